"""Request latency: newcomers each ask for a room's three state sessions at once, from sending the
request to the forwarded key arriving, first with the bot idle (the baseline) and then while it
pushes a restricted room's keys to 1,000 fresh devices in another room. The bot runs as in
production: maubot standalone, its own process."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import statistics
import time

from aiohttp import ClientSession

from harness.botproc import BotProcess
from harness.client import TestUser, eventually
from harness.synapse import Synapse

from .population import Population
from .report import Report, proc_cpu_seconds, proc_rss_mb

NEWCOMERS = 50


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


BATCH_LINE = re.compile(r"Batch of \d+ item\(s\) \[([a-z/]+)\]: .*\(([\d.]+) s: (.*)\)$")


def answer_phases(log: str, lane: str = "request") -> str:
    """From the bot's batch log lines of one lane: each phase's median and 95th percentile
    (milliseconds; a phase a batch did not go through counts 0 for it)."""
    batches: list[dict[str, float]] = []
    for line in log.splitlines():
        match = BATCH_LINE.search(line)
        if match is None or match.group(1) != lane:
            continue
        phases = {"total": 1000 * float(match.group(2))}
        for part in filter(None, match.group(3).split(", ")):
            name, _, ms = part.rpartition(" ")[0].rpartition(" ")
            phases[name] = float(ms)
        batches.append(phases)
    if not batches:
        return "no batches logged"
    names = list(dict.fromkeys(n for b in batches for n in b))
    return f"{len(batches)} batches: " + ", ".join(
        f"{n} {percentile([b.get(n, 0.0) for b in batches], 50):.0f}"
        f"/{percentile([b.get(n, 0.0) for b in batches], 95):.0f} ms"
        for n in names
    )


def answer_times(bot: BotProcess, room_id: str, since: float) -> list[float]:
    """The bot's own answer times (request queued -> answer sent) from its audit."""
    path = bot.database.removeprefix("sqlite:")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as conn:
        rows = conn.execute(
            "SELECT waited_ms FROM encstate_audit WHERE room_id=? AND trigger='request' "
            "AND waited_ms IS NOT NULL AND ts >= ?",
            (room_id, int(since * 1000)),
        ).fetchall()
    return [float(r[0]) for r in rows]


def delivered(bot: BotProcess, room_id: str) -> int:
    path = bot.database.removeprefix("sqlite:")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as conn:
        return conn.execute(
            "SELECT COUNT(*) FROM encstate_delivered WHERE room_id=?", (room_id,)
        ).fetchone()[0]


async def ask_all(
    newcomers: list[TestUser], room_id: str, sessions: list[str], bot: BotProcess
) -> tuple[list[float], list[float]]:
    """Every newcomer asks for every session at once. Returns latencies in ms, counted from
    when each request was sent and from when the homeserver accepted it (its PUT returned):
    the first includes the homeserver working through the burst of requests itself."""
    sent_at: dict[tuple[str, str], float] = {}
    accepted_at: dict[tuple[str, str], float] = {}
    marks = {id(u): len(u.forwarded) for u in newcomers}

    async def ask(user: TestUser, session_id: str) -> None:
        sent_at[(user.user_id, session_id)] = time.time()
        await user.request_key(room_id, session_id, bot.user_id, [bot.device_id])
        accepted_at[(user.user_id, session_id)] = time.time()

    await asyncio.gather(*(ask(u, s) for u in newcomers for s in sessions))

    def arrived() -> bool:
        return all(
            {f["session_id"] for f in u.forwarded[marks[id(u)] :]} >= set(sessions)
            for u in newcomers
        )

    await eventually(arrived, timeout=120, interval=0.05)
    from_sent, from_accepted = [], []
    for user in newcomers:
        for forwarded in user.forwarded[marks[id(user)] :]:
            key = (user.user_id, forwarded["session_id"])
            if key in sent_at:
                from_sent.append((forwarded["at"] - sent_at.pop(key)) * 1000)
                from_accepted.append(max(0.0, forwarded["at"] - accepted_at.pop(key)) * 1000)
    return from_sent, from_accepted


