"""Room keys in every form the bot sends them, built here and nowhere else.

- ``m.room_key`` for the bot's own sessions (seals, private replies): megolm sessions it makes
  itself, each for one event, so it chooses exactly which devices can read what it sends;
- ``m.forwarded_room_key`` for another member's session, exported from an index;
- an exported session (the key-export form) for a room key bundle (MSC4268).
"""

from __future__ import annotations

import json
from typing import Any

from attr import dataclass
import olm

from . import protocol


@dataclass(frozen=True)
class OwnEvent:
    session_id: str
    content: dict[str, Any]  # the m.room.encrypted content to send
    room_key: dict[str, Any]  # the m.room_key content that opens it (from index 0)


def room_key_content(room_id: str, session_id: str, session_key: str) -> dict[str, Any]:
    """The ``m.room_key`` content for one of the bot's own sessions."""
    return {
        "algorithm": protocol.MEGOLM_ALGORITHM,
        "room_id": room_id,
        "session_id": session_id,
        "session_key": session_key,
    }


def encrypt_once(
    room_id: str, payload: dict[str, Any], identity_key: str, device_id: str | None
) -> OwnEvent:
    """Encrypt one payload in a fresh session that is then thrown away: it never encrypts
    anything else."""
    outbound = olm.OutboundGroupSession()
    session_key = outbound.session_key  # exported at index 0, before any use
    ciphertext = outbound.encrypt(json.dumps({**payload, "room_id": room_id}))
    content = {
        "algorithm": protocol.MEGOLM_ALGORITHM,
        "sender_key": identity_key,
        "device_id": device_id,
        "session_id": outbound.id,
        "ciphertext": ciphertext,
    }
    return OwnEvent(outbound.id, content, room_key_content(room_id, outbound.id, session_key))


def exported_session(session: Any, index: int) -> dict[str, Any]:
    """What every export of someone's megolm session carries, from ``index`` on."""
    return {
        "algorithm": protocol.MEGOLM_ALGORITHM,
        "sender_key": session.sender_key,
        "session_key": session.export_session(index),
        "forwarding_curve25519_key_chain": list(session.forwarding_chain or []),
    }


def forwarded_content(
    session: Any, room_id: str, session_id: str, index: int, shared_history: bool
) -> dict[str, Any]:
    """The ``m.forwarded_room_key`` content for a session the bot holds."""
    content = {
        **exported_session(session, index),
        "room_id": room_id,
        "session_id": session_id,
        "sender_claimed_ed25519_key": session.signing_key,
    }
    if shared_history:
        content["shared_history"] = True
    return content


def bundle_entry(session: Any, room_id: str, session_id: str, index: int) -> dict[str, Any]:
    """A session in a room key bundle: the key-export form, flagged shared history."""
    return {
        **exported_session(session, index),
        "room_id": room_id,
        "session_id": session_id,
        "sender_claimed_keys": {"ed25519": session.signing_key},
        "shared_history": True,
    }
