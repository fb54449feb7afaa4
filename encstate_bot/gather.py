"""Gathering: everything a batch's decisions depend on, read fresh (all the I/O before the
planner). Per room: the bot's power (read again for every batch: it can change under a long
queue), the room's policy, the users' memberships and removals, admissions through the rooms a
restricted join rule allows; per user: the devices; per device: trust where the policy asks for
it; per session: what the ledger knows and what the bot holds.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
import logging
from typing import Any

from attr import dataclass
from mautrix.api import Method, Path
from mautrix.errors import MatrixConnectionError, MatrixRequestError, MNotFound
from mautrix.types import DeviceIdentity, TrustState

from .bulk_olm import BulkOlm
from .identity import Identity
from .ledger import SessionFacts, SessionKind
from .links import RoomLinks
from .members import Members
from .planner import DeviceFacts, RoomBatch, SessionInfo, UserFacts
from .policy import HeldSession, RoomFacts, counts_as_member
from .room_policy import Mode, RoomPolicies
from .seals import SealBook, seal_facts
from .store import OutboxItem
from .tracker import SessionSource, Tracker
from .triggers import Trigger

Devices = dict[str, dict[str, DeviceIdentity]]
# user -> (decisions for all their current devices, the devices named explicitly)
Targets = dict[str, tuple[bool, set[str]]]


def targets(items: list[OutboxItem]) -> Targets:
    """Which devices the decisions about these items are about, per user."""
    found: Targets = {}
    for item in items:
        every, named = found.get(item.user_id, (False, set()))
        if item.device_id:
            named.add(item.device_id)
        found[item.user_id] = (every or not item.device_id, named)
    return found


@dataclass(frozen=True)
class RoomContext:
    room_id: str
    facts: RoomFacts
    memberships: dict[str, str | None]
    admitted: dict[str, str]
    removed: frozenset[str] = frozenset()  # banned, or kicked by someone else


class Gatherer:
    def __init__(
        self,
        client: Any,
        tracker: Tracker,
        seals: SealBook,
        policies: RoomPolicies,
        members: Members,
        links: RoomLinks,
        identity: Identity,
        bulk: BulkOlm,
        config: Any,
        log: logging.Logger,
    ) -> None:
        self.client = client
        self.tracker = tracker
        self.seals = seals
        self.policies = policies
        self.members = members
        self.links = links
        self.identity = identity
        self.bulk = bulk
        self.config = config
        self.log = log

    # Rooms --------------------------------------------------------------------------------------

    async def room_facts(self, room_id: str) -> RoomFacts:
        view = self.tracker.view(room_id)
        try:
            content = await self.client.api.request(
                Method.GET, Path.v3.rooms[room_id].state["m.room.power_levels"][""]
            )
            view.apply({"type": "m.room.power_levels", "state_key": "", "content": content})
        except MNotFound:
            pass
        return RoomFacts(
            room_id=room_id,
            bot_level=view.user_level(self.client.mxid),
            users_default=view.users_default,
            history_visibility=view.history_visibility,
            policy=self.policies.get(room_id),
            history_unread=self.tracker.history_unread(room_id),
        )

    async def room(self, room_id: str, items: list[OutboxItem]) -> RoomContext:
        """What the decisions in one room depend on, read fresh for this batch."""
        facts, states = await asyncio.gather(
            self.room_facts(room_id), self.members.states(room_id, {i.user_id for i in items})
        )
        memberships = {u: m for u, (m, _) in states.items()}
        removed = frozenset(u for u, (_, gone) in states.items() if gone)
        admitted = await self._admissions(room_id, items, memberships, facts)
        return RoomContext(room_id, facts, memberships, admitted, removed)

    async def _admissions(
        self,
        room_id: str,
        items: list[OutboxItem],
        memberships: dict[str, str | None],
        facts: RoomFacts,
    ) -> dict[str, str]:
        """Users admitted through a room the join rule allows *now*, checked at send time:
        the item's own room for link pushes, any allowed room the bot is in for requests."""
        allowed = set(self.tracker.view(room_id).allowed_rooms()[0])
        wanted: dict[str, set[str]] = defaultdict(set)
        for item in items:
            if counts_as_member(facts.policy, memberships.get(item.user_id)):
                continue
            if item.via:
                candidates = [item.via]
            elif item.trigger == Trigger.REQUEST:
                candidates = self.links.admitting_rooms(room_id)
            else:
                candidates = []
            for via in candidates:
                if via in allowed:
                    wanted[via].add(item.user_id)
        admitted: dict[str, str] = {}
        for via, users in wanted.items():
            members = await self.members.memberships(via, users)
            for user_id, membership in members.items():
                if counts_as_member(facts.policy, membership):
                    admitted.setdefault(user_id, via)
        return admitted

    # Users and devices --------------------------------------------------------------------------

    async def devices(self, user_ids: set[str]) -> Devices:
        """Device identities for these users, with one key query for those not known yet."""
        try:
            return await self.bulk.devices(user_ids)
        except (MatrixRequestError, MatrixConnectionError) as e:
            self.log.warning(f"Key query for {len(user_ids)} user(s) failed: {e}")
            known = {}
            for user_id in user_ids:
                known[user_id] = await self.client.crypto.crypto_store.get_devices(user_id) or {}
            return known

    async def users(
        self, context: RoomContext, devices: Devices, targets: Targets
    ) -> dict[str, UserFacts]:
        """What the policy needs of each user and their devices. Trust is resolved only where
        the room's policy asks for it, for the devices the decisions are about, of users whose
        membership can pass the policy: for all of them at once (a few crypto-store reads in
        all, not per device)."""
        cross_signed = context.facts.policy.mode == Mode.CROSS_SIGNED
        judged: list[DeviceIdentity] = []
        if cross_signed:
            for user_id, (all_devices, named) in targets.items():
                membership = context.memberships.get(user_id)
                may_pass = (
                    user_id not in context.removed
                    and membership != "ban"
                    and (membership in ("join", "invite") or user_id in context.admitted)
                )
                if may_pass:
                    judged += [
                        device
                        for device_id, device in devices.get(user_id, {}).items()
                        if device_id in named or (all_devices and not device.deleted)
                    ]
        trust = await self.identity.trust_many(judged) if judged else {}
        users: dict[str, UserFacts] = {}
        for user_id in targets:
            membership = context.memberships.get(user_id)
            facts: list[DeviceFacts] = []
            for device_id, device in devices.get(user_id, {}).items():
                signed, changed = trust.get((user_id, device_id), (False, False))
                facts.append(
                    DeviceFacts(
                        device_id=device_id,
                        known=not device.deleted,  # a deleted device is no longer listed
                        deleted=bool(device.deleted),
                        blacklisted=device.trust == TrustState.BLACKLISTED,
                        cross_signed=signed,
                        identity_changed=changed,
                    )
                )
            users[user_id] = UserFacts(
                membership=membership,
                removed=user_id in context.removed,
                admitted_via=context.admitted.get(user_id),
                devices=tuple(facts),
            )
        return users

    # Sessions -----------------------------------------------------------------------------------

    async def held(
        self, source: SessionSource, room_id: str, session_id: str
    ) -> tuple[Any, HeldSession | None]:
        """The megolm session as the bot holds it, and what the policy needs to know of it."""
        session = await source.get(room_id, session_id)
        if session is None:
            return None, None
        return session, HeldSession(
            first_known_index=session.first_known_index,
            shared_history=(room_id, session_id) in self.tracker.shared_history,
        )

    async def sessions(
        self,
        room_id: str,
        session_ids: list[str],
        live: set[str],
        source: SessionSource,
        hold_seals: bool,
    ) -> tuple[dict[str, SessionInfo], dict[str, Any]]:
        """What the policy needs of each session (``live``: the room's live seals), and the
        bot's megolm session objects (for exporting; for the seals only with ``hold_seals``)."""
        ledger = self.tracker.ledgers.get(room_id)
        preview = self.config.preview_types
        infos: dict[str, SessionInfo] = {}
        groups: dict[str, Any] = {}
        for session_id in dict.fromkeys(session_ids):
            seal = self.seals.get(room_id, session_id)
            if seal is not None:
                infos[session_id] = SessionInfo(
                    session_id, seal=seal_facts(seal, session_id in live, preview)
                )
                if hold_seals:
                    groups[session_id], _ = await self.held(source, room_id, session_id)
                continue
            facts = (
                ledger.facts(session_id)
                if ledger
                else SessionFacts(session_id=session_id, kind=SessionKind.UNKNOWN)
            )
            groups[session_id], held = await self.held(source, room_id, session_id)
            infos[session_id] = SessionInfo(session_id, facts=facts, held=held)
        return infos, groups

    async def batch(
        self,
        context: RoomContext,
        items: list[OutboxItem],
        devices: Devices,
        source: SessionSource,
        hold_seals: bool = False,
    ) -> tuple[RoomBatch, dict[str, Any]]:
        """Everything the planner needs for these items of one room, and the megolm sessions
        to export from."""
        # what an item naming no session stands for: the live seals, then the other state
        # sessions the bot may forward
        live, others = self.seals.shareable(self.tracker.ledgers.get(context.room_id))
        shareable = tuple(live) + tuple(others)
        wanted = [i.session_id for i in items if i.session_id]
        if any(not i.session_id for i in items):
            wanted += shareable
        infos, groups = await self.sessions(context.room_id, wanted, set(live), source, hold_seals)
        users = await self.users(context, devices, targets(items))
        return RoomBatch(context.facts, users, infos, shareable), groups
