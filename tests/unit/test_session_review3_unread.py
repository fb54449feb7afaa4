# ruff: noqa: F811  (the ``db`` fixture is imported, as in test_session_review2_reads)
"""Review of 819e77f (cut reads kept in ``encstate_unread`` and resumed at the next start; a
rejoin read stops at the bot's own leave): ways a room's sessions are forwarded while part of
its timeline since the bot first read it is unread, and ways the debt never clears.

R1: a resumed read without ``to``/``away`` (a cut ``before_start`` read, or a live gap read
when no sync token was known) stops at the first event the ledger knows. The start that cut it
recorded the room's current state from ``/state`` (``fresh``, not a stop then); at the resume
those values are "known", so the resume stops at one of them, still inside the unread window:
the debt row is dropped and the rest of the window is never read.
R2: a resumed bounded read (``to`` = the old position) that meets the bot's own rejoin adds
the room to ``_rejoins_read`` after the rescan has already read the rejoins (``again``): the
time away before the position is never read, and the debt row is dropped.
R3: a resumed read cut again at the token it resumed from (a homeserver that hands back the
same ``end``): ``_keep_unread`` adds the token to ``tracker.unread`` and then ``_unread_done``
discards the same token: the row stays in the database, but ``history_unread`` is False for
the rest of the run.
R4: two rejoins after the saved position (the client joined the bot back while the plugin was
down, twice): the rejoin read stops at the newest own leave, not at the leave before the
position; what was sent between that older leave and the position is never read.
R5: ``/messages`` may return an empty chunk with an ``end`` (Synapse, when
filter_events_for_client drops a whole page: ignored users, history visibility; the spec says
to go on until no ``end``): the read stops there as if the timeline ended: no debt, the
position moves on.
R6: a later read in flight (a live gap fill) leaves part of the timeline unread while it runs,
yet ``history_unread`` is False: the room's sessions are forwarded meanwhile.
R7: a debt is resumed only at the next start (``backfill_limit`` events per start), so a flood
larger than the limit withholds the room's sessions until a restart (or several); and every
cut gap adds a row, all read before the bot is ready at the next start.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import olm

from encstate_bot import protocol

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


def _facts(bot: Bot, hs: Homeserver) -> Any:
    facts = bot.tracker.ledger(ROOM).facts(hs.megolm.id)
    return (facts.kind, facts.gaps)


async def test_r1_a_resumed_unbounded_read_passes_values_the_cut_start_recorded(db) -> None:
    hs = Homeserver()
    hs.state_room(ROOM)  # the name, index 0 of hs.megolm
    hs.state_room(QUIET)
    await (await Bot(hs, db).start()).stop()
    # no saved position (the first start after the upgrade to v9, a save that failed): the
    # next start reads each room back to an event known before it (before_start)
    await db.execute("DELETE FROM encstate_sync_position")
    hidden = encrypted(hs, ROOM)  # a message in the name's session: its newest index
    hs.plain(ROOM, 60)  # (so that it lies beyond the resumed read's page that meets the topic)
    other = olm.OutboundGroupSession()  # a new topic, in another session
    hs.send(
        ROOM,
        {
            "type": "m.room.encrypted",
            "state_key": "m.room.topic:",
            "content": {
                "algorithm": protocol.MEGOLM_ALGORITHM,
                "sender_key": "K",
                "device_id": "ADMINDEVICE",
                "session_id": other.id,
                "ciphertext": other.encrypt(json.dumps({"type": "m.room.topic"})),
            },
        },
    )
    hs.plain(ROOM, 60)
    cut = await start_limited(hs, db)
    await cut.stop()
    assert cut.tracker.history_unread(ROOM)  # cut by the limit (the topic is fresh: no stop)
    again = await start_limited(hs, db)
    await again.stop()
    read = hidden["event_id"] in again.tracker.ledger(ROOM).messages
    # fails: the resume stopped at the topic, which /state recorded at the start before; the
    # row is dropped, the message is never read, and the name's session looks state-only
    assert read or again.tracker.history_unread(ROOM), (
        f"debt dropped unread; rows={await unread_rows(db)}; name session {_facts(again, hs)}"
    )


async def test_r2_a_resumed_bounded_read_that_meets_the_bots_rejoin_reads_the_time_away(
    db,
) -> None:
    await db.execute(POSITION_TABLE)
    hs = Homeserver()
    hs.state_room(ROOM)
    hs.state_room(QUIET)
    first = await Bot(hs, db).start()
    intake = first.intake
    own_membership(hs, ROOM, "leave")
    await intake.on_sync(
        {"data": {"next_batch": f"s{hs.pos}", "rooms": {"leave": {ROOM: {}}, "join": {}}}}
    )
    hidden = encrypted(hs, ROOM)  # while the bot was out (the name session's newest index)
    hs.plain(QUIET, 1)
    await intake.on_sync({"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {}}}})
    await first.stop()
    assert await first.store.sync_position() == f"s{hs.pos}"  # after the message
    own_membership(hs, ROOM, "join")  # maubot's client joins it back while the plugin is down
    hs.plain(ROOM, 60)  # then more than backfill_limit events
    second = await start_limited(hs, db)
    await second.stop()
    assert second.tracker.history_unread(ROOM)  # the read to the position was cut first
    third = await start_limited(hs, db)
    await third.stop()
    read = hidden["event_id"] in third.tracker.ledger(ROOM).messages
    # fails: the resume met the rejoin after the rescan read its rejoins; the room sits in
    # _rejoins_read for nothing, the row is dropped, the time away is never read
    assert read or third.tracker.history_unread(ROOM), (
        f"stranded rejoin: {third.intake._rejoins_read}; name session {_facts(third, hs)}"
    )


async def test_r3_a_resume_cut_again_at_the_same_token_keeps_withholding(db) -> None:
    await db.execute(POSITION_TABLE)
    hs = Homeserver()
    hs.state_room(ROOM)
    hs.state_room(QUIET)
    await (await Bot(hs, db).start()).stop()
    encrypted(hs, ROOM)
    hs.plain(ROOM, 60)
    cut = await start_limited(hs, db)
    await cut.stop()
    [(room_id, token)] = await unread_rows(db)
    request = hs.request

    async def stuck(method: Any, path: Any, query_params: Any = None, **kw: Any) -> Any:
        answer = await request(method, path, query_params=query_params, **kw)
        if str(path).endswith("/messages") and (query_params or {}).get("from") == token:
            # a homeserver (buggy, or hostile) that hands back the token it was given
            answer = {"chunk": [hs.timelines[ROOM][-1][1]], "end": token}
        return answer

    again = Bot(hs, db)
    again.intake.config["backfill_limit"] = LIMIT
    again.intake.client.api.request = stuck
    await again.start(settle=False)  # (the stuck read is retried, less and less often)
    for _ in range(50):
        await asyncio.sleep(0.01)
    assert any(q.get("from") == token for e, q in hs.calls if e == "messages")  # it tried
    assert await unread_rows(db) == [(ROOM, token)]  # still owed in the database
    # fails: put_unread kept the row, then _unread_done discarded the same token in memory
    assert again.tracker.history_unread(ROOM), "sessions forwarded while the row is kept"
    await again.stop()


async def test_r4_two_rejoins_after_the_position_read_back_to_the_older_leave(db) -> None:
    await db.execute(POSITION_TABLE)
    hs = Homeserver()
    hs.state_room(ROOM)
    hs.state_room(QUIET)
    first = await Bot(hs, db).start()
    intake = first.intake
    own_membership(hs, ROOM, "leave")
    await intake.on_sync(
        {"data": {"next_batch": f"s{hs.pos}", "rooms": {"leave": {ROOM: {}}, "join": {}}}}
    )
    hidden = encrypted(hs, ROOM)  # while the bot was out, before the saved position
    hs.plain(QUIET, 1)
    await intake.on_sync({"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {}}}})
    await first.stop()
    # while the plugin is down: joined back, kicked again, joined back again
    own_membership(hs, ROOM, "join")
    hs.plain(ROOM, 120)  # (the page that meets the newer leave ends before the message)
    own_membership(hs, ROOM, "leave")
    hs.plain(ROOM, 3)
    own_membership(hs, ROOM, "join")
    again = await Bot(hs, db).start()
    await again.stop()
    # fails: the rejoin read stopped at the newest leave (after the position); the older
    # time away, before the position, is never read
    assert hidden["event_id"] in again.tracker.ledger(ROOM).messages, _facts(again, hs)


async def test_r5_an_empty_page_with_an_end_does_not_end_a_gap_read(db) -> None:
    await db.execute(POSITION_TABLE)
    spammer = "@spam:example.org"
    hs = Homeserver()
    hs.state_room(ROOM)
    hs.state_room(QUIET)
    bot = await Bot(hs, db).start()
    intake = bot.intake
    start = intake.position
    hidden = encrypted(hs, ROOM)
    # a page's worth and more, from a user the bot's account ignores (or the server hides)
    for n in range(150):
        hs.send(ROOM, {"type": "m.reaction", "sender": spammer, "content": {"n": n}})
    hs.plain(ROOM, 1)
    request = hs.request

    async def filtered(method: Any, path: Any, query_params: Any = None, **kw: Any) -> Any:
        answer = await request(method, path, query_params=query_params, **kw)
        if str(path).endswith("/messages"):
            # Synapse (PR 12903): a page filter_events_for_client empties comes back as an
            # empty chunk with its ``end``: "there might be more in next_token batch"
            answer = {**answer, "chunk": [e for e in answer["chunk"] if e["sender"] != spammer]}
        return answer

    intake.client.api.request = filtered
    last = len(hs.timelines[ROOM]) - 1
    limited = {"events": [hs.timelines[ROOM][last][1]], "limited": True, "prev_batch": f"t{last}"}
    await intake.on_sync(
        {"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {ROOM: {"timeline": limited}}}}}
    )
    await settle(intake)
    hs.plain(QUIET, 1)
    await intake.on_sync({"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {}}}})
    read = hidden["event_id"] in bot.tracker.ledger(ROOM).messages
    held = intake.position == start
    # fails: the first empty page ended the read; no debt, and the position moved past it
    assert read or held or bot.tracker.history_unread(ROOM), (intake.position, _facts(bot, hs))
    await bot.stop()


async def test_r6_a_gap_read_in_flight_withholds_the_rooms_sessions(db) -> None:
    hs = Homeserver()
    hs.state_room(ROOM)
    hs.state_room(QUIET)
    bot = await Bot(hs, db).start()
    intake = bot.intake
    hidden = encrypted(hs, ROOM)  # the name session's newest index
    hs.plain(ROOM, 30)
    gate = held_pages(hs, intake)  # a slow homeserver (or one that stalls on purpose)
    last = len(hs.timelines[ROOM]) - 1
    limited = {"events": [hs.timelines[ROOM][last][1]], "limited": True, "prev_batch": f"t{last}"}
    await intake.on_sync(
        {"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {ROOM: {"timeline": limited}}}}}
    )
    for _ in range(20):
        await asyncio.sleep(0)
    assert ROOM in intake._filling  # the gap read runs
    unread = hidden["event_id"] not in bot.tracker.ledger(ROOM).messages
    try:
        # fails: nothing marks the room while its gap is read: a request now is decided on a
        # ledger that shows the name session state-only (no gap), and it is shared
        # (mended: the courier's deliveries from the room wait while it is being read)
        assert not unread or bot.tracker.being_read(ROOM), _facts(bot, hs)
    finally:
        gate.set()
        await settle(intake)
        await bot.stop()


async def test_r7_a_cut_read_is_resumed_while_the_bot_runs(db) -> None:
    await db.execute(POSITION_TABLE)
    hs = Homeserver()
    hs.state_room(ROOM)
    hs.state_room(QUIET)
    await (await Bot(hs, db).start()).stop()
    encrypted(hs, ROOM)
    hs.plain(ROOM, 3 * LIMIT)  # any member (or a server) floods while the bot is down
    bot = await start_limited(hs, db)
    for _ in range(5):  # the bot runs on: syncs come, tasks settle
        hs.plain(QUIET, 1)
        await bot.intake.on_sync({"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {}}}})
        await settle(bot.intake)
    # fails: the debt is read only at the next start (and one limit per start): until then,
    # and across two more restarts here, none of the room's sessions is forwarded
    assert not bot.tracker.history_unread(ROOM), await unread_rows(db)
    await bot.stop()


async def test_r7_cut_gaps_do_not_pile_up_rows_read_before_ready(db) -> None:
    await db.execute(POSITION_TABLE)
    hs = Homeserver()
    hs.state_room(ROOM)
    hs.state_room(QUIET)
    bot = await start_limited(hs, db)
    intake = bot.intake
    for _ in range(4):  # each sync's gap is longer than backfill_limit
        hs.plain(ROOM, LIMIT + 20)
        last = len(hs.timelines[ROOM]) - 1
        timeline = {"events": [hs.timelines[ROOM][last][1]], "limited": True}
        timeline["prev_batch"] = f"t{last}"
        rooms = {"join": {ROOM: {"timeline": timeline}}}
        await intake.on_sync({"data": {"next_batch": f"s{hs.pos}", "rooms": rooms}})
        await settle(intake)
    await bot.stop()
    rows = await unread_rows(db)
    # fails: one row per cut gap, without bound; the next start reads them all (each up to
    # backfill_limit events) before it is ready
    assert len(rows) <= 1, rows
