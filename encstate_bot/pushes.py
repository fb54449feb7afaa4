"""Unasked pushes: who should receive which room's state keys, and when.

- A member joins a state-encrypted room B (push on join).
- Someone joins a room A that a restricted room B allows: B's keys go to them.
- A link (B, A) becomes actionable (B's allow list gains A, the bot becomes empowered in B, or the
  bot joins A): B's keys go to every current member of A.
- B gets a new preview seal (name, topic, avatar): it goes to the members of B's allowed rooms.

Members of allowed rooms and invitees get only the bot's seals: sessions it did not create go
only to joined members.

This module only enqueues; the courier decides per device at send time and audits.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from mautrix.errors import MatrixConnectionError, MatrixRequestError

from .courier import Courier
from .links import Link, RoomLinks
from .members import Members, membership_changes
from .policy import counts_as_member
from .room_policy import RoomPolicies
from .seals import SealBook, is_preview
from .store import AuditRow, OutboxItem, Store
from .tracker import Tracker
from .triggers import Trigger

# A newcomer waits for at most this many sessions the bot cannot read yet (someone able to send
# state could otherwise make every join cost a row per undecryptable value, for 30 days).
MAX_PENDING_PER_JOIN = 20
GONE = ("leave", "ban")  # memberships that end a member's reach


class Pushes:
    def __init__(
        self,
        own_user: str,
        store: Store,
        tracker: Tracker,
        courier: Courier,
        policies: RoomPolicies,
        links: RoomLinks,
        members: Members,
        seals: SealBook,
        config: Any,
        log: logging.Logger,
    ) -> None:
        self.own_user = own_user
        self.store = store
        self.tracker = tracker
        self.courier = courier
        self.policies = policies
        self.links = links
        self.members = members
        self.seals = seals
        self.config = config
        self.log = log
        self.acted: set[Link] | None = None  # actionable links already pushed for

    def has_state(self, room_id: str) -> bool:
        ledger = self.tracker.ledgers.get(room_id)
        return ledger is not None and bool(ledger.state_sessions())

    # Membership changes -----------------------------------------------------------------------

    def departed(self, room_id: str, events: list[dict[str, Any]]) -> None:
        """Tell the member listings in use (a seal's waves) who these events show leaving or
        banned: they are read afresh."""
        gone = [u for u, membership in membership_changes(events) if membership in GONE]
        if gone:
            self.members.departed(room_id, gone)

    async def on_members(self, room_id: str, events: list[dict[str, Any]]) -> None:
        items: list[OutboxItem] = []
        ignored: list[AuditRow] = []
        actionable: set[Link] | None = None  # read once per call: it walks every link
        self.departed(room_id, events)
        for user_id, membership in membership_changes(events):
            if user_id == self.own_user:
                continue
            items += self._own_room_push(room_id, user_id, membership, ignored)
            if self.links.graph.allowing(room_id):
                if actionable is None:
                    actionable = self.links.actionable()
                items += self._linked_pushes(room_id, user_id, membership, actionable)
        if ignored:
            await self.store.add_audit(ignored)
        if items:
            await self.courier.submit(items)

    def _own_room_push(
        self, room_id: str, user_id: str, membership: str, ignored: list[AuditRow]
    ) -> list[OutboxItem]:
        # Invitees get the preview seals (or every seal, where invitees count as members).
        if membership not in ("join", "invite"):
            return []
        if not self.config["push_on_join"]:
            return []
        ledger = self.tracker.ledgers.get(room_id)
        # Current values the bot cannot read yet: the newcomer waits for their keys (the
        # courier keeps the wait; the key's arrival delivers it). Only joined members get
        # sessions the bot did not create.
        pending = ledger.pending_current_sessions() if ledger and membership == "join" else []
        pending = pending[:MAX_PENDING_PER_JOIN]
        has_state = self.has_state(room_id)
        if not has_state and not pending:
            return []
        if not self.links.empowered(room_id):
            view = self.tracker.view(room_id)
            reason = (
                f"no push on {membership}: the bot's power level "
                f"{view.user_level(self.own_user)} does not exceed users_default "
                f"{view.users_default}"
            )
            ignored.append(AuditRow.user_ignored(room_id, user_id, reason, membership))
            self.log.info(f"Not pushing to {user_id} in {room_id}: bot not empowered")
            return []
        trigger = Trigger(membership)
        items = (
            [OutboxItem(room_id=room_id, user_id=user_id, trigger=trigger)] if has_state else []
        )
        return items + [
            OutboxItem(room_id=room_id, user_id=user_id, trigger=trigger, session_id=session_id)
            for session_id in pending
        ]

    def _linked_pushes(
        self, via: str, user_id: str, membership: str, actionable: set[Link]
    ) -> list[OutboxItem]:
        items = []
        for room_id in sorted(self.links.graph.allowing(via)):
            if not counts_as_member(self.policies.get(room_id), membership):
                continue
            if not self.has_state(room_id) or Link(room_id, via) not in actionable:
                continue
            items.append(
                OutboxItem(room_id=room_id, user_id=user_id, trigger=Trigger.LINK, via=via)
            )
        return items

    # Links becoming actionable -----------------------------------------------------------------

    async def refresh_links(self) -> set[Link]:
        """Push for links that became actionable since the bot last acted; remember the set.
        Returns the links pushed for."""
        current = self.links.actionable()
        if self.acted is None:
            self.acted = {Link(*pair) for pair in await self.store.links()}
        gained = current - self.acted
        lost = self.acted - current
        if gained or lost:
            await self.store.set_links((link.room_id, link.via) for link in current)
            self.acted = current
        for link in sorted(lost):
            self.log.info(f"{link.via} no longer admits into {link.room_id}: nothing more of it")
        members: dict[str, list[str]] = {}  # an allowed room's members, read once here
        for link in sorted(gained):
            if self.has_state(link.room_id):
                await self._push_link(link, members=members)
        return gained

    async def reconcile(
        self, skip: set[Link], members: dict[str, list[str]] | None = None
    ) -> None:
        """After a start: members of allowed rooms who joined while the bot was away have no
        delivery of the restricted room's current state sessions; push to them. One pass reads
        each allowed room's members once, and the deliveries of its members once (only of the
        sessions wanted); a restricted room's own members only where someone lacks a key."""
        wanted: dict[Link, set[tuple[str, int]]] = {}
        for link in sorted(self.links.actionable() - skip):
            if self.tracker.ledgers.get(link.room_id) is None:
                continue
            sessions = {(session_id, 0) for session_id in self.preview_seals(link.room_id)}
            if sessions:
                wanted[link] = sessions
        members = {} if members is None else members
        served: dict[str, dict[str, set[tuple[str, int]]]] = {}  # via -> user -> (session, i)
        for link, sessions in wanted.items():
            try:
                candidates = [
                    u for u in await self._joined(link.via, members) if u != self.own_user
                ]
            except (MatrixRequestError, MatrixConnectionError) as e:
                self.log.warning(f"Could not list the members of {link.via}: {e}")
                continue
            if link.via not in served:
                through = {
                    s for other, more in wanted.items() if other.via == link.via for s in more
                }
                by_user: dict[str, set[tuple[str, int]]] = {}
                for user_id, session_id, index in await self.store.delivered_sessions(
                    candidates, {session_id for session_id, _ in through}
                ):
                    by_user.setdefault(user_id, set()).add((session_id, index))
                served[link.via] = by_user
            lacking = [u for u in candidates if not sessions <= served[link.via].get(u, set())]
            if not lacking:
                continue
            try:
                own = set(await self._joined(link.room_id, members))
            except (MatrixRequestError, MatrixConnectionError) as e:
                self.log.warning(f"Could not list the members of {link.room_id}: {e}")
                continue
            missing = [u for u in lacking if u not in own]
            if missing:
                self.log.info(
                    f"{len(missing)} member(s) of {link.via} lack {link.room_id}'s state keys; "
                    "pushing"
                )
                await self.courier.submit(
                    OutboxItem(room_id=link.room_id, user_id=u, trigger=Trigger.LINK, via=link.via)
                    for u in missing
                )

    async def _joined(self, room_id: str, members: dict[str, list[str]] | None) -> list[str]:
        """A room's joined members, read once per pass when given the pass's ``members``."""
        if members is None:
            return await self.members.joined(room_id)
        if room_id not in members:
            members[room_id] = await self.members.joined(room_id)
        return members[room_id]

    async def _admitted_users(
        self, link: Link, members: dict[str, list[str]] | None = None
    ) -> list[str]:
        """Members of the allowed room who are not already members of the restricted room."""
        via = await self._joined(link.via, members)
        own = set(await self._joined(link.room_id, members))
        return [u for u in via if u != self.own_user and u not in own]

    async def _push_link(
        self,
        link: Link,
        session_ids: Iterable[str | None] = (None,),
        members: dict[str, list[str]] | None = None,
    ) -> None:
        try:
            users = await self._admitted_users(link, members)
        except (MatrixRequestError, MatrixConnectionError) as e:
            self.log.warning(f"Could not list the members of {link.via}: {e}")
            return
        sessions = list(session_ids)
        for session_id in sessions:
            what = f"session {session_id}" if session_id else "state keys"
            self.log.info(
                f"{link.via} admits into {link.room_id}: pushing its {what} to {len(users)} "
                "member(s)"
            )
        await self.courier.submit(
            OutboxItem(
                room_id=link.room_id,
                user_id=u,
                trigger=Trigger.LINK,
                via=link.via,
                session_id=session_id,
            )
            for session_id in sessions
            for u in users
        )

    def preview_seals(self, room_id: str) -> list[str]:
        """The live seals of a room that members of its admitting rooms may read."""
        preview = self.config.preview_types
        return [
            seal.session_id
            for seal in self.seals.live(self.tracker.ledgers.get(room_id))
            if is_preview(seal.inner_type, preview)
        ]

    async def on_new_state(
        self,
        room_id: str,
        session_ids: set[str],
        skip: set[Link] = frozenset(),
        members: dict[str, list[str]] | None = None,
    ) -> None:
        """A restricted room gained state sessions: push its new preview seals to its allowed
        rooms' members (but not through ``skip``, links whose members were just sent
        everything). Sessions the bot did not create never go to them. Only this room's links
        are looked at (not the whole graph: a start calls this for every room that gained);
        ``members``: the member lists already read in this pass (the start's)."""
        links = self.links.actionable_from(room_id) - skip
        if not links:
            return
        session_ids = set(session_ids) & set(self.preview_seals(room_id))
        if not session_ids:
            return
        members = {} if members is None else members
        for link in sorted(links):
            await self._push_link(link, sorted(session_ids), members)
