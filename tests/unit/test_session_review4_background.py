# ruff: noqa: F811  (the ``db`` fixture is imported, as in test_session_review3_unread)
"""Review of da3f791 and 47ad239 (reads kept to do go on in the background; a read bounded by
the position decides from the oldest own membership whether the bot was out; the courier holds
a room's forwarded sessions while any read of it runs).

F1: a homeserver that answers every page of a kept read with an empty chunk and a new ``end``
makes the read a background loop without end: MAX_EMPTY_PAGES pages, a new row replacing the
old, ``_resume_soon`` again 0.5 s later, forever (40 requests a second and a database write
every 0.5 s per room, until the plugin stops; the room's sessions withheld all that time).
F2: ``Courier._hold_while_read`` holds only queued items (``item.id is not None``): an
``!encstate share`` (unqueued ``Trigger.COMMAND`` items) forwards a room's session while its
timeline is being read back, which is exactly what R6 found for requests.
F3: ``_hold_while_read`` looks only at ``being_read``: the decision's ``history_unread`` was read
by ``gather.room`` at the start of the batch. A gap read that starts and ends (cut: a row kept)
while the batch decides (device queries, key waits) leaves ``being_read`` False and
``history_unread`` True at hold time, and the Share decided on the stale False goes out.
F4: a first read cut by backfill_limit keeps no row: a message in a state session, newer than
the session's current value (read from /state) but older than the newest backfill_limit events,
is never read; the room's sessions are forwarded at once (pre-existing; asked about).
F5: a read kept for a room the bot is not in at start is not resumed (``later.room_id in
rooms``) and nothing resumes it when the bot joins back live: the room's sessions are withheld
until the next start that finds the bot in it.
F6: ``Intake.stop`` cancels the tasks spawned so far, but the rescan (the plugin's startup task,
cancelled only after ``intake.stop``) spawns the kept reads' resumes after that: they run on
after the plugin stopped.
"""

from __future__ import annotations

import asyncio
from typing import Any

from encstate_bot import intake as intake_module
from encstate_bot.audit import Outcome
from encstate_bot.policy import Share
from encstate_bot.store import OutboxItem, Store, UnreadHistory

from .test_courier_lanes import ROOM as COURIER_ROOM
from .test_courier_lanes import USER, FakeClient, ReorderingServer, courier_for
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
    unread_rows,
)
from .test_session_review2_reads import held_pages


