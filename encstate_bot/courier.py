"""The courier: the one place that sends keys, and the queue it drains.

Work arrives as ``OutboxItem`` rows in the database (a request to answer, a member to push to),
so a crash or restart resumes where it stopped. Three lanes drain the queue side by side:
answers to requests, a newcomer's keys (the fast lane) and bulk pushes, which pause for the
other two (``triggers.py``). For each batch the courier has the gatherer read what can change
under it (``gather.py``), asks the planner for every decision
(``planner.py``, pure), hands the shares to the transport (``transport.py``: Olm, to-device,
withheld notices) and records each outcome in the audit (``audit.py``) as its call goes
through.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
import logging
import time
from typing import Any, Iterable

from attr import dataclass
from mautrix.errors import MatrixConnectionError, MatrixRequestError
from mautrix.types import DeviceIdentity, EventType

from . import audit, protocol
from .audit import WITHHELD_PER_DEVICE, Audit, Outcome
from .gather import Devices, Gatherer, RoomContext
from .ledger import SessionKind
from .phases import Phases
from .planner import approve, plan, waiting_for_keys
from .policy import Share, Withhold
from .ratelimit import RecentSet
from .room_keys import forwarded_content
from .room_policy import RoomPolicy
from .seals import SealBook
from .store import AuditRow, OutboxItem, Store
from .tasks import settle, stop_all
from .tracker import SessionSource, Tracker
from .transport import Transport
from .triggers import LANES, PUSH_LANE, Trigger, is_fast, lane

PER_ROOM_ITEMS = 1000  # one busy room cannot take a whole batch
WAVE_USERS = 1000  # users whose device keys are looked up together (bounds memory)
BATCH_ITEMS = 2000
# A join storm becomes a few batches, not one per join: when the push lane wakes to a short
# queue it waits this long for more; longer while a storm goes on (it woke again soon after
# its last batch: a homeserver admits joins to a room one after the other, often a second
# apart).
PUSH_COALESCE_SECONDS = 0.5
STORM_COALESCE_SECONDS = 2.0
STORM_GAP_SECONDS = 5.0
COALESCE_BELOW = 50
CANCELLATIONS_KEPT_SECONDS = 600  # far longer than a batch takes to decide


@dataclass(frozen=True)
class Approved:
    """A device that may hold the bot's own sessions, and which of its seals."""

    device: DeviceIdentity
    reach: str  # policy.ALL or policy.PREVIEW
    membership: str


