"""Scale (`python -m bench --scale`): one bot serving a whole community.

- many rooms: the bot in 1,000 state-encrypted rooms (10 members, 5 values each, sealed),
  restarted: time to ready beside the time to fetch every room's state once, RSS when ready,
  and the events it ingests per second of its CPU while members post;
- a join storm: 5,000 space members each join one of the space's 20 restricted rooms, with the
  bot's process stopped meanwhile so the storm reaches it as one backlog; devices holding every
  seal they may read per second, and a newcomer's answer time in another room meanwhile;
- one huge room: 20,000 devices (5,000 users with 4 devices each), a value sealed for them with
  no Olm session yet, then the next value, beside the homeserver's own fan-out of a plain
  to-device message to the same devices.

The bot of the first two runs as in production (maubot standalone, its own process, SQLite);
the huge room's bot runs in this process, as `bench/seal.py`'s does, so the sealer is timed
directly. Fixtures are built once per run with bulk calls (`bench/bulk.py`) and reused.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from typing import Any
import uuid

from aiohttp import ClientSession
import olm

from harness.botproc import BotProcess
from harness.synapse import Synapse

from .bulk import Bulk, Stopwatch, bounded
from .fanout import Room
from .inproc import InProcessBot
from .latency import answer_phases, percentile
from .megolm import StateSession
from .population import Device, Population
from .report import (
    Report,
    Timer,
    peak_rss_mb,
    proc_cpu_seconds,
    proc_rss_mb,
    reset_peak_rss,
    rss_mb,
)
from .seal import seal_on, sealing_bot


@dataclass(frozen=True)
class Sizes:
    rooms: int = 1000
    members: int = 10  # per room, the admin and the bot included
    pool: int = 200  # the users the rooms' other members are drawn from
    posts: int = 5000  # events posted while the rooms are busy
    storm_users: int = 5000
    storm_rooms: int = 20
    askers: int = 20
    huge_devices_per_user: int = 4


FULL = Sizes()
QUICK = Sizes(rooms=100, pool=40, posts=1000, storm_users=500, storm_rooms=5, askers=10)


def _db(bot: BotProcess) -> sqlite3.Connection:
    path = bot.database.removeprefix("sqlite:")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)


def query(bot: BotProcess, sql: str, *args: Any) -> list[tuple]:
    with _db(bot) as conn:
        return conn.execute(sql, args).fetchall()


async def until(check, timeout: float, interval: float = 0.25, what: str = "") -> float:
    """Poll ``check`` (sync, run in a thread) until true; seconds it took."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    while not await loop.run_in_executor(None, check):
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not within {timeout} s: {what}")
        await asyncio.sleep(interval)
    return time.monotonic() - started


async def healthy(http: ClientSession, bot: BotProcess) -> bool:
    try:
        async with http.get(f"{bot.web_url}/health") as resp:
            return resp.status == 200 and (await resp.json()).get("ready") is True
    except OSError:
        return False


def key_request(asker: Device, room_id: str, sender_key: str, session_id: str) -> dict:
    return {
        "action": "request",
        "body": {
            "algorithm": "m.megolm.v1.aes-sha2",
            "room_id": room_id,
            "sender_key": sender_key,
            "session_id": session_id,
        },
        "request_id": uuid.uuid4().hex,
        "requesting_device_id": asker.device_id,
    }


async def ask(
    pop: Population, asker: Device, bot_user: str, bot_device: str, room_id: str, session: Any
) -> None:
    sender_key, session_id = session
    await pop._call(
        "PUT",
        f"/_matrix/client/v3/sendToDevice/m.room_key_request/{uuid.uuid4().hex}",
        asker.token,
        {
            "messages": {
                bot_user: {bot_device: key_request(asker, room_id, sender_key, session_id)}
            }
        },
    )


def timeline_message(session: olm.OutboundGroupSession, sender: Device, room_id: str, n: int):
    ciphertext = session.encrypt(
        json.dumps(
            {
                "type": "m.room.message",
                "content": {"msgtype": "m.text", "body": f"m{n}"},
                "room_id": room_id,
            }
        )
    )
    return {
        "algorithm": "m.megolm.v1.aes-sha2",
        "sender_key": sender.curve25519,
        "device_id": sender.device_id,
        "session_id": session.id,
        "ciphertext": ciphertext,
    }


