"""The tracker judges a sender's power only once it knows the room's power levels."""

from __future__ import annotations

import json
import logging

from mautrix.crypto.sessions import InboundGroupSession
import olm

from encstate_bot.ledger import Status
from encstate_bot.tracker import Tracker

from .helpers import ROOM, OneSessionCrypto, state


class _Store:
    def __init__(self) -> None:
        self.saved = []

    async def put_states(self, records) -> None:
        self.saved += list(records)

    async def put_messages(self, records) -> None:
        pass

    async def put_server_current(self, room_id, current) -> None:
        pass


async def test_state_seen_before_the_power_levels_waits_for_them() -> None:
    # What a restart can do: the first sync's timeline is processed before the rescan has read
    # the room's power levels. Judging then would call the admin powerless, for good.
    outbound = olm.OutboundGroupSession()
    inbound = InboundGroupSession(outbound.session_key, "sig", "curve", ROOM)
    payload = {"type": "m.room.topic", "state_key": "", "content": {"topic": "x"}, "room_id": ROOM}
    rec = state("$t", outbound.id, 0, "m.room.topic", status=Status.PENDING)
    raw = {
        "type": "m.room.encrypted",
        "state_key": "m.room.topic:",
        "event_id": rec.event_id,
        "sender": rec.sender,
        "origin_server_ts": 1,
        "content": {
            "algorithm": "m.megolm.v1.aes-sha2",
            "session_id": outbound.id,
            "ciphertext": outbound.encrypt(json.dumps(payload)),
        },
    }
    tracker = Tracker(_Store(), OneSessionCrypto(inbound), logging.getLogger("test"))
    tracker.ledger(ROOM)
    await tracker.ingest(ROOM, [raw])
    assert tracker.ledgers[ROOM].events["$t"].status == Status.PENDING
    await tracker.apply_plain_state(
        ROOM,
        {
            "type": "m.room.power_levels",
            "state_key": "",
            "content": {"users": {rec.sender: 100}},
        },
    )
    await tracker.session_received(ROOM, outbound.id)
    assert tracker.ledgers[ROOM].events["$t"].status == Status.VALID