async def test_f1_empty_pages_with_ever_new_tokens_do_not_loop_in_the_background(
    db, monkeypatch
) -> None:
    monkeypatch.setattr(intake_module, "RESUME_DELAY_SECONDS", 0.01)  # (the loop, faster)
    await db.execute(POSITION_TABLE)
    hs = Homeserver()
    hs.state_room(ROOM)
    hs.state_room(QUIET)
    bot = await start_limited(hs, db, settle=True)
    intake = bot.intake
    hs.plain(ROOM, 2 * LIMIT)  # a gap longer than backfill_limit: its read is cut, kept
    last = len(hs.timelines[ROOM]) - 1
    request = hs.request
    fresh = iter(range(10**9))

    async def endless(method: Any, path: Any, query_params: Any = None, **kw: Any) -> Any:
        query = query_params or {}
        if str(path).endswith("/messages") and query.get("from") != f"t{last}":
            # every page after the gap's first: nothing, and a token never seen before
            hs.calls.append(("messages", dict(query)))
            return {"chunk": [], "end": f"e{next(fresh)}"}
        return await request(method, path, query_params=query_params, **kw)

    intake.client.api.request = endless
    limited = {"events": [hs.timelines[ROOM][last][1]], "limited": True, "prev_batch": f"t{last}"}
    hs.calls.clear()
    await intake.on_sync(
        {"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {ROOM: {"timeline": limited}}}}}
    )
    await asyncio.sleep(1.0)
    pages = hs.count("messages")
    running = [t.get_name() for t in intake._tasks if not t.done()]
    await bot.stop()
    # fails: a new row and a new resume after every MAX_EMPTY_PAGES empty pages, for good
    assert pages <= 1 + 2 * intake_module.MAX_EMPTY_PAGES, (pages, running, await unread_rows(db))


def _outcome(item: OutboxItem, session_id: str) -> Outcome:
    return Outcome(item=item, device_id="DEV", session_id=session_id, decision=Share(0, "ok"))


def test_f2_an_admin_share_while_the_room_is_read_back_forwards_no_session() -> None:
    courier = courier_for(FakeClient(ReorderingServer()))
    courier.tracker.being_read = lambda room_id: room_id == COURIER_ROOM  # type: ignore
    # ``!encstate share @user`` (or ``--members``): Commands.share builds unqueued items and
    # calls Courier.deliver with them
    command = OutboxItem(room_id=COURIER_ROOM, user_id=USER, trigger="admin")
    kept, held = courier._hold_while_read([_outcome(command, "S")], {})
    forwarded = [o for o in kept if isinstance(o.decision, Share)]
    # fails: an item without an id is never held, so its Share goes out while the read runs
    assert not forwarded, "a room's session is forwarded while its timeline is being read"


def test_f3_a_read_that_ended_with_a_kept_row_during_the_batch_holds_its_shares() -> None:
    courier = courier_for(FakeClient(ReorderingServer()))
    # gather.room read history_unread False (the decision below is a Share); while the batch
    # decided, a limited sync's gap read started and was cut: it kept a row and ended
    courier.tracker.being_read = lambda room_id: False  # type: ignore
    courier.tracker.history_unread = lambda room_id: room_id == COURIER_ROOM  # type: ignore
    asked = OutboxItem(room_id=COURIER_ROOM, user_id=USER, trigger="request", id=1)
    kept, held = courier._hold_while_read([_outcome(asked, "S")], {})
    # fails: only being_read is looked at when the batch sends
    assert held == [asked] and not kept, "a Share decided before a row was kept goes out"


async def test_f4_a_cut_first_read_leaves_a_message_of_a_state_session_unread(db) -> None:
    await db.execute(POSITION_TABLE)
    hs = Homeserver()
    hs.state_room(QUIET)
    bot = await start_limited(hs, db, settle=True)
    intake = bot.intake
    hs.state_room(ROOM)  # the name: index 0 of the session
    hidden = encrypted(hs, ROOM)  # a message in the same session: index 1
    hs.plain(ROOM, 2 * LIMIT)  # the room goes on (more than backfill_limit events)
    state = [e for _, e in hs.timelines[ROOM] if "state_key" in e]
    joined = own_membership(hs, ROOM, "join")  # the bot joins the room (new to it)
    at = len(hs.timelines[ROOM]) - 1
    room = {
        "state": {"events": state},
        "timeline": {"events": [joined], "limited": True, "prev_batch": f"t{at}"},
    }
    await intake.on_sync({"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {ROOM: room}}}})
    await settle(intake)
    assert ROOM in bot.tracker.backfilled and not bot.tracker.being_read(ROOM)
    read = hidden["event_id"] in bot.tracker.ledger(ROOM).messages
    facts = bot.tracker.ledger(ROOM).facts(hs.megolm.id)
    await bot.stop()
    # fails: the first read stopped at the limit and kept nothing: the name's session shows
    # no message and no gap, nothing withholds it, and an export from index 0 opens index 1
    assert read or bot.tracker.history_unread(ROOM), (facts.kind, facts.gaps, facts.safe_index)


async def test_f5_a_kept_read_of_a_room_joined_again_live_is_resumed(db) -> None:
    await db.execute(POSITION_TABLE)
    hs = Homeserver()
    hs.state_room(ROOM)
    hs.state_room(QUIET)
    await (await start_limited(hs, db, settle=True)).stop()
    # a read kept for the room (a cut gap, the time away) when the bot was kicked
    await bot_store_put(db, UnreadHistory(ROOM, "t3", None, True))
    own_membership(hs, ROOM, "leave")
    real_joined = hs.get_joined_rooms

    async def joined() -> list[str]:
        return [r for r in await real_joined() if r != ROOM]

    bot = Bot(hs, db)
    bot.intake.config["backfill_limit"] = LIMIT
    bot.intake.client.get_joined_rooms = joined  # the bot is out of ROOM at this start
    await bot.start()
    assert bot.tracker.history_unread(ROOM)
    # it is invited and joins back; the syncs go on
    bot.intake.client.get_joined_rooms = real_joined
    joined_again = own_membership(hs, ROOM, "join")
    at = len(hs.timelines[ROOM]) - 1
    room = {"timeline": {"events": [joined_again], "limited": False, "prev_batch": f"t{at}"}}
    await bot.intake.on_sync(
        {"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {ROOM: room}}}}
    )
    await settle(bot.intake)
    for _ in range(3):
        hs.plain(QUIET, 1)
        await bot.intake.on_sync({"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {}}}})
        await settle(bot.intake)
    rows = await unread_rows(db)
    await bot.stop()
    # fails: the old row is never resumed while the bot runs: the room's sessions are
    # withheld until a restart that finds the bot in the room
    assert (ROOM, "t3") not in rows, rows


async def bot_store_put(db: Any, unread: UnreadHistory) -> None:
    from encstate_bot.store import Store

    await Store(db).put_unread(unread)


async def test_f6_no_resume_runs_on_after_the_intake_stopped(db) -> None:
    await db.execute(POSITION_TABLE)
    hs = Homeserver()
    hs.state_room(ROOM)
    hs.state_room(QUIET)
    await (await start_limited(hs, db, settle=True)).stop()
    encrypted(hs, ROOM)
    hs.plain(ROOM, 3 * LIMIT)
    cut = await start_limited(hs, db)  # the read to the position is cut: a row kept
    await cut.stop()
    assert await unread_rows(db)
    hs.plain(ROOM, 3)  # the room changed since: the next start reads it back first
    bot = Bot(hs, db)
    bot.intake.config["backfill_limit"] = LIMIT
    await bot.tracker.load()
    gate = held_pages(hs, bot.intake)  # the rescan's catch-up waits on its page
    startup = asyncio.ensure_future(bot.intake.rescan())
    for _ in range(50):
        await asyncio.sleep(0)
    # the plugin stops (Bot.stop: intake.stop, then its own tasks, the startup among them)
    late: list[str] = []
    spawn = bot.intake.spawn

    def spawn_late(coro: Any, name: str) -> None:  # what is spawned once the stop began
        late.append(name)
        spawn(coro, name)

    bot.intake.spawn = spawn_late  # type: ignore[method-assign]
    stopping = asyncio.ensure_future(bot.intake.stop())
    for _ in range(5):
        await asyncio.sleep(0)
    gate.set()  # the page answered meanwhile: the rescan goes on and spawns the resumes
    await stopping
    # (Bot.stop cancels the startup next; here it reaches its resumes first, as it may)
    await asyncio.wait_for(startup, 5)
    running = list(bot.intake._tasks)
    for t in running:
        t.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    # failed at da3f791: the rescan spawned the resumes after intake.stop cancelled what it
    # had: nobody's to cancel, they read (and wrote rows) after the plugin stopped. Now a
    # stopped intake starts nothing (``late`` names what it was asked to start).
    assert not running, (late, running)


def _own(hs: Homeserver, membership: str, before: str) -> dict[str, Any]:
    return hs.send(
        ROOM,
        {
            "type": "m.room.member",
            "state_key": "@encstate:example.org",
            "sender": "@encstate:example.org",
            "content": {"membership": membership},
            "unsigned": {"prev_content": {"membership": before}},
        },
    )


async def test_f7_an_away_row_dropped_by_an_older_part_stops_its_read(db) -> None:
    await db.execute(POSITION_TABLE)
    hs = Homeserver()
    hs.state_room(ROOM)
    hs.state_room(QUIET)
    hs.plain(ROOM, 6 * LIMIT)  # history before the position
    await (await start_limited(hs, db, settle=True)).stop()
    position = await Store(db).sync_position()
    below = len(hs.timelines[ROOM])  # timeline indices before the position
    # while the plugin is down: the bot is kicked and joins back, then more than a limit
    _own(hs, "leave", "join")
    hs.plain(ROOM, 10)
    _own(hs, "join", "leave")
    hs.plain(ROOM, LIMIT - 5)
    bot = await start_limited(hs, db, settle=True)
    await bot.stop()
    # the first part met the rejoin (the bot looked out at the position: an away row from it,
    # resumed 0.5 s later); the older part met the kick (in at the position: the row dropped)
    older = [
        q
        for e, q in hs.calls
        if e == "messages"
        and (
            q.get("from") == position
            or (q.get("from", "s")[0] == "t" and int(q["from"][1:]) <= below)
        )
    ]
    # fails: the dropped row's read runs on (its resume was already scheduled, and its cut
    # writes a new row): it pages through the whole history before the position
    assert not older, (position, older)