class Community:
    """The fixtures, built once: an admin, the bot's account and device (its crypto store
    holding every room's state sessions), the rooms, their members, the storm's users."""

    def __init__(self, synapse: Synapse, http: ClientSession, workdir: str, sizes: Sizes) -> None:
        self.synapse = synapse
        self.http = http
        self.workdir = workdir
        self.sizes = sizes
        self.pop = Population(synapse, http)
        self.bulk = Bulk(self.pop)
        self.watch = Stopwatch()
        self.rooms: list[tuple[str, list[StateSession]]] = []
        self.members: dict[str, list[Device]] = {}  # room -> its members' devices (not admin)

    async def build_admin(self) -> None:
        (self.admin,) = (await self.bulk.users("scale-admin", 1, one_time_keys=20))[0]

    async def build_rooms(self) -> None:
        s = self.sizes
        loop = asyncio.get_running_loop()
        self.bot_user = await loop.run_in_executor(None, self.synapse.register, "scale-bot")
        self.pool = [u[0] for u in await self.bulk.users("member", s.pool)]
        self.watch.lap(f"{s.pool + 1} users")
        self.rooms = await bounded(
            range(s.rooms),
            lambda i: self.bulk.state_room(self.admin, self.bot_user, i),
        )
        self.watch.lap(f"{s.rooms} rooms with 5 encrypted values each")
        # the bot's device: its crypto store gets every state session, as if each room key
        # had reached it; the bot process runs on that database
        self.keys = InProcessBot(self.synapse, self.http, self.workdir, "scale-bot")
        self.keys.pickle_key = "encstate-test"  # harness.botproc's

        async def hold(crypto) -> None:
            for _, sessions in self.rooms:
                for session in sessions:
                    await session.give_to(crypto)

        await self.keys.start(user_id=self.bot_user, before_plugin=hold, plugin=False)
        await self.keys.stop()
        others = s.members - 2
        pairs = [(room_id, self.keys.token) for room_id, _ in self.rooms]
        await bounded(
            pairs,
            lambda p: self.pop._call("POST", f"/_matrix/client/v3/join/{p[0]}", p[1], {}),
        )
        joins = []
        for i, (room_id, _) in enumerate(self.rooms):
            picked = [self.pool[(i * others + k) % len(self.pool)] for k in range(others)]
            self.members[room_id] = picked
            joins += [(room_id, d) for d in picked]
        await self.bulk.joins(joins)
        self.watch.lap(f"{len(joins) + len(pairs)} joins")

    def bot(self, name: str, config: dict[str, Any] | None = None) -> BotProcess:
        workdir = os.path.join(self.workdir, name)
        os.makedirs(workdir, exist_ok=True)
        return BotProcess(
            self.synapse,
            self.bot_user,
            self.keys.token,
            self.keys.device_id,
            database=f"sqlite:{self.keys.path}",
            plugin_config={
                "seal": {"enabled": True},
                "push_on_join": True,
                "self_supply": {"enabled": False},
                **(config or {}),
            },
            workdir=workdir,
            log_level="INFO",
            ignore_first_sync=False,
        )


def sealed_values(bot: BotProcess) -> int:
    return query(bot, "SELECT COUNT(*) FROM encstate_seal WHERE event_id IS NOT NULL")[0][0]


async def fetch_all_state(c: Community, width: int) -> float:
    started = time.monotonic()
    await bounded(
        c.rooms,
        lambda r: c.pop._call("GET", f"/_matrix/client/v3/rooms/{r[0]}/state", c.admin.token),
        width=width,
    )
    return time.monotonic() - started


