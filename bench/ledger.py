"""Ledger scale: a room with 10,000 encrypted state events (per-user state): the bot's start-up
rescan time and resident memory, first sight and after a restart, beside the floor any reader
pays (fetching /state and decrypting every event once)."""

from __future__ import annotations

import asyncio
import time

from aiohttp import ClientSession

from harness.synapse import Synapse

from .fanout import make_room
from .inproc import InProcessBot
from .megolm import StateSession
from .population import Population
from .report import Report, peak_rss_mb, reset_peak_rss, rss_mb

SESSIONS = 10
CONCURRENCY = 8


async def run(
    synapse: Synapse, http: ClientSession, workdir: str, report: Report, quick: bool
) -> None:
    events = 1000 if quick else 10_000
    pop = Population(synapse, http)
    (admin,) = await pop.user_with_devices("ledger-admin", 1, 5)
    loop = asyncio.get_running_loop()
    bot_user = await loop.run_in_executor(None, synapse.register, "ledger-bot")
    room = await make_room(pop, admin, bot_user, public=False)
    sessions = [StateSession(admin, room.room_id) for _ in range(SESSIONS)]
    sem = asyncio.Semaphore(CONCURRENCY)
    started = time.monotonic()

    async def put(i: int) -> None:
        session = sessions[i % SESSIONS]
        user = f"@member{i}:bench.example"
        content = session.encrypt("org.example.profile", user, {"status": f"status {i}"})
        async with sem:
            await pop._call(
                "PUT",
                f"/_matrix/client/v3/rooms/{room.room_id}/state/m.room.encrypted/"
                f"org.example.profile:{user}",
                admin.token,
                content,
            )

    await asyncio.gather(*(put(i) for i in range(events)))
    token, _ = await loop.run_in_executor(None, synapse.login, bot_user)
    await pop._call("POST", f"/_matrix/client/v3/join/{room.room_id}", token, {})
    report.note(
        f"ledger: {events} encrypted state events sent in {time.monotonic() - started:.0f} s"
    )

    # The floor: fetch the room's state and decrypt every encrypted event once.
    t0 = time.monotonic()
    state = await pop._call("GET", f"/_matrix/client/v3/rooms/{room.room_id}/state", token)
    inbound = {s.id: s.inbound() for s in sessions + room.sessions}
    decrypted = 0
    for evt in state:
        if evt.get("type") == "m.room.encrypted":
            inbound[evt["content"]["session_id"]].decrypt(evt["content"]["ciphertext"])
            decrypted += 1
    floor = time.monotonic() - t0

    async def give(crypto) -> None:
        for session in sessions + room.sessions:
            await session.give_to(crypto)

    bot = InProcessBot(synapse, http, workdir, "ledger")
    try:
        reset_peak_rss()
        rss0 = rss_mb()
        t0 = time.monotonic()
        plugin = await bot.start(user_id=bot_user, before_plugin=give)
        first = time.monotonic() - t0
        growth = peak_rss_mb() - rss0
        counts = plugin.tracker.ledgers[room.room_id].counts()
        assert counts["current"] == events + 3, counts
        await bot.stop()
        t0 = time.monotonic()
        plugin = await bot.start(user_id=bot_user, reuse_device=True)
        again = time.monotonic() - t0
        assert plugin.tracker.ledgers[room.room_id].counts()["current"] == events + 3
    finally:
        await bot.stop()
    report.row(
        f"start-up rescan, {events} encrypted state events",
        f"{first:.2f} s first sight, {again:.2f} s after a restart",
        f"{floor:.2f} s to fetch /state and decrypt {decrypted} events",
        "<= 5 s",
    )
    report.row(
        f"RSS growth, rescan of {events} events",
        f"{growth:.1f} MB",
        f"{rss0:.0f} MB resident before",
    )
    key = "ledger_rescan_10k" if events == 10_000 else f"ledger_rescan_{events}"
    report.result(f"{key}_s", first)
    report.result(f"{key}_restart_s", again)
    report.result(f"{key}_rss_growth_mb", growth)
