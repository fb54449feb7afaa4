"""Feeds the ledger: encrypted state and messages from sync, rescans and backfill, decrypted with
the sessions the bot holds, persisted through the store.

The bot never trusts a session id in an event: state counts once it decrypts and validates, a
message once it decrypts to a payload that is not replayed state.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Iterable

from mautrix.errors import GroupSessionWithheldError
import olm

from . import protocol
from .ledger import MessageRecord, MessageStatus, RoomLedger, StateRecord, Status, evolve
from .rooms import RoomView
from .store import Store

NewStateCallback = Callable[[str, set[str]], Awaitable[None]]


class Decrypted:
    __slots__ = ("plaintext", "index")

    def __init__(self, plaintext: str, index: int) -> None:
        self.plaintext = plaintext
        self.index = index


MISSING = "missing"  # the bot does not hold the session
EARLY = "early"  # the bot holds the session, but only from a later index
BAD = "bad"  # does not decrypt with the session it names


class SessionSource:
    """Looks sessions up in the crypto store, once per session per batch."""

    def __init__(self, crypto: Any) -> None:
        self.crypto = crypto
        self._cache: dict[tuple[str, str], Any] = {}

    async def get(self, room_id: str, session_id: str) -> Any:
        key = (room_id, session_id)
        if key not in self._cache:
            session = None
            if self.crypto is not None:
                try:
                    session = await self.crypto.crypto_store.get_group_session(room_id, session_id)
                except GroupSessionWithheldError:
                    session = None
            self._cache[key] = session
        return self._cache[key]

    async def decrypt(self, room_id: str, session_id: str, ciphertext: str) -> Decrypted | str:
        session = await self.get(room_id, session_id)
        if session is None:
            return MISSING
        try:
            plaintext, index = session.decrypt(ciphertext)
        except olm.OlmGroupSessionError as e:
            return EARLY if "UNKNOWN_MESSAGE_INDEX" in str(e) else BAD
        except Exception:
            return BAD
        return Decrypted(plaintext, index)


class Tracker:
    def __init__(
        self,
        store: Store,
        crypto: Any,
        log: logging.Logger,
        on_new_state: NewStateCallback | None = None,
    ) -> None:
        self.store = store
        self.crypto = crypto
        self.log = log
        self.on_new_state = on_new_state
        self.views: dict[str, RoomView] = {}
        self.ledgers: dict[str, RoomLedger] = {}
        self.shared_history: set[tuple[str, str]] = set()
        self.backfilled: set[str] = set()

    # Loading ------------------------------------------------------------------------------------

    async def load(self) -> None:
        for row in await self.store.rooms():
            if row.state_flag:
                self.ledgers.setdefault(row.room_id, RoomLedger(row.room_id))
            if row.backfilled:
                self.backfilled.add(row.room_id)
        for rec in await self.store.load_states():
            self.ledger(rec.room_id).add_state(rec)
        for msg in await self.store.load_messages():
            self.ledger(msg.room_id).add_message(msg)
        self.shared_history = await self.store.shared_history_sessions()

    def session_source(self) -> SessionSource:
        """A per-batch view of the sessions the bot holds."""
        return SessionSource(self.crypto)

    def view(self, room_id: str) -> RoomView:
        view = self.views.get(room_id)
        if view is None:
            view = self.views[room_id] = RoomView(room_id)
        return view

    def ledger(self, room_id: str) -> RoomLedger:
        ledger = self.ledgers.get(room_id)
        if ledger is None:
            ledger = self.ledgers[room_id] = RoomLedger(room_id)
        return ledger

    def tracked(self, room_id: str) -> bool:
        """A room is tracked once its m.room.encryption turns state encryption on."""
        view = self.views.get(room_id)
        return (view is not None and view.state_encrypted) or room_id in self.ledgers

    # Plaintext state ----------------------------------------------------------------------------

    async def apply_plain_state(self, room_id: str, raw: dict[str, Any]) -> bool:
        view = self.view(room_id)
        before = view.state_flag
        changed = view.apply(raw)
        if view.state_flag != before and view.state_flag is not None:
            self.ledger(room_id)
            await self.store.put_room_flag(room_id, view.state_flag)
            self.log.info(f"State encryption is on in {room_id} ({view.state_flag})")
        return changed

    # Encrypted events ---------------------------------------------------------------------------

    async def ingest(self, room_id: str, raw_events: Iterable[dict[str, Any]]) -> set[str]:
        """Record encrypted state events and messages (in timeline order); returns the sessions
        that gained valid state."""
        states: list[StateRecord] = []
        messages: list[MessageRecord] = []
        ledger = self.ledger(room_id)
        for raw in raw_events:
            if raw.get("type") != "m.room.encrypted":
                continue
            if "state_key" in raw:
                parsed = protocol.parse_encrypted_state(raw, room_id)
                if isinstance(parsed, protocol.Invalid):
                    self.log.info(f"Skipping encrypted state in {room_id}: {parsed.reason}")
                    continue
                rec = StateRecord(
                    room_id=room_id,
                    event_id=parsed.event_id,
                    outer_key=parsed.outer_key,
                    session_id=parsed.session_id,
                    sender=parsed.sender,
                    origin_ts=parsed.origin_ts,
                    msg_index=parsed.msg_index,
                    ciphertext=parsed.ciphertext,
                    sender_key=parsed.sender_key,
                    device_id=parsed.device_id,
                )
                if ledger.add_state(rec):
                    states.append(rec)
            else:
                parsed_msg = protocol.parse_encrypted_message(raw, room_id)
                if isinstance(parsed_msg, protocol.Invalid):
                    continue
                msg = MessageRecord(
                    room_id=room_id,
                    event_id=parsed_msg.event_id,
                    session_id=parsed_msg.session_id,
                    msg_index=parsed_msg.msg_index,
                    ciphertext=parsed_msg.ciphertext,
                )
                if ledger.add_message(msg):
                    messages.append(msg)
        if not states and not messages:
            return set()
        source = self.session_source()
        states = [await self._settle_state(source, rec) for rec in states]
        messages = [await self._settle_message(source, msg) for msg in messages]
        await self.store.put_states(states)
        await self.store.put_messages(messages)
        gained = {rec.session_id for rec in states if rec.status == Status.VALID}
        if gained and self.on_new_state:
            await self.on_new_state(room_id, gained)
        return gained

    async def session_received(self, room_id: str, session_id: str) -> set[str]:
        """A session arrived: decrypt what was waiting for it."""
        ledger = self.ledgers.get(room_id)
        if ledger is None:
            return set()
        source = self.session_source()
        states = [
            await self._settle_state(source, rec)
            for rec in ledger.state_records(session_id)
            if rec.status == Status.PENDING
        ]
        messages = [
            await self._settle_message(source, msg) for msg in ledger.pending_messages(session_id)
        ]
        await self.store.put_states(states)
        await self.store.put_messages(messages)
        gained = {rec.session_id for rec in states if rec.status == Status.VALID}
        if states:
            ok = sum(1 for r in states if r.status == Status.VALID)
            self.log.info(
                f"Session {session_id} in {room_id} arrived: {ok} of {len(states)} waiting "
                "state event(s) decrypted and valid"
            )
        if gained and self.on_new_state:
            await self.on_new_state(room_id, gained)
        return gained

    async def _settle_state(self, source: SessionSource, rec: StateRecord) -> StateRecord:
        result = await source.decrypt(rec.room_id, rec.session_id, rec.ciphertext)
        ledger = self.ledger(rec.room_id)
        if result == MISSING or result == EARLY:
            new = evolve(rec, status=Status.PENDING, reason=f"session {result}")
        elif result == BAD or not isinstance(result, Decrypted):
            new = evolve(rec, status=Status.INVALID, reason="does not decrypt with its session")
        else:
            new = self._validate(rec, result)
        ledger.update_state(new)
        if new.status == Status.INVALID:
            self.log.info(f"Invalid encrypted state {rec.event_id} in {rec.room_id}: {new.reason}")
        return new

    def _validate(self, rec: StateRecord, result: Decrypted) -> StateRecord:
        payload = protocol.load_payload(result.plaintext)
        if isinstance(payload, protocol.Invalid):
            return evolve(
                rec, status=Status.INVALID, reason=payload.reason, msg_index=result.index
            )
        checked = protocol.validate_state_payload(payload, rec.room_id, rec.outer_key)
        inner_type = payload.get("type") if isinstance(payload.get("type"), str) else "?"
        inner_key = payload.get("state_key")
        if isinstance(checked, protocol.Invalid):
            return evolve(
                rec,
                status=Status.INVALID,
                reason=checked.reason,
                msg_index=result.index,
                inner_type=inner_type[:255],
                inner_key=inner_key[:255] if isinstance(inner_key, str) else None,
                message_payload="state_key" not in payload,
            )
        view = self.view(rec.room_id)
        if not view.known:
            # e.g. a sync processed before the start-up rescan read the room's state: judge
            # the sender's power once it is known (the rescan settles pending records again)
            return evolve(
                rec,
                status=Status.PENDING,
                reason="waiting for the room's power levels",
                msg_index=result.index,
            )
        needed = view.state_level(checked.event_type)
        have = view.user_level(rec.sender)
        if have < needed:
            return evolve(
                rec,
                status=Status.INVALID,
                reason=f"sender's power level {have} is below {needed} for {checked.event_type}",
                msg_index=result.index,
                inner_type=checked.event_type,
                inner_key=checked.state_key,
            )
        return evolve(
            rec,
            status=Status.VALID,
            reason=None,
            msg_index=result.index,
            inner_type=checked.event_type,
            inner_key=checked.state_key,
        )

    async def _settle_message(self, source: SessionSource, msg: MessageRecord) -> MessageRecord:
        ledger = self.ledger(msg.room_id)
        assert msg.ciphertext is not None
        result = await source.decrypt(msg.room_id, msg.session_id, msg.ciphertext)
        if result == MISSING or result == EARLY:
            return msg
        if result == BAD or not isinstance(result, Decrypted):
            new = evolve(msg, status=MessageStatus.GARBAGE, ciphertext=None)
        else:
            payload = protocol.load_payload(result.plaintext)
            replay = ledger.state_index_taken(msg.session_id, result.index) or (
                isinstance(payload, dict) and "state_key" in payload
            )
            status = MessageStatus.REPLAY if replay else MessageStatus.MESSAGE
            new = evolve(msg, status=status, msg_index=result.index, ciphertext=None)
            if status == MessageStatus.MESSAGE:
                self.log.debug(f"Session {msg.session_id} in {msg.room_id} encrypts messages")
        ledger.update_message(new)
        return new

    # Session flags and self-supply --------------------------------------------------------------

    async def note_session(
        self, room_id: str, session_id: str, shared_history: bool, received_from: str | None
    ) -> None:
        if shared_history:
            self.shared_history.add((room_id, session_id))
        await self.store.put_session_flag(room_id, session_id, shared_history, received_from)

    def missing_sessions(self) -> dict[tuple[str, str], StateRecord]:
        """State sessions the bot cannot decrypt yet, with one event naming each."""
        missing: dict[tuple[str, str], StateRecord] = {}
        for room_id, ledger in self.ledgers.items():
            for rec in ledger.pending_state():
                missing.setdefault((room_id, rec.session_id), rec)
        return missing
