"""Feeds the ledger: encrypted state and messages from sync, rescans and backfill, decrypted with
the sessions the bot holds, persisted through the store.

The bot never trusts a session id in an event: state counts once it decrypts and validates, a
message once it decrypts to a payload that is not replayed state.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable, Iterable

from mautrix.errors import GroupSessionWithheldError
import olm

from . import glue, protocol
from .ledger import MessageRecord, MessageStatus, RoomLedger, StateRecord, Status, evolve
from .rooms import RoomView
from .store import Store


class Decrypted:
    __slots__ = ("plaintext", "index", "sender_key", "signing_key")

    def __init__(
        self,
        plaintext: str,
        index: int,
        sender_key: str | None = None,
        signing_key: str | None = None,
    ) -> None:
        self.plaintext = plaintext
        self.index = index
        # the curve25519 and ed25519 keys of the device that made the session
        self.sender_key = sender_key
        self.signing_key = signing_key


MAX_BACKLOG_EVENTS = 10_000  # per room, waiting to be written
MISSING = "missing"  # the bot does not hold the session
EARLY = "early"  # the bot holds the session, but only from a later index
BAD = "bad"  # does not decrypt with the session it names


class SessionSource:
    """Looks sessions up in the crypto store, once per session per batch."""

    def __init__(self, crypto: Any, own_user: str | None = None) -> None:
        self.crypto = crypto
        self.own_user = own_user
        self._cache: dict[tuple[str, str], Any] = {}
        self._owners: dict[str, set[tuple[str, str]] | None] = {}

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
        return Decrypted(
            plaintext,
            index,
            getattr(session, "sender_key", None),
            getattr(session, "signing_key", None),
        )

    async def device_keys(self, user_id: str) -> set[tuple[str, str]] | None:
        """The (curve25519, ed25519) key pairs of a user's devices as the crypto store knows
        them, looked up once per batch; None if they could not be looked up (judged later).
        Both keys must match a session: a curve25519 key is public, and anyone can upload a
        device claiming someone else's."""
        if user_id not in self._owners:
            keys: set[tuple[str, str]] = set()
            if self.crypto is not None:
                store = self.crypto.crypto_store
                try:
                    devices = await store.get_devices(user_id)
                    if devices is None:
                        devices = (await glue.fetch_keys(self.crypto, [user_id])).get(user_id, {})
                except Exception:
                    self._owners[user_id] = None
                    return None
                keys = {(d.identity_key, d.signing_key) for d in devices.values()}
                if user_id == self.own_user:
                    account = self.crypto.account
                    keys.add((account.identity_key, account.signing_key))
            self._owners[user_id] = keys
        return self._owners[user_id]