class Courier:
    def __init__(
        self,
        client: Any,
        store: Store,
        tracker: Tracker,
        seals: SealBook,
        gather: Gatherer,
        transport: Transport,
        audit: Audit,
        log: logging.Logger,
    ) -> None:
        self.client = client
        self.store = store
        self.tracker = tracker
        self.seals = seals
        self.gather = gather
        self.transport = transport
        self.audit = audit
        self.log = log
        self._wake = {name: asyncio.Event() for name in LANES}
        self._urgent = 0  # lanes draining a batch someone waits for (bulk deliveries pause)
        self._tasks: list[asyncio.Task] = []
        # (user, device, request id) of recent cancellations: a batch deciding the request
        # when it was cancelled must not leave a wait behind
        self.cancelled = RecentSet(CANCELLATIONS_KEPT_SECONDS)

    @property
    def sent_calls(self) -> int:
        """sendToDevice calls that carried keys, for tests and status."""
        return self.transport.sent_calls

    # Lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        for name in LANES:
            self._tasks.append(asyncio.create_task(self._run(name), name=f"encstate-{name}"))

    async def stop(self) -> None:
        await stop_all(self._tasks)
        self._tasks = []

    async def submit(self, items: Iterable[OutboxItem]) -> int:
        items = list(items)
        count = await self.store.enqueue(items)
        for name in {lane(i.trigger) for i in items}:
            self._wake[name].set()
        return count

    def _waited_for(self, draining: int) -> None:
        """Count a lane someone waits for in (1) or out (-1) of a batch: bulk deliveries pause
        between their calls while any of them drains."""
        self._urgent += draining
        if self._urgent:
            self.transport.fast_idle.clear()
        else:
            self.transport.fast_idle.set()

    async def _run(self, lane: str) -> None:
        """Drain one lane, a batch at a time. The lanes run side by side: an answer to a
        request never waits for a newcomers' batch in flight, however big a join storm's."""
        wake = self._wake[lane]
        urgent = lane != PUSH_LANE
        last_batch = float("-inf")  # when this lane last finished a batch (monotonic)
        while True:
            try:
                if urgent:
                    self._waited_for(1)
                try:
                    worked = await self.drain(lane)
                finally:
                    if urgent:
                        self._waited_for(-1)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception(f"Courier ({lane}) failed; retrying in 5 s")
                await asyncio.sleep(5)
                continue
            if worked:
                last_batch = time.monotonic()
                if not urgent:
                    queued = await self.store.queued(lane, COALESCE_BELOW)
                    if 0 < queued < COALESCE_BELOW:
                        await asyncio.sleep(STORM_COALESCE_SECONDS)  # more are coming in
                continue
            wake.clear()
            next_due = await self.store.next_due_ms(lane)
            timeout = 30.0
            if next_due is not None:
                timeout = max(0.05, min(timeout, (next_due - time.time() * 1000) / 1000))
            try:
                await asyncio.wait_for(wake.wait(), timeout)
            except asyncio.TimeoutError:
                continue
            if not urgent and await self.store.queued(lane, COALESCE_BELOW) < COALESCE_BELOW:
                storm = time.monotonic() - last_batch < STORM_GAP_SECONDS
                await asyncio.sleep(STORM_COALESCE_SECONDS if storm else PUSH_COALESCE_SECONDS)

    async def drain(self, lane: str) -> bool:
        """Process one batch of due items of a lane; False if there was none."""
        due = await self.store.due(BATCH_ITEMS, lane, per_room=PER_ROOM_ITEMS)
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
            asyncio.create_task(self.gather.devices(set(everyone[:WAVE_USERS])))
            if everyone
            else None
        )
        try:
            return await self._deliver(items, everyone, first_devices, dry_run)
        finally:
            settle([first_devices])

    async def _contexts(
        self, items: list[OutboxItem]
    ) -> tuple[dict[str, RoomContext], list[OutboxItem]]:
        """Each room's context; the items of rooms that cannot be read now."""
        by_room: dict[str, list[OutboxItem]] = defaultdict(list)
        for item in items:
            by_room[item.room_id].append(item)
        contexts: dict[str, RoomContext] = {}
        skipped: list[OutboxItem] = []
        for room_id, room_items in by_room.items():
            if not self.tracker.complete(room_id):
                self.log.warning(f"{room_id} has events not recorded yet; retrying later")
                skipped += room_items
                continue
            try:
                contexts[room_id] = await self.gather.room(room_id, room_items)
            except (MatrixRequestError, MatrixConnectionError) as e:
                self.log.warning(f"Could not read {room_id} for delivery, retrying later: {e}")
                skipped += room_items
        return contexts, skipped

    async def _deliver(
        self,
        items: list[OutboxItem],
        everyone: list[str],
        first_devices: asyncio.Task | None,
        dry_run: bool,
    ) -> list[Outcome]:
        phases = Phases()
        reads = {i.room_id: self.tracker.reads_started.get(i.room_id, 0) for i in items}
        queued = [audit.waited(i) for i in items]
        if any(q is not None for q in queued):
            phases.add("queued", max(q for q in queued if q is not None))
        contexts, skipped = await self._contexts(items)
        phases.mark("rooms")
        if skipped:
            await self._send(skipped, [], skipped, {})
        live = [i for i in items if i.room_id in contexts]
        users = list(dict.fromkeys(i.user_id for i in live))
        delivered = await self.store.delivered(users)
        source = self.tracker.session_source()
        phases.mark("ledger")
        waves = [users[i : i + WAVE_USERS] for i in range(0, len(users), WAVE_USERS)]
        wave_of = {user: n // WAVE_USERS for n, user in enumerate(users)}
        per_wave: list[list[OutboxItem]] = [[] for _ in waves]
        for item in live:
            per_wave[wave_of[item.user_id]].append(item)
        outcomes: list[Outcome] = []
        next_devices = None
        if waves and first_devices is not None and set(waves[0]) <= set(everyone[:WAVE_USERS]):
            next_devices = first_devices
        elif waves:
            next_devices = asyncio.create_task(self.gather.devices(set(waves[0])))
        try:
            for index, wave_items in enumerate(per_wave):
                assert next_devices is not None
                devices = await next_devices
                phases.mark("devices")
                next_devices = (
                    asyncio.create_task(self.gather.devices(set(waves[index + 1])))
                    if index + 1 < len(waves)
                    else None
                )
                by_room: dict[str, list[OutboxItem]] = defaultdict(list)
                for item in wave_items:
                    by_room[item.room_id].append(item)
                wave_outcomes: list[Outcome] = []
                groups: dict[tuple[str, str], Any] = {}
                for room_id, context in contexts.items():
                    room_items = by_room.get(room_id)
                    if room_items:
                        wave_outcomes += await self._decide(
                            context, room_items, devices, delivered, source, dry_run, groups
                        )
                phases.mark("decide")
                wave_outcomes, held = self._hold_while_read(wave_outcomes, reads)
                await self._send(wave_items, wave_outcomes, held, groups, phases)
                outcomes += wave_outcomes
        finally:
            settle([next_devices])
        return outcomes

    def _hold_while_read(
        self, outcomes: list[Outcome], reads: dict[str, int]
    ) -> tuple[list[Outcome], list[OutboxItem]]:
        """Items that would forward a session (not one of the bot's seals) from a room whose
        timeline is being read back, or was since this batch began (``reads``: the reads
        begun per room then), or is kept to read, wait: queued ones are retried later, an
        admin's command is refused (m.unavailable). What a read has not reached, or reached
        after the batch decided, may hold messages of that session. Returns (the outcomes to
        send, the items held back)."""
        held: dict[int, OutboxItem] = {}
        for o in outcomes:
            room_id = o.item.room_id
            if (
                not isinstance(o.decision, Share)
                or self.seals.get(room_id, o.session_id) is not None
            ):
                continue
            if not (
                self.tracker.being_read(room_id)
                or self.tracker.history_unread(room_id)
                or self.tracker.reads_started.get(room_id, 0) != reads.get(room_id, 0)
            ):
                continue
            if o.item.id is None:
                o.decision = Withhold(
                    protocol.UNAVAILABLE, "the room's timeline is being read back; try again"
                )
            else:
                held[id(o.item)] = o.item
        if not held:
            return outcomes, []
        self.log.info(
            f"{len(held)} item(s) wait for a timeline being read back before a session is "
            "forwarded"
        )
        return [o for o in outcomes if id(o.item) not in held], list(held.values())

    async def _decide(
        self,
        context: RoomContext,
        items: list[OutboxItem],
        devices: Devices,
        delivered: set[tuple[str, str, str, int]],
        source: SessionSource,
        dry_run: bool,
        groups: dict[tuple[str, str], Any],
    ) -> list[Outcome]:
        """The planner's decisions for one room's items, with what the transport needs."""
        room_id = context.room_id
        batch, held = await self.gather.batch(context, items, devices, source)
        groups.update({(room_id, s): g for s, g in held.items()})
        own_key = self.client.crypto.account.identity_key if self.client.crypto else None
        outcomes = []
        planned = plan(self.client.mxid, batch, items, delivered, dry_run)
        waits = waiting_for_keys(batch, planned)
        if waits:
            await self._wait_for_keys(room_id, waits)
        for p in planned:
            seal = batch.sessions[p.session_id].seal if p.session_id in batch.sessions else None
            group = held.get(p.session_id)
            outcomes.append(
                Outcome(
                    item=p.item,
                    device_id=p.device_id,
                    session_id=p.session_id,
                    decision=p.decision,
                    device=devices.get(p.item.user_id, {}).get(p.device_id),
                    sender_key=own_key if seal is not None else getattr(group, "sender_key", None),
                )
            )
        return outcomes

    async def cancel(self, user_id: str, device_id: str, request_id: str) -> int:
        """A key request was cancelled: drop its queued answer and its wait for a key, also
        one a batch deciding it right now would write. Returns the queued answers dropped."""
        key = (user_id, device_id, request_id)
        self.cancelled.seen(key, time.monotonic())
        removed = await self.store.cancel_request(*key)
        await self.store.cancel_waits(*key)
        return removed

    def _was_cancelled(self, item: OutboxItem) -> bool:
        return item.request_id is not None and self.cancelled.holds(
            (item.user_id, item.device_id, item.request_id), time.monotonic()
        )

    async def _wait_for_keys(self, room_id: str, waits: list[OutboxItem]) -> None:
        """Keep deliveries refused for a missing key in the database; the intake queues them
        again when the key arrives (``release``). A key that arrived while this batch was
        deciding found no rows to release: release those now."""
        waits = [w for w in waits if not self._was_cancelled(w)]
        await self.store.add_waits(waits)
        for w in waits:  # cancelled while the rows were written
            if self._was_cancelled(w):
                await self.store.cancel_waits(w.user_id, w.device_id or "", w.request_id or "")
        ledger = self.tracker.ledgers.get(room_id)
        arrived = {
            w.session_id
            for w in waits
            if ledger is not None and ledger.facts(w.session_id).kind != SessionKind.PENDING
        }
        if arrived:
            await self.release(room_id, arrived)

    async def release(self, room_id: str, session_ids: set[str]) -> None:
        """Sessions' keys arrived: queue again what waited for them."""
        items = await self.store.take_waits(room_id, session_ids)
        if items:
            self.log.info(
                f"Delivering {len(items)} key(s) in {room_id} that waited for the bot to hold them"
            )
            await self.submit(items)

    # The bot's own sessions ---------------------------------------------------------------------

    async def approved_devices(
        self, room_id: str, user_ids: list[str]
    ) -> tuple[list[Approved], list[AuditRow], RoomPolicy]:
        """The devices of these users that may hold the bot's own sessions in this room (the
        room and device checks of the policy, read fresh: membership, bans and kicks, power,
        policy mode, blacklist, cross-signing), each with which seals it may read; the
        refusals as audit rows; and the policy. Inside ``Members.reusing`` (a seal's waves)
        memberships come from the seal's one listing, except for users a sync has since seen
        leave or be banned: those are read again."""
        items = [OutboxItem(room_id=room_id, user_id=u, trigger=Trigger.OWN) for u in user_ids]
        context = await self.gather.room(room_id, items)
        devices = await self.gather.devices(set(user_ids))
        users = await self.gather.users(context, devices, {u: (True, set()) for u in user_ids})
        own = (self.client.mxid, self.client.device_id)
        approved: list[Approved] = []
        refused: list[AuditRow] = []
        for a in approve(own, context.facts, users, user_ids):
            if a.decision is None:
                approved.append(Approved(devices[a.user_id][a.device_id], a.reach, a.membership))
                continue
            refused.append(
                AuditRow(
                    room_id=room_id,
                    user_id=a.user_id,
                    device_id=a.device_id,
                    session_id=None,
                    decision="withhold" if isinstance(a.decision, Withhold) else "ignore",
                    code=getattr(a.decision, "code", None),
                    reason=a.decision.reason,
                    trigger=str(Trigger.OWN),
                )
            )
        return approved, refused, context.facts.policy

    async def send_room_keys(
        self,
        room_id: str,
        plan: list[tuple[DeviceIdentity, dict[str, Any]]],
        trigger: Trigger,
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
                    trigger=str(trigger),
                    msg_index=0,
                )
                for d, c in sent
            ]
            await self.store.finish(
                [],
                rows,
                [(d.user_id, d.device_id, c["session_id"], 0, room_id) for d, c in sent],
            )

        sent, failed, no_olm, _ = await self.transport.olm_send(entries, record)
        return len(sent), len({(d.user_id, d.device_id) for d, _ in sent}), failed + no_olm

    # Sending and recording ----------------------------------------------------------------------

    async def _send(
        self,
        items: list[OutboxItem],
        outcomes: list[Outcome],
        skipped: list[OutboxItem],
        groups: dict[tuple[str, str], Any],
        phases: Phases | None = None,
    ) -> None:
        """Send one wave's keys and withheld notices, and record the outcomes; logs one line
        with where the wave's time went (since the previous wave's line, or the batch's
        start)."""
        phases = phases or Phases()
        started = time.monotonic()
        failed_items: set[int] = {i.id for i in skipped if i.id is not None}
        shares = [o for o in outcomes if isinstance(o.decision, Share)]
        recorded: set[int] = set()
        calls = 0
        sent: list[Outcome] = []
        if shares:
            sent, failed, calls = await self._send_keys(shares, groups, recorded, phases)
            phases.at = time.monotonic()
            failed_items |= {o.item.id for o in failed if o.item.id is not None}
            for o in failed:
                o.failed = True  # an unqueued share (a command's) is audited as failed
        withholds = [
            o
            for o in outcomes
            if isinstance(o.decision, Withhold) and o.item.trigger == Trigger.REQUEST
        ]
        if withholds:
            await self._send_withheld(withholds)
            phases.mark("withheld")
        failed_queued = [i for i in items if i.id in failed_items]
        expired = [i for i in failed_queued if audit.expired(i)]
        gone = {i.id for i in expired}
        retry = [i for i in failed_queued if i.id not in gone]
        waiting = {i.id for i in retry}
        rest = [o for o in outcomes if id(o) not in recorded and o.item.id not in waiting]
        done = [i.id for i in items if i.id is not None and i.id not in waiting]
        await self.store.finish(
            done, [audit.row(o) for o in rest] + [self.audit.gave_up(i) for i in expired]
        )
        later: dict[int, list[int]] = defaultdict(list)
        for item in retry:
            later[audit.backoff_ms(item.attempts)].append(item.id)  # type: ignore[arg-type]
        for delay_ms, ids in later.items():
            await self.store.retry_later(ids, delay_ms)
        for o in rest:
            self.audit.log_outcome(o)
        phases.mark("record")
        devices = {(o.item.user_id, o.device_id) for o in sent}
        lanes = "/".join(dict.fromkeys(lane(i.trigger) for i in items))
        self.log.info(
            f"Batch of {len(items)} item(s) [{lanes}]: {len(sent)} key(s) to {len(devices)} "
            f"device(s) in {calls} sendToDevice call(s), {len(withholds)} withheld, "
            f"{len(outcomes) - len(shares) - len(withholds)} ignored, {len(retry)} to retry "
            f"({time.monotonic() - started:.2f} s: {phases.report()})"
        )

    async def _send_keys(
        self,
        shares: list[Outcome],
        groups: dict[tuple[str, str], Any],
        recorded: set[int],
        phases: Phases | None = None,
    ) -> tuple[list[Outcome], list[Outcome], int]:
        """Send the shared sessions, recording each call's shares as soon as it went through;
        returns (sent, failed, calls). The transport books its phases (sessions, leases, Olm
        lock, encryption, sendToDevice calls) and the recording to ``phases``."""
        phases = phases or Phases()
        exports: dict[tuple[str, str, int | None], Any] = {}  # (room, session, index or None)
        entries: list[tuple[DeviceIdentity, EventType, Any, Outcome]] = []
        for o in shares:
            assert o.device is not None and isinstance(o.decision, Share)
            seal = self.seals.get(o.item.room_id, o.session_id)
            if seal is not None:
                # the bot made this session: its m.room_key, which every client takes (one
                # dict per seal, so its JSON is encoded once for all the devices)
                key = (o.item.room_id, o.session_id, None)
                if key not in exports:
                    exports[key] = seal.room_key()
                entries.append((o.device, EventType.ROOM_KEY, exports[key], o))
                continue
            key = (o.item.room_id, o.session_id, o.decision.index)
            if key not in exports:
                exports[key] = forwarded_content(
                    groups[(o.item.room_id, o.session_id)],
                    o.item.room_id,
                    o.session_id,
                    o.decision.index,
                    (o.item.room_id, o.session_id) in self.tracker.shared_history,
                )
            entries.append((o.device, EventType.FORWARDED_ROOM_KEY, exports[key], o))

        async def record(outcomes: list[Outcome]) -> None:
            async with phases.timed("record"):
                rows = [audit.row(o) for o in outcomes]
                await self.store.finish([], rows, [audit.delivery(o) for o in outcomes])
                recorded.update(id(o) for o in outcomes)
                for o in outcomes:
                    self.audit.log_outcome(o)
                await self.audit.announce(rows)

        # Answers and a newcomer's keys go at once (someone is waiting for them, and a repeat
        # after a crash is harmless); bulk pushes one call after the other.
        waiting = all(is_fast(o.item.trigger) for o in shares)
        sent, failed, no_olm, calls = await self.transport.olm_send(
            entries, record, together=waiting, phases=phases
        )
        for o in no_olm:
            o.decision = Withhold(protocol.NO_OLM, "no Olm session could be established")
        return sent, failed, calls

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
        await self.transport.send_withheld(messages)