async def many_rooms(c: Community, bot: BotProcess, report: Report) -> None:
    s = c.sizes
    # First start: every room rescanned for the first time and sealed (5 values each).
    with Timer() as first:
        bot.start()
        await bot.wait_ready(timeout=1800)
        await until(lambda: sealed_values(bot) >= 5 * s.rooms, 3600, 1.0, "every value sealed")
    report.note(
        f"scale: first start in {s.rooms} rooms, every value sealed: {first.wall:.0f} s "
        f"(fixtures: {c.watch.text()})"
    )
    await asyncio.sleep(3)  # the seals' own events come back through sync
    bot.stop()

    # The request a member sends while the bot is down: answered once it is ready.
    room_id, sessions = c.rooms[0]
    asker = c.members[room_id][0]
    seal_session = query(
        bot,
        "SELECT session_id FROM encstate_seal WHERE room_id=? AND outer_key='m.room.name:'",
        room_id,
    )[0][0]
    since = int(time.time() * 1000)
    await ask(
        c.pop,
        asker,
        c.bot_user,
        c.keys.device_id,
        room_id,
        (await bot_curve25519(c), seal_session),
    )

    def answered() -> bool:
        return bool(
            query(
                bot,
                "SELECT 1 FROM encstate_audit WHERE trigger='request' AND decision='share' "
                "AND user_id=? AND ts>=?",
                asker.user_id,
                since,
            )
        )

    started = time.monotonic()
    bot.start()
    ready = False
    while True:
        ready = ready or await healthy(c.http, bot)
        if ready and await asyncio.get_running_loop().run_in_executor(None, answered):
            break
        if time.monotonic() - started > 1800 or not bot.running:
            raise RuntimeError(f"not ready after a restart:\n{bot.tail()}")
        await asyncio.sleep(0.1)
    ready_s = time.monotonic() - started
    rss = proc_rss_mb(bot.proc.pid)
    plugin_started = plugin_start_offset(bot)
    await bot.wait_ready(timeout=60)

    # Baseline: every room's state fetched once, 8 at a time (the bot's concurrency) and one
    # after the other.
    fetch_s = await fetch_all_state(c, 8)
    fetch_seq_s = await fetch_all_state(c, 1)
    report.row(
        f"restart to ready, {s.rooms} rooms x 5 sealed values (first request answered)",
        f"{ready_s:.1f} s (maubot's own start {plugin_started:.1f} s of it)",
        f"{fetch_s:.1f} s to fetch every room's state, 8 at once ({fetch_seq_s:.1f} s one by one)",
        "<= 2x",
    )
    report.row(f"RSS when ready, {s.rooms} rooms", f"{rss:.0f} MB", "", "<= 300 MB")
    report.result(f"scale_rooms{s.rooms}_ready_s", ready_s)
    report.result(f"scale_rooms{s.rooms}_fetch_s", fetch_s)
    report.result(f"scale_rooms{s.rooms}_fetch_sequential_s", fetch_seq_s)
    report.result(f"scale_rooms{s.rooms}_ready_ratio", ready_s / fetch_s)
    report.result(f"scale_rooms{s.rooms}_rss_mb", rss)
    await busy_rooms(c, bot, report)


async def bot_curve25519(c: Community) -> str:
    keys = await c.pop._call(
        "POST",
        "/_matrix/client/v3/keys/query",
        c.admin.token,
        {"device_keys": {c.bot_user: [c.keys.device_id]}},
    )
    return keys["device_keys"][c.bot_user][c.keys.device_id]["keys"][
        f"curve25519:{c.keys.device_id}"
    ]


def plugin_start_offset(bot: BotProcess) -> float:
    """Seconds from the process start (its first log line) to encstate's first line."""
    stamps = []
    for line in bot.log_text().splitlines():
        if line.startswith("[") and "]" in line:
            stamps.append((line[1 : line.index("]")], line))
    if not stamps:
        return float("nan")
    from datetime import datetime

    def at(stamp: str) -> float:
        return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()

    first = at(stamps[0][0])
    for stamp, line in stamps:
        if "encstate" in line.lower() and "maubot.loader" not in line:
            return at(stamp) - first
    return float("nan")