async def run(
    synapse: Synapse, http: ClientSession, workdir: str, report: Report, quick: bool
) -> None:
    fanout_users = 50 if quick else 500
    newcomer_count = 10 if quick else NEWCOMERS
    loop = asyncio.get_running_loop()
    bot_user = await loop.run_in_executor(None, synapse.register, "latency-bot")
    token, device_id = await loop.run_in_executor(None, synapse.login, bot_user)
    bot = BotProcess(
        synapse,
        bot_user,
        token,
        device_id,
        plugin_config={"push_on_join": False},
        workdir=os.path.join(workdir, "latency-bot"),
        log_level="INFO",
    )
    os.makedirs(bot.workdir, exist_ok=True)
    bot.start()
    users: list[TestUser] = []
    try:
        await bot.wait_ready()
        admin = await TestUser.create(synapse, "latency-admin", http)
        users.append(admin)

        async def joined(room_id: str) -> bool:
            return bot_user in await admin.joined_members(room_id)

        # The room newcomers ask about.
        room = await admin.create_room(
            invite=[bot_user], power={bot_user: 50}, join_rule={"join_rule": "public"}
        )
        await eventually(lambda: joined(room), timeout=30)
        # This room measures answers to requests for the admin's own state sessions: no seals
        # here (they would supersede what the newcomers ask for). The restricted room below
        # keeps sealing on: its members-to-be get its preview seals.
        await bot.wait_for_log(f"Read back \\d+ timeline event\\(s\\) of {room}", timeout=30)
        await admin.command(room, "!encstate seal off", bot_user)
        sessions = []
        for event_type, content in (
            ("m.room.name", {"name": "Latency"}),
            ("m.room.topic", {"topic": "asked for"}),
            ("m.room.avatar", {"url": "mxc://bench/a"}),
        ):
            await admin.new_session(room)
            sessions.append((await admin.send_state(room, event_type, "", content)).session_id)

        # The restricted room whose keys go to a big room's members, and that big room.
        space = await admin.create_room(
            invite=[bot_user], encrypted=False, join_rule={"join_rule": "public"}
        )
        await eventually(lambda: joined(space), timeout=30)
        restricted = await admin.create_room(
            invite=[bot_user],
            power={bot_user: 50},
            join_rule={"join_rule": "restricted", "allow": []},
        )
        await eventually(lambda: joined(restricted), timeout=30)
        for event_type in ("m.room.name", "m.room.topic", "m.room.avatar"):
            await admin.new_session(restricted)
            await admin.send_state(restricted, event_type, "", {"name": "x", "topic": "y"})
        for event_type in ("m.room.name", "m.room.topic", "m.room.avatar"):
            await bot.wait_for_log(f"Sealed {event_type} '' of {restricted}", timeout=60)
        pop = Population(synapse, http)
        crowd = await pop.users("crowd", fanout_users, devices=2, one_time_keys=5)
        await pop.join(space, crowd)

        newcomers = await asyncio.gather(
            *(
                TestUser.create(synapse, f"newcomer{i}-{os.getpid()}", http)
                for i in range(newcomer_count)
            )
        )
        singles = await asyncio.gather(
            *(TestUser.create(synapse, f"single{i}-{os.getpid()}", http) for i in range(10))
        )
        users += newcomers + singles
        await asyncio.gather(*(u.join(room) for u in newcomers + singles))
        await asyncio.sleep(2)

        idle_started = time.time()
        idle_log = len(bot.log_text())
        idle_sent, idle = await ask_all(newcomers, room, sessions, bot)
        idle_bot = answer_times(bot, room, idle_started)
        idle_phases = answer_phases(bot.log_text()[idle_log:])
        await asyncio.sleep(6)  # past the duplicate window
        alone = []
        for user in newcomers[:20]:  # one request at a time, nothing else going on
            _, accepted = await ask_all([user], room, sessions[:1], bot)
            alone += accepted
        await asyncio.sleep(6)

        devices = fanout_users * 2
        cpu0 = proc_cpu_seconds(bot.proc.pid)
        started = time.monotonic()
        await admin.put_state(
            restricted,
            "m.room.join_rules",
            "",
            {
                "join_rule": "restricted",
                "allow": [{"type": "m.room_membership", "room_id": space}],
            },
        )
        await bot.wait_for_log(f"{space} admits into {restricted}", timeout=60)
        busy_started = time.time()
        busy_log = len(bot.log_text())
        busy_sent, busy = await ask_all(newcomers, room, sessions, bot)
        busy_bot = answer_times(bot, room, busy_started)
        busy_phases = answer_phases(bot.log_text()[busy_log:])
        # Then one newcomer asking at a time while the push goes on (newcomers who did not
        # ask before): from the homeserver accepting the request to the key arriving.
        single: list[float] = []
        for user in singles:
            if delivered(bot, restricted) >= devices * 3:
                break
            _, accepted = await ask_all([user], room, sessions[:1], bot)
            single += accepted
        single_during = delivered(bot, restricted) < devices * 3
        pushed_during = delivered(bot, restricted)
        await eventually(lambda: delivered(bot, restricted) >= devices * 3, timeout=300)
        fanout_wall = time.monotonic() - started
        fanout_cpu = proc_cpu_seconds(bot.proc.pid) - cpu0
        rss = proc_rss_mb(bot.proc.pid, "VmHWM")
    finally:
        for user in users:
            await user.stop()
        bot.stop()

    report.row(
        f"request latency, {len(busy)} requests from {newcomer_count} newcomers at once "
        "(from sending each)",
        f"p50 {percentile(busy_sent, 50):.0f} ms, p95 {percentile(busy_sent, 95):.0f} ms "
        f"during a {devices}-device push",
        f"p50 {percentile(idle_sent, 50):.0f} ms, p95 {percentile(idle_sent, 95):.0f} ms, "
        "bot idle",
        "p50 <= 50 ms, p95 <= 250 ms",
    )
    report.row(
        "  the same, from the homeserver accepting each",
        f"p50 {percentile(busy, 50):.0f} ms, p95 {percentile(busy, 95):.0f} ms",
        f"p50 {percentile(idle, 50):.0f} ms, p95 {percentile(idle, 95):.0f} ms",
    )
    report.row(
        "  the bot's own answer time (request received -> answer sent)",
        f"p50 {percentile(busy_bot, 50):.0f} ms, p95 {percentile(busy_bot, 95):.0f} ms",
        f"p50 {percentile(idle_bot, 50):.0f} ms, p95 {percentile(idle_bot, 95):.0f} ms",
    )
    report.row(
        "  one request at a time, bot idle (from accepted)",
        "",
        f"p50 {percentile(alone, 50):.0f} ms, p95 {percentile(alone, 95):.0f} ms",
    )
    report.row(
        f"one newcomer asking at a time during a {devices}-device push ({len(single)} asks, "
        "from accepted)",
        f"p50 {percentile(single, 50):.0f} ms, p95 {percentile(single, 95):.0f} ms"
        + ("" if single_during else " (the push ended during the last)"),
        f"p50 {percentile(alone, 50):.0f} ms idle",
        "p50 <= 100 ms",
    )
    report.note(
        f"latency: the concurrent push reached {devices} devices x 3 sessions in "
        f"{fanout_wall:.2f} s ({fanout_cpu:.2f} s bot CPU, peak RSS {rss:.0f} MB); "
        f"{pushed_during} keys were out when the last newcomer was served; mean "
        f"{statistics.mean(busy):.0f} ms"
    )
    report.note(
        "latency: where the answers' time went (request batches, median / 95th percentile): "
        f"during the push {busy_phases}; bot idle {idle_phases}"
    )
    report.result("request_latency_p50_ms", percentile(busy_sent, 50))
    report.result("request_latency_p95_ms", percentile(busy_sent, 95))
    report.result("request_latency_idle_p50_ms", percentile(idle_sent, 50))
    report.result("request_latency_idle_p95_ms", percentile(idle_sent, 95))
    report.result("request_latency_from_accept_p50_ms", percentile(busy, 50))
    report.result("request_latency_from_accept_p95_ms", percentile(busy, 95))
    report.result("request_latency_alone_p50_ms", percentile(alone, 50))
    report.result("request_answer_p50_ms", percentile(busy_bot, 50))
    report.result("request_answer_p95_ms", percentile(busy_bot, 95))
    # issue 15's restatement: what the bot controls
    report.result("request_latency_bot_p95_ms", percentile(busy_bot, 95))
    report.result("request_single_p50_ms", percentile(single, 50))
    report.result("request_single_idle_p50_ms", percentile(alone, 50))
