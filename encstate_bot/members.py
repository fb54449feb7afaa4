"""Who is in a room, as the homeserver says now: the one place that asks.

The policy decides on memberships read at send time, never on what a sync said earlier.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import Any, AsyncIterator, Iterable, Iterator

from attr import dataclass
from mautrix.api import Method, Path
from mautrix.errors import MNotFound

LOOKUP_LIMIT = 3  # above this many users in one room, list the room's members


@dataclass(frozen=True)
class Listing:
    """A room's joined and invited users, from one member listing."""

    room_id: str
    joined: list[str]
    invited: list[str]

    def states(self, user_ids: set[str]) -> dict[str, tuple[str | None, bool]] | None:
        """What ``Members.states`` would answer for these users, if the listing names them
        all (None if not): joined and invited users are never removed."""
        listed = dict.fromkeys(self.invited, "invite")
        listed.update(dict.fromkeys(self.joined, "join"))
        if not set(user_ids) <= listed.keys():
            return None
        return {u: (listed[u], False) for u in user_ids}


# The listings ``Members.states`` answers from in this task (and the tasks it starts), by room:
# a seal lists the room's members once and decides every wave on that listing.
_LISTED: ContextVar[dict[str, Listing] | None] = ContextVar("encstate_listed", default=None)


class Members:
    def __init__(self, client: Any) -> None:
        self.client = client
        # While listings of a room are reused: the users a sync saw leave or be banned since.
        # ``states`` reads those afresh instead of answering from the listing, so a seal's
        # later waves do not approve someone kicked while its earlier ones went out.
        self._reused: dict[str, int] = {}
        self._departed: dict[str, set[str]] = {}

    async def joined(self, room_id: str) -> list[str]:
        resp = await self.client.api.request(Method.GET, Path.v3.rooms[room_id].joined_members)
        return list(resp.get("joined", {}))

    async def listing(self, room_id: str) -> Listing:
        """The room's joined and invited users, in one member listing."""
        resp = await self.client.api.request(
            Method.GET, Path.v3.rooms[room_id].members, query_params={"not_membership": "leave"}
        )
        joined: list[str] = []
        invited: list[str] = []
        for evt in resp.get("chunk", []):
            if not isinstance(evt, dict) or not isinstance(evt.get("state_key"), str):
                continue
            content = evt.get("content") if isinstance(evt.get("content"), dict) else {}
            membership = content.get("membership")
            if membership == "join":
                joined.append(evt["state_key"])
            elif membership == "invite":
                invited.append(evt["state_key"])
        return Listing(room_id, joined, invited)

    @asynccontextmanager
    async def listed(self, room_id: str) -> AsyncIterator[Listing]:
        """The room's listing, read now and reused within this block (``reusing``); a leave
        or ban a sync shows from before the listing is read until the block ends counts."""
        with self._watching(room_id):
            listing = await self.listing(room_id)
            with self.reusing(listing):
                yield listing

    @contextmanager
    def reusing(self, listing: Listing) -> Iterator[None]:
        """Within this block, ``states`` answers from ``listing`` for the users it names, in
        this task and the tasks started in it (no other task sees it): what is decided on it
        was read when the listing was, as if one listing had been read for all of them."""
        token = _LISTED.set({**(_LISTED.get() or {}), listing.room_id: listing})
        try:
            with self._watching(listing.room_id):
                yield
        finally:
            _LISTED.reset(token)

    @contextmanager
    def _watching(self, room_id: str) -> Iterator[None]:
        """Within this block, ``departed`` keeps what it is told of the room."""
        self._reused[room_id] = self._reused.get(room_id, 0) + 1
        try:
            yield
        finally:
            left = self._reused.pop(room_id) - 1
            if left:
                self._reused[room_id] = left
            else:
                self._departed.pop(room_id, None)

    def any_departed(self, room_id: str, user_ids: Iterable[str]) -> bool:
        """Whether a sync saw one of these users leave or be banned while a listing of the
        room is reused (a decision taken on it before then is stale)."""
        departed = self._departed.get(room_id)
        return bool(departed) and not departed.isdisjoint(user_ids)

    def departed(self, room_id: str, user_ids: Iterable[str]) -> None:
        """A sync saw these users leave the room or be banned from it: no listing read before
        answers for them any more."""
        if room_id in self._reused:
            self._departed.setdefault(room_id, set()).update(user_ids)

    async def memberships(self, room_id: str, user_ids: set[str]) -> dict[str, str | None]:
        """Each user's current membership (None: never a member)."""
        return {u: m for u, (m, _) in (await self.states(room_id, user_ids)).items()}

    async def states(self, room_id: str, user_ids: set[str]) -> dict[str, tuple[str | None, bool]]:
        """Each user's membership and whether they were removed (banned, or kicked: a leave
        sent by someone else). One GET per user for a few users; else the joined members in
        one call, and the other memberships (with their senders) only if someone is not
        joined. A leave whose sender cannot be read counts as removed. Inside ``reusing``,
        the listing answers for the users it names, unless a sync saw one of them leave or be
        banned since (``departed``)."""
        listing = (_LISTED.get() or {}).get(room_id)
        if listing is not None and not self.any_departed(room_id, user_ids):
            listed = listing.states(user_ids)
            if listed is not None:
                return listed
        room = Path.v3.rooms[room_id]
        if len(user_ids) <= LOOKUP_LIMIT:

            async def one(user_id: str) -> tuple[str | None, bool]:
                try:
                    event = await self.client.api.request(
                        Method.GET,
                        room.state["m.room.member"][user_id],
                        query_params={"format": "event"},
                    )
                except MNotFound:
                    return None, False
                return member_state(user_id, event)

            users = list(user_ids)
            found = await asyncio.gather(*(one(u) for u in users))
            return dict(zip(users, found, strict=True))
        joined = await self.client.api.request(Method.GET, room.joined_members)
        states: dict[str, tuple[str | None, bool]] = {
            u: ("join", False) for u in joined.get("joined", {}) if u in user_ids
        }
        if len(states) < len(user_ids):
            resp = await self.client.api.request(
                Method.GET, room.members, query_params={"not_membership": "join"}
            )
            for evt in resp.get("chunk", []):
                user_id = evt.get("state_key") if isinstance(evt, dict) else None
                if user_id in user_ids and user_id not in states:
                    states[user_id] = member_state(user_id, evt)
        return {u: states.get(u, (None, False)) for u in user_ids}


