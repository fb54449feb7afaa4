"""Seals at scale: a new value sealed for a room of 1,000 devices, and how fast a joiner holds
every seal while a 1,000-device push runs elsewhere; each beside a baseline from the same run."""

from __future__ import annotations

import asyncio
import statistics
import time

from aiohttp import ClientSession

from encstate_bot.room_policy import Overrides
from encstate_bot.store import OutboxItem
from harness.synapse import Synapse

from .fanout import Room, make_room
from .inproc import InProcessBot
from .population import Population
from .report import Report, Timer

SEALING = {"seal": {"enabled": False}}  # the bench drives the sealer itself, then turns it on
JOINERS = 15


async def sealing_bot(synapse, http, workdir, name, bot_user, rooms: list[Room]) -> InProcessBot:
    """A fresh bot device (no Olm sessions yet) holding the rooms' state sessions."""
    bot = InProcessBot(synapse, http, workdir, name)
    plugin = await bot.start(user_id=bot_user, config=SEALING)
    for room in rooms:
        for session in room.sessions:
            await session.give_to(plugin.client.crypto)
            await plugin.tracker.session_received(room.room_id, session.id)
    await plugin.intake.react()
    return bot


def seal_on(plugin, room_id: str) -> None:
    plugin.policies.overrides[room_id] = Overrides(seal=True)


async def sync_back(pop: Population, plugin, admin, room: Room) -> None:
    """What sync would bring the bot after it sealed: its seal events as the room's current
    state (the in-process bot does not sync)."""
    raws = []
    for seal in plugin.seals.live(plugin.tracker.ledgers[room.room_id]):
        if seal.event_id:
            raws.append(
                await pop._call(
                    "GET",
                    f"/_matrix/client/v3/rooms/{room.room_id}/event/{seal.event_id}",
                    admin.token,
                )
            )
    await plugin.tracker.ingest(room.room_id, raws, current=True)
    await plugin.intake.react()


async def new_topic(pop: Population, room: Room, admin, text: str) -> dict:
    """The admin sets a new topic in its topic session; returns the event as sync shows it."""
    session = room.sessions[1]
    content = session.encrypt("m.room.topic", "", {"topic": text})
    sent = await pop._call(
        "PUT",
        f"/_matrix/client/v3/rooms/{room.room_id}/state/m.room.encrypted/m.room.topic:",
        admin.token,
        content,
    )
    return await pop._call(
        "GET", f"/_matrix/client/v3/rooms/{room.room_id}/event/{sent['event_id']}", admin.token
    )


class Arrivals:
    """Which (device, session) the courier has delivered, told by the audit's announcement as
    each sendToDevice call goes through (polling the database would load the loop it
    measures)."""

    def __init__(self, plugin) -> None:
        self.got: set[tuple[str, str]] = set()
        self.changed = asyncio.Event()
        previous = plugin.audit.announce

        async def announce(rows) -> None:
            self.got.update((r.device_id, r.session_id) for r in rows)
            self.changed.set()
            await previous(rows)

        plugin.audit.announce = announce

    async def wait(self, device_id: str, sessions: set[str]) -> None:
        while not all((device_id, s) in self.got for s in sessions):
            self.changed.clear()
            await self.changed.wait()


async def join_latency(pop, plugin, arrivals, room: Room, device, sessions: set[str]) -> float:
    """One joiner joins; from the bot seeing the join (its push queued) until the joiner's
    device holds every live seal of the room, in ms."""
    await pop.join(room.room_id, [[device]])
    started = time.monotonic()
    await plugin.courier.submit(
        [OutboxItem(room_id=room.room_id, user_id=device.user_id, trigger="join")]
    )
    await arrivals.wait(device.device_id, sessions)
    return 1000 * (time.monotonic() - started)


async def join_latencies(
    pop, plugin, arrivals, room: Room, joiners, sessions: set[str], spacing: float = 0.0
) -> list[float]:
    """Joiners one after the other (``spacing`` 0), or each ``spacing`` seconds after the
    previous one without waiting for it."""
    if not spacing:
        return [await join_latency(pop, plugin, arrivals, room, d, sessions) for (d,) in joiners]

    async def later(i: int, device) -> float:
        await asyncio.sleep(i * spacing)
        return await join_latency(pop, plugin, arrivals, room, device, sessions)

    return list(await asyncio.gather(*(later(i, d) for i, (d,) in enumerate(joiners))))


