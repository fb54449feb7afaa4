from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
import olm
import pytest

from encstate_bot import protocol
from encstate_bot.protocol import Invalid, KeyCancellation, KeyRequest

ROOM = "!room:example.org"


@pytest.mark.parametrize("flag", protocol.STATE_ENCRYPTION_FLAGS)
def test_each_flag_turns_state_encryption_on(flag: str) -> None:
    assert protocol.state_encryption_flag(
        {"algorithm": protocol.MEGOLM_ALGORITHM, flag: True}
    ) == (flag)


@pytest.mark.parametrize("value", [False, "true", 1, None, {}, []])
def test_only_json_true_counts(value: object) -> None:
    content = {"io.element.msc4362.encrypt_state_events": value}
    assert protocol.state_encryption_flag(content) is None


@pytest.mark.parametrize("content", [None, [], "x", 3])
def test_flag_on_malformed_content(content: object) -> None:
    assert protocol.state_encryption_flag(content) is None


@pytest.mark.parametrize(
    "outer, expected",
    [
        ("m.room.name:", ("m.room.name", "")),
        ("m.foo:@alice:example.org", ("m.foo", "@alice:example.org")),
        ("m.room.topic:a:b:c", ("m.room.topic", "a:b:c")),
        ("nocolon", None),
        (":leading", None),
        ("", None),
    ],
)
def test_split_packed_key_at_first_colon(outer: str, expected: tuple | None) -> None:
    assert protocol.split_packed_key(outer) == expected


def _ciphertexts(count: int) -> list[str]:
    session = olm.OutboundGroupSession()
    return [session.encrypt(f"payload {i}") for i in range(count)]


def test_message_index_read_without_the_key() -> None:
    texts = _ciphertexts(300)
    for i in (0, 1, 2, 127, 128, 129, 299):
        assert protocol.message_index(texts[i]) == i


@pytest.mark.parametrize("garbage", ["", "!!!", "AAAA", "AwgA" * 0, 42, None, "Awg"])
def test_message_index_of_garbage_is_none(garbage: object) -> None:
    assert protocol.message_index(garbage) is None


def _payload(**over: object) -> dict:
    payload = {"type": "m.room.name", "state_key": "", "content": {"name": "x"}, "room_id": ROOM}
    payload.update(over)
    return payload


def test_valid_state_payload() -> None:
    result = protocol.validate_state_payload(_payload(), ROOM, "m.room.name:")
    assert isinstance(result, protocol.ValidState)
    assert (result.event_type, result.state_key) == ("m.room.name", "")


@pytest.mark.parametrize(
    "payload, outer, reason",
    [
        (_payload(), "m.room.topic:", "packed state key"),
        (_payload(), "m.room.name:x", "packed state key"),
        (_payload(room_id="!other:example.org"), "m.room.name:", "room_id"),
        ({k: v for k, v in _payload().items() if k != "state_key"}, "m.room.name:", "message"),
        (_payload(type="m.room.power_levels"), "m.room.power_levels:", "never be encrypted"),
        (_payload(type="m.space.child"), "m.space.child:", "never be encrypted"),
        (_payload(content="text"), "m.room.name:", "content"),
        (_payload(state_key=5), "m.room.name:5", "not a string"),
    ],
)
def test_invalid_state_payloads(payload: dict, outer: str, reason: str) -> None:
    result = protocol.validate_state_payload(payload, ROOM, outer)
    assert isinstance(result, Invalid)
    assert reason in result.reason


def test_key_request_without_sender_key() -> None:
    content = {
        "action": "request",
        "requesting_device_id": "DEV",
        "request_id": "r1",
        "body": {"algorithm": protocol.MEGOLM_ALGORITHM, "room_id": ROOM, "session_id": "s"},
    }
    parsed = protocol.parse_key_request("@u:example.org", content)
    assert isinstance(parsed, KeyRequest)
    assert parsed.sender_key is None and parsed.session_id == "s"


