"""mautrix warns for every key request it cannot parse (most clients leave out sender_key); the
intake answers those requests from the raw sync, so the warning is noise an admin would worry
about. Exercised through mautrix's own deserializer, so the test follows its wording."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from mautrix.client.syncer import Syncer
from mautrix.types import ToDeviceEvent

from encstate_bot.intake import RawRequestWarnings

REQUEST = {
    "type": "m.room_key_request",
    "sender": "@alice:example.org",
    "content": {
        "action": "request",
        "requesting_device_id": "DEV",
        "request_id": "r1",
        "body": {
            "algorithm": "m.megolm.v1.aes-sha2",
            "room_id": "!room:example.org",
            "session_id": "S",
        },  # no sender_key, as Element sends it
    },
}
OTHER = {"type": "m.room.encrypted", "sender": "@alice:example.org", "content": {"x": 1}}


def deserialize(log: logging.Logger, data: dict) -> None:
    Syncer._try_deserialize(SimpleNamespace(log=log), ToDeviceEvent, data)  # type: ignore[arg-type]


def test_key_requests_mautrix_cannot_parse_are_not_warned_about(caplog) -> None:
    log = logging.getLogger("test.intake.client")
    log.trace = lambda *a, **k: None  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="test.intake.client"):
        deserialize(log, REQUEST)
        assert any("m.room_key_request" in r.getMessage() for r in caplog.records), (
            "mautrix no longer warns: the filter may be dropped"
        )
        caplog.clear()
        log.addFilter(RawRequestWarnings())
        deserialize(log, REQUEST)
        assert not caplog.records
        deserialize(log, OTHER)  # other events mautrix cannot parse are still reported
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