async def drained(plugin, room_id: str) -> float:
    """Seconds until the room's queue is empty."""
    started = time.monotonic()
    while await plugin.store.pending_count(room_id):  # noqa: ASYNC110 (the queue is the observable)
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def run(synapse: Synapse, http: ClientSession, workdir: str, report: Report, quick: bool):
    n = 200 if quick else 1000
    pop = Population(synapse, http)
    (admin,) = await pop.user_with_devices("seal-admin", 1, 10)
    loop = asyncio.get_running_loop()
    bot_user = await loop.run_in_executor(None, synapse.register, "seal-bot")
    bot_token, _ = await loop.run_in_executor(None, synapse.login, bot_user)
    big = await make_room(pop, admin, bot_user, public=True)
    small = await make_room(pop, admin, bot_user, public=True)
    for room in (big, small):
        await pop._call("POST", f"/_matrix/client/v3/join/{room.room_id}", bot_token, {})
    started = time.monotonic()
    users = await pop.users("s", n // 2, devices=2, one_time_keys=12)
    await pop.join(big.room_id, users)
    joiners = await pop.users("j", 2 * JOINERS, devices=1, one_time_keys=4)
    report.note(f"seal population: {n} devices joined in {time.monotonic() - started:.0f} s")

    bots: list[InProcessBot] = []
    try:
        # Baseline: the courier forwarding the admin's three sessions to the same devices,
        # cold (a fresh bot device, every Olm session new), as the forwarding model did.
        base = await sealing_bot(synapse, http, workdir, "seal-base", bot_user, [big])
        bots.append(base)
        items = [
            OutboxItem(room_id=big.room_id, user_id=u[0].user_id, trigger="command") for u in users
        ]
        with Timer() as forward_cold:
            await base.plugin.courier.deliver(items)

        bot = await sealing_bot(synapse, http, workdir, "seal", bot_user, [big, small])
        bots.append(bot)
        plugin = bot.plugin
        with Timer() as cold:
            sealed = await plugin.sealer.seal_room(big.room_id)
        assert len(sealed.sealed) == 3 and sealed.devices >= n, sealed  # + admin, other bots
        await sync_back(pop, plugin, admin, big)
        report.row(
            f"first seal of 3 values, n={n} devices, cold",
            f"{cold.wall:.2f} s ({cold.cpu:.2f} s CPU)",
            f"{forward_cold.wall:.2f} s forwarding the 3 sessions, cold",
        )
        report.result(f"seal_cold3_n{n}_s", cold.wall)

        # One new value, live: from the bot seeing the admin's topic (the tracker ingests it)
        # to its seal event sent with every member device's key delivered (Olm sessions warm).
        seal_on(plugin, big.room_id)
        raw = await new_topic(pop, big, admin, "sealed at scale")
        with Timer() as warm:
            await plugin.tracker.ingest(big.room_id, [raw], current=True)
            await plugin.intake.react()  # as the intake does after every sync
            while True:
                latest = plugin.seals.latest(big.room_id, "m.room.topic:")
                if latest and latest.source_event_id == raw["event_id"] and latest.event_id:
                    break
                await asyncio.sleep(0.005)
        topic_seal = latest.session_id
        forward = [
            OutboxItem(
                room_id=big.room_id, user_id=u[0].user_id, trigger="command", session_id=topic_seal
            )
            for u in users
        ]
        with Timer() as forward_warm:
            await plugin.courier.deliver(forward)
        report.row(
            f"new value sealed, n={n} devices (bot sees it -> event sent, keys delivered)",
            f"{warm.wall:.2f} s (incl. the 0.5 s coalescing window; {warm.cpu:.2f} s CPU)",
            f"{forward_warm.wall:.2f} s pushing one session to the same devices, warm",
            "<= 3 s",
        )
        report.result(f"seal_n{n}_s", warm.wall)
        report.result(f"seal_n{n}_push_baseline_s", forward_warm.wall)

        # Joiners of the small room: idle first (the baseline), then while a cold push of
        # the big room's sessions to n devices runs in the other lane.
        seal_on(plugin, small.room_id)
        await plugin.sealer.seal_room(small.room_id)
        await sync_back(pop, plugin, admin, small)
        await sync_back(pop, plugin, admin, big)
        seals = {s.session_id for s in plugin.seals.live(plugin.tracker.ledgers[small.room_id])}
        arrivals = Arrivals(plugin)
        idle = await join_latencies(
            pop, plugin, arrivals, small, joiners[:JOINERS], seals, spacing=0.05
        )
        # an admin's `!encstate share --members` of the big room, twice: every seal to every
        # device, in the bulk lane, while the joiners arrive 50 ms apart
        big_push = [
            OutboxItem(room_id=big.room_id, user_id=u[0].user_id, trigger="command")
            for u in users + users
        ]
        await plugin.courier.submit(big_push)
        await asyncio.sleep(0.2)  # the bulk lane has taken its first batch
        pushing = asyncio.create_task(drained(plugin, big.room_id))
        busy = await join_latencies(
            pop, plugin, arrivals, small, joiners[JOINERS:], seals, spacing=0.05
        )
        overlap = not pushing.done()
        push_s = await pushing
        report.row(
            f"joiner holds every seal ({len(seals)}), p50 (p95) of {JOINERS} joining 50 ms "
            f"apart while a {n}-device push runs",
            f"{statistics.median(busy):.0f} ms ({sorted(busy)[int(0.95 * len(busy))]:.0f} ms)",
            f"{statistics.median(idle):.0f} ms idle, the same joiners",
            "p50 <= 100 ms",
        )
        report.note(
            f"the push took {push_s:.1f} s"
            + ("" if overlap else "; it ended before the last joiner was served")
        )
        report.result("seal_join_p50_ms", statistics.median(busy))
        report.result("seal_join_idle_p50_ms", statistics.median(idle))
    finally:
        for b in bots:
            await b.stop()
