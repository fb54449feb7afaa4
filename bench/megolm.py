"""Encrypted state for the benchmark, made with python-olm directly, and the check that a
recipient can decrypt what the bot forwarded."""

from __future__ import annotations

import json
from typing import Any

from mautrix.crypto.sessions import InboundGroupSession
from mautrix.types import RoomID, SessionID
import olm

from .population import Device

MEGOLM = "m.megolm.v1.aes-sha2"


class StateSession:
    """One megolm session of the room admin's device, used for encrypted state."""

    def __init__(self, sender: Device, room_id: str) -> None:
        self.sender = sender
        self.room_id = room_id
        self.outbound = olm.OutboundGroupSession()
        self.session_key = self.outbound.session_key  # at index 0
        self.id = self.outbound.id
        self.ciphertexts: dict[int, tuple[str, dict[str, Any]]] = {}

    def encrypt(self, event_type: str, state_key: str, content: dict[str, Any]) -> dict:
        index = self.outbound.message_index
        payload = {
            "type": event_type,
            "state_key": state_key,
            "content": content,
            "room_id": self.room_id,
        }
        ciphertext = self.outbound.encrypt(json.dumps(payload))
        self.ciphertexts[index] = (ciphertext, payload)
        return {
            "algorithm": MEGOLM,
            "sender_key": self.sender.curve25519,
            "device_id": self.sender.device_id,
            "session_id": self.id,
            "ciphertext": ciphertext,
        }

    def inbound(self) -> InboundGroupSession:
        return InboundGroupSession(
            session_key=self.session_key,
            signing_key=self.sender.account.identity_keys["ed25519"],
            sender_key=self.sender.curve25519,
            room_id=RoomID(self.room_id),
        )

    async def give_to(self, crypto: Any) -> None:
        """Put this session in a bot's crypto store, as if it had received the room key."""
        await crypto.crypto_store.put_group_session(
            RoomID(self.room_id), self.sender.curve25519, SessionID(self.id), self.inbound()
        )


def received_keys(device: Device, events: list[dict[str, Any]], from_key: str) -> list[dict]:
    """Decrypt the Olm to-device messages one bot device sent to this device."""
    keys = []
    session: olm.Session | None = None
    for evt in events:
        content = evt.get("content", {})
        if evt.get("type") != "m.room.encrypted" or content.get("sender_key") != from_key:
            continue
        mine = content["ciphertext"].get(device.curve25519)
        if mine is None:
            continue
        if mine["type"] == 0:
            message: Any = olm.OlmPreKeyMessage(mine["body"])
            if session is None or not session.matches(message, from_key):
                session = olm.InboundSession(device.account, message, from_key)
                device.account.remove_one_time_keys(session)
        else:
            message = olm.OlmMessage(mine["body"])
        assert session is not None
        payload = json.loads(session.decrypt(message))
        assert payload["recipient"] == device.user_id
        assert payload["recipient_keys"]["ed25519"] == device.account.identity_keys["ed25519"]
        keys.append(payload)
    return keys


def check_forwarded(keys: list[dict], sessions: list[StateSession]) -> int:
    """Every state session arrived and decrypts its state; returns how many were checked."""
    by_id = {s.id: s for s in sessions}
    checked = 0
    for key in keys:
        if key["type"] != "m.forwarded_room_key":
            continue
        content = key["content"]
        state = by_id.get(content["session_id"])
        if state is None:
            continue
        inbound = olm.InboundGroupSession.import_session(content["session_key"])
        for index, (ciphertext, payload) in state.ciphertexts.items():
            if index >= inbound.first_known_index:
                plaintext, got = inbound.decrypt(ciphertext)
                assert got == index and json.loads(plaintext) == payload
        checked += 1
    missing = set(by_id) - {k["content"]["session_id"] for k in keys}
    assert not missing, f"sessions never arrived: {missing}"
    return checked
