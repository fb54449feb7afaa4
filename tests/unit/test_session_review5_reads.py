# ruff: noqa: F811  (the ``db`` fixture is imported, as in test_session_review4_background)
"""Review of 01e42f5 and 398c7a8 (a first read cut by backfill_limit goes on in the
background; away rows start once the read to ``to`` reaches it; resumed reads without
to/away push no joins).

G1: 398c7a8 tells "the rest of a first read" by ``resuming and not to and not away``, but a
row of that shape is also kept by a read cut short without a bound that is *not* a first read:
the rescan's catch-up without a sync position (``before_start``: the first start after the
upgrade, a failed probe or position load) and a limited sync's gap read before any sync was
processed (``_last_batch`` None). Their continuations read events sent while the bot was away,
and the joins there are no longer pushed (at da3f791 they were).
G2: a live rejoin keeps the time away with ``again=False``; only the gap read reaching ``to``
starts it. When that gap read fails (one transient /messages error) nothing starts the away
row in this run: the room's sessions are withheld (``history_unread``) until the next start.
G3: a read that fails (one transient /messages error) and is not a resumed one keeps nothing:
a room's first read, a limited sync's gap read. The room is only put in ``_lost`` (which holds
the sync position, nothing else), so its sessions are forwarded for the rest of the run with
part of its timeline unread (pre-existing, da3f791 fails too).
G4: a resumed read that fails is not retried in this run: since 01e42f5 that is also the rest
of every first read of a room longer than backfill_limit, so one failed page withholds that
room's sessions until the next start.
G5 (low): a live rejoin resumes the room's stored rows again, also one whose read is running:
the same pages are read twice, and both copies can keep the next row and go on together.
"""

from __future__ import annotations

from typing import Any

from encstate_bot import intake as intake_module

from .test_rescan_rejoin_first_read import encrypted, own_membership, settle
from .test_rescan_scale import (  # noqa: F401  (db: a fixture)
    LIMIT,
    POSITION_TABLE,
    QUIET,
    ROOM,
    Bot,
    Homeserver,
    db,
    start_limited,
)


def _failing_once(hs: Homeserver, intake: Any, when: Any) -> list[dict[str, Any]]:
    """/messages fails once, for the first page ``when(query)`` picks; then answers again."""
    from mautrix.errors import MatrixConnectionError

    request = hs.request
    failed: list[dict[str, Any]] = []

    async def flaky(method: Any, path: Any, query_params: Any = None, **kw: Any) -> Any:
        query = dict(query_params or {})
        if str(path).endswith("/messages") and not failed and when(query):
            failed.append(query)
            raise MatrixConnectionError("a transient error")
        return await request(method, path, query_params=query_params, **kw)

    intake.client.api.request = flaky
    return failed


async def test_g1_the_rest_of_a_catch_up_without_a_position_pushes_the_joins(db) -> None:
    hs = Homeserver()
    hs.state_room(ROOM)
    hs.state_room(QUIET)
    await (await start_limited(hs, db, settle=True)).stop()
    await db.execute("DELETE FROM encstate_sync_position")
    # no position at this start (never saved, as here, or the probe / its load failed): the
    # catch-up reads back to an event known before the start; more than a limit came since
    hs.join(ROOM, "@late:example.org")  # while the bot was away
    hs.plain(ROOM, 2 * LIMIT)
    bot = await start_limited(hs, db, settle=False)
    assert bot.tracker.history_unread(ROOM)  # cut: the rest goes on in the background
    await settle(bot.intake)
    assert not bot.tracker.history_unread(ROOM)
    await bot.stop()
    # fails: 398c7a8 takes the rest of this cut catch-up (no ``to``, no ``away``) for the rest
    # of a first read, and pushes none of its joins (at da3f791 it did)
    assert (ROOM, ["@late:example.org"]) in bot.pushes.members, bot.pushes.members