def test_key_request_cancellation() -> None:
    content = {"action": "request_cancellation", "requesting_device_id": "D", "request_id": "r"}
    assert protocol.parse_key_request("@u:x", content) == KeyCancellation("@u:x", "D", "r")


@pytest.mark.parametrize(
    "content",
    [
        {"action": "request", "requesting_device_id": "D", "request_id": "r"},
        {"action": "share", "requesting_device_id": "D", "request_id": "r"},
        {"action": "request", "request_id": "r", "body": {}},
        {
            "action": "request",
            "requesting_device_id": "D",
            "request_id": "r",
            "body": {"algorithm": "m.olm.v1", "room_id": ROOM, "session_id": "s"},
        },
        {
            "action": "request",
            "requesting_device_id": "D" * 10_000,
            "request_id": "r",
            "body": {"algorithm": protocol.MEGOLM_ALGORITHM, "room_id": ROOM, "session_id": "s"},
        },
        [],
        None,
    ],
)
def test_malformed_key_requests(content: object) -> None:
    assert isinstance(protocol.parse_key_request("@u:x", content), Invalid)


def test_allowed_rooms_skips_garbage() -> None:
    content = {
        "join_rule": "restricted",
        "allow": [
            {"type": "m.room_membership", "room_id": "!a:x"},
            {"type": "m.room_membership", "room_id": "!a:x"},
            {"type": "m.room_membership"},
            {"type": "m.other", "room_id": "!b:x"},
            "garbage",
            {"type": "m.room_membership", "room_id": "#alias:x"},
        ],
    }
    rooms, skipped = protocol.allowed_rooms(content)
    assert rooms == ["!a:x"]
    assert len(skipped) == 4


def test_allowed_rooms_of_public_rule_is_empty() -> None:
    assert protocol.allowed_rooms({"join_rule": "public", "allow": [{}]}) == ([], [])


def test_parse_encrypted_state_reads_the_index() -> None:
    session = olm.OutboundGroupSession()
    session.encrypt("zero")
    ciphertext = session.encrypt("one")
    raw = {
        "type": "m.room.encrypted",
        "state_key": "m.room.name:",
        "event_id": "$e",
        "sender": "@a:x",
        "origin_server_ts": 5,
        "content": {
            "algorithm": protocol.MEGOLM_ALGORITHM,
            "ciphertext": ciphertext,
            "session_id": session.id,
        },
    }
    parsed = protocol.parse_encrypted_state(raw, ROOM)
    assert isinstance(parsed, protocol.EncryptedState)
    assert parsed.msg_index == 1 and parsed.sender_key is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=20), inner),
    max_leaves=25,
)


@settings(max_examples=300)
@given(sender=json_values, content=json_values)
def test_parse_key_request_never_raises(sender: object, content: object) -> None:
    result = protocol.parse_key_request(sender, content)
    assert isinstance(result, (KeyRequest, KeyCancellation, Invalid))


@settings(max_examples=300)
@given(
    raw=st.dictionaries(
        st.sampled_from(
            ["type", "state_key", "event_id", "sender", "origin_server_ts", "content", "room_id"]
        ),
        json_values,
    )
)
def test_parse_encrypted_events_never_raise(raw: dict) -> None:
    raw = {"type": "m.room.encrypted", **raw}
    protocol.parse_encrypted_state(raw, ROOM)
    protocol.parse_encrypted_message(raw, ROOM)


@settings(max_examples=300)
@given(payload=json_values, outer=st.text(max_size=40))
def test_validate_payload_never_raises(payload: object, outer: str) -> None:
    loaded = protocol.load_payload(json.dumps(payload))
    if isinstance(loaded, dict):
        protocol.validate_state_payload(loaded, ROOM, outer)


@settings(max_examples=300)
@given(content=json_values)
def test_join_rules_never_raise(content: object) -> None:
    rooms, _ = protocol.allowed_rooms(content)
    assert all(r.startswith("!") for r in rooms)