class Tracker:
    def __init__(
        self,
        store: Store,
        crypto: Any,
        log: logging.Logger,
        own_user: str | None = None,
    ) -> None:
        self.store = store
        self.crypto = crypto
        self.log = log
        # room -> session -> when it first gained valid state (time.monotonic()), until the
        # reactions take it
        self.gained: dict[str, dict[str, float]] = {}
        self.views: dict[str, RoomView] = {}
        self.ledgers: dict[str, RoomLedger] = {}
        self.shared_history: set[tuple[str, str]] = set()
        self.backfilled: set[str] = set()
        # room -> the tokens its timeline reads kept to do go on from (Store.unread), and
        # room -> its timeline reads running: events the bot has not read lie there, so none
        # of the room's sessions is forwarded meanwhile
        self.unread: dict[str, set[str]] = {}
        self.reading: dict[str, int] = {}
        self.reads_started: dict[str, int] = {}  # room -> reads of its timeline begun so far
        # rooms whose latest events could not be recorded: (events, current) batches in order,
        # retried before anything newer is written; nothing of such a room is shared meanwhile
        self.backlog: dict[str, list[tuple[list[dict[str, Any]], bool]]] = {}
        # rooms whose backlog overflowed: events were dropped, to be read again at the next start
        self.overflowed: set[str] = set()
        # the event ids first recorded since this start, while the start-up rescan runs (a
        # catch-up without a sync position stops at events known from before the start)
        self.fresh: set[str] | None = set()
        self._flags: dict[str, str | None] = {}  # room -> the state flag as stored
        self.own_user = own_user

    # Loading ------------------------------------------------------------------------------------

    async def load(self) -> None:
        for row in await self.store.rooms():
            self._flags[row.room_id] = row.state_flag
            if row.state_flag:
                self.ledgers.setdefault(row.room_id, RoomLedger(row.room_id))
            if row.backfilled:
                self.backfilled.add(row.room_id)
        for unread in await self.store.unread():
            self.unread.setdefault(unread.room_id, set()).add(unread.from_token)
        for rec in await self.store.load_states():
            self.ledger(rec.room_id).add_state(rec)
        for msg in await self.store.load_messages():
            self.ledger(msg.room_id).add_message(msg)
        for room_id, outer_key, event_id in await self.store.server_current():
            self.ledger(room_id).set_server_current(outer_key, event_id)
        self.shared_history = await self.store.shared_history_sessions()

    def take_gained(self) -> dict[str, dict[str, float]]:
        """The sessions that gained valid state since the last call, per room, with when."""
        gained, self.gained = self.gained, {}
        return gained

    def give_back(self, room_id: str, sessions: dict[str, float]) -> None:
        """Gains whose reactions failed: taken again by the next call."""
        room_gains = self.gained.setdefault(room_id, {})
        for session_id, at in sessions.items():
            room_gains[session_id] = min(at, room_gains.get(session_id, at))

    def session_source(self) -> SessionSource:
        """A per-batch view of the sessions the bot holds."""
        return SessionSource(self.crypto, self.own_user)

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

    def history_unread(self, room_id: str) -> bool:
        """Whether part of the room's timeline is kept to read (a read cut short by
        backfill_limit or by a failed page, the time the bot was out of the room): a message
        of any of its sessions may lie there, so none is forwarded until it is read."""
        return bool(self.unread.get(room_id))

    def being_read(self, room_id: str) -> bool:
        """Whether a read of the room's timeline is running, or its first read has not
        finished (it failed, and is retried): the courier forwards none of the room's
        sessions until then (what it has not reached yet may hold messages of them), and
        retries what would; seals go at once."""
        if room_id in self.reading:
            return True
        return room_id in self.ledgers and room_id not in self.backfilled

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
            if self._flags.get(room_id) != view.state_flag:  # (a rescan reads it again)
                await self.store.put_room_flag(room_id, view.state_flag)
                self._flags[room_id] = view.state_flag
                self.log.info(f"State encryption is on in {room_id} ({view.state_flag})")
        return changed

    # Encrypted events ---------------------------------------------------------------------------

    def complete(self, room_id: str) -> bool:
        """Whether every event the bot has seen in the room is recorded (nothing is shared
        from a room whose newest evidence could not be written)."""
        return room_id not in self.backlog

    async def ingest(
        self, room_id: str, raw_events: Iterable[dict[str, Any]], current: bool = False
    ) -> set[str]:
        """Record encrypted state events and messages (in timeline order); returns the sessions
        that gained valid state. ``current``: the events are the room's state as the server
        holds it now (sync, a rescan), so the last one of each packed key is its current event;
        catch-up pages of older events are not.

        Evidence is durable before it counts: the events are written (undecided) before the
        ledger sees them. If that write fails the batch waits in the room's backlog, later
        batches queue behind it, and the room shares nothing until all are written."""
        batch = ([e for e in raw_events if isinstance(e, dict)], current)
        waiting = self.backlog.get(room_id)
        if waiting is not None:
            if sum(len(events) for events, _ in waiting) < MAX_BACKLOG_EVENTS:
                waiting.append(batch)
            else:
                self.overflowed.add(room_id)
            # else: the room stays incomplete and nothing newer is written, so the catch-up at
            # the next start reads these events again; memory stays bounded meanwhile.
            return await self.flush(room_id)
        try:
            return await self._ingest(room_id, *batch)
        except Exception as e:
            self.log.error(
                f"Could not record {len(batch[0])} event(s) of {room_id} ({type(e).__name__}: "
                f"{e}); sharing nothing from it until they are recorded"
            )
            self.backlog[room_id] = [batch]
            return set()

    async def flush(self, room_id: str) -> set[str]:
        """Write a room's backlog, oldest batch first; stops at the first that still fails."""
        gained: set[str] = set()
        batches = self.backlog.get(room_id, [])
        while batches:
            try:
                gained |= await self._ingest(room_id, *batches[0])
            except Exception as e:
                self.log.warning(f"Still cannot record events of {room_id}: {e}")
                return gained
            batches.pop(0)
        self.backlog.pop(room_id, None)
        self.log.info(f"Recorded the backlog of {room_id}")
        return gained

    async def flush_all(self) -> None:
        for room_id in list(self.backlog):
            await self.flush(room_id)

    async def _ingest(
        self, room_id: str, raw_events: list[dict[str, Any]], current: bool
    ) -> set[str]:
        states: list[StateRecord] = []
        messages: list[MessageRecord] = []
        ledger = self.ledger(room_id)
        latest: dict[str, str] = {}  # packed key -> event id, when ``current``
        seen: set[str] = set()
        for raw in raw_events:
            if raw.get("type") != "m.room.encrypted":
                continue
            if "state_key" in raw:
                ref = protocol.state_ref(raw) if current else None
                if ref is not None:
                    latest[ref[0]] = ref[1]
                parsed = protocol.parse_encrypted_state(raw, room_id)
                if isinstance(parsed, protocol.Invalid):
                    self.log.info(f"Skipping encrypted state in {room_id}: {parsed.reason}")
                    continue
                if parsed.event_id in ledger.events or parsed.event_id in seen:
                    continue
                seen.add(parsed.event_id)
                states.append(
                    StateRecord(
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
                )
            else:
                parsed_msg = protocol.parse_encrypted_message(raw, room_id)
                if isinstance(parsed_msg, protocol.Invalid):
                    continue
                event_id = parsed_msg.event_id
                if event_id in ledger.messages or event_id in ledger.events or event_id in seen:
                    continue
                seen.add(event_id)
                messages.append(
                    MessageRecord(
                        room_id=room_id,
                        event_id=event_id,
                        session_id=parsed_msg.session_id,
                        msg_index=parsed_msg.msg_index,
                        ciphertext=parsed_msg.ciphertext,
                    )
                )
        # (a rescan reads every current event again: only what changed is written)
        latest = {k: e for k, e in latest.items() if ledger.server_current.get(k) != e}
        if not states and not messages and not latest:
            return set()
        # Write-ahead: undecided records (with their ciphertexts) reach the database before the
        # ledger counts anything; a crash after this point re-decides them at the next start.
        await self.store.put_states(states)
        await self.store.put_messages(messages)
        if latest:
            await self.store.put_server_current(room_id, latest)
        if self.fresh is not None:
            self.fresh.update(rec.event_id for rec in states)
            self.fresh.update(msg.event_id for msg in messages)
        for rec in states:
            ledger.add_state(rec)
        for msg in messages:
            ledger.add_message(msg)
        for outer_key, event_id in latest.items():
            ledger.set_server_current(outer_key, event_id)
        return await self._settle(room_id, states, messages)

    async def _settle(
        self, room_id: str, states: list[StateRecord], messages: list[MessageRecord]
    ) -> set[str]:
        """Decrypt and judge records (one failing record never stops the others: it stays
        undecided, which shares nothing), persist the verdicts, announce new state."""
        source = self.session_source()
        settled_states = await self._judge(source, states, self._settle_state)
        settled_messages = await self._judge(source, messages, self._settle_message)
        await self.store.put_states(settled_states)
        await self.store.put_messages(settled_messages)
        gained = {rec.session_id for rec in settled_states if rec.status == Status.VALID}
        if gained:
            now = time.monotonic()
            room_gains = self.gained.setdefault(room_id, {})
            for session_id in gained:
                room_gains.setdefault(session_id, now)
        return gained

    async def _judge(
        self,
        source: SessionSource,
        records: list,
        settle: Callable[[SessionSource, Any], Awaitable],
    ) -> list:
        """Settle each record on its own: one that raises is logged and stays undecided."""
        settled = []
        for rec in records:
            try:
                settled.append(await settle(source, rec))
            except Exception:
                self.log.exception(f"Could not judge {rec.event_id} in {rec.room_id}")
        return settled

    async def session_received(self, room_id: str, session_id: str) -> set[str]:
        """A session arrived: decrypt what was waiting for it."""
        ledger = self.ledgers.get(room_id)
        if ledger is None:
            return set()
        states = [rec for rec in ledger.state_records(session_id) if rec.status == Status.PENDING]
        messages = ledger.pending_messages(session_id)
        if not states and not messages:
            return set()
        gained = await self._settle(room_id, states, messages)
        if states:
            ok = sum(1 for r in states if ledger.events[r.event_id].status == Status.VALID)
            self.log.info(
                f"Session {session_id} in {room_id} arrived: {ok} of {len(states)} waiting "
                "state event(s) decrypted and valid"
            )
        return gained

    async def settle_pending(self) -> None:
        """At start: decide what a crash left undecided (written ahead, never judged)."""
        for room_id, ledger in list(self.ledgers.items()):
            sessions = {rec.session_id for rec in ledger.pending_state()}
            sessions |= {msg.session_id for msg in ledger.pending_messages()}
            for session_id in sorted(sessions):
                await self.session_received(room_id, session_id)

    async def _settle_state(self, source: SessionSource, rec: StateRecord) -> StateRecord:
        result = await source.decrypt(rec.room_id, rec.session_id, rec.ciphertext)
        ledger = self.ledger(rec.room_id)
        if result == MISSING or result == EARLY:
            new = evolve(rec, status=Status.PENDING, reason=f"session {result}")
        elif result == BAD or not isinstance(result, Decrypted):
            new = evolve(rec, status=Status.INVALID, reason="does not decrypt with its session")
        else:
            new = await self._validate(source, rec, result)
        if new.status == Status.INVALID:
            new = evolve(new, ciphertext="")  # decided: the ciphertext is not needed any more
        ledger.update_state(new)
        if new.status == Status.INVALID:
            self.log.info(f"Invalid encrypted state {rec.event_id} in {rec.room_id}: {new.reason}")
        return new

    async def _validate(
        self, source: SessionSource, rec: StateRecord, result: Decrypted
    ) -> StateRecord:
        payload = protocol.load_payload(result.plaintext)
        if isinstance(payload, protocol.Invalid):
            return evolve(
                rec, status=Status.INVALID, reason=payload.reason, msg_index=result.index
            )
        checked = protocol.validate_state_payload(payload, rec.room_id, rec.outer_key)
        if isinstance(checked, protocol.Invalid):
            return evolve(
                rec,
                status=Status.INVALID,
                reason=checked.reason,
                msg_index=result.index,
                inner_type=protocol.clean_text(payload.get("type")) or "?",
                inner_key=protocol.clean_text(payload.get("state_key")),
                message_payload="state_key" not in payload,
            )
        # MSC4362 state counts only from the session's owner: a moderator can re-post an old
        # ciphertext of someone else's session as new state (a replay).
        owners = await source.device_keys(rec.sender)
        if owners is None:
            return evolve(
                rec,
                status=Status.PENDING,
                reason=f"could not look up the devices of {rec.sender}",
                msg_index=result.index,
            )
        if (result.sender_key, result.signing_key) not in owners:
            return evolve(
                rec,
                status=Status.INVALID,
                reason=f"its session was not made by a device of the sender {rec.sender} "
                "(a replayed ciphertext)",
                msg_index=result.index,
                inner_type=checked.event_type,
                inner_key=checked.state_key,
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
        self,
        room_id: str,
        session_id: str,
        shared_history: bool,
        received_from: str | None,
        from_creator: bool = False,
    ) -> None:
        """Remember where a session came from. Its shared-history flag is the creator's word
        only: set from an ``m.room_key`` of the creator, never from a forward."""
        if from_creator and shared_history:
            self.shared_history.add((room_id, session_id))
        elif from_creator:
            self.shared_history.discard((room_id, session_id))
        await self.store.put_session_flag(
            room_id, session_id, shared_history and from_creator, received_from, from_creator
        )

    def missing_sessions(self) -> dict[tuple[str, str], StateRecord]:
        """State sessions the bot cannot decrypt yet, with one event naming each."""
        missing: dict[tuple[str, str], StateRecord] = {}
        for room_id, ledger in self.ledgers.items():
            for rec in ledger.pending_state():
                missing.setdefault((room_id, rec.session_id), rec)
        return missing
