# ruff: noqa: F811  (the ``db`` fixture is imported, as in test_rescan_rejoin_first_read)
"""Review of 3194032 (M1, M2): reads that still stop too early, or run too often.

R1: a rejoin's read-back stops at the first event the ledger knows, and the rejoin sync's own
state section (full state: the bot was not in the room) was ingested just before: a value set
while the bot was away ends the read at once, and a message sent before it in the same session
is never seen (the session looks state-only: rule 1). (Before 3194032 the limited-sync gap fill
read this case to the last sync, which came before the message, and saw it.)
R2: the same with a rejoin sync that has no ``prev_batch``: the read starts at the newest event,
which this sync's timeline just recorded.
R3: the same gap across a restart: the bot was out of the room at the saved position and is in
it at the next start; the rescan reads back only to the position.
R4: the first read now always goes to backfill_limit (M2), and every sync naming the room while
it runs starts another full one (before, those later reads stopped in their first page).
"""

from __future__ import annotations

import asyncio
from typing import Any

from .test_rescan_rejoin_first_read import encrypted, own_membership, settle
from .test_rescan_scale import (  # noqa: F401
    POSITION_TABLE,
    QUIET,
    ROOM,
    Bot,
    Homeserver,
    db,
)


async def _leave(hs: Homeserver, intake: Any) -> None:
    own_membership(hs, ROOM, "leave")
    await intake.on_sync(
        {"data": {"next_batch": f"s{hs.pos}", "rooms": {"leave": {ROOM: {}}, "join": {}}}}
    )


async def test_a_rejoin_read_passes_a_value_its_own_state_section_recorded(db) -> None:
    hs = Homeserver()
    hs.state_room(ROOM)
    bot = await Bot(hs, db).start()
    intake = bot.intake
    await _leave(hs, intake)
    hidden = encrypted(hs, ROOM)  # a message in the state session, while the bot was away
    hs.plain(ROOM, 120)  # the room goes on (a page of the read-back holds 100 events)
    topic = encrypted(hs, ROOM, "m.room.topic:")  # then a new value in the same session
    joined = own_membership(hs, ROOM, "join")
    at = len(hs.timelines[ROOM]) - 1
    # a rejoin's sync carries the room's full state (the topic is in it)
    room = {
        "state": {"events": [topic]},
        "timeline": {"events": [joined], "limited": True, "prev_batch": f"t{at}"},
    }
    await intake.on_sync({"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {ROOM: room}}}})
    await settle(intake)
    assert topic["event_id"] in bot.tracker.ledger(ROOM).events
    # fails: the read stopped at the topic, which the state section had just recorded
    assert hidden["event_id"] in bot.tracker.ledger(ROOM).messages


async def test_a_rejoin_without_prev_batch_passes_the_events_of_its_own_sync(db) -> None:
    hs = Homeserver()
    hs.state_room(ROOM)
    bot = await Bot(hs, db).start()
    intake = bot.intake
    await _leave(hs, intake)
    hidden = encrypted(hs, ROOM)
    hs.plain(ROOM, 20)  # the read's first page holds 10 events
    joined = own_membership(hs, ROOM, "join")
    after = encrypted(hs, ROOM)  # a message right after the join, in the rejoin sync
    timeline = {"events": [joined, after], "limited": False}  # no prev_batch
    await intake.on_sync(
        {"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {ROOM: {"timeline": timeline}}}}}
    )
    await settle(intake)
    # fails: the read began at the newest event, which this sync had just recorded
    assert hidden["event_id"] in bot.tracker.ledger(ROOM).messages


async def test_a_room_rejoined_across_a_restart_is_read_back_over_the_time_away(db) -> None:
    await db.execute(POSITION_TABLE)
    hs = Homeserver()
    hs.state_room(ROOM)
    hs.state_room(QUIET)
    first = await Bot(hs, db).start()
    intake = first.intake
    await _leave(hs, intake)
    hidden = encrypted(hs, ROOM)  # while the bot was out of the room
    hs.plain(QUIET, 1)
    await intake.on_sync({"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {}}}})
    await first.stop()  # the position saved: after the hidden message
    assert intake.position == f"s{hs.pos}"
    # joined again before the sync showing it was processed (a crash; an admin's force-join
    # while the bot was down)
    own_membership(hs, ROOM, "join")
    again = await Bot(hs, db).start()
    # fails: the rescan read back only to the saved position, after the message
    assert hidden["event_id"] in again.tracker.ledger(ROOM).messages


async def test_syncs_during_a_first_read_do_not_start_more_full_reads(db) -> None:
    hs = Homeserver()
    hs.state_room(QUIET)
    bot = await Bot(hs, db).start()
    intake = bot.intake
    # a room the bot is new to, with a long encrypted history (Element: chat and state in
    # the room's one session)
    hs.state_room(ROOM)
    for _ in range(600):
        encrypted(hs, ROOM)
    request = hs.request

    async def slow(method: Any, path: Any, query_params: Any = None, **kw: Any) -> Any:
        if str(path).endswith("/messages"):
            await asyncio.sleep(0.01)  # a homeserver takes a while per page
        return await request(method, path, query_params=query_params, **kw)

    hs.request = slow  # type: ignore[method-assign]
    intake.client.api.request = slow
    state = [e for _, e in hs.timelines[ROOM] if "state_key" in e]
    joined = own_membership(hs, ROOM, "join")
    at = len(hs.timelines[ROOM]) - 1
    room = {
        "state": {"events": state},
        "timeline": {"events": [joined], "limited": True, "prev_batch": f"t{at}"},
    }
    await intake.on_sync({"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {ROOM: room}}}})
    for _ in range(5):  # the room is busy: each sync while the first read runs names it
        await asyncio.sleep(0.02)
        message = encrypted(hs, ROOM)
        timeline = {"events": [message], "limited": False, "prev_batch": f"t{at}"}
        await intake.on_sync(
            {
                "data": {
                    "next_batch": f"s{hs.pos}",
                    "rooms": {"join": {ROOM: {"timeline": timeline}}},
                }
            }
        )
    await settle(intake)
    assert ROOM in bot.tracker.backfilled
    pages = hs.count("messages")
    # one full read is 1 + 6 pages (10, then 100 at a time, to the room's start); before
    # 3194032 the reads the later syncs started stopped in their first page (9 in all)
    assert pages <= 10, f"{pages} /messages pages: every sync started another full first read"
