"""Review of 39fd529 (start-up catch-up without a sync position, which is every start until
the ``encstate_sync_position`` migration exists): the catch-up pages back in timeline
(topological) order and stops at the first encrypted event it knew before this start. An
event that reached the homeserver while the bot was down but sits *before* that event in the
timeline (federation: a remote member's event arriving late with an older depth; a homeserver
may place it so on purpose) is never read. Here it is a message in a state session: the
session is never known to encrypt messages, so it stays shareable from its safe index (rule
1). The stop rule predates the commit; the commit now relies on it as "stops at what it saw".
"""

from __future__ import annotations

import json

from encstate_bot import protocol

from .test_rescan_scale import ADMIN, QUIET, Bot, busy_world, db  # noqa: F401


def encrypted(hs, inner: str, **extra):
    return {
        "type": "m.room.encrypted",
        **extra,
        "content": {
            "algorithm": protocol.MEGOLM_ALGORITHM,
            "sender_key": "K",
            "device_id": "ADMINDEVICE",
            "session_id": hs.megolm.id,
            "ciphertext": hs.megolm.encrypt(json.dumps({"type": inner})),
        },
    }


async def test_review_issue15_rescan_catch_up_reads_a_late_event_behind_a_known_one(
    db,  # noqa: F811
) -> None:
    hs = busy_world()
    name = hs.timelines[QUIET][-1][1]
    hs.plain(QUIET, 20)  # some chat (reactions) after the name, then a topic
    topic = hs.send(QUIET, encrypted(hs, "m.room.topic", state_key="m.room.topic:"))
    first = await Bot(hs, db).start()
    known = name
    assert {known["event_id"], topic["event_id"]} <= set(first.tracker.ledger(QUIET).events)
    await first.stop()

    # while the bot is down: a message in the name's megolm session arrives (new in the
    # homeserver's stream) but its place in the timeline is right after the name event,
    # before the chat and the topic the bot saw
    hs.pos += 1
    late = {
        "event_id": f"$late{hs.pos}",
        "room_id": QUIET,
        "sender": ADMIN,
        "origin_server_ts": 1000 + hs.pos,
        **encrypted(hs, "m.room.message"),
    }
    timeline = hs.timelines[QUIET]
    at = next(i for i, (_, e) in enumerate(timeline) if e is known)
    timeline.insert(at + 1, (hs.pos, late))

    again = await Bot(hs, db).start()
    ledger = again.tracker.ledger(QUIET)
    assert late["event_id"] in ledger.messages, "the late message was never read"
