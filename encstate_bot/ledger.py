"""The ledger: which megolm sessions carry which encrypted state, and what sharing one exposes.

Pure data structures. The bot feeds it what it sees (state events, timeline messages, decryption
results); the policy asks it about one session at a time. A session id in an event is only a
claim: a session counts as *state* only through state events that decrypted and validated, and
as *used for messages* only through timeline payloads that decrypted and are not replayed state.
"""

from __future__ import annotations

from enum import Enum
from typing import Iterable

from attr import dataclass, evolve

# A timestamp more than a day ahead pins a value forever under the conflict rule.
FAR_FUTURE_MS = 24 * 3600 * 1000


class Status(str, Enum):
    PENDING = "pending"  # the bot does not hold (this index of) the session yet
    VALID = "valid"  # decrypted and passed MSC4362 validation
    INVALID = "invalid"  # decrypted, failed validation, or does not decrypt at all


class MessageStatus(str, Enum):
    PENDING = "pending"  # not decrypted yet
    MESSAGE = "message"  # decrypted: the session encrypted a timeline message
    REPLAY = "replay"  # decrypted to state, or reuses a state event's index: not a message
    GARBAGE = "garbage"  # does not decrypt with the session it names


@dataclass(frozen=True)
class StateRecord:
    room_id: str
    event_id: str
    outer_key: str
    session_id: str
    sender: str
    origin_ts: int
    msg_index: int | None
    ciphertext: str
    sender_key: str | None = None
    device_id: str | None = None
    status: Status = Status.PENDING
    inner_type: str | None = None
    inner_key: str | None = None
    reason: str | None = None
    # True when the payload decrypted but was a message posing as state (no state_key).
    message_payload: bool = False

    @property
    def pair(self) -> tuple[str, str] | None:
        if self.status != Status.VALID or self.inner_type is None or self.inner_key is None:
            return None
        return self.inner_type, self.inner_key

    @property
    def decrypted(self) -> bool:
        return self.status == Status.VALID or (
            self.status == Status.INVALID and self.inner_type is not None
        )

    def sort_key(self) -> tuple[int, str]:
        """MSC3414's conflict rule: newest origin_server_ts, then event_id, last one wins."""
        return self.origin_ts, self.event_id


@dataclass(frozen=True)
class MessageRecord:
    room_id: str
    event_id: str
    session_id: str
    msg_index: int | None
    ciphertext: str | None
    status: MessageStatus = MessageStatus.PENDING


class SessionKind(str, Enum):
    UNKNOWN = "unknown"  # no event the bot saw names it
    PENDING = "pending"  # named by state events the bot cannot decrypt yet
    MESSAGE = "message"  # encrypted messages only
    STATE = "state"  # encrypted valid state only
    MIXED = "mixed"  # encrypted valid state and messages


@dataclass(frozen=True)
class SessionFacts:
    session_id: str
    kind: SessionKind
    current: tuple[StateRecord, ...] = ()
    superseded: tuple[StateRecord, ...] = ()
    message_indices: frozenset[int] = frozenset()
    safe_index: int | None = None
    # superseded values still readable when exporting from safe_index
    exposed: tuple[StateRecord, ...] = ()
    # indices between safe_index and the highest known index that the bot never saw decrypt
    gaps: tuple[int, ...] = ()


