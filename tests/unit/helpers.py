"""Builders for ledger records in unit tests."""

from __future__ import annotations

from encstate_bot.ledger import MessageRecord, MessageStatus, StateRecord, Status

ROOM = "!room:example.org"


def state(
    event_id: str,
    session: str,
    index: int,
    event_type: str = "m.room.name",
    state_key: str = "",
    ts: int = 1000,
    status: Status = Status.VALID,
    message_payload: bool = False,
) -> StateRecord:
    return StateRecord(
        room_id=ROOM,
        event_id=event_id,
        outer_key=f"{event_type}:{state_key}",
        session_id=session,
        sender="@admin:example.org",
        origin_ts=ts,
        msg_index=index,
        ciphertext="c",
        status=status,
        inner_type=event_type if status == Status.VALID or message_payload else None,
        inner_key=state_key if status == Status.VALID else None,
        message_payload=message_payload,
    )


def message(
    event_id: str, session: str, index: int, status: MessageStatus = MessageStatus.MESSAGE
) -> MessageRecord:
    return MessageRecord(
        room_id=ROOM,
        event_id=event_id,
        session_id=session,
        msg_index=index,
        ciphertext=None,
        status=status,
    )


class _Device:
    def __init__(self, identity_key: str, signing_key: str) -> None:
        self.identity_key = identity_key
        self.signing_key = signing_key


class OneSessionCrypto:
    """A stand-in for mautrix's OlmMachine that holds one megolm session, and knows the
    devices of the users in ``owners`` (user -> (curve25519, ed25519) pairs; by default the
    admin owns the session)."""

    def __init__(self, session, owners: dict[str, set[str]] | None = None) -> None:
        self.crypto_store = self
        self.session = session
        if owners is None:
            owners = {"@admin:example.org": {(session.sender_key, session.signing_key)}}
        self.owners = owners

    async def get_group_session(self, room_id, session_id):
        return self.session if session_id == self.session.id else None

    async def get_devices(self, user_id):
        keys = self.owners.get(user_id, set())
        return {f"D{n}": _Device(*pair) for n, pair in enumerate(sorted(keys))}
