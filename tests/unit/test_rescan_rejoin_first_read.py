# ruff: noqa: F811  (the ``db`` fixture is imported, as in test_final_review_rescan_position)
"""Two reads that stopped too early (review of the sync position, M1 and M2).

M1: a room the bot left and joined again had its gap read back only to the last sync, so the
events sent while the bot was away went unread: a message in a state session there leaves the
session looking state-only, and it would be shared (rule 1).

M2: the first read-back of a room stopped at the first event the ledger knew, and the ledger
already knew the current values from /state: one page of 10 ended at the newest value, and the
older values of its session stayed gaps (withheld for good).
"""

from __future__ import annotations

import json
from typing import Any

from encstate_bot import protocol

from .test_rescan_scale import (  # noqa: F401
    BOT,
    QUIET,
    ROOM,
    Bot,
    Homeserver,
    db,
    settle_tasks,
)


def encrypted(hs: Homeserver, room_id: str, state_key: str | None = None) -> dict[str, Any]:
    """A Megolm event in the room's state session: a timeline message, or a state value."""
    inner = "m.room.message" if state_key is None else state_key.split(":")[0]
    event: dict[str, Any] = {
        "type": "m.room.encrypted",
        "content": {
            "algorithm": protocol.MEGOLM_ALGORITHM,
            "sender_key": "K",
            "device_id": "ADMINDEVICE",
            "session_id": hs.megolm.id,
            "ciphertext": hs.megolm.encrypt(json.dumps({"type": inner})),
        },
    }
    if state_key is not None:
        event["state_key"] = state_key
    return hs.send(room_id, event)


def own_membership(hs: Homeserver, room_id: str, membership: str) -> dict[str, Any]:
    return hs.send(
        room_id,
        {
            "type": "m.room.member",
            "state_key": BOT,
            "sender": BOT,
            "content": {"membership": membership},
        },
    )


async def settle(intake: Any) -> None:
    await settle_tasks(intake)


async def test_a_room_joined_again_is_read_back_over_the_time_the_bot_was_away(db) -> None:
    hs = Homeserver()
    hs.state_room(ROOM)
    hs.state_room(QUIET)
    bot = await Bot(hs, db).start()
    intake = bot.intake
    own_membership(hs, ROOM, "leave")
    await intake.on_sync(
        {"data": {"next_batch": f"s{hs.pos}", "rooms": {"leave": {ROOM: {}}, "join": {}}}}
    )
    hidden = encrypted(hs, ROOM)  # sent while the bot was out of the room
    hs.plain(ROOM, 3)
    hs.plain(QUIET, 1)  # the bot syncs on meanwhile
    await intake.on_sync({"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {}}}})
    joined = own_membership(hs, ROOM, "join")
    at = len(hs.timelines[ROOM]) - 1
    timeline = {"events": [joined], "limited": True, "prev_batch": f"t{at}"}
    await intake.on_sync(
        {"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {ROOM: {"timeline": timeline}}}}}
    )
    await settle(intake)
    # before: the gap was read only to the last sync, which came after the message
    assert hidden["event_id"] in bot.tracker.ledger(ROOM).messages


async def test_a_room_joined_again_without_a_limited_timeline_is_read_back_too(db) -> None:
    hs = Homeserver()
    hs.state_room(ROOM)
    bot = await Bot(hs, db).start()
    intake = bot.intake
    own_membership(hs, ROOM, "leave")
    await intake.on_sync(
        {"data": {"next_batch": f"s{hs.pos}", "rooms": {"leave": {ROOM: {}}, "join": {}}}}
    )
    hidden = encrypted(hs, ROOM)
    joined = own_membership(hs, ROOM, "join")
    at = len(hs.timelines[ROOM]) - 1
    timeline = {"events": [joined], "limited": False, "prev_batch": f"t{at}"}
    await intake.on_sync(
        {"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {ROOM: {"timeline": timeline}}}}}
    )
    await settle(intake)
    assert hidden["event_id"] in bot.tracker.ledger(ROOM).messages


async def test_the_first_read_back_passes_the_values_state_just_recorded(db) -> None:
    hs = Homeserver()
    hs.state_room(ROOM)  # the name at index 0
    first_name = hs.timelines[ROOM][-1][1]
    hs.plain(ROOM, 30)
    encrypted(hs, ROOM, "m.room.name:")  # the current name, at index 1, in the newest 10
    hs.plain(ROOM, 3)
    bot = await Bot(hs, db).start()
    ledger = bot.tracker.ledger(ROOM)
    # before: the first page ended at the current name, which /state had just recorded, and
    # index 0 stayed a gap: the session was withheld for good
    assert first_name["event_id"] in ledger.events
    assert ledger.facts(hs.megolm.id).gaps == ()
