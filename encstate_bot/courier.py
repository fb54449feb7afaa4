"""The courier: the one place that sends keys.

Work arrives as ``OutboxItem`` rows in the database (a request to answer, a member to push to),
so a crash or restart resumes where it stopped. Two lanes drain the queue: requests (small,
latency-sensitive) and pushes (bulk). For each batch the courier re-reads what can change under
it (the bot's power, the requesters' membership, their devices), asks the policy for one
decision per (device, session), then delivers in bulk: one key query for the users it lacks,
one one-time-key claim for devices without an Olm session, Olm encryption in process, and at
most 250 messages per ``sendToDevice`` call. Every decision becomes an audit row.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

from attr import dataclass, evolve
from mautrix.api import Method, Path
from mautrix.errors import MatrixConnectionError, MatrixRequestError, MNotFound
from mautrix.types import (
    DeviceIdentity,
    EncryptionAlgorithm,
    EventType,
    ForwardedRoomKeyEventContent,
    SessionID,
    TrustState,
)

from . import protocol
from .bulk_olm import BulkOlm, settle
from .ledger import SessionFacts, SessionKind
from .policy import (
    PREVIEW,
    Decision,
    HeldSession,
    Ignore,
    Mode,
    Requester,
    RoomFacts,
    Share,
    Withhold,
    admit_device,
    decide,
    decide_seal,
    reach,
)
from .seals import SealBook, seal_facts
from .store import FAST_TRIGGERS, AuditRow, OutboxItem, Store

if TYPE_CHECKING:
    from .tracker import SessionSource, Tracker

MAX_PER_CALL = 250
ENCRYPT_SLICE = 100  # Olm messages a bulk delivery encrypts before letting the fast lane in
TOGETHER_ROUNDS = 32  # calls sent at once to one device, below Olm's 40 skipped message keys
REQUEST_LANE = "request"
PUSH_LANE = "push"
PER_ROOM_ITEMS = 1000  # one busy room cannot take a whole batch
WAVE_USERS = 1000  # users whose device keys are looked up together (bounds memory)
BATCH_ITEMS = 2000
# A join storm becomes a few batches, not one per join: when a push lane wakes to a short
# queue it waits this long for more.
PUSH_COALESCE_SECONDS = 0.5
COALESCE_BELOW = 50
MEMBER_LOOKUP_LIMIT = 3  # above this many users in one room, list the room's members
MAX_BACKOFF_MS = 5 * 60 * 1000
# A queued item is dropped (and audited) after this many failed tries or this age: nothing a
# user can queue lives forever.
MAX_ATTEMPTS = {True: 8, False: 300}  # requests; pushes (at most 5 min apart: about a day)
MAX_AGE_MS = {True: 15 * 60 * 1000, False: 24 * 3600 * 1000}  # requests, pushes

# Unasked pushes: never the same (device, session, index) twice. Requests and an admin's
# explicit share are always answered.
PUSH_TRIGGERS = frozenset({"join", "invite", "link", "bot-invite", "seal"})
# Users the bot invited itself get what a member gets while their invite stands.
BOT_INVITE = "bot-invite"

WITHHELD_PER_DEVICE = 10

WITHHELD_TYPES = (EventType.ROOM_KEY_WITHHELD, EventType.ORG_MATRIX_ROOM_KEY_WITHHELD)


@dataclass(frozen=True)
class RoomPolicy:
    """The per-room settings in force (config defaults with the room's overrides)."""

    mode: Mode
    share_with_invited: bool
    allow_mixed_shared_history: bool
    dry_run: bool


@dataclass(frozen=True)
class RoomContext:
    room_id: str
    facts: RoomFacts
    policy: RoomPolicy
    memberships: dict[str, str | None]
    admitted: dict[str, str]
    removed: frozenset[str] = frozenset()  # banned, or kicked by someone else


@dataclass(frozen=True)
class Approved:
    """A device that may hold the bot's own sessions, and which of its seals."""

    device: DeviceIdentity
    reach: str  # policy.ALL or policy.PREVIEW
    membership: str


@dataclass
class Outcome:
    """What one (device, session) came to."""

    item: OutboxItem
    device_id: str
    session_id: str
    decision: Decision
    device: DeviceIdentity | None = None
    sender_key: str | None = None
    notified: bool = True  # for a withhold: whether the device was sent a withheld notice
    failed: bool = False  # for a share: the sendToDevice call carrying it failed


def rounds(messages: list[tuple[str, str, Any]]) -> list[list[tuple[str, str, Any]]]:
    """Split (user, device, content) messages so no device appears twice in one call, and no call
    carries more than MAX_PER_CALL messages."""
    per_round: list[list[tuple[str, str, Any]]] = []
    seen: list[set[tuple[str, str]]] = []
    for msg in messages:
        key = (msg[0], msg[1])
        for i, devices in enumerate(seen):
            if key not in devices:
                devices.add(key)
                per_round[i].append(msg)
                break
        else:
            seen.append({key})
            per_round.append([msg])
    chunks: list[list[tuple[str, str, Any]]] = []
    for batch in per_round:
        chunks.extend(batch[i : i + MAX_PER_CALL] for i in range(0, len(batch), MAX_PER_CALL))
    return chunks


def backoff_ms(attempts: int) -> int:
    return min(1000 * 2 ** min(attempts, 16), MAX_BACKOFF_MS)


class Courier:
    def __init__(
        self,
        client: Any,
        store: Store,
        tracker: Tracker,
        room_policy: Callable[[str], RoomPolicy],
        log: logging.Logger,
        on_shared: Callable[[list[AuditRow]], Any] | None = None,
        admitting_rooms: Callable[[str], list[str]] | None = None,
        seals: SealBook | None = None,
        preview_types: Callable[[], tuple[str, ...]] | None = None,
    ) -> None:
        self.seals = seals if seals is not None else SealBook()
        self.preview_types = preview_types or (lambda: ())
        self.client = client
        self.store = store
        self.tracker = tracker
        self.room_policy = room_policy
        self.admitting_rooms = admitting_rooms or (lambda room_id: [])
        self.bulk = BulkOlm(client, log)
        self.log = log
        self.on_shared = on_shared
        self._wake = {REQUEST_LANE: asyncio.Event(), PUSH_LANE: asyncio.Event()}
        # Set while the fast lane has nothing in hand: bulk deliveries pause for it between
        # their calls, so someone waiting for an answer or a newcomer's keys goes first.
        self._fast_idle = asyncio.Event()
        self._fast_idle.set()
        self._tasks: list[asyncio.Task] = []
        self.sent_calls = 0  # sendToDevice calls that carried keys, for tests and status

    @property
    def crypto(self) -> Any:
        return self.client.crypto

    # Lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        for lane in (REQUEST_LANE, PUSH_LANE):
            self._tasks.append(asyncio.create_task(self._run(lane), name=f"encstate-{lane}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks = []

    async def submit(self, items: Iterable[OutboxItem]) -> int:
        items = list(items)
        count = await self.store.enqueue(items)
        for lane in {lane_of(i) for i in items}:
            self._wake[lane].set()
        return count

    async def _run(self, lane: str) -> None:
        wake = self._wake[lane]
        while True:
            try:
                if lane == REQUEST_LANE:
                    self._fast_idle.clear()
                try:
                    worked = await self.drain(lane)
                finally:
                    if lane == REQUEST_LANE:
                        self._fast_idle.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception(f"Courier ({lane}) failed; retrying in 5 s")
                await asyncio.sleep(5)
                continue
            if worked:
                continue
            wake.clear()
            next_due = await self.store.next_due_ms(lane == REQUEST_LANE)
            timeout = 30.0
            if next_due is not None:
                timeout = max(0.05, min(timeout, (next_due - time.time() * 1000) / 1000))
            try:
                await asyncio.wait_for(wake.wait(), timeout)
            except asyncio.TimeoutError:
                continue
            if lane == PUSH_LANE and await self.store.pending_count() < COALESCE_BELOW:
                await asyncio.sleep(PUSH_COALESCE_SECONDS)

    async def drain(self, lane: str) -> bool:
        """Process one batch of due items of a lane; False if there was none."""
        due = await self.store.due(BATCH_ITEMS, lane == REQUEST_LANE, per_room=PER_ROOM_ITEMS)
        if not due:
            return False
        await self.deliver(due)
        return True

    # One batch ----------------------------------------------------------------------------------

    async def deliver(self, items: list[OutboxItem], dry_run: bool = False) -> list[Outcome]:
        """Decide and deliver a batch; returns what each (device, session) came to. With
        ``dry_run`` (or the room's dry-run policy) it decides and records but sends nothing.

        Each room's power and memberships are read once. Users then go in waves of
        WAVE_USERS: the next wave's device keys are queried while this wave is delivered."""
        # The first wave's device keys are looked up while the rooms are read (one round trip
        # to the homeserver fewer for a newcomer waiting to read the room).
        everyone = list(dict.fromkeys(i.user_id for i in items))
        first_devices = (
            asyncio.create_task(self._devices(set(everyone[:WAVE_USERS]))) if everyone else None
        )
        try:
            return await self._deliver(items, everyone, first_devices, dry_run)
        finally:
            settle([first_devices])

    async def _deliver(
        self,
        items: list[OutboxItem],
        everyone: list[str],
        first_devices: asyncio.Task | None,
        dry_run: bool,
    ) -> list[Outcome]:
        started = time.monotonic()
        by_room: dict[str, list[OutboxItem]] = defaultdict(list)
        for item in items:
            by_room[item.room_id].append(item)
        contexts: dict[str, RoomContext] = {}
        skipped: list[OutboxItem] = []
        outcomes: list[Outcome] = []
        for room_id, room_items in by_room.items():
            if not self.tracker.complete(room_id):
                self.log.warning(f"{room_id} has events not recorded yet; retrying later")
                skipped += room_items
                continue
            try:
                contexts[room_id] = await self.room_context(room_id, room_items)
            except (MatrixRequestError, MatrixConnectionError) as e:
                self.log.warning(f"Could not read {room_id} for delivery, retrying later: {e}")
                skipped += room_items
        if skipped:
            await self._send(skipped, [], skipped, self.tracker.session_source())
        live = [i for i in items if i.room_id in contexts]
        users = list(dict.fromkeys(i.user_id for i in live))
        delivered = await self.store.delivered(users)
        source = self.tracker.session_source()
        waves = [users[i : i + WAVE_USERS] for i in range(0, len(users), WAVE_USERS)]
        looked_up = time.monotonic()
        next_devices = None
        if waves and first_devices is not None and set(waves[0]) <= set(everyone[:WAVE_USERS]):
            next_devices = first_devices
        elif waves:
            next_devices = asyncio.create_task(self._devices(set(waves[0])))
        try:
            for index, wave in enumerate(waves):
                assert next_devices is not None
                devices = await next_devices
                next_devices = (
                    asyncio.create_task(self._devices(set(waves[index + 1])))
                    if index + 1 < len(waves)
                    else None
                )
                members = set(wave)
                wave_items = [i for i in live if i.user_id in members]
                wave_outcomes: list[Outcome] = []
                for room_id, context in contexts.items():
                    room_items = [i for i in wave_items if i.room_id == room_id]
                    if room_items:
                        wave_outcomes += await self._decide(
                            context, room_items, devices, delivered, source, dry_run
                        )
                await self._send(wave_items, wave_outcomes, [], source)
                outcomes += wave_outcomes
        finally:
            settle([next_devices])
        self.log.debug(
            f"Batch phases: rooms {1000 * (looked_up - started):.0f} ms, devices, decisions "
            f"and delivery {1000 * (time.monotonic() - looked_up):.0f} ms in {len(waves)} wave(s)"
        )
        return outcomes

    async def _devices(self, user_ids: set[str]) -> dict[str, dict[str, DeviceIdentity]]:
        """Device identities for these users, with one key query for those not known yet."""
        try:
            return await self.bulk.devices(user_ids)
        except (MatrixRequestError, MatrixConnectionError) as e:
            self.log.warning(f"Key query for {len(user_ids)} user(s) failed: {e}")
            known = {}
            for user_id in user_ids:
                known[user_id] = await self.crypto.crypto_store.get_devices(user_id) or {}
            return known

    async def _room_facts(self, room_id: str) -> tuple[RoomFacts, RoomPolicy]:
        view = self.tracker.view(room_id)
        # The bot's power can change under a long queue: read it fresh for every batch.
        try:
            content = await self.client.api.request(
                Method.GET, Path.v3.rooms[room_id].state["m.room.power_levels"][""]
            )
            view.apply({"type": "m.room.power_levels", "state_key": "", "content": content})
        except MNotFound:
            pass
        policy = self.room_policy(room_id)
        facts = RoomFacts(
            room_id=room_id,
            bot_level=view.user_level(self.client.mxid),
            users_default=view.users_default,
            history_visibility=view.history_visibility,
            mode=policy.mode,
            share_with_invited=policy.share_with_invited,
            allow_mixed_shared_history=policy.allow_mixed_shared_history,
        )
        return facts, policy

    async def memberships(self, room_id: str, user_ids: set[str]) -> dict[str, str | None]:
        """The homeserver's current word on these users' membership (None: never a member)."""
        return {u: m for u, (m, _) in (await self.member_states(room_id, user_ids)).items()}

    async def member_states(
        self, room_id: str, user_ids: set[str]
    ) -> dict[str, tuple[str | None, bool]]:
        """Each user's membership and whether they were removed (banned, or kicked: a leave
        sent by someone else). One GET per user for a few users; else the joined members in
        one call, and the other memberships (with their senders) only if someone is not
        joined. A leave whose sender cannot be read counts as removed."""
        room = Path.v3.rooms[room_id]
        if len(user_ids) <= MEMBER_LOOKUP_LIMIT:

            async def one(user_id: str) -> tuple[str | None, bool]:
                try:
                    event = await self.client.api.request(
                        Method.GET,
                        room.state["m.room.member"][user_id],
                        query_params={"format": "event"},
                    )
                except MNotFound:
                    return None, False
                return _member_state(user_id, event)

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
                    states[user_id] = _member_state(user_id, evt)
        return {u: states.get(u, (None, False)) for u in user_ids}

    async def room_context(self, room_id: str, items: list[OutboxItem]) -> RoomContext:
        """What the decisions in one room depend on, read fresh for this batch."""
        (facts, policy), states = await asyncio.gather(
            self._room_facts(room_id), self.member_states(room_id, {i.user_id for i in items})
        )
        memberships = {u: m for u, (m, _) in states.items()}
        removed = frozenset(u for u, (_, gone) in states.items() if gone)
        admitted = await self._admissions(room_id, items, memberships, policy)
        return RoomContext(room_id, facts, policy, memberships, admitted, removed)

    async def _decide(
        self,
        context: RoomContext,
        items: list[OutboxItem],
        devices: dict[str, dict[str, DeviceIdentity]],
        delivered: set[tuple[str, str, str, int]],
        source: SessionSource,
        dry_run: bool = False,
    ) -> list[Outcome]:
        room_id, facts, policy = context.room_id, context.facts, context.policy
        admitted = context.admitted
        ledger = self.tracker.ledgers.get(room_id)
        live, others = self.seals.shareable(ledger)
        preview_types = self.preview_types()
        held_cache: dict[str, tuple[Any, HeldSession | None]] = {}
        outcomes: list[Outcome] = []
        seen: set[tuple[str, str, str]] = set()
        for item in items:
            sessions = [item.session_id] if item.session_id else list(live) + others
            user_devices = devices.get(item.user_id, {})
            if item.device_id:
                targets = [(item.device_id, user_devices.get(item.device_id))]
            else:
                targets = [(d, ident) for d, ident in user_devices.items() if not ident.deleted]
            unasked = item.trigger in PUSH_TRIGGERS
            for session_id in sessions:
                seal = self.seals.get(room_id, session_id)
                if seal is None:
                    session = (
                        ledger.facts(session_id)
                        if ledger
                        else SessionFacts(session_id=session_id, kind=SessionKind.UNKNOWN)
                    )
                    if session_id not in held_cache:
                        held_cache[session_id] = await self.held(source, room_id, session_id)
                    group_session, held = held_cache[session_id]
                    sender_key = group_session.sender_key if group_session else None
                else:
                    sealed = seal_facts(seal, session_id in live, preview_types)
                    sender_key = self.crypto.account.identity_key if self.crypto else None
                for device_id, device in targets:
                    if (item.user_id, device_id, session_id) in seen:
                        continue
                    seen.add((item.user_id, device_id, session_id))
                    if item.user_id == self.client.mxid:
                        continue
                    who = await self._requester(item.user_id, device_id, device, context)
                    if item.user_id in admitted:
                        who = evolve(who, admitted_via=admitted[item.user_id])
                    if item.trigger == BOT_INVITE:
                        who = evolve(who, invited_by_bot=True)
                    if unasked and who.membership != "join":
                        # Unasked, someone not joined gets the seals within their reach and
                        # hears nothing about the rest.
                        if seal is None or not (sealed.preview or reach(facts, who) != PREVIEW):
                            continue
                    if seal is None:
                        decision = decide(facts, who, session, held)
                    else:
                        decision = decide_seal(facts, who, sealed)
                    if (
                        isinstance(decision, Share)
                        and unasked
                        and (item.user_id, device_id, session_id, decision.index) in delivered
                    ):
                        continue  # never push the same (device, session, index) twice unasked
                    outcomes.append(
                        Outcome(
                            item=item,
                            device_id=device_id,
                            session_id=session_id,
                            decision=decision,
                            device=device,
                            sender_key=sender_key,
                        )
                    )
        if policy.dry_run or dry_run:
            for outcome in outcomes:
                if isinstance(outcome.decision, Share):
                    outcome.decision = Ignore(
                        f"dry run: would share from index {outcome.decision.index} "
                        f"({outcome.decision.reason})"
                    )
        return outcomes

    async def _admissions(
        self,
        room_id: str,
        items: list[OutboxItem],
        memberships: dict[str, str | None],
        policy: RoomPolicy,
    ) -> dict[str, str]:
        """Users admitted through a room the join rule allows *now*, checked at send time:
        the item's own room for link pushes, any allowed room the bot is in for requests."""
        accepted = {"join", "invite"} if policy.share_with_invited else {"join"}
        allowed = set(self.tracker.view(room_id).allowed_rooms()[0])
        wanted: dict[str, set[str]] = defaultdict(set)
        for item in items:
            if memberships.get(item.user_id) in accepted:
                continue
            if item.via:
                candidates = [item.via]
            elif item.trigger == REQUEST_LANE:
                candidates = self.admitting_rooms(room_id)
            else:
                candidates = []
            for via in candidates:
                if via in allowed:
                    wanted[via].add(item.user_id)
        admitted: dict[str, str] = {}
        for via, users in wanted.items():
            members = await self.memberships(via, users)
            for user_id, membership in members.items():
                if membership in accepted:
                    admitted.setdefault(user_id, via)
        return admitted

    async def _requester(
        self,
        user_id: str,
        device_id: str,
        device: DeviceIdentity | None,
        context: RoomContext,
    ) -> Requester:
        cross_signed = changed = False
        if device is not None and context.facts.mode == Mode.CROSS_SIGNED:
            cross_signed, changed = await self.trust(device)
        return Requester(
            user_id=user_id,
            device_id=device_id,
            membership=context.memberships.get(user_id),
            removed=user_id in context.removed,
            device_known=device is not None,
            blacklisted=device is not None and device.trust == TrustState.BLACKLISTED,
            cross_signed=cross_signed,
            identity_changed=changed,
        )

    async def trust(self, device: DeviceIdentity) -> tuple[bool, bool]:
        """(cross-signed, identity changed) for a device. Cross-signed means by an identity
        the bot trusted on first use (or verified): a cross-signing identity that changed since
        then (CROSS_SIGNED_UNTRUSTED: what a homeserver swapping it in looks like) does not
        count, and is logged."""
        trust = await self.crypto.resolve_trust(device)
        if trust == TrustState.CROSS_SIGNED_UNTRUSTED:
            self.log.warning(
                f"{device.user_id}'s cross-signing identity changed since the bot first saw it "
                f"(device {device.device_id}): treated as not cross-signed"
            )
            return False, True
        return trust >= TrustState.CROSS_SIGNED_TOFU, False

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

    # Sending ------------------------------------------------------------------------------------

    async def _send(
        self,
        items: list[OutboxItem],
        outcomes: list[Outcome],
        skipped: list[OutboxItem],
        source: SessionSource,
    ) -> None:
        started = time.monotonic()
        failed_items: set[int] = {i.id for i in skipped if i.id is not None}
        shares = [o for o in outcomes if isinstance(o.decision, Share)]
        recorded: set[int] = set()
        calls = 0
        sent: list[Outcome] = []
        if shares:
            sent, failed, calls = await self._send_keys(shares, source, recorded)
            failed_items |= {o.item.id for o in failed if o.item.id is not None}
            for o in failed:
                o.failed = True  # an unqueued share (a command's) is audited as failed
        withholds = [
            o
            for o in outcomes
            if isinstance(o.decision, Withhold) and o.item.trigger == REQUEST_LANE
        ]
        if withholds:
            await self._send_withheld(withholds)
        failed_queued = [i for i in items if i.id in failed_items]
        expired = [i for i in failed_queued if self._expired(i)]
        retry = [i for i in failed_queued if i not in expired]
        waiting = {i.id for i in retry}
        rest = [o for o in outcomes if id(o) not in recorded and o.item.id not in waiting]
        done = [i.id for i in items if i.id is not None and i.id not in waiting]
        await self.store.finish(
            done, [self._audit_row(o) for o in rest] + [self._gave_up(i) for i in expired]
        )
        for item in retry:
            await self.store.retry_later([item.id], backoff_ms(item.attempts))
        for o in rest:
            self._log(o)
        devices = {(o.item.user_id, o.device_id) for o in sent}
        self.log.info(
            f"Batch of {len(items)} item(s): {len(sent)} key(s) to {len(devices)} device(s) in "
            f"{calls} sendToDevice call(s), {len(withholds)} withheld, "
            f"{len(outcomes) - len(shares) - len(withholds)} ignored, {len(retry)} to retry "
            f"({time.monotonic() - started:.2f} s)"
        )

    async def _send_keys(
        self, shares: list[Outcome], source: SessionSource, recorded: set[int]
    ) -> tuple[list[Outcome], list[Outcome], int]:
        """Forward the shared sessions, recording each call's shares as soon as it went
        through; returns (sent, failed, calls)."""
        exports: dict[tuple[str, str, int], ForwardedRoomKeyEventContent] = {}
        plan: list[tuple[DeviceIdentity, EventType, Any, Outcome]] = []
        for o in shares:
            assert o.device is not None and isinstance(o.decision, Share)
            seal = self.seals.get(o.item.room_id, o.session_id)
            if seal is not None:
                # the bot made this session: its m.room_key, which every client takes
                plan.append((o.device, EventType.ROOM_KEY, seal.room_key(), o))
                continue
            key = (o.item.room_id, o.session_id, o.decision.index)
            if key not in exports:
                group_session = await source.get(o.item.room_id, o.session_id)
                exports[key] = forwarded_content(
                    group_session,
                    o.item.room_id,
                    o.session_id,
                    o.decision.index,
                    (o.item.room_id, o.session_id) in self.tracker.shared_history,
                )
            plan.append((o.device, EventType.FORWARDED_ROOM_KEY, exports[key], o))

        async def record(outcomes: list[Outcome]) -> None:
            rows = [self._audit_row(o) for o in outcomes]
            await self.store.finish([], rows, [self._delivery(o) for o in outcomes])
            recorded.update(id(o) for o in outcomes)
            for o in outcomes:
                self._log(o)
            if self.on_shared:
                await self.on_shared(rows)

        # Answers and a newcomer's keys go at once (someone is waiting for them, and a repeat
        # after a crash is harmless); bulk pushes one call after the other.
        waiting = all(o.item.trigger in FAST_TRIGGERS for o in shares)
        sent, failed, no_olm, calls = await self.olm_send(plan, record, together=waiting)
        for o in no_olm:
            o.decision = Withhold(protocol.NO_OLM, "no Olm session could be established")
        return sent, failed, calls

    async def olm_send(
        self,
        plan: list[tuple[DeviceIdentity, EventType, Any, Any]],
        on_sent: Callable[[list[Any]], Awaitable[None]] | None = None,
        together: bool = False,
    ) -> tuple[list[Any], list[Any], list[Any], int]:
        """Bulk Olm delivery of (device, event type, content, token), in groups of at most
        MAX_PER_CALL devices: one one-time-key claim for the group's devices lacking an Olm
        session, encryption in process (the ratchets stored before anything is sent), then one
        sendToDevice call per message a device gets. While a group's calls are in flight the
        next group is claimed and encrypted. ``on_sent`` gets the tokens of each call that went
        through. A group's calls go one after the other, so a crash repeats at most the one in
        flight; with ``together`` (answers, a newcomer's keys: a repeat is harmless and latency
        matters) up to TOGETHER_ROUNDS go at once: each carries one message per device, and Olm
        accepts a session's messages out of order within its 40 skipped message keys. Returns
        (sent, failed, no Olm session, calls)."""
        per_device: dict[str, list[tuple[DeviceIdentity, EventType, Any, Any]]] = {}
        for entry in plan:
            per_device.setdefault(entry[0].identity_key, []).append(entry)
        existing = await self.bulk.store.latest_sessions(per_device)
        keys = list(per_device)
        sent: list[Any] = []
        failed: list[Any] = []
        no_olm: list[Any] = []
        calls = 0

        async def call(messages: list[tuple[tuple, dict]]) -> int:
            if not together:
                await self._fast_idle.wait()
            tokens = [entry[3] for entry, _ in messages]
            chunk = [(e[0].user_id, e[0].device_id, content) for e, content in messages]
            try:
                await self._send_chunk(EventType.TO_DEVICE_ENCRYPTED, chunk)
            except (MatrixRequestError, MatrixConnectionError) as e:
                self.log.warning(f"sendToDevice of {len(chunk)} message(s) failed: {e}")
                failed.extend(tokens)
                return 0
            self.sent_calls += 1
            sent.extend(tokens)
            if on_sent:
                await on_sent(tokens)
            return 1

        async def deliver(rounds_: list[list[tuple[tuple, dict]]]) -> int:
            if together:
                # At most TOGETHER_ROUNDS messages per device in flight at once: a receiver
                # keeps only 40 skipped Olm message keys (libolm, vodozemac), so the
                # homeserver must never store one of a device's messages behind 40 later ones.
                done = 0
                for start in range(0, len(rounds_), TOGETHER_ROUNDS):
                    window = rounds_[start : start + TOGETHER_ROUNDS]
                    done += sum(await asyncio.gather(*(call(messages) for messages in window)))
                return done
            return sum([await call(messages) for messages in rounds_])

        groups = [keys[i : i + MAX_PER_CALL] for i in range(0, len(keys), MAX_PER_CALL)]
        lacking = [[per_device[k][0][0] for k in g if k not in existing] for g in groups]
        claims: list[asyncio.Task | None] = [None] * len(groups)
        made: list[asyncio.Task | None] = [None] * len(groups)

        async def chained_claim(index: int) -> dict[str, Any]:
            # One claim at a time: the homeserver answers a lone claim of 250 devices in a
            # fraction of the time it takes for three at once, and the first one gates
            # everything.
            earlier = [task for task in claims[:index] if task is not None]
            if earlier:
                await asyncio.wait(earlier)
            try:
                return await self.bulk.claim(lacking[index])
            except (MatrixRequestError, MatrixConnectionError) as e:
                self.log.warning(f"One-time key claim failed: {e}")
                return {}

        async def new_sessions(index: int) -> dict[str, Any]:
            # Olm sessions are made in a worker thread, one group after the other, while the
            # event loop encrypts the previous group and sends the one before.
            claimed = await claims[index]  # type: ignore[misc]
            earlier = [task for task in made[:index] if task is not None]
            if earlier:
                await asyncio.wait(earlier)
            return await self.bulk.sessions_from_claim(lacking[index], claimed)

        def claim(index: int) -> None:
            if index < len(groups) and lacking[index] and claims[index] is None:
                claims[index] = asyncio.create_task(chained_claim(index))
                made[index] = asyncio.create_task(new_sessions(index))

        in_flight: asyncio.Task | None = None
        try:
            claim(0)
            for index, group in enumerate(groups):
                if not together:
                    await self._fast_idle.wait()
                claim(index + 1)  # the homeserver works on the next claims meanwhile
                claim(index + 2)
                sessions = {k: existing[k] for k in group if k in existing}
                task = made[index]
                if task is not None:
                    sessions.update(await task)
                entries = []
                for key in group:
                    if key in sessions:
                        entries += per_device[key]
                    else:
                        no_olm += [entry[3] for entry in per_device[key]]
                # A bulk delivery encrypts in slices and lets the fast lane take the Olm lock
                # between them (both lanes use the same cached session objects, each slice
                # stores the ratchets it moved, so nothing forks).
                step = len(entries) if together else ENCRYPT_SLICE
                contents = []
                for start in range(0, len(entries), max(step, 1)):
                    if not together:
                        await self._fast_idle.wait()
                    async with self.crypto._olm_lock:
                        contents += await self.bulk.encrypt(
                            [
                                (device, event_type, content)
                                for device, event_type, content, _ in entries[start : start + step]
                            ],
                            sessions,
                        )
                by_round: list[list[tuple[tuple, dict]]] = []
                depth: dict[str, int] = {}
                for entry, content in zip(entries, contents, strict=True):
                    level = depth.get(entry[0].identity_key, 0)
                    depth[entry[0].identity_key] = level + 1
                    if level == len(by_round):
                        by_round.append([])
                    by_round[level].append((entry, content))
                if in_flight is not None:
                    calls += await in_flight
                in_flight = asyncio.create_task(deliver(by_round))
            if in_flight is not None:
                calls += await in_flight
                in_flight = None
        finally:
            settle([in_flight, *claims, *made])
        return sent, failed, no_olm, calls

    async def approved_devices(
        self, room_id: str, user_ids: list[str]
    ) -> tuple[list[Approved], list[AuditRow], RoomPolicy]:
        """The devices of these users that may hold the bot's own sessions in this room (the
        room and device checks of the policy, read fresh: membership, bans and kicks, power,
        policy mode, blacklist, cross-signing), each with which seals it may read; the
        refusals as audit rows; and the policy."""
        items = [OutboxItem(room_id=room_id, user_id=u, trigger="own") for u in user_ids]
        context = await self.room_context(room_id, items)
        devices = await self._devices(set(user_ids))
        approved: list[Approved] = []
        refused: list[AuditRow] = []
        for user_id in dict.fromkeys(user_ids):
            for device_id, device in devices.get(user_id, {}).items():
                if device.deleted or (
                    user_id == self.client.mxid and device_id == self.client.device_id
                ):
                    continue
                who = await self._requester(user_id, device_id, device, context)
                refusal = admit_device(context.facts, who)
                if refusal is None:
                    approved.append(
                        Approved(device, reach(context.facts, who), who.membership or "")
                    )
                    continue
                refused.append(
                    AuditRow(
                        room_id=room_id,
                        user_id=user_id,
                        device_id=device_id,
                        session_id=None,
                        decision="withhold" if isinstance(refusal, Withhold) else "ignore",
                        code=getattr(refusal, "code", None),
                        reason=refusal.reason,
                        trigger="own",
                    )
                )
        return approved, refused, context.policy

    async def send_room_keys(
        self,
        room_id: str,
        plan: list[tuple[DeviceIdentity, dict[str, Any]]],
        trigger: str,
        reason: str,
    ) -> tuple[int, int, list[tuple[DeviceIdentity, dict[str, Any]]]]:
        """Send the bot's own megolm sessions (``m.room_key`` contents) to devices, as
        (device, content) pairs the caller chose with ``approved_devices``; audit and record
        each delivery. Returns (keys sent, devices, the pairs that did not go out: a failed
        call, or no Olm session could be made)."""
        entries = [
            (device, EventType.ROOM_KEY, content, (device, content)) for device, content in plan
        ]
        if not entries:
            return 0, 0, []

        async def record(sent: list[tuple[DeviceIdentity, dict[str, Any]]]) -> None:
            rows = [
                AuditRow(
                    room_id=room_id,
                    user_id=d.user_id,
                    device_id=d.device_id,
                    session_id=c["session_id"],
                    decision="share",
                    reason=reason,
                    trigger=trigger,
                    msg_index=0,
                )
                for d, c in sent
            ]
            await self.store.finish(
                [],
                rows,
                [(d.user_id, d.device_id, c["session_id"], 0, room_id) for d, c in sent],
            )

        sent, failed, no_olm, _ = await self.olm_send(entries, record)
        return len(sent), len({(d.user_id, d.device_id) for d, _ in sent}), failed + no_olm

    async def _send_withheld(self, withholds: list[Outcome]) -> None:
        """Tell devices what they were refused, at most WITHHELD_PER_DEVICE notices per device
        per batch (a device that floods the bot with requests must not turn it into an
        amplifier, nor hold up everyone else's answers). Notices are best effort: a failed
        send is logged, not retried."""
        messages = []
        per_device: dict[tuple[str, str], int] = defaultdict(int)
        for o in withholds:
            assert isinstance(o.decision, Withhold)
            key = (o.item.user_id, o.device_id)
            per_device[key] += 1
            if per_device[key] > WITHHELD_PER_DEVICE:
                o.notified = False
                continue
            content = protocol.withheld_content(
                o.item.room_id, o.session_id, o.sender_key, o.decision.code, o.decision.reason
            )
            messages.append((o.item.user_id, o.device_id, content))
        for chunk in rounds(messages):
            for event_type in WITHHELD_TYPES:
                try:
                    await self._send_chunk(event_type, chunk)
                except (MatrixRequestError, MatrixConnectionError) as e:
                    self.log.warning(f"Sending {len(chunk)} withheld notice(s) failed: {e}")

    async def _send_chunk(self, event_type: EventType, chunk: list[tuple[str, str, Any]]) -> None:
        body: dict[str, dict[str, Any]] = defaultdict(dict)
        for user_id, device_id, content in chunk:
            body[user_id][device_id] = content
        await self.client.send_to_device(event_type, body)

    # Records ------------------------------------------------------------------------------------

    @staticmethod
    def _expired(item: OutboxItem) -> bool:
        """A queued item that failed too often or waited too long: dropped, never retried."""
        age = int(time.time() * 1000) - item.enqueued if item.enqueued else 0
        requests = item.trigger == REQUEST_LANE
        return item.attempts + 1 >= MAX_ATTEMPTS[requests] or age > MAX_AGE_MS[requests]

    def _gave_up(self, item: OutboxItem) -> AuditRow:
        why = f"gave up after {item.attempts + 1} tries over {_waited(item) or 0} ms"
        self.log.warning(
            f"Dropping the {item.trigger} for {item.user_id} in {item.room_id}: {why}"
        )
        return AuditRow(
            room_id=item.room_id,
            user_id=item.user_id,
            device_id=item.device_id,
            session_id=item.session_id,
            decision="ignore",
            reason=why,
            trigger=item.trigger,
            request_id=item.request_id,
            waited_ms=_waited(item),
        )

    def _audit_row(self, o: Outcome) -> AuditRow:
        d = o.decision
        common = dict(
            room_id=o.item.room_id,
            user_id=o.item.user_id,
            device_id=o.device_id,
            session_id=o.session_id,
            trigger=o.item.trigger,
            request_id=o.item.request_id,
            waited_ms=_waited(o.item),
        )
        if o.failed:
            return AuditRow(
                decision="failed",
                reason=f"not delivered (sendToDevice failed): {d.reason}",
                msg_index=getattr(d, "index", None),
                **common,
            )
        if isinstance(d, Share):
            return AuditRow(
                decision="share", reason=d.reason, msg_index=d.index, exposed=d.exposed, **common
            )
        if isinstance(d, Withhold):
            reason = d.reason
            if not o.notified:
                reason += f" (no notice sent: over {WITHHELD_PER_DEVICE} for this device at once)"
            return AuditRow(decision="withhold", code=d.code, reason=reason, **common)
        return AuditRow(decision="ignore", reason=d.reason, **common)

    @staticmethod
    def _delivery(o: Outcome) -> tuple[str, str, str, int, str]:
        assert isinstance(o.decision, Share)
        return o.item.user_id, o.device_id, o.session_id, o.decision.index, o.item.room_id

    def _log(self, o: Outcome) -> None:
        d = o.decision
        who = f"{o.item.user_id}/{o.device_id} in {o.item.room_id}, session {o.session_id}"
        if isinstance(d, Share):
            self.log.info(f"Shared {who} from index {d.index} ({o.item.trigger}): {d.reason}")
        elif isinstance(d, Withhold):
            self.log.info(f"Withheld {who} with {d.code} ({o.item.trigger}): {d.reason}")
        else:
            self.log.info(f"Ignored {who} ({o.item.trigger}): {d.reason}")


def _waited(item: OutboxItem) -> int | None:
    """How long an item has waited, in ms (clamped: a clock jump cannot overflow a column)."""
    if not item.enqueued:
        return None
    return max(0, min(int(time.time() * 1000) - item.enqueued, 2**53))


def lane_of(item: OutboxItem) -> str:
    return REQUEST_LANE if item.trigger in FAST_TRIGGERS else PUSH_LANE


def forwarded_content(
    session: Any, room_id: str, session_id: str, index: int, shared_history: bool
) -> ForwardedRoomKeyEventContent:
    content = ForwardedRoomKeyEventContent(
        algorithm=EncryptionAlgorithm.MEGOLM_V1,
        room_id=room_id,
        session_id=SessionID(session_id),
        session_key=session.export_session(index),
        sender_key=session.sender_key,
        signing_key=session.signing_key,
        forwarding_key_chain=list(session.forwarding_chain or []),
    )
    if shared_history:
        content["shared_history"] = True
    return content


def _member_state(user_id: str, event: Any) -> tuple[str | None, bool]:
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