class RoomLedger:
    """Everything the bot knows about one room's encrypted state and its sessions."""

    def __init__(self, room_id: str) -> None:
        self.room_id = room_id
        self.events: dict[str, StateRecord] = {}
        self.messages: dict[str, MessageRecord] = {}
        self._state_by_session: dict[str, set[str]] = {}
        self._messages_by_session: dict[str, set[str]] = {}
        self._by_outer: dict[str, set[str]] = {}
        # packed outer key -> the event the homeserver's current state holds for it
        self.server_current: dict[str, str] = {}
        # packed outer key -> the valid record that is the current value
        self._winners: dict[str, str] = {}
        self._facts_cache: dict[str, SessionFacts] = {}

    # Feeding ------------------------------------------------------------------------------------

    def add_state(self, record: StateRecord) -> bool:
        """Record a state event; returns False if it was already known."""
        if record.event_id in self.events:
            return False
        self.events[record.event_id] = record
        self._state_by_session.setdefault(record.session_id, set()).add(record.event_id)
        self._by_outer.setdefault(record.outer_key, set()).add(record.event_id)
        self._invalidate(record.session_id)
        self._consider(record)
        return True

    def update_state(self, record: StateRecord) -> None:
        """Replace a known record (after decryption)."""
        old = self.events.get(record.event_id)
        self.events[record.event_id] = record
        self._state_by_session.setdefault(record.session_id, set()).add(record.event_id)
        self._by_outer.setdefault(record.outer_key, set()).add(record.event_id)
        if old is not None and old.outer_key != record.outer_key:
            self._recompute_winner(old.outer_key)
        self._invalidate(record.session_id)
        self._consider(record)

    def set_server_current(self, outer_key: str, event_id: str) -> None:
        """The homeserver's current state holds ``event_id`` for this packed key (MSC4362: it
        is authoritative). While that event is not valid to the bot, nothing is current for
        the key, so nothing older for it is shared."""
        if self.server_current.get(outer_key) == event_id:
            return
        self.server_current[outer_key] = event_id
        self._recompute_winner(outer_key)

    def add_message(self, record: MessageRecord) -> bool:
        if record.event_id in self.messages or record.event_id in self.events:
            return False
        self.messages[record.event_id] = record
        self._messages_by_session.setdefault(record.session_id, set()).add(record.event_id)
        self._invalidate(record.session_id)
        return True

    def update_message(self, record: MessageRecord) -> None:
        self.messages[record.event_id] = record
        self._messages_by_session.setdefault(record.session_id, set()).add(record.event_id)
        self._invalidate(record.session_id)

    def _consider(self, record: StateRecord) -> None:
        """Update the current value of the record's key for this one record, in constant time
        (a key can carry thousands of superseded values: recomputing from all of them on every
        record made loading and rescans quadratic)."""
        key = record.outer_key
        holder = self._winners.get(key)
        if key in self.server_current:
            if self.server_current[key] == record.event_id or holder == record.event_id:
                self._recompute_winner(key)  # the server names one event: no scan
            return
        if holder == record.event_id:
            if record.pair is None:  # the current value stopped being valid: the rare scan
                self._recompute_winner(key)
            return
        if record.pair is None:
            return
        if holder is None or self.events[holder].sort_key() < record.sort_key():
            if holder is not None:
                self._invalidate(self.events[holder].session_id)
            self._winners[key] = record.event_id
            self._invalidate(record.session_id)

    def _recompute_winner(self, outer_key: str) -> None:
        """The current value of a packed key: the server's current event if it is valid, else
        nothing; where the server's word is not known yet, MSC3414's conflict rule among the
        valid records."""
        holder = self._winners.pop(outer_key, None)
        if holder is not None:
            self._invalidate(self.events[holder].session_id)
        winner: StateRecord | None = None
        named = self.server_current.get(outer_key)
        if named is not None:
            rec = self.events.get(named)
            if rec is not None and rec.pair is not None and rec.outer_key == outer_key:
                winner = rec
        else:
            candidates = [
                self.events[eid]
                for eid in self._by_outer.get(outer_key, ())
                if self.events[eid].pair is not None
            ]
            if candidates:
                winner = max(candidates, key=StateRecord.sort_key)
        if winner is not None:
            self._winners[outer_key] = winner.event_id
            self._invalidate(winner.session_id)

    def _invalidate(self, session_id: str) -> None:
        self._facts_cache.pop(session_id, None)

    # Questions ----------------------------------------------------------------------------------

    def is_current(self, record: StateRecord) -> bool:
        return record.pair is not None and self._winners.get(record.outer_key) == record.event_id

    def unreadable_current(self) -> list[str]:
        """Packed keys whose current event (the server's word) the bot cannot use: not held
        yet, or invalid. Nothing older is shared for them."""
        return sorted(
            key
            for key, event_id in self.server_current.items()
            if key not in self._winners and event_id in self.events
        )

    def pending_current_sessions(self) -> list[str]:
        """Sessions of current values (the server's word) that the bot cannot read yet because
        it lacks their key: what a newcomer is owed once the key arrives."""
        order: list[str] = []
        for key in self.unreadable_current():
            record = self.events[self.server_current[key]]
            if record.status == Status.PENDING and record.session_id not in order:
                order.append(record.session_id)
        return order

    def current_state(self) -> list[StateRecord]:
        """The room's current encrypted state, aesthetic types first."""
        from .protocol import aesthetic_rank

        records = [self.events[eid] for eid in self._winners.values()]
        return sorted(records, key=lambda r: (aesthetic_rank(r.inner_type), r.outer_key))

    def state_sessions(self) -> list[str]:
        """Sessions that carry current state, the ones with aesthetic state first."""
        order: list[str] = []
        for record in self.current_state():
            if record.session_id not in order:
                order.append(record.session_id)
        return order

    def sessions(self) -> set[str]:
        return set(self._state_by_session) | set(self._messages_by_session)

    def pending_state(self) -> list[StateRecord]:
        return [rec for rec in self.events.values() if rec.status == Status.PENDING]

    def pending_messages(self, session_id: str | None = None) -> list[MessageRecord]:
        ids: Iterable[str] = (
            self._messages_by_session.get(session_id, set())
            if session_id is not None
            else self.messages
        )
        return [
            self.messages[eid] for eid in ids if self.messages[eid].status == MessageStatus.PENDING
        ]

    def state_records(self, session_id: str) -> list[StateRecord]:
        return [self.events[eid] for eid in self._state_by_session.get(session_id, ())]

    def state_index_taken(self, session_id: str, index: int | None) -> bool:
        """Whether a decrypted state event of this session sits at this index (replay check)."""
        return index is not None and any(
            rec.msg_index == index and rec.decrypted for rec in self.state_records(session_id)
        )

    def facts(self, session_id: str) -> SessionFacts:
        cached = self._facts_cache.get(session_id)
        if cached is None:
            cached = self._facts_cache[session_id] = self._compute_facts(session_id)
        return cached

    def _compute_facts(self, session_id: str) -> SessionFacts:
        states = self.state_records(session_id)
        messages = [self.messages[eid] for eid in self._messages_by_session.get(session_id, ())]
        message_indices = {
            m.msg_index
            for m in messages
            if m.status == MessageStatus.MESSAGE and m.msg_index is not None
        }
        # A "state" event whose payload is a message is evidence of a message at that index.
        message_indices |= {
            rec.msg_index for rec in states if rec.message_payload and rec.msg_index is not None
        }
        valid = [rec for rec in states if rec.status == Status.VALID]
        if not valid:
            if message_indices:
                kind = SessionKind.MESSAGE
            elif any(rec.status == Status.PENDING for rec in states):
                kind = SessionKind.PENDING
            else:
                kind = SessionKind.UNKNOWN
            return SessionFacts(
                session_id=session_id, kind=kind, message_indices=frozenset(message_indices)
            )
        kind = SessionKind.MIXED if message_indices else SessionKind.STATE
        current = tuple(sorted((r for r in valid if self.is_current(r)), key=_by_index))
        superseded = tuple(sorted((r for r in valid if not self.is_current(r)), key=_by_index))
        indexed = [r.msg_index for r in current if r.msg_index is not None]
        safe_index = min(indexed) if indexed else None
        exposed: tuple[StateRecord, ...] = ()
        gaps: tuple[int, ...] = ()
        if safe_index is not None:
            # A superseded event at a current event's index is the same ciphertext replayed:
            # it reveals nothing the current value does not.
            current_indices = set(indexed)
            exposed = tuple(
                r
                for r in superseded
                if r.msg_index is not None
                and r.msg_index > safe_index
                and r.msg_index not in current_indices
            )
            known = set(message_indices) | {
                r.msg_index for r in states if r.decrypted and r.msg_index is not None
            }
            known |= {
                m.msg_index
                for m in messages
                if m.status == MessageStatus.REPLAY and m.msg_index is not None
            }
            # A message not decrypted yet (the bot does not hold that index, or processing it
            # failed) is an index the bot cannot vouch for.
            unsure = {
                m.msg_index
                for m in messages
                if m.status == MessageStatus.PENDING and m.msg_index is not None
            }
            gaps = _gaps(safe_index, known, unsure)
        return SessionFacts(
            session_id=session_id,
            kind=kind,
            current=current,
            superseded=superseded,
            message_indices=frozenset(message_indices),
            safe_index=safe_index,
            exposed=exposed,
            gaps=gaps,
        )

    # Reports ------------------------------------------------------------------------------------

    def far_future(self, now_ms: int) -> list[StateRecord]:
        return [
            rec
            for rec in self.events.values()
            if rec.status == Status.VALID and rec.origin_ts > now_ms + FAR_FUTURE_MS
        ]

    def counts(self) -> dict[str, int]:
        valid = [r for r in self.events.values() if r.status == Status.VALID]
        current = sum(1 for r in valid if self.is_current(r))
        kinds = [self.facts(s).kind for s in self.sessions()]
        return {
            "current": current,
            "superseded": len(valid) - current,
            "invalid": sum(1 for r in self.events.values() if r.status == Status.INVALID),
            "pending": sum(1 for r in self.events.values() if r.status == Status.PENDING),
            "state_only_sessions": kinds.count(SessionKind.STATE),
            "mixed_sessions": kinds.count(SessionKind.MIXED),
        }


MAX_GAPS = 64


def _gaps(safe_index: int, known: set[int], unsure: set[int]) -> tuple[int, ...]:
    """Indices from the safe index up to the highest one seen that nothing vouches for (at
    most MAX_GAPS of them: an index read from an attacker's ciphertext may be huge)."""
    top = max(known | unsure)
    found: list[int] = []
    index = safe_index
    for mark in sorted(i for i in known | {top + 1} if i >= safe_index):
        while index < mark and len(found) < MAX_GAPS:
            found.append(index)
            index += 1
        if len(found) >= MAX_GAPS:
            break
        index = mark + 1
    return tuple(found)


def _by_index(record: StateRecord) -> tuple[int, str]:
    return (record.msg_index if record.msg_index is not None else -1), record.event_id


__all__ = [
    "MessageRecord",
    "MessageStatus",
    "RoomLedger",
    "SessionFacts",
    "SessionKind",
    "StateRecord",
    "Status",
    "evolve",
]
