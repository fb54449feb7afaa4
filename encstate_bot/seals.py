"""Seals: the bot's own one-value sessions.

For every current, valid value of a room's encrypted state, the bot re-sends the same value
itself, as an MSC4362 encrypted state event in a megolm session it created for that one event
(a *seal*). The seal's ``m.room_key`` (index 0) can go to anyone who may read the value, on any
entry path, and every client takes it: it comes from the session's creator. A seal opens
exactly one event, so it can never leak a message or a later value.

Pure: this module decides which values need a seal and which seals are live; the sealer
(``sealer.py``) does the I/O.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

from attr import dataclass

from .ledger import RoomLedger, StateRecord
from .policy import SealFacts
from .room_keys import room_key_content

# The state an invitee or a member of an admitting room may read before joining (MSC3414's
# "aesthetic" state), unless the config names others.
PREVIEW_TYPES = ("m.room.name", "m.room.topic", "m.room.avatar")


@dataclass(frozen=True)
class Seal:
    room_id: str
    session_id: str
    outer_key: str
    inner_type: str
    inner_key: str
    content_hash: str
    source_event_id: str  # the value it seals (the event that made it current)
    session_key: str  # signed, from index 0: the m.room_key form
    created_ts: int
    event_id: str | None = None  # the bot's own state event, once sent

    def room_key(self) -> dict[str, Any]:
        """The ``m.room_key`` content that opens the seal, flagged shared history (MSC4268),
        so a member's client puts it in the bundle it sends with its own invites."""
        content = room_key_content(self.room_id, self.session_id, self.session_key)
        return {**content, "shared_history": True}

    def seals(self, record: StateRecord) -> bool:
        """Whether this seal opens the event that is ``record`` (its own event, or the value
        it sealed before its own event came back)."""
        return record.session_id == self.session_id or record.event_id in (
            self.source_event_id,
            self.event_id,
        )


def content_hash(content: Any) -> str:
    """A stable digest of a state value's content (canonical JSON)."""
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Unsealable:
    outer_key: str
    reason: str


class SealBook:
    """Every seal the bot made, by room; which are live and which values lack one.

    A seal counts (opens its value, blocks a new seal of the same content) once its event is
    sent, or while the sealer is sending it (``begin``: its key goes out before its event). A
    seal whose event never went out (a failed send, a crash) counts for nothing: its key opens
    no event, and the value is sealed again."""

    def __init__(self) -> None:
        self.rooms: dict[str, dict[str, Seal]] = {}  # room -> session id -> seal
        self._latest: dict[tuple[str, str], Seal] = {}  # (room, packed key) -> newest counted
        self.in_flight: set[str] = set()

    def _counts(self, seal: Seal) -> bool:
        return seal.event_id is not None or seal.session_id in self.in_flight

    def add(self, seal: Seal) -> None:
        self.rooms.setdefault(seal.room_id, {})[seal.session_id] = seal
        if not self._counts(seal):
            return
        latest = self._latest.get((seal.room_id, seal.outer_key))
        if latest is None or (latest.created_ts, latest.session_id) <= (
            seal.created_ts,
            seal.session_id,
        ):
            self._latest[(seal.room_id, seal.outer_key)] = seal

    def begin(self, seal: Seal) -> None:
        """The sealer is about to send this seal's key, then its event."""
        self.in_flight.add(seal.session_id)
        self.add(seal)

    def finish(self, seal: Seal) -> None:
        """Its event was sent (``seal.event_id``), or it was abandoned (None)."""
        self.in_flight.discard(seal.session_id)
        self.rooms.setdefault(seal.room_id, {})[seal.session_id] = seal
        if seal.event_id is None:
            key = (seal.room_id, seal.outer_key)
            counted = [
                s
                for s in self.rooms[seal.room_id].values()
                if s.outer_key == seal.outer_key and self._counts(s)
            ]
            if counted:
                self._latest[key] = max(counted, key=lambda s: (s.created_ts, s.session_id))
            else:
                self._latest.pop(key, None)
        else:
            self.add(seal)

    def load(self, seals: Iterable[Seal]) -> None:
        for seal in seals:
            self.add(seal)

    def get(self, room_id: str, session_id: str) -> Seal | None:
        return self.rooms.get(room_id, {}).get(session_id)

    def is_seal(self, room_id: str, session_id: str) -> bool:
        return session_id in self.rooms.get(room_id, {})

    def latest(self, room_id: str, outer_key: str) -> Seal | None:
        return self._latest.get((room_id, outer_key))

    def live(self, ledger: RoomLedger | None) -> list[Seal]:
        """The seals that open a current value of the room, in the ledger's order (aesthetic
        types first)."""
        if ledger is None:
            return []
        live = []
        for record in ledger.current_state():
            seal = self.latest(ledger.room_id, record.outer_key)
            if seal is not None and seal.seals(record):
                live.append(seal)
            else:
                own = self.get(ledger.room_id, record.session_id)
                if own is not None:  # an older seal of ours that is current again
                    live.append(own)
        return live

    def shareable(self, ledger: RoomLedger | None) -> tuple[dict[str, Seal], list[str]]:
        """What a room has to hand out: its live seals by session, and the other sessions that
        carry current state (anyone else's, for joined members only)."""
        if ledger is None:
            return {}, []
        live = {seal.session_id: seal for seal in self.live(ledger)}
        others = [s for s in ledger.state_sessions() if not self.is_seal(ledger.room_id, s)]
        return live, others

    def sealed(self, ledger: RoomLedger, record: StateRecord) -> bool:
        """Whether a current value is opened by one of the bot's seals."""
        seal = self.latest(ledger.room_id, record.outer_key)
        return (seal is not None and seal.seals(record)) or self.is_seal(
            ledger.room_id, record.session_id
        )


def needs_seal(book: SealBook, ledger: RoomLedger, record: StateRecord, digest: str) -> bool:
    """A current value needs a new seal unless it is one of the bot's seals, or its content is
    what the bot's newest seal for that key already holds. The content rule is what keeps two
    empowered encstate instances from resealing each other's seals forever: each sees the
    other's seal carry the value it sealed itself."""
    if book.is_seal(ledger.room_id, record.session_id):
        return False
    latest = book.latest(ledger.room_id, record.outer_key)
    return latest is None or latest.content_hash != digest


def is_preview(event_type: str | None, preview_types: Iterable[str]) -> bool:
    return event_type in tuple(preview_types)


def seal_facts(seal: Seal, live: bool, preview_types: Iterable[str]) -> SealFacts:
    """One seal as the policy sees it."""
    return SealFacts(seal.inner_type, is_preview(seal.inner_type, preview_types), live)
