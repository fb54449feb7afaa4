"""Ledger scale: the bot's start-up rescan of a room with 10,000 encrypted state events
(per-user state), first sight and after a restart, and its memory, beside the floor any reader
pays (fetching /state and decrypting every event once).

Synapse slows down quadratically when one room accumulates state (measured here: 32 state events
per second at first, 5 per second at 3,000), so creating 10,000 real state events would take
most of an hour. The room is real and holds a few hundred real encrypted state events; the
benchmark's loopback proxy adds the rest to Synapse's answer to `GET /state`, encrypted with the
same sessions, so the bot reads, decrypts, validates and stores 10,000 events through exactly
the code a real start-up runs. The real-only part is measured too, as a cross-check of the
per-event cost.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import ClientSession

from harness.proxy import FaultProxy
from harness.synapse import Synapse

from .fanout import make_room
from .inproc import InProcessBot
from .megolm import StateSession
from .population import Population
from .report import Report, peak_rss_mb, reset_peak_rss, rss_mb

SESSIONS = 10
REAL_EVENTS = 300
CONCURRENCY = 4


async def run(
    synapse: Synapse, http: ClientSession, workdir: str, report: Report, quick: bool
) -> None:
    total = 1000 if quick else 10_000
    pop = Population(synapse, http)
    (admin,) = await pop.user_with_devices("ledger-admin", 1, 5)
    loop = asyncio.get_running_loop()
    bot_user = await loop.run_in_executor(None, synapse.register, "ledger-bot")
    room = await make_room(pop, admin, bot_user, public=False)
    sessions = [StateSession(admin, room.room_id) for _ in range(SESSIONS)]
    sem = asyncio.Semaphore(CONCURRENCY)
    started = time.monotonic()

    def member(i: int) -> str:
        return f"@member{i}:bench.example"

    async def put(i: int) -> None:
        content = sessions[i % SESSIONS].encrypt(
            "org.example.profile", member(i), {"status": f"status {i}"}
        )
        async with sem:
            await pop._call(
                "PUT",
                f"/_matrix/client/v3/rooms/{room.room_id}/state/m.room.encrypted/"
                f"org.example.profile:{member(i)}",
                admin.token,
                content,
            )

    await asyncio.gather(*(put(i) for i in range(REAL_EVENTS)))
    token, _ = await loop.run_in_executor(None, synapse.login, bot_user)
    await pop._call("POST", f"/_matrix/client/v3/join/{room.room_id}", token, {})
    report.note(
        f"ledger: {REAL_EVENTS} real encrypted state events in {time.monotonic() - started:.0f} s"
    )

    now = int(time.time() * 1000)
    extra = [
        {
            "type": "m.room.encrypted",
            "state_key": f"org.example.profile:{member(i)}",
            "event_id": f"$bench-ledger-{i}",
            "room_id": room.room_id,
            "sender": admin.user_id,
            "origin_server_ts": now + i,
            "content": sessions[i % SESSIONS].encrypt(
                "org.example.profile", member(i), {"status": f"status {i}"}
            ),
            "unsigned": {},
        }
        for i in range(REAL_EVENTS, total)
    ]
    proxy = await FaultProxy(synapse.url).start()
    proxy.rewrite(rf"/rooms/{room.room_id}/state$", lambda state: state + extra)
    try:
        # The floor: fetch the room's state and decrypt every encrypted event once.
        inbound = {s.id: s.inbound() for s in sessions + room.sessions}
        t0 = time.monotonic()
        async with http.get(
            f"{proxy.url}/_matrix/client/v3/rooms/{room.room_id}/state",
            headers={"Authorization": f"Bearer {token}"},
        ) as resp:
            state = await resp.json()
        for evt in state:
            if evt.get("type") == "m.room.encrypted":
                inbound[evt["content"]["session_id"]].decrypt(evt["content"]["ciphertext"])
        floor = time.monotonic() - t0
        events = sum(1 for e in state if e.get("type") == "m.room.encrypted")

        async def give(crypto) -> None:
            for session in sessions + room.sessions:
                await session.give_to(crypto)

        first, again, growth, rss0 = await _rescans(
            synapse, http, workdir, proxy.url, bot_user, room.room_id, give, events
        )
        real_first, _, _, _ = await _rescans(
            synapse, http, workdir, synapse.url, bot_user, room.room_id, give, REAL_EVENTS + 3
        )
    finally:
        await proxy.close()
    report.row(
        f"start-up rescan, {events} encrypted state events",
        f"{first:.2f} s first sight, {again:.2f} s after a restart",
        f"{floor:.2f} s to fetch /state and decrypt them all",
        "<= 5 s",
    )
    report.row(
        f"  cross-check: {REAL_EVENTS + 3} real events only",
        f"{real_first:.2f} s first sight",
        f"{1000 * first / events:.2f} vs {1000 * real_first / (REAL_EVENTS + 3):.2f} ms/event",
    )
    report.row(
        f"RSS growth, rescan of {events} events",
        f"{growth:.1f} MB",
        f"{rss0:.0f} MB resident before",
    )
    key = "ledger_rescan_10k" if total == 10_000 else f"ledger_rescan_{total}"
    report.result(f"{key}_s", first)
    report.result(f"{key}_restart_s", again)
    report.result(f"{key}_rss_growth_mb", growth)


async def _rescans(synapse, http, workdir, homeserver, bot_user, room_id, give, expected):
    """Start a fresh bot device (first sight), then restart it on the same database."""
    bot = InProcessBot(synapse, http, workdir, f"ledger{int(time.time() * 1000)}", homeserver)
    try:
        reset_peak_rss()
        rss0 = rss_mb()
        t0 = time.monotonic()
        plugin = await bot.start(user_id=bot_user, before_plugin=give)
        first = time.monotonic() - t0
        growth = peak_rss_mb() - rss0
        counts = plugin.tracker.ledgers[room_id].counts()
        assert counts["current"] == expected, (counts, expected)
        await bot.stop()
        t0 = time.monotonic()
        plugin = await bot.start(user_id=bot_user, reuse_device=True)
        again = time.monotonic() - t0
        assert plugin.tracker.ledgers[room_id].counts()["current"] == expected
    finally:
        await bot.stop()
    return first, again, growth, rss0
