"""Megolm sessions the bot makes itself, each for one event: the event's content and the
``m.room_key`` that opens it. Resealed state and replies that carry decrypted values use them,
so the bot chooses exactly which devices can read what it sends."""

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
    """The one ``m.room_key`` content builder for the bot's own sessions."""
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
