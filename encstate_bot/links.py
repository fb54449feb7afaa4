"""Restricted join rules as a graph: whose members may hold which room's state keys.

Room B with ``{"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id":
A}]}`` admits A's members, so MSC3414 asks that A's members get B's state keys. A link (B, A) is
*actionable* for the bot when it is empowered in B (it may hand out B's keys) and joined to A (it
can see who A's members are). ``LinkGraph`` is pure; ``RoomLinks`` keeps the bot's rooms and
asks the tracker where the bot is empowered.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from attr import dataclass


@dataclass(frozen=True, order=True)
class Link:
    room_id: str  # the restricted room B, whose keys are shared
    via: str  # the allowed room A, whose members are admitted


@dataclass(frozen=True)
class LinkGap:
    link: Link
    reason: str


class LinkGraph:
    def __init__(self) -> None:
        self._allows: dict[str, tuple[str, ...]] = {}
        self._admits: dict[str, set[str]] = {}

    def set_allow(self, room_id: str, allowed: Iterable[str]) -> None:
        """Replace what a room's join rule allows (empty for non-restricted rules)."""
        for via in self._allows.pop(room_id, ()):
            rooms = self._admits.get(via)
            if rooms is not None:
                rooms.discard(room_id)
                if not rooms:
                    del self._admits[via]
        allowed = tuple(dict.fromkeys(a for a in allowed if a != room_id))
        if allowed:
            self._allows[room_id] = allowed
            for via in allowed:
                self._admits.setdefault(via, set()).add(room_id)

    def allowed(self, room_id: str) -> tuple[str, ...]:
        """The rooms whose members ``room_id`` admits."""
        return self._allows.get(room_id, ())

    def allowing(self, via: str) -> set[str]:
        """The restricted rooms that admit ``via``'s members."""
        return set(self._admits.get(via, ()))

    def links(self) -> set[Link]:
        return {Link(room, via) for room, allowed in self._allows.items() for via in allowed}

    def actionable(self, joined: set[str], empowered: Callable[[str], bool]) -> set[Link]:
        return {link for link in self.links() if link.via in joined and empowered(link.room_id)}

    def gaps(self, joined: set[str], empowered: Callable[[str], bool]) -> list[LinkGap]:
        """Links the bot cannot act on, with why."""
        gaps = []
        for link in sorted(self.links()):
            reasons = []
            if not empowered(link.room_id):
                reasons.append(f"the bot is not empowered in {link.room_id}")
            if link.via not in joined:
                reasons.append(f"the bot is not in {link.via}, so it cannot see its members")
            if reasons:
                gaps.append(LinkGap(link, "; ".join(reasons)))
        return gaps


class RoomLinks:
    """The rooms the bot is in and the links between them, as the sync tells: which allowed
    rooms can admit someone into a room, and which links the bot can act on."""

    def __init__(self, tracker: Any, own_user: str, log: Any) -> None:
        self.tracker = tracker
        self.own_user = own_user
        self.log = log
        self.graph = LinkGraph()
        self.joined: set[str] = set()
        self.listed = False  # until the start-up rescan lists the joined rooms

    def empowered(self, room_id: str) -> bool:
        return bool(self.tracker.view(room_id).empowered(self.own_user))

    def is_joined(self, room_id: str) -> bool:
        """Whether the bot is in the room (before the rooms are listed, assume so)."""
        return room_id in self.joined or not self.listed

    def set_joined(self, rooms: Iterable[str]) -> None:
        self.joined = set(rooms)
        self.listed = True

    def on_own_membership(self, room_id: str, joined: bool) -> None:
        if joined:
            self.joined.add(room_id)
        else:
            self.joined.discard(room_id)

    def update_join_rule(self, room_id: str) -> None:
        allowed, skipped = self.tracker.view(room_id).allowed_rooms()
        for entry in skipped:
            self.log.info(f"Skipping a garbage allow entry in {room_id}'s join rule: {entry}")
        self.graph.set_allow(room_id, allowed)

    def actionable(self) -> set[Link]:
        """Every link the bot can act on (walks the whole graph: read it once per pass)."""
        return self.graph.actionable(self.joined, self.empowered)

    def actionable_from(self, room_id: str) -> set[Link]:
        """The links of one restricted room the bot can act on, without walking the graph."""
        allowed = self.graph.allowed(room_id)
        if not allowed or not self.empowered(room_id):
            return set()
        return {Link(room_id, via) for via in allowed if via in self.joined}

    def gaps(self) -> list[LinkGap]:
        """Links the bot cannot act on (not empowered in the room, or not in the allowed one)."""
        return self.graph.gaps(self.joined, self.empowered)

    def admitting_rooms(self, room_id: str) -> list[str]:
        """Allowed rooms of ``room_id`` whose membership the bot can check."""
        return [via for via in self.graph.allowed(room_id) if via in self.joined]