def member_state(user_id: str, event: Any) -> tuple[str | None, bool]:
    """(membership, removed) from a member event (or, from a server that ignores
    ``format=event``, its bare content: then a leave counts as removed, to be safe)."""
    if not isinstance(event, dict):
        return None, False
    # A whole event has a type and a sender; bare content is what the user wrote, so a
    # "content" key inside it means nothing.
    whole = event.get("type") == "m.room.member" and isinstance(event.get("sender"), str)
    content = event.get("content") if whole else event
    membership = content.get("membership") if isinstance(content, dict) else None
    if not isinstance(membership, str):
        return None, False
    if membership == "ban":
        return membership, True
    if membership == "leave":
        return membership, not whole or event["sender"] != user_id
    return membership, False


def membership_changes(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(user, new membership) for member events that changed someone's membership."""
    changes = []
    for raw in events:
        if raw.get("type") != "m.room.member" or not isinstance(raw.get("state_key"), str):
            continue
        content = raw.get("content") if isinstance(raw.get("content"), dict) else {}
        unsigned = raw.get("unsigned") if isinstance(raw.get("unsigned"), dict) else {}
        prev = unsigned.get("prev_content")
        prev_membership = prev.get("membership") if isinstance(prev, dict) else None
        membership = content.get("membership")
        if isinstance(membership, str) and membership != prev_membership:
            changes.append((raw["state_key"], membership))
    return changes
