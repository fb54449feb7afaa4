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


class OneSessionCrypto:
    """A stand-in for mautrix's OlmMachine that holds one megolm session."""

    def __init__(self, session) -> None:
        self.crypto_store = self
        self.session = session

    async def get_group_session(self, room_id, session_id):
        return self.session if session_id == self.session.id else None