async def test_g2_a_live_rejoin_whose_gap_read_fails_reads_the_time_away_in_this_run(
    db, monkeypatch
) -> None:
    monkeypatch.setattr(intake_module, "RESUME_DELAY_SECONDS", 0.01)
    await db.execute(POSITION_TABLE)
    hs = Homeserver()
    hs.state_room(ROOM)
    hs.state_room(QUIET)
    bot = await start_limited(hs, db, settle=True)
    intake = bot.intake
    own_membership(hs, ROOM, "leave")
    await intake.on_sync(
        {"data": {"next_batch": f"s{hs.pos}", "rooms": {"leave": {ROOM: {}}, "join": {}}}}
    )
    hidden = encrypted(hs, ROOM)  # sent while the bot was out of the room
    hs.plain(QUIET, 1)
    await intake.on_sync({"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {}}}})
    since = f"s{hs.pos}"
    joined = own_membership(hs, ROOM, "join")
    at = len(hs.timelines[ROOM]) - 1
    # the gap read (from the rejoin back to the last sync) meets one transient error
    failed = _failing_once(hs, intake, lambda q: q.get("to") == since)
    timeline = {"events": [joined], "limited": True, "prev_batch": f"t{at}"}
    await intake.on_sync(
        {"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {ROOM: {"timeline": timeline}}}}}
    )
    await settle(intake)
    for _ in range(3):  # the bot syncs on, for a while
        hs.plain(QUIET, 1)
        await intake.on_sync({"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {}}}})
        await settle(intake)
    assert failed
    withheld = bot.tracker.history_unread(ROOM)
    read = hidden["event_id"] in bot.tracker.ledger(ROOM).messages
    await bot.stop()
    # fails: the away row (kept with again=False) waits for a gap read that failed: nothing
    # starts it in this run, the room's sessions are withheld until the next start
    assert read and not withheld, (read, withheld, bot.tracker.unread)


async def test_g3_a_first_read_that_fails_leaves_the_room_withheld(db) -> None:
    hs = Homeserver()
    hs.state_room(ROOM)
    hidden = encrypted(hs, ROOM)  # index 1 of the name's session, before the newest events
    hs.plain(ROOM, 2 * LIMIT)
    bot = Bot(hs, db)
    bot.intake.config["backfill_limit"] = 4 * LIMIT  # (no cut: the whole history at once)
    # the second page of the room's first read (``from`` a pagination token) fails once
    failed = _failing_once(hs, bot.intake, lambda q: str(q.get("from", "")).startswith("t"))
    await bot.start(settle=True)
    assert failed
    withheld = bot.tracker.history_unread(ROOM) or bot.tracker.being_read(ROOM)
    read = hidden["event_id"] in bot.tracker.ledger(ROOM).messages
    facts = bot.tracker.ledger(ROOM).facts(hs.megolm.id)
    await bot.stop()
    # fails: a failed read keeps nothing (the room is only ``_lost``, which holds the sync
    # position and nothing else): the name's session shows no message, nothing withholds it,
    # and an export from index 0 opens the unread message at index 1 for the rest of the run
    assert read or withheld, (facts.kind, facts.safe_index)


async def test_g3_a_gap_read_that_fails_leaves_the_room_withheld(db) -> None:
    await db.execute(POSITION_TABLE)
    hs = Homeserver()
    hs.state_room(ROOM)
    hs.state_room(QUIET)
    bot = await start_limited(hs, db, settle=True)
    intake = bot.intake
    since = f"s{hs.pos}"
    hidden = encrypted(hs, ROOM)  # in the gap of a limited sync
    hs.plain(ROOM, 5)
    last = len(hs.timelines[ROOM]) - 1
    failed = _failing_once(hs, intake, lambda q: q.get("to") == since)
    limited = {"events": [hs.timelines[ROOM][last][1]], "limited": True, "prev_batch": f"t{last}"}
    await intake.on_sync(
        {"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {ROOM: {"timeline": limited}}}}}
    )
    await settle(intake)
    assert failed
    withheld = bot.tracker.history_unread(ROOM) or bot.tracker.being_read(ROOM)
    read = hidden["event_id"] in bot.tracker.ledger(ROOM).messages
    await bot.stop()
    # fails: the gap stays unread for the rest of the run and nothing withholds the room
    assert read or withheld, bot.tracker.unread


async def test_g4_a_resumed_read_that_meets_a_transient_error_goes_on_in_this_run(
    db, monkeypatch
) -> None:
    monkeypatch.setattr(intake_module, "RESUME_DELAY_SECONDS", 0.01)
    await db.execute(POSITION_TABLE)
    hs = Homeserver()
    hs.state_room(ROOM)
    hs.state_room(QUIET)
    hidden = encrypted(hs, ROOM)  # beyond the first read
    hs.plain(ROOM, 2 * LIMIT)
    bot = Bot(hs, db)
    bot.intake.config["backfill_limit"] = LIMIT
    tracker = bot.tracker
    # the first page of the rest of the first read (from the kept token) fails once
    failed = _failing_once(hs, bot.intake, lambda q: q.get("from") in tracker.unread.get(ROOM, ()))
    await bot.start(settle=True)
    for _ in range(3):  # the bot syncs on, for a while
        hs.plain(QUIET, 1)
        await bot.intake.on_sync({"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {}}}})
        await settle(bot.intake)
    assert failed
    withheld = tracker.history_unread(ROOM)
    read = hidden["event_id"] in tracker.ledger(ROOM).messages
    await bot.stop()
    # fails: a resumed read that fails is not tried again: the room (new to the bot, with a
    # long history) has its sessions withheld until the next start
    assert read and not withheld, (read, withheld, tracker.unread)


async def test_g5_a_live_rejoin_does_not_start_a_second_copy_of_a_running_read(
    db, monkeypatch
) -> None:
    """G5 (low): ``_read_away`` resumes every stored row of the room but the new one, also
    those whose read is running now (the rest of a first read, a cut gap): the same pages are
    read twice at once (the ``resuming not in unread`` check only stops the slower copy once
    its page is read; a copy with ``to`` would push the same joins twice)."""
    import asyncio

    monkeypatch.setattr(intake_module, "RESUME_DELAY_SECONDS", 0.01)
    await db.execute(POSITION_TABLE)
    hs = Homeserver()
    hs.state_room(ROOM)
    hs.state_room(QUIET)
    hs.plain(ROOM, 2 * LIMIT)
    bot = Bot(hs, db)
    bot.intake.config["backfill_limit"] = LIMIT
    intake, tracker = bot.intake, bot.tracker
    request = hs.request
    gate = asyncio.Event()
    resumed: list[str] = []

    async def held(method: Any, path: Any, query_params: Any = None, **kw: Any) -> Any:
        query = dict(query_params or {})
        if str(path).endswith("/messages") and query.get("from") in tracker.unread.get(ROOM, ()):
            resumed.append(query["from"])
            await gate.wait()  # the rest of the first read is slow (a long history)
        return await request(method, path, query_params=query_params, **kw)

    intake.client.api.request = held
    await bot.start(settle=False)
    for _ in range(100):
        await asyncio.sleep(0.001)
        if resumed:
            break
    assert resumed  # the rest of the first read runs
    # meanwhile the bot is kicked and joins back
    own_membership(hs, ROOM, "leave")
    await intake.on_sync(
        {"data": {"next_batch": f"s{hs.pos}", "rooms": {"leave": {ROOM: {}}, "join": {}}}}
    )
    joined = own_membership(hs, ROOM, "join")
    at = len(hs.timelines[ROOM]) - 1
    timeline = {"events": [joined], "limited": False, "prev_batch": f"t{at}"}
    await intake.on_sync(
        {"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {ROOM: {"timeline": timeline}}}}}
    )
    for _ in range(100):
        await asyncio.sleep(0.001)
    gate.set()
    await settle(intake)
    await bot.stop()
    # fails: the running read's row is resumed a second time, its page read twice at once
    assert len(resumed) == len(set(resumed)), resumed
