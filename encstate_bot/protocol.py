"""MSC3414 / MSC4362 on the wire: flags, exempt types, packed keys, payload checks, indices.

Everything here is pure: it takes parsed JSON (or strings) and returns values. Untrusted input
never raises out of these functions; it comes back as ``None`` or an ``Invalid`` with a reason.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from attr import dataclass

MEGOLM_ALGORITHM = "m.megolm.v1.aes-sha2"

# m.room.encryption content flags that turn state encryption on, most current first.
STATE_ENCRYPTION_FLAGS = (
    "io.element.msc4362.encrypt_state_events",
    "encrypt_state_events",
    "io.element.msc3414.encrypt_state_events",
)

# Never encrypted (MSC3414/MSC4362, plus the space hierarchy events implementations exempt).
EXEMPT_TYPES = frozenset(
    {
        "m.room.create",
        "m.room.member",
        "m.room.join_rules",
        "m.room.power_levels",
        "m.room.third_party_invite",
        "m.room.history_visibility",
        "m.room.guest_access",
        "m.room.encryption",
        "m.space.child",
        "m.space.parent",
    }
)

# The "aesthetic" state MSC3414 allows sharing first, in this order.
AESTHETIC_TYPES = ("m.room.name", "m.room.avatar", "m.room.topic")

SHARED_HISTORY_FLAGS = ("shared_history", "m.shared_history", "org.matrix.msc3061.shared_history")

HISTORY_VISIBLE_TO_NEWCOMERS = frozenset({"shared", "world_readable"})

# Withheld codes (m.room_key.withheld).
UNAUTHORISED = "m.unauthorised"
UNAVAILABLE = "m.unavailable"
BLACKLISTED = "m.blacklisted"
UNVERIFIED = "m.unverified"
NO_OLM = "m.no_olm"

MAX_ID_LENGTH = 255
MAX_JSON_INT = 2**53 - 1  # canonical JSON's range; larger values cannot be stored as BIGINT


def withheld_content(
    room_id: str, session_id: str, sender_key: str | None, code: str, reason: str
) -> dict[str, str]:
    """An ``m.room_key.withheld`` content (also a bundle's ``withheld`` entry, MSC4268)."""
    return {
        "algorithm": MEGOLM_ALGORITHM,
        "room_id": room_id,
        "session_id": session_id,
        "sender_key": sender_key or "",
        "code": code,
        "reason": reason,
    }


def state_encryption_flag(content: Any) -> str | None:
    """The flag name that turns state encryption on in an ``m.room.encryption`` content.

    Only a JSON ``true`` counts; anything else (missing, ``"true"``, ``1``) does not.
    """
    if not isinstance(content, dict):
        return None
    for flag in STATE_ENCRYPTION_FLAGS:
        if content.get(flag) is True:
            return flag
    return None


def aesthetic_rank(event_type: str | None) -> int:
    """Sort key: name, avatar, topic first (in that order), everything else after."""
    try:
        return AESTHETIC_TYPES.index(event_type or "")
    except ValueError:
        return len(AESTHETIC_TYPES)


def split_packed_key(outer_key: str) -> tuple[str, str] | None:
    """Split an MSC4362 packed state key ``{type}:{state_key}`` at the first colon."""
    event_type, sep, state_key = outer_key.partition(":")
    if not sep or not event_type:
        return None
    return event_type, state_key


def _b64decode(data: str) -> bytes | None:
    if not isinstance(data, str) or len(data) > 1_000_000:
        return None
    try:
        return base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def message_index(ciphertext: Any) -> int | None:
    """Read the megolm message index from a ciphertext without the key.

    The decoded message starts with the version byte ``0x03``, then the protobuf tag ``0x08``
    and the index as a varint. Returns ``None`` for anything that is not shaped like that.
    """
    raw = _b64decode(ciphertext)
    if raw is None or len(raw) < 3 or raw[0] != 0x03 or raw[1] != 0x08:
        return None
    index = 0
    for shift, byte in enumerate(raw[2:7]):
        index |= (byte & 0x7F) << (7 * shift)
        if not byte & 0x80:
            return index if index < 2**32 else None
    return None


@dataclass(frozen=True)
class Invalid:
    reason: str


@dataclass(frozen=True)
class EncryptedState:
    """The server-visible part of an encrypted state event."""

    room_id: str
    event_id: str
    sender: str
    origin_ts: int
    outer_key: str
    session_id: str
    ciphertext: str
    sender_key: str | None
    device_id: str | None
    msg_index: int | None


@dataclass(frozen=True)
class EncryptedMessage:
    """The server-visible part of an encrypted timeline message."""

    room_id: str
    event_id: str
    sender: str
    origin_ts: int
    session_id: str
    ciphertext: str
    msg_index: int | None


def storable(text: str) -> bool:
    """Whether text can be stored as it is: PostgreSQL refuses NUL, and neither database
    takes a lone surrogate (JSON lets an attacker send both)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clean_text(value: Any, limit: int = MAX_ID_LENGTH) -> str | None:
    """Untrusted text made storable and short, for records and reasons (None if not text)."""
    if not isinstance(value, str):
        return None
    value = value[:limit]
    if storable(value):
        return value
    return value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def _short_str(value: Any, limit: int = MAX_ID_LENGTH) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= limit and storable(value):
        return value
    return None


def _megolm_fields(content: Any) -> tuple[str, str] | Invalid:
    if not isinstance(content, dict):
        return Invalid("content is not an object")
    if content.get("algorithm") != MEGOLM_ALGORITHM:
        return Invalid(f"unsupported algorithm {str(content.get('algorithm'))[:64]!r}")
    session_id = _short_str(content.get("session_id"))
    ciphertext = content.get("ciphertext")
    if not session_id:
        return Invalid("missing or malformed session_id")
    if not isinstance(ciphertext, str) or not ciphertext or not ciphertext.isascii():
        return Invalid("missing or malformed ciphertext")
    if "\x00" in ciphertext or len(ciphertext) > 1_000_000:
        return Invalid("malformed ciphertext")
    return session_id, ciphertext


def _event_header(raw: Any, room_id: str | None) -> tuple[str, str, str, int] | Invalid:
    if not isinstance(raw, dict) or raw.get("type") != "m.room.encrypted":
        return Invalid("not an m.room.encrypted event")
    room = room_id or raw.get("room_id")
    event_id = _short_str(raw.get("event_id"))
    sender = _short_str(raw.get("sender"))
    ts = raw.get("origin_server_ts")
    if not isinstance(room, str) or not event_id or not sender:
        return Invalid("missing room_id, event_id or sender")
    if not isinstance(ts, int) or isinstance(ts, bool) or abs(ts) > MAX_JSON_INT:
        return Invalid("missing or malformed origin_server_ts")
    return room, event_id, sender, ts


def state_ref(raw: Any) -> tuple[str, str] | None:
    """(outer state key, event ID) of a state event as the server holds it, whatever its
    content (a redacted one included); None if either is not a short, storable string."""
    if not isinstance(raw, dict):
        return None
    outer_key = _short_str(raw.get("state_key"), 1000)
    event_id = _short_str(raw.get("event_id"))
    return (outer_key, event_id) if outer_key and event_id else None


def parse_encrypted_state(raw: Any, room_id: str | None = None) -> EncryptedState | Invalid:
    """Parse a raw ``m.room.encrypted`` event that carries a ``state_key``."""
    header = _event_header(raw, room_id)
    if isinstance(header, Invalid):
        return header
    outer_key = raw.get("state_key")
    if not isinstance(outer_key, str):
        return Invalid("not a state event")
    if state_ref(raw) is None:
        return Invalid("state_key is empty, too long or not storable")
    fields = _megolm_fields(raw.get("content"))
    if isinstance(fields, Invalid):
        return fields
    content = raw["content"]
    return EncryptedState(
        room_id=header[0],
        event_id=header[1],
        sender=header[2],
        origin_ts=header[3],
        outer_key=outer_key,
        session_id=fields[0],
        ciphertext=fields[1],
        sender_key=_short_str(content.get("sender_key")),
        device_id=_short_str(content.get("device_id")),
        msg_index=message_index(fields[1]),
    )


def parse_encrypted_message(raw: Any, room_id: str | None = None) -> EncryptedMessage | Invalid:
    """Parse a raw ``m.room.encrypted`` timeline event (no ``state_key``)."""
    header = _event_header(raw, room_id)
    if isinstance(header, Invalid):
        return header
    if "state_key" in raw:
        return Invalid("a state event, not a message")
    fields = _megolm_fields(raw.get("content"))
    if isinstance(fields, Invalid):
        return fields
    return EncryptedMessage(
        room_id=header[0],
        event_id=header[1],
        sender=header[2],
        origin_ts=header[3],
        session_id=fields[0],
        ciphertext=fields[1],
        msg_index=message_index(fields[1]),
    )


@dataclass(frozen=True)
class ValidState:
    event_type: str
    state_key: str
    content: dict


def load_payload(plaintext: str | bytes) -> dict | Invalid:
    """Parse a decrypted payload. Never raises: deeply nested JSON (RecursionError) and
    anything else the parser refuses come back as Invalid."""
    try:
        payload = json.loads(plaintext)
    except (ValueError, UnicodeDecodeError, RecursionError, MemoryError):
        return Invalid("decrypted payload is not JSON (or nests too deeply)")
    if not isinstance(payload, dict):
        return Invalid("decrypted payload is not an object")
    return payload


def validate_state_payload(payload: dict, room_id: str, outer_key: str) -> ValidState | Invalid:
    """MSC4362 validation of a decrypted state payload against its outer event."""
    inner_type = payload.get("type")
    inner_key = payload.get("state_key")
    if payload.get("room_id") != room_id:
        return Invalid("room_id in the payload does not match the room")
    if not isinstance(inner_type, str) or not inner_type:
        return Invalid("payload has no type")
    if not storable(inner_type) or (isinstance(inner_key, str) and not storable(inner_key)):
        return Invalid("payload type or state_key has characters no store accepts")
    if inner_key is None:
        return Invalid("payload has no state_key (a message posing as state)")
    if not isinstance(inner_key, str):
        return Invalid("payload state_key is not a string")
    if not isinstance(payload.get("content"), dict):
        return Invalid("payload content is not an object")
    packed = split_packed_key(outer_key)
    if packed is None or packed != (inner_type, inner_key):
        return Invalid("packed state key does not match the payload's type and state_key")
    if inner_type in EXEMPT_TYPES:
        return Invalid(f"{inner_type} must never be encrypted")
    return ValidState(event_type=inner_type, state_key=inner_key, content=payload["content"])


def shared_history_flag(content: Any) -> bool:
    if not isinstance(content, dict):
        return False
    return any(content.get(flag) is True for flag in SHARED_HISTORY_FLAGS)


# Key requests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRequest:
    user_id: str
    device_id: str
    request_id: str
    room_id: str
    session_id: str
    sender_key: str | None
    algorithm: str


@dataclass(frozen=True)
class KeyCancellation:
    user_id: str
    device_id: str
    request_id: str


def parse_key_request(sender: Any, content: Any) -> KeyRequest | KeyCancellation | Invalid:
    """Parse raw ``m.room_key_request`` content; ``sender_key`` is optional (deprecated)."""
    user_id = _short_str(sender)
    if not user_id or not isinstance(content, dict):
        return Invalid("no sender or content is not an object")
    action = content.get("action")
    device_id = _short_str(content.get("requesting_device_id"))
    request_id = _short_str(content.get("request_id"))
    if not device_id or not request_id:
        return Invalid("missing requesting_device_id or request_id")
    if action == "request_cancellation":
        return KeyCancellation(user_id=user_id, device_id=device_id, request_id=request_id)
    if action != "request":
        return Invalid(f"unknown action {str(action)[:64]!r}")
    body = content.get("body")
    if not isinstance(body, dict):
        return Invalid("request has no body")
    algorithm = body.get("algorithm")
    if algorithm != MEGOLM_ALGORITHM:
        return Invalid(f"unsupported algorithm {str(algorithm)[:64]!r}")
    room_id = _short_str(body.get("room_id"))
    session_id = _short_str(body.get("session_id"))
    if not room_id or not session_id:
        return Invalid("request body lacks room_id or session_id")
    sender_key = body.get("sender_key")
    return KeyRequest(
        user_id=user_id,
        device_id=device_id,
        request_id=request_id,
        room_id=room_id,
        session_id=session_id,
        sender_key=_short_str(sender_key),
        algorithm=algorithm,
    )


# Join rules -----------------------------------------------------------------------------------

RESTRICTED_JOIN_RULES = frozenset({"restricted", "knock_restricted"})


def allowed_rooms(content: Any) -> tuple[list[str], list[str]]:
    """Rooms whose members a restricted join rule admits, and the skipped garbage entries."""
    if not isinstance(content, dict) or content.get("join_rule") not in RESTRICTED_JOIN_RULES:
        return [], []
    allow = content.get("allow")
    if not isinstance(allow, list):
        return [], ["allow is not a list"] if allow is not None else []
    rooms: list[str] = []
    skipped: list[str] = []
    for entry in allow:
        if (
            isinstance(entry, dict)
            and entry.get("type") == "m.room_membership"
            and isinstance(entry.get("room_id"), str)
            and entry["room_id"].startswith("!")
            and 1 < len(entry["room_id"]) <= MAX_ID_LENGTH
        ):
            if entry["room_id"] not in rooms:
                rooms.append(entry["room_id"])
        else:
            skipped.append(repr(entry)[:120])
    return rooms, skipped