async def busy_rooms(c: Community, bot: BotProcess, report: Report) -> None:
    """Members post encrypted messages in every room (and a tenth as many plain state events:
    display names); the bot's CPU per ingested event, beside Synapse's for the same events."""
    s = c.sizes
    before = query(bot, "SELECT COUNT(*) FROM encstate_message")[0][0]
    outbound: dict[tuple[str, str], olm.OutboundGroupSession] = {}
    jobs = []
    for n in range(s.posts):
        room_id, _ = c.rooms[n % len(c.rooms)]
        sender = c.members[room_id][(n // len(c.rooms)) % len(c.members[room_id])]
        jobs.append((n, room_id, sender))
    state_jobs = [(n, c.rooms[n % len(c.rooms)][0]) for n in range(s.posts // 10)]

    async def post(job) -> None:
        n, room_id, sender = job
        key = (room_id, sender.device_id)
        if key not in outbound:
            outbound[key] = olm.OutboundGroupSession()
        await c.pop._call(
            "PUT",
            f"/_matrix/client/v3/rooms/{room_id}/send/m.room.encrypted/{uuid.uuid4().hex}",
            sender.token,
            timeline_message(outbound[key], sender, room_id, n),
        )

    async def plain_state(job) -> None:
        n, room_id = job
        await c.pop._call(
            "PUT",
            f"/_matrix/client/v3/rooms/{room_id}/state/org.encstate.bench.plain/{n}",
            c.admin.token,
            {"n": n},
        )

    synapse_pid = c.synapse.proc.pid
    spy = profiler(bot.proc.pid, "busy-rooms")
    cpu0, hs0 = proc_cpu_seconds(bot.proc.pid), proc_cpu_seconds(synapse_pid)
    started = time.monotonic()
    await asyncio.gather(bounded(jobs, post), bounded(state_jobs, plain_state, width=4))
    posted = time.monotonic() - started
    await until(
        lambda: query(bot, "SELECT COUNT(*) FROM encstate_message")[0][0] >= before + s.posts,
        600,
        0.5,
        "every message ingested",
    )
    bot_cpu = proc_cpu_seconds(bot.proc.pid) - cpu0
    hs_cpu = proc_cpu_seconds(synapse_pid) - hs0
    profile_note(spy, "busy-rooms", report)
    renamed = len(state_jobs)
    events = s.posts + renamed
    report.row(
        f"busy rooms: {s.posts} encrypted messages and {renamed} plain state events ingested",
        f"{events / bot_cpu:.0f} events per CPU second ({bot_cpu:.1f} s CPU)",
        f"{events / hs_cpu:.0f} per Synapse CPU second ({hs_cpu:.1f} s), posted in {posted:.0f} s",
        ">= 2000/s",
    )
    report.result("scale_sync_events_per_s", events / bot_cpu)
    report.result("scale_sync_synapse_events_per_s", events / hs_cpu)


def spy_out(scenario: str) -> str:
    return f"/tmp/encstate-{scenario}.pyspy"


def profiler(pid: int, scenario: str) -> subprocess.Popen | None:
    """With ENCSTATE_BENCH_PYSPY=1 (and py-spy installed), sample the bot process during a
    scenario: the report names the functions its CPU went to."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.environ.get("ENCSTATE_BENCH_PYSPY") or not os.path.exists(spy):
        return None
    out = spy_out(scenario)
    return subprocess.Popen(
        [spy, "record", "-p", str(pid), "-o", out, "-f", "raw", "-r", "200", "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def profile_note(spy: subprocess.Popen | None, scenario: str, report: Report) -> None:
    if spy is None:
        return
    spy.send_signal(signal.SIGINT)
    spy.wait(timeout=60)
    report.note(f"{scenario}, where the bot's CPU went (py-spy): {top_frames(spy_out(scenario))}")


def top_frames(path: str, count: int = 8) -> str:
    """From py-spy's collapsed stacks: the leaf frames holding the most samples (self time),
    then the functions of encstate, mautrix, maubot and the database driver holding the most
    samples anywhere on the stack (inclusive), each as a share of all samples."""
    leaf: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    with open(path) as fh:
        for line in fh:
            stack, _, n = line.rstrip().rpartition(" ")
            samples = int(n)
            total += samples
            frames = [_frame(f) for f in stack.split(";")]
            leaf[frames[-1]] = leaf.get(frames[-1], 0) + samples
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + samples
    ours = ("encstate_bot/", "mautrix/", "maubot/", "aiosqlite/", "asyncpg/")

    def share(items) -> str:
        return ", ".join(f"{k} {100 * v / max(total, 1):.0f}%" for k, v in items)

    top_leaf = sorted(leaf.items(), key=lambda kv: -kv[1])[:count]
    top_ours = [
        kv for kv in sorted(inclusive.items(), key=lambda kv: -kv[1]) if kv[0].startswith(ours)
    ]
    return f"self: {share(top_leaf)}; inclusive: {share(top_ours[:count])}"


def _frame(frame: str) -> str:
    name = frame.split(" (")[0]
    where = frame[frame.find("(") + 1 : frame.find(")")].split(":")[0]
    return f"{'/'.join(where.split('/')[-2:])} {name}"


async def storm(c: Community, bot: BotProcess, report: Report) -> None:
    """5,000 space members each join one of its 20 restricted rooms while the bot's process
    is stopped (SIGSTOP): the storm reaches it as one backlog, as after a slow sync."""
    s = c.sizes
    watch = Stopwatch()
    space = await c.pop._call(
        "POST",
        "/_matrix/client/v3/createRoom",
        c.admin.token,
        {"preset": "public_chat", "creation_content": {"type": "m.space"}},
    )
    space_id = space["room_id"]
    restricted = {
        "join_rule": "restricted",
        "allow": [{"type": "m.room_membership", "room_id": space_id}],
    }
    rooms = await bounded(
        range(s.storm_rooms),
        lambda i: c.bulk.state_room(c.admin, c.bot_user, 10_000 + i, join_rule=restricted),
    )
    # the newcomers' room: the bot cannot send state there (no seals), so it answers
    # requests for the admin's own state sessions
    ask_room, ask_sessions = await c.bulk.state_room(
        c.admin, c.bot_user, 20_000, join_rule={"join_rule": "public"}, state_default=100
    )
    for room_id, _ in [*rooms, (ask_room, ask_sessions)]:
        await c.pop._call("POST", f"/_matrix/client/v3/join/{room_id}", c.keys.token, {})
    askers = [u[0] for u in await c.bulk.users("asker", s.askers)]
    await c.bulk.join(ask_room, [[a] for a in askers])
    storm_users = await c.bulk.users("storm", s.storm_users)
    await c.bulk.join(space_id, storm_users)
    watch.lap(f"{s.storm_users} users in the space")
    # the bot gets the rooms' keys (the admin's room keys, as to-device Olm would) and seals
    for room_id, sessions in [*rooms, (ask_room, ask_sessions)]:
        await give_keys(c, bot, room_id, sessions)
    await until(
        lambda: sealed_values(bot) >= 5 * (s.rooms + s.storm_rooms),
        900,
        0.5,
        "the storm rooms sealed",
    )
    watch.lap("rooms sealed")
    storm_rooms = [r for r, _ in rooms]
    seal_counts = {
        r: n
        for r, n in query(
            bot,
            "SELECT room_id, COUNT(*) FROM encstate_seal WHERE event_id IS NOT NULL "
            f"AND room_id IN ({','.join('?' * len(storm_rooms))}) GROUP BY room_id",
            *storm_rooms,
        )
    }
    await asyncio.sleep(2)
    since = int(time.time() * 1000)

    log_from = len(bot.log_text())
    os.killpg(bot.proc.pid, signal.SIGSTOP)
    try:
        joins = [(storm_rooms[i % len(storm_rooms)], u[0]) for i, u in enumerate(storm_users)]
        with Timer() as joined:
            await c.bulk.joins(joins)
    finally:
        os.killpg(bot.proc.pid, signal.SIGCONT)
    started = time.monotonic()
    cpu0 = proc_cpu_seconds(bot.proc.pid)
    placeholders = ",".join("?" * len(storm_rooms))
    need = sum(seal_counts[r] for r, _ in joins)

    def served() -> int:
        return query(
            bot,
            f"SELECT COUNT(*) FROM encstate_delivered WHERE room_id IN ({placeholders}) "
            "AND ts >= ?",
            *storm_rooms,
            since,
        )[0][0]

    # newcomers ask for the ask room's sessions meanwhile, one request every 100 ms
    requests = [(a, (c.admin.curve25519, sess.id)) for sess in ask_sessions for a in askers]
    timeline: list[tuple[float, int]] = []
    usage: list[tuple[float, float]] = []

    async def asking() -> None:
        for asker, session in requests:
            await ask(c.pop, asker, c.bot_user, c.keys.device_id, ask_room, session)
            await asyncio.sleep(0.1)

    asks = asyncio.create_task(asking())
    spy = profiler(bot.proc.pid, "storm")
    loop = asyncio.get_running_loop()
    synapse_pid = c.synapse.proc.pid
    hs0 = proc_cpu_seconds(synapse_pid)
    while True:
        got = await loop.run_in_executor(None, served)
        timeline.append((time.monotonic() - started, got))
        usage.append((proc_cpu_seconds(bot.proc.pid) - cpu0, proc_cpu_seconds(synapse_pid) - hs0))
        if got >= need:
            break
        if time.monotonic() - started > 1800:
            raise TimeoutError(f"storm: {got} of {need} keys after 30 min")
        await asyncio.sleep(STORM_POLL_SECONDS)
    wall = time.monotonic() - started
    cpu = proc_cpu_seconds(bot.proc.pid) - cpu0
    profile_note(spy, "storm", report)
    await asks
    await asyncio.sleep(2)
    waited = [
        float(r[0])
        for r in query(
            bot,
            "SELECT waited_ms FROM encstate_audit WHERE room_id=? AND trigger='request' "
            "AND waited_ms IS NOT NULL AND ts >= ?",
            ask_room,
            since,
        )
    ]
    devices_per_s = len(storm_users) / wall
    # sustained: the rate between 10% and 90% of the keys
    t10 = next(t for t, n in timeline if n >= need * 0.1)
    t90 = next(t for t, n in timeline if n >= need * 0.9)
    # (at least one poll apart: a small storm can go from 10% to 90% between two polls, and
    # then this is a lower bound)
    sustained = 0.8 * len(storm_users) / max(t90 - t10, STORM_POLL_SECONDS)
    report.row(
        f"join storm: {len(storm_users)} users join {len(storm_rooms)} restricted rooms, "
        "every seal they may read",
        f"{devices_per_s:.0f} devices/s ({wall:.1f} s, {cpu:.1f} s bot CPU; "
        f"{sustained:.0f}/s from 10% to 90%)",
        f"the homeserver took the {len(joins)} joins at {len(joins) / joined.wall:.0f}/s",
        ">= 500/s",
    )
    report.row(
        f"  a newcomer asking in another room meanwhile ({len(waited)} answers), bot's own time",
        f"p50 {percentile(waited, 50):.0f} ms, p95 {percentile(waited, 95):.0f} ms",
        "",
        "p95 <= 100 ms",
    )
    report.note(f"storm timeline: {storm_timeline(timeline, usage, need)}")
    report.note(
        "where a newcomer's answer went during the storm (request batches, "
        f"median / 95th percentile): {answer_phases(bot.log_text()[log_from:])}"
    )
    report.note(f"storm fixtures: {watch.text()}")
    report.note(f"the bot's database after the storm: {table_sizes(bot)}")
    report.result("storm_devices_per_s", devices_per_s)
    report.result("storm_devices_per_s_sustained", sustained)
    report.result("storm_homeserver_joins_per_s", len(joins) / joined.wall)
    report.result("storm_request_p50_ms", percentile(waited, 50))
    report.result("storm_request_p95_ms", percentile(waited, 95))
    c.storm_users = storm_users


STORM_POLL_SECONDS = 0.5  # how often the storm's progress is read from the bot's database


def storm_timeline(
    timeline: list[tuple[float, int]], usage: list[tuple[float, float]], need: int
) -> str:
    """Each tenth of the storm's keys: when it was reached, and the share of one core the bot
    and the homeserver used meanwhile. A tenth where the bot is near 100% is bound by the
    bot's CPU; one where neither is, by waiting (a sync, a homeserver call)."""
    parts = []
    last_t, last_cpu = 0.0, (0.0, 0.0)
    for tenth in range(1, 11):
        at = next(i for i, (_, n) in enumerate(timeline) if n >= need * tenth / 10)
        t, (bot, hs) = timeline[at][0], usage[at]
        span = max(t - last_t, 1e-6)
        parts.append(
            f"{tenth * 10}% at {t:.1f} s (bot {100 * (bot - last_cpu[0]) / span:.0f}%, "
            f"homeserver {100 * (hs - last_cpu[1]) / span:.0f}%)"
        )
        last_t, last_cpu = t, (bot, hs)
    first = next((t for t, n in timeline if n > 0), timeline[-1][0])
    return f"first key at {first:.1f} s; " + "; ".join(parts)


def table_sizes(bot: BotProcess) -> str:
    """Rows and bytes (tables with their indexes) of encstate's tables, for the cost model."""
    pages = dict(query(bot, "SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"))
    indexes = query(bot, "SELECT name, tbl_name FROM sqlite_master WHERE type='index'")
    out = []
    for (table,) in query(
        bot, "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE 'encstate_%'"
    ):
        size = pages.get(table, 0) + sum(pages.get(i, 0) for i, t in indexes if t == table)
        rows = query(bot, f"SELECT COUNT(*) FROM {table}")[0][0]
        out.append(f"{table.removeprefix('encstate_')} {rows} rows {size / 1024:.0f} KiB")
    return "; ".join(out)


async def give_keys(c: Community, bot: BotProcess, room_id: str, sessions: list[StateSession]):
    """The admin sends the room's state sessions to the bot's device as m.room_key over Olm,
    as its client would (one-time key claimed, the bot's device keys from the server)."""
    keys = await c.pop._call(
        "POST",
        "/_matrix/client/v3/keys/query",
        c.admin.token,
        {"device_keys": {c.bot_user: [c.keys.device_id]}},
    )
    device = keys["device_keys"][c.bot_user][c.keys.device_id]
    curve = device["keys"][f"curve25519:{c.keys.device_id}"]
    ed = device["keys"][f"ed25519:{c.keys.device_id}"]
    claimed = await c.pop._call(
        "POST",
        "/_matrix/client/v3/keys/claim",
        c.admin.token,
        {"one_time_keys": {c.bot_user: {c.keys.device_id: "signed_curve25519"}}},
    )
    otk = next(iter(claimed["one_time_keys"][c.bot_user][c.keys.device_id].values()))["key"]
    session = olm.OutboundSession(c.admin.account, curve, otk)
    messages = []
    for state in sessions:
        payload = {
            "type": "m.room_key",
            "content": {
                "algorithm": "m.megolm.v1.aes-sha2",
                "room_id": room_id,
                "session_id": state.id,
                "session_key": state.session_key,
            },
            "sender": c.admin.user_id,
            "sender_device": c.admin.device_id,
            "keys": {"ed25519": c.admin.account.identity_keys["ed25519"]},
            "recipient": c.bot_user,
            "recipient_keys": {"ed25519": ed},
        }
        message = session.encrypt(json.dumps(payload))
        messages.append(
            {
                "algorithm": "m.olm.v1.curve25519-aes-sha2",
                "sender_key": c.admin.curve25519,
                "ciphertext": {curve: {"type": message.message_type, "body": message.ciphertext}},
            }
        )
    for content in messages:
        await c.pop._call(
            "PUT",
            f"/_matrix/client/v3/sendToDevice/m.room.encrypted/{uuid.uuid4().hex}",
            c.admin.token,
            {"messages": {c.bot_user: {c.keys.device_id: content}}},
        )


async def homeserver_fanout(c: Community, devices: list[Device]) -> float:
    """The homeserver's floor: a small plain to-device message to every device, 250 devices
    a call, four calls at once (the courier's shape)."""
    groups = [devices[i : i + 250] for i in range(0, len(devices), 250)]

    async def send(group: list[Device]) -> None:
        messages: dict[str, dict[str, Any]] = {}
        for d in group:
            messages.setdefault(d.user_id, {})[d.device_id] = {"n": 1}
        await c.pop._call(
            "PUT",
            f"/_matrix/client/v3/sendToDevice/org.encstate.bench/{uuid.uuid4().hex}",
            c.admin.token,
            {"messages": messages},
        )

    started = time.monotonic()
    await bounded(groups, send, width=4)
    return time.monotonic() - started


async def huge_room(c: Community, report: Report) -> None:
    s = c.sizes
    watch = Stopwatch()
    users = getattr(c, "storm_users", None) or await c.bulk.users("huge", s.storm_users)
    await c.bulk.more_devices(users, s.huge_devices_per_user - 1)
    devices = [d for u in users for d in u]
    watch.lap(f"{len(devices) - len(users)} more devices")
    loop = asyncio.get_running_loop()
    bot_user = await loop.run_in_executor(None, c.synapse.register, "huge-bot")
    room_id, sessions = await c.bulk.state_room(
        c.admin, bot_user, 30_000, values=1, join_rule={"join_rule": "public"}
    )
    bot_token, _ = await loop.run_in_executor(None, c.synapse.login, bot_user)
    await c.pop._call("POST", f"/_matrix/client/v3/join/{room_id}", bot_token, {})
    await c.bulk.join(room_id, users)
    watch.lap(f"{len(users)} joins")
    room = Room(room_id, sessions)
    bot = await sealing_bot(c.synapse, c.http, c.workdir, "huge-bot", bot_user, [room])
    try:
        plugin = bot.plugin
        floor_cold = await homeserver_fanout(c, devices)
        # sealing on for the room now, with nothing marked: the bench times the seal itself
        # (a reaction's mark would otherwise seal it in the background first)
        await asyncio.sleep(1)  # past the coalescing window: the start-up marks are taken
        plugin.sealer._due.pop(room_id, None)
        seal_on(plugin, room_id)
        reset_peak_rss()
        rss0 = rss_mb()
        with Timer() as cold:
            sealed = await plugin.sealer.seal_room(room_id)
        assert sealed.devices >= len(devices), sealed
        await adopt(c, plugin, room_id, bot_token)
        # the next value: a new name, sealed for the same devices (Olm sessions warm)
        content = sessions[0].encrypt("m.room.name", "", {"name": "the next value"})
        sent = await c.pop._call(
            "PUT",
            f"/_matrix/client/v3/rooms/{room_id}/state/m.room.encrypted/m.room.name:",
            c.admin.token,
            content,
        )
        raw = await c.pop._call(
            "GET", f"/_matrix/client/v3/rooms/{room_id}/event/{sent['event_id']}", c.admin.token
        )
        report.result("huge_seal_cold_s", cold.wall)  # now, should the next step fail
        # through the live path, as a sync would: the tracker ingests the admin's event, the
        # reaction marks the room, the sealer seals it (0.5 s coalescing window included)
        with Timer() as warm:
            await plugin.tracker.ingest(room_id, [raw], current=True)
            await plugin.intake.react()
            while True:
                latest = plugin.seals.latest(room_id, "m.room.name:")
                if latest and latest.source_event_id == raw["event_id"] and latest.event_id:
                    break
                await asyncio.sleep(0.01)
        delivered_next = await plugin.store.db.fetchval(
            "SELECT COUNT(*) FROM encstate_delivered WHERE session_id=$1", latest.session_id
        )
        assert delivered_next >= len(devices), (delivered_next, len(devices))
        growth = peak_rss_mb() - rss0
        floor_warm = await homeserver_fanout(c, devices)
    finally:
        await bot.stop()
    report.row(
        f"huge room: a value sealed for {len(devices)} devices, no Olm session yet",
        f"{cold.wall:.1f} s ({cold.cpu:.1f} s CPU)",
        f"{floor_cold:.1f} s for the homeserver to take a plain message to each",
        "<= 45 s",
    )
    report.row(
        "  the next value, the same devices",
        f"{warm.wall:.1f} s ({warm.cpu:.1f} s CPU)",
        f"{floor_warm:.1f} s, the same plain fan-out",
        "<= 10 s",
    )
    report.row("  RSS growth over both", f"{growth:.0f} MB", f"{rss0:.0f} MB before", "<= 150 MB")
    report.note(f"huge room fixtures: {watch.text()}")
    report.result("huge_seal_warm_s", warm.wall)
    report.result("huge_seal_rss_growth_mb", growth)
    report.result("huge_homeserver_fanout_s", floor_cold)


async def adopt(c: Community, plugin, room_id: str, token: str) -> None:
    """What sync would bring the in-process bot after it sealed: its seal events as the
    room's current state."""
    raws = []
    for seal in plugin.seals.live(plugin.tracker.ledgers[room_id]):
        if seal.event_id:
            raws.append(
                await c.pop._call(
                    "GET", f"/_matrix/client/v3/rooms/{room_id}/event/{seal.event_id}", token
                )
            )
    await plugin.tracker.ingest(room_id, raws, current=True)
    await plugin.intake.react()


async def run(
    synapse: Synapse, http: ClientSession, workdir: str, report: Report, quick: bool, parts
) -> None:
    sizes = QUICK if quick else FULL
    c = Community(synapse, http, workdir, sizes)
    await c.build_admin()
    if "rooms" in parts:
        await c.build_rooms()
        bot = c.bot("scale-bot")
        try:
            await many_rooms(c, bot, report)
            await storm(c, bot, report)
        finally:
            bot.stop()
    if "huge" in parts:
        await huge_room(c, report)
