"""The sealer: keeps every current value of an encrypted-state room re-sent by the bot in a seal
(see ``seals.py``), keys first.

A room is marked when its state changes; shortly after (changes to a key within the window
coalesce to the latest value) the sealer reads what lacks a seal, makes one session per value,
writes each seal's key to the database, hands the keys to the joined members' (and invitees')
devices, and only then sends the state events. Members of rooms that admit into a restricted
room get the preview seals through the courier once the seal event is back in the ledger.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from attr import dataclass, evolve
from mautrix.api import Method, Path
from mautrix.crypto.sessions import InboundGroupSession
from mautrix.errors import MatrixConnectionError, MatrixRequestError
from mautrix.types import DeviceIdentity, RoomID, SessionID

from .courier import Courier
from .ledger import StateRecord
from .members import Members
from .policy import ALL, Mode
from .ratelimit import TokenBuckets
from .room_keys import encrypt_once
from .room_policy import RoomPolicies
from .seals import Seal, SealBook, content_hash, is_preview, needs_seal
from .store import AuditRow, OutboxItem, Store, now_ms
from .tasks import settle, stop_all
from .tracker import Decrypted, Tracker
from .triggers import Trigger

# A seal's keys go to a room's users in waves of this many (a huge room's devices, trust and
# Olm work are not all in memory at once).
SEAL_WAVE_USERS = 2000
# Changes to a room's state within this window are sealed together, each key at its latest.
SEAL_DELAY_SECONDS = 0.5
TICK_SECONDS = 0.1
RETRY_SECONDS = 5.0
# Each seal is a state event and a key to every member (and, for the preview types, to every
# member of the rooms that admit into a restricted room): someone flipping a value must not
# turn the bot into an amplifier. Per packed key: 3 seals at once, then one a minute; per room:
# 200 values at once (a room's first sealing), then one a second. Values changed meanwhile
# wait, and are sealed at their latest.
KEY_BURST, KEY_PER_SECOND = 3, 1 / 60
ROOM_BURST, ROOM_PER_SECOND = 200, 1.0


@dataclass(frozen=True)
class SealPlan:
    """What sealing a room would do now."""

    # current values lacking a seal, with their content (None: the bot cannot read it now)
    todo: list[tuple[StateRecord, dict[str, Any] | None]]
    sealed: int  # current values a seal of the bot opens
    total: int  # current values
    unreadable: list[str]  # packed keys whose current value the bot cannot decrypt
    problem: str | None  # why the bot cannot seal here, if it cannot
    same_content: list[str]  # keys whose current event is not the bot's but holds its value


@dataclass(frozen=True)
class SealReport:
    sealed: list[Seal]
    keys_sent: int
    devices: int
    refused: int
    plan: SealPlan
    dry_run: bool = False


class Sealer:
    def __init__(
        self,
        client: Any,
        store: Store,
        tracker: Tracker,
        courier: Courier,
        book: SealBook,
        policies: RoomPolicies,
        members: Members,
        config: Any,
        log: logging.Logger,
    ) -> None:
        self.client = client
        self.store = store
        self.tracker = tracker
        self.courier = courier
        self.book = book
        self.policies = policies
        self.members = members
        self.config = config
        self.log = log
        self._due: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._per_key = TokenBuckets(KEY_BURST, KEY_PER_SECOND)
        self._per_room = TokenBuckets(ROOM_BURST, ROOM_PER_SECOND)
        self._hashes: dict[tuple[str, str], tuple[str, dict[str, Any]] | None] = {}
        self.runs = 0  # sealing passes that sent something, for tests and status

    # Scheduling ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="encstate-sealer")

    async def stop(self) -> None:
        await stop_all([self._task])
        self._task = None

    def mark(self, room_id: str, delay: float = SEAL_DELAY_SECONDS) -> None:
        """The room's state may have changed: seal it after ``delay`` (the coalescing window),
        or sooner if it was due sooner already."""
        at = time.monotonic() + delay
        if room_id not in self._due or self._due[room_id] > at:
            self._due[room_id] = at
            self._wake.set()

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            due = [room for room, at in self._due.items() if at <= now]
            for room_id in due:
                self._due.pop(room_id, None)
                await self.seal_now(room_id)
            self._wake.clear()
            if self._due:
                wait = max(TICK_SECONDS, min(self._due.values()) - time.monotonic())
            else:
                wait = 30.0
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass

    async def seal_now(self, room_id: str) -> int:
        """Seal the room's current values where its policy seals (what can be sealed now; a
        failure is logged and the room tried again after RETRY_SECONDS). Returns the values
        sealed."""
        if not self.policies.get(room_id).seal:
            return 0
        try:
            return len((await self.seal_room(room_id, limited=True)).sealed)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception(f"Sealing {room_id} failed; trying again shortly")
            self.mark(room_id, RETRY_SECONDS)
            return 0

    # Planning -----------------------------------------------------------------------------------

    async def _content(self, record: StateRecord) -> tuple[str, dict[str, Any]] | None:
        """(digest, content) of a valid value, decrypted once per event."""
        key = (record.room_id, record.event_id)
        if key not in self._hashes:
            result = await self.tracker.session_source().decrypt(
                record.room_id, record.session_id, record.ciphertext
            )
            content = None
            if isinstance(result, Decrypted):
                try:
                    content = json.loads(result.plaintext).get("content")
                except (ValueError, AttributeError):
                    content = None
            if not isinstance(content, dict):
                self._hashes[key] = None
            else:
                self._hashes[key] = (content_hash(content), content)
            while len(self._hashes) > 20_000:
                self._hashes.pop(next(iter(self._hashes)))
        return self._hashes[key]

    def needed_level(self, room_id: str, types: list[str]) -> int:
        """The power level it takes to send these types as encrypted state."""
        view = self.tracker.view(room_id)
        return max([view.state_level("m.room.encrypted")] + [view.state_level(t) for t in types])

    def missing_power(self, room_id: str, types: list[str]) -> str | None:
        view = self.tracker.view(room_id)
        level = view.user_level(self.client.mxid)
        if level <= view.users_default:
            return (
                f"the bot's power level {level} does not exceed users_default {view.users_default}"
            )
        needed = self.needed_level(room_id, types)
        if level < needed:
            return f"sealing needs power level {needed} to send this state; the bot has {level}"
        return None

    async def plan(self, room_id: str) -> SealPlan:
        ledger = self.tracker.ledgers.get(room_id)
        if ledger is None:
            return SealPlan([], 0, 0, [], None, [])
        current = ledger.current_state()
        todo: list[tuple[StateRecord, dict[str, Any] | None]] = []
        same: list[str] = []
        sealed = 0
        for record in current:
            if self.book.sealed(ledger, record):
                sealed += 1
                continue
            found = await self._content(record) if self.client.crypto is not None else None
            if found is None:
                # no crypto (the problem below says so), or the session went away since the
                # value was judged: it is unsealed, and nothing can seal it now
                todo.append((record, None))
                continue
            digest, content = found
            if needs_seal(self.book, ledger, record, digest):
                todo.append((record, content))
            else:
                same.append(record.outer_key)
        unreadable = ledger.unreadable_current()
        problem = None
        if self.client.crypto is None:
            problem = "the bot has no end-to-end encryption"
        elif not self.tracker.complete(room_id):
            problem = "recent events of this room are not recorded yet"
        elif any(content is None for _, content in todo):
            problem = "the bot cannot decrypt some current values any more"
        elif todo:
            problem = self.missing_power(room_id, [r.inner_type or "" for r, _ in todo])
            policy = self.policies.get(room_id)
            if problem is None and policy.mode == Mode.OFF:
                problem = "the room's policy is off, so the seals could go to nobody"
            elif problem is None and policy.dry_run:
                problem = "the room is in dry run (it decides and records, sends nothing)"
        return SealPlan(todo, sealed, len(current), unreadable, problem, same)

    # Sealing ------------------------------------------------------------------------------------

    async def seal_room(
        self, room_id: str, dry_run: bool = False, limited: bool = False
    ) -> SealReport:
        """Seal every current value of the room that lacks a seal: keys to the joined members'
        and invitees' devices first, then the state events. ``limited``: within the rate
        limits (the automatic pass; an admin's ``seal now`` is not limited)."""
        async with self._lock:
            made: list[Seal] = []
            try:
                return await self._seal_room(room_id, dry_run, limited, made)
            finally:
                for seal in made:  # a seal whose event did not go out counts for nothing
                    if seal.session_id in self.book.in_flight:
                        self.book.finish(seal)
                        self.mark(room_id, RETRY_SECONDS)

    def _allowed(self, room_id: str, todo: list) -> list:
        """The values the rate limits let through now; the room is looked at again later for
        the rest."""
        now = time.monotonic()
        allowed = []
        for record, content in todo:
            key = (room_id, record.outer_key)
            # both budgets must have a token before either is charged
            if self._per_key.tokens(key, now) >= 1 and self._per_room.tokens(room_id, now) >= 1:
                self._per_key.allow(key, now)
                self._per_room.allow(room_id, now)
                allowed.append((record, content))
        if len(allowed) < len(todo):
            self.log.info(
                f"Sealing {len(todo) - len(allowed)} value(s) of {room_id} later: they changed "
                "faster than the seal rate limit allows"
            )
            self.mark(room_id, 1 / KEY_PER_SECOND)
        return allowed

    async def _adopt(self, room_id: str) -> None:
        """Seals whose event is in the room although the bot never learned its ID (the answer
        to the PUT was lost): record the event, send the invitees their preview keys and queue
        the members' keys (those who have it already are skipped)."""
        ledger = self.tracker.ledgers.get(room_id)
        if ledger is None or self.client.crypto is None:
            return
        for record in ledger.current_state():
            seal = self.book.get(room_id, record.session_id)
            if seal is None or seal.event_id is not None:
                continue
            seal = evolve(seal, event_id=record.event_id)
            await self.store.put_seal(seal)
            self.book.finish(seal)
            self.log.info(f"Seal {seal.session_id} of {room_id} was sent as {seal.event_id}")
            async with self.members.listed(room_id) as listing:  # one listing, not two
                approved, _, _ = await self.courier.approved_devices(
                    room_id, listing.joined + listing.invited
                )
            preview = is_preview(seal.inner_type, self.config.preview_types)
            room_key = seal.room_key()  # one dict for every device: its JSON is encoded once
            later = [
                (a.device, room_key)
                for a in approved
                if a.membership != "join" and (preview or a.reach == ALL)
            ]
            await self.courier.send_room_keys(
                room_id, later, trigger=Trigger.SEAL, reason="preview seal for an invitee"
            )
            await self.courier.submit(
                [
                    OutboxItem(
                        room_id=room_id,
                        user_id=user_id,
                        session_id=seal.session_id,
                        trigger=Trigger.SEAL,
                    )
                    for user_id in listing.joined
                    if user_id != self.client.mxid
                ]
            )

    async def _send_to_members(
        self, room_id: str, made: list[Seal]
    ) -> tuple[
        int,
        int,
        list[tuple[DeviceIdentity, dict[str, Any]]],
        list[tuple[DeviceIdentity, dict[str, Any]]],
        list[AuditRow],
    ]:
        """The new seals' keys to the joined members' devices the policy approves: (keys
        sent, devices, the pairs that did not go out, the invitees' pairs for after the
        events, the refusals). The room is listed once; its users go in waves of
        SEAL_WAVE_USERS (the devices, trust and Olm work of one wave in memory at a time),
        the next wave's devices looked up while this one's keys go out."""
        # One m.room_key dict per seal, shared by every device: its JSON is encoded once.
        room_keys = {seal.session_id: seal.room_key() for seal in made}
        preview = self.config.preview_types
        keys = devices = 0
        missed: list[tuple[DeviceIdentity, dict[str, Any]]] = []
        later_plan: list[tuple[DeviceIdentity, dict[str, Any]]] = []
        refused: list[AuditRow] = []
        upcoming: asyncio.Task | None = None
        async with self.members.listed(room_id) as listing:
            users = listing.joined + listing.invited
            waves = [users[i : i + SEAL_WAVE_USERS] for i in range(0, len(users), SEAL_WAVE_USERS)]
            try:
                for index, wave in enumerate(waves):
                    if upcoming is None:
                        upcoming = asyncio.create_task(
                            self.courier.approved_devices(room_id, wave)
                        )
                    approved, wave_refused, _ = await upcoming
                    upcoming = None
                    if self.members.any_departed(room_id, wave):
                        # decided while the last wave went out, before a sync showed someone
                        # of this wave leave or be banned: decide again on fresh memberships
                        approved, wave_refused, _ = await self.courier.approved_devices(
                            room_id, wave
                        )
                    if index + 1 < len(waves):
                        upcoming = asyncio.create_task(
                            self.courier.approved_devices(room_id, waves[index + 1])
                        )
                    refused += wave_refused
                    members_plan = []
                    for entry in approved:
                        for seal in made:
                            if entry.reach != ALL and not is_preview(seal.inner_type, preview):
                                continue
                            target = members_plan if entry.membership == "join" else later_plan
                            target.append((entry.device, room_keys[seal.session_id]))
                    del approved
                    sent, reached, wave_missed = await self.courier.send_room_keys(
                        room_id,
                        members_plan,
                        trigger=Trigger.SEAL,
                        reason="seal of the current value, before its event",
                    )
                    keys, devices, missed = keys + sent, devices + reached, missed + wave_missed
            finally:
                settle([upcoming])
        return keys, devices, missed, later_plan, refused

    async def _seal_room(
        self, room_id: str, dry_run: bool, limited: bool, made: list[Seal]
    ) -> SealReport:
        await self._adopt(room_id)
        plan = await self.plan(room_id)
        if not plan.todo or plan.problem or dry_run:
            if plan.todo and plan.problem:
                self.log.info(
                    f"Cannot seal {len(plan.todo)} value(s) in {room_id}: {plan.problem}"
                )
            return SealReport([], 0, 0, 0, plan, dry_run)
        todo = self._allowed(room_id, plan.todo) if limited else plan.todo
        crypto = self.client.crypto
        contents: dict[str, dict[str, Any]] = {}
        sources: dict[str, StateRecord] = {}
        for record, content in todo:
            assert content is not None  # else plan.problem says why not
            own = encrypt_once(
                room_id,
                {"type": record.inner_type, "state_key": record.inner_key, "content": content},
                crypto.account.identity_key,
                self.client.device_id,
            )
            seal = Seal(
                room_id=room_id,
                session_id=own.session_id,
                outer_key=record.outer_key,
                inner_type=record.inner_type or "",
                inner_key=record.inner_key or "",
                content_hash=content_hash(content),
                source_event_id=record.event_id,
                session_key=own.room_key["session_key"],
                created_ts=now_ms(),
            )
            # The key is durable before anything leaves: the bot can always hand it out again.
            await self.store.put_seal(seal)
            inbound = InboundGroupSession(
                session_key=seal.session_key,
                signing_key=crypto.account.signing_key,
                sender_key=crypto.account.identity_key,
                room_id=RoomID(room_id),
            )
            await crypto.crypto_store.put_group_session(
                RoomID(room_id), crypto.account.identity_key, SessionID(seal.session_id), inbound
            )
            self.book.begin(seal)
            made.append(seal)
            contents[seal.session_id] = own.content
            sources[seal.session_id] = record
        # Keys first: Element's engine decrypts a state event once, when it arrives.
        keys, devices, missed, later_plan, refused = await self._send_to_members(room_id, made)
        ledger = self.tracker.ledger(room_id)
        sent: list[Seal] = []
        for seal in made:
            source = ledger.events.get(seal.source_event_id, sources[seal.session_id])
            if not ledger.is_current(source):
                # The value changed while its keys went out: sending it now would put the old
                # value back over the new one. The next pass seals the new one.
                self.log.info(
                    f"Not sending the seal of {seal.outer_key} in {room_id}: the value changed "
                    "meanwhile"
                )
                self.book.finish(seal)
                self.mark(room_id)
                continue
            try:
                resp = await self.client.api.request(
                    Method.PUT,
                    Path.v3.rooms[room_id].state["m.room.encrypted"][seal.outer_key],
                    contents[seal.session_id],
                )
            except (MatrixRequestError, MatrixConnectionError) as e:
                self.log.warning(f"Could not send the seal of {seal.outer_key} in {room_id}: {e}")
                continue  # abandoned in seal_room, which looks at the room again later
            seal = evolve(seal, event_id=resp.get("event_id"))
            await self.store.put_seal(seal)
            self.book.finish(seal)
            sent.append(seal)
            self.log.info(
                f"Sealed {seal.inner_type} {seal.inner_key!r} of {room_id} (value "
                f"{seal.source_event_id}) in session {seal.session_id}, event {seal.event_id}"
            )
        live = {seal.session_id for seal in sent}
        later_plan = [(d, c) for d, c in later_plan if c["session_id"] in live]
        more_keys, more_devices, more_missed = await self.courier.send_room_keys(
            room_id, later_plan, trigger=Trigger.SEAL, reason="preview seal for an invitee"
        )
        # Keys that did not go out (a failed call, no Olm session yet) are retried through the
        # queue, which decides again at send time.
        retry = {
            (d.user_id, d.device_id, c["session_id"])
            for d, c in missed + more_missed
            if c["session_id"] in live
        }
        if retry:
            await self.courier.submit(
                [
                    OutboxItem(
                        room_id=room_id,
                        user_id=user_id,
                        device_id=device_id,
                        session_id=session_id,
                        trigger=Trigger.SEAL,
                    )
                    for user_id, device_id, session_id in sorted(retry)
                ]
            )
        await self.store.add_audit(
            [
                AuditRow(
                    room_id=room_id,
                    user_id=self.client.mxid,
                    device_id=self.client.device_id,
                    session_id=seal.session_id,
                    decision="seal",
                    reason=f"sealed {seal.inner_type} {seal.inner_key!r} (value "
                    f"{seal.source_event_id}) as {seal.event_id}",
                    trigger=Trigger.SEAL,
                    msg_index=0,
                )
                for seal in sent
            ]
            + refused
        )
        self.runs += 1
        return SealReport(
            sent, keys + more_keys, devices + more_devices, len(refused), plan, False
        )
