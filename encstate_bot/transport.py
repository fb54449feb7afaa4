"""Transport: Olm-encrypted to-device messages, in bulk, and withheld notices.

Given (device, event type, content) messages it claims one-time keys for the devices lacking an
Olm session, encrypts in process (the ratchets stored before anything is sent) and sends at most
MAX_PER_CALL messages per ``sendToDevice`` call, one message per device per call. It decides
nothing and records nothing: the caller hears about every call that went through.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
import logging
from typing import Any, Awaitable, Callable, Generic, Iterable, TypeVar

from mautrix.errors import MatrixConnectionError, MatrixRequestError
from mautrix.types import DeviceIdentity, EventType

from .bulk_olm import BulkOlm
from .glue import olm_lock
from .phases import Phases
from .tasks import settle

MAX_PER_CALL = 250
ENCRYPT_SLICE = 100  # Olm messages a bulk delivery encrypts before letting the fast lane in
# calls sent at once to one device, below Olm's 40 skipped message keys: one delivery at a time
# sends to a device (Transport.devices), so this bounds all lanes together
TOGETHER_ROUNDS = 32
WITHHELD_TYPES = (EventType.ROOM_KEY_WITHHELD, EventType.ORG_MATRIX_ROOM_KEY_WITHHELD)

T = TypeVar("T")
# (device, event type, content, token): the token comes back when its message went out
Message = tuple[DeviceIdentity, EventType, Any, T]
Encrypted = tuple[Message, dict]


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


class DeviceLeases:
    """One delivery at a time per device (by Curve25519 identity key), from encrypting its
    messages until the last of their calls came back.

    Every delivery encrypts with the same Olm session of a device, so two at once interleave
    its ratchet: a newcomer's join push (fast lane) and its key requests (request lane), or a
    bulk push, would each have their messages in flight, and the homeserver may commit a later
    one more than 40 message keys (libolm, vodozemac) ahead of an earlier one, which is then
    lost. Held by one delivery, a device's messages go out in ratchet order, at most
    TOGETHER_ROUNDS uncommitted at once, whatever the lanes do. A delivery takes its group's
    devices in key order (no two wait for each other) and gives each back once its last
    message went; one waited for stops pausing for the fast lane (``wanted``), so it never
    holds up the delivery that waits."""

    def __init__(self) -> None:
        self.holder: dict[str, _Delivery] = {}
        self.queue: dict[str, deque[tuple[_Delivery, asyncio.Future]]] = {}

    async def take(self, delivery: _Delivery, keys: Iterable[str]) -> None:
        for key in sorted(keys):
            holder = self.holder.get(key)
            if holder is None:
                self.holder[key] = delivery
                delivery.held.add(key)
                continue
            if holder is delivery:
                continue
            turn = asyncio.get_running_loop().create_future()
            self.queue.setdefault(key, deque()).append((delivery, turn))
            holder.wanted.set()
            try:
                await turn  # give() hands the device over
            except asyncio.CancelledError:
                queue = self.queue.get(key)
                if queue is not None and (delivery, turn) in queue:
                    queue.remove((delivery, turn))
                    if not queue:
                        del self.queue[key]
                    if not any(k in self.queue for k in holder.held):
                        holder.wanted.clear()
                raise  # a device handed over is in delivery.held: the delivery gives it back

    def give(self, delivery: _Delivery, keys: Iterable[str]) -> None:
        for key in list(keys):
            if key not in delivery.held:
                continue
            delivery.held.discard(key)
            queue = self.queue.get(key)
            while queue:
                successor, turn = queue.popleft()
                if not turn.done():
                    self.holder[key] = successor
                    successor.held.add(key)
                    turn.set_result(None)
                    if queue:
                        successor.wanted.set()
                    break
            else:
                del self.holder[key]
            if queue is not None and not queue:
                del self.queue[key]
        if not any(key in self.queue for key in delivery.held):
            delivery.wanted.clear()


class Transport:
    def __init__(self, client: Any, bulk: BulkOlm, log: logging.Logger) -> None:
        self.client = client
        self.bulk = bulk
        self.log = log
        # Set while no one waits for an answer: bulk deliveries pause for it between their
        # calls and encryption slices, so an answer or a newcomer's keys go first.
        self.fast_idle = asyncio.Event()
        self.fast_idle.set()
        # which delivery may encrypt for and send to each device right now
        self.devices = DeviceLeases()
        self.sent_calls = 0  # sendToDevice calls that carried Olm messages, for tests and status
        self.failed_calls = 0  # and those that failed (the metrics)

    async def send_chunk(self, event_type: EventType, chunk: list[tuple[str, str, Any]]) -> None:
        body: dict[str, dict[str, Any]] = defaultdict(dict)
        for user_id, device_id, content in chunk:
            body[user_id][device_id] = content
        await self.client.send_to_device(event_type, body)

    async def send_withheld(self, messages: list[tuple[str, str, Any]]) -> None:
        """Withheld notices, under both event types; best effort: a failed call is logged."""
        for chunk in rounds(messages):
            for event_type in WITHHELD_TYPES:
                try:
                    await self.send_chunk(event_type, chunk)
                except (MatrixRequestError, MatrixConnectionError) as e:
                    self.log.warning(f"Sending {len(chunk)} withheld notice(s) failed: {e}")

    async def olm_send(
        self,
        plan: list[Message[T]],
        on_sent: Callable[[list[T]], Awaitable[None]] | None = None,
        together: bool = False,
        phases: Phases | None = None,
    ) -> tuple[list[T], list[T], list[T], int]:
        """Bulk Olm delivery of (device, event type, content, token), in groups of at most
        MAX_PER_CALL devices: one one-time-key claim for the group's devices lacking an Olm
        session, encryption in process, then one sendToDevice call per message a device gets.
        While a group's calls are in flight the next group is claimed and encrypted. ``on_sent``
        gets the tokens of each call that went through. A group's calls go one after the other,
        so a crash repeats at most the one in flight; with ``together`` (answers, a newcomer's
        keys: a repeat is harmless and latency matters) up to TOGETHER_ROUNDS go at once: each
        carries one message per device, and Olm accepts a session's messages out of order
        within its 40 skipped message keys. Returns (sent, failed, no Olm session, calls).
        Where the time went is booked to ``phases``: sessions (reading them, waiting for
        claims and new ones), paused (for the urgent lanes), leases (for devices another
        delivery holds), lock (Olm's), encrypt, send (the sendToDevice calls); the groups
        overlap, so for a bulk delivery the phases add up to more than its wall time."""
        delivery = _Delivery(self, plan, on_sent, together, phases or Phases())
        await delivery.run()
        return delivery.sent, delivery.failed, delivery.no_olm, delivery.calls


class _Delivery(Generic[T]):
    """One ``olm_send``: its groups, their claims and Olm sessions, and what came of it."""

    def __init__(
        self,
        transport: Transport,
        plan: list[Message[T]],
        on_sent: Callable[[list[T]], Awaitable[None]] | None,
        together: bool,
        phases: Phases,
    ) -> None:
        self.transport = transport
        self.phases = phases
        self.bulk = transport.bulk
        self.on_sent = on_sent
        self.together = together
        self.per_device: dict[str, list[Message[T]]] = {}
        for entry in plan:
            self.per_device.setdefault(entry[0].identity_key, []).append(entry)
        keys = list(self.per_device)
        self.groups = [keys[i : i + MAX_PER_CALL] for i in range(0, len(keys), MAX_PER_CALL)]
        self.existing: dict[str, Any] = {}
        self.lacking: list[list[DeviceIdentity]] = []
        self.claims: list[asyncio.Task | None] = [None] * len(self.groups)
        self.made: list[asyncio.Task | None] = [None] * len(self.groups)
        self.sent: list[T] = []
        self.failed: list[T] = []
        self.no_olm: list[T] = []
        self.calls = 0
        # each content's JSON, encoded once for the whole delivery (the plan keeps every
        # content alive until the delivery ends, so the ids it is keyed by stay unique)
        self.encoded: dict[int, str] = {}
        self.held: set[str] = set()  # the devices this delivery holds (DeviceLeases)
        self.wanted = asyncio.Event()  # another delivery waits for one of them

    async def pause_for_fast_lane(self) -> None:
        """A bulk delivery waits while the fast lane works, unless another delivery waits for
        one of its devices (that one would wait for the fast lane too: a request lane's answer
        to a device a bulk push holds, or a bulk delivery the fast lane waits for). One wait:
        a moment of idleness between two urgent batches lets one call through, so back-to-back
        urgent batches slow a bulk delivery but never hold it for good."""
        idle = self.transport.fast_idle
        if self.together or idle.is_set() or self.wanted.is_set():
            return
        waits = [asyncio.ensure_future(idle.wait()), asyncio.ensure_future(self.wanted.wait())]
        try:
            async with self.phases.timed("paused"):
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            settle(waits)

    async def run(self) -> None:
        async with self.phases.timed("sessions"):
            self.existing = await self.bulk.store.latest_sessions(self.per_device)
        self.lacking = [
            [self.per_device[k][0][0] for k in g if k not in self.existing] for g in self.groups
        ]
        in_flight: asyncio.Task | None = None
        try:
            self.claim(0)
            for index, group in enumerate(self.groups):
                await self.pause_for_fast_lane()
                self.claim(index + 1)  # the homeserver works on the next claims meanwhile
                self.claim(index + 2)
                by_round = await self.encrypt_group(index, group)
                if in_flight is not None:
                    self.calls += await in_flight
                in_flight = asyncio.create_task(self.deliver(by_round))
            if in_flight is not None:
                self.calls += await in_flight
                in_flight = None
        finally:
            settle([in_flight, *self.claims, *self.made])
            self.transport.devices.give(self, self.held)

    # One-time keys and Olm sessions, a group ahead ---------------------------------------------

    def claim(self, index: int) -> None:
        if index < len(self.groups) and self.lacking[index] and self.claims[index] is None:
            self.claims[index] = asyncio.create_task(self.chained_claim(index))
            self.made[index] = asyncio.create_task(self.new_sessions(index))

    async def chained_claim(self, index: int) -> dict[str, Any]:
        # One claim at a time: the homeserver answers a lone claim of 250 devices in a fraction
        # of the time it takes for three at once, and the first one gates everything.
        earlier = [task for task in self.claims[:index] if task is not None]
        if earlier:
            await asyncio.wait(earlier)
        try:
            return await self.bulk.claim(self.lacking[index])
        except (MatrixRequestError, MatrixConnectionError) as e:
            self.transport.log.warning(f"One-time key claim failed: {e}")
            return {}

    async def new_sessions(self, index: int) -> dict[str, Any]:
        # Olm sessions are made in a worker thread, one group after the other, while the event
        # loop encrypts the previous group and sends the one before.
        claimed = await self.claims[index]  # type: ignore[misc]
        earlier = [task for task in self.made[:index] if task is not None]
        if earlier:
            await asyncio.wait(earlier)
        return await self.bulk.sessions_from_claim(self.lacking[index], claimed)

    # Encryption ---------------------------------------------------------------------------------

    async def encrypt_group(self, index: int, group: list[str]) -> list[list[Encrypted]]:
        """The group's messages encrypted, in rounds: round n holds each device's n-th message."""
        sessions = {k: self.existing[k] for k in group if k in self.existing}
        task = self.made[index]
        if task is not None:
            async with self.phases.timed("sessions"):
                sessions.update(await task)
        entries: list[Message[T]] = []
        for key in group:
            if key in sessions:
                entries += self.per_device[key]
            else:
                self.no_olm += [entry[3] for entry in self.per_device[key]]
        # No other delivery encrypts for these devices until their messages went (Olm's 40
        # skipped message keys across all lanes, DeviceLeases)
        async with self.phases.timed("leases"):
            await self.transport.devices.take(self, [key for key in group if key in sessions])
        # A bulk delivery encrypts in slices and lets the fast lane take the Olm lock between
        # them (both lanes use the same cached session objects, each slice stores the ratchets
        # it moved, so nothing forks).
        step = len(entries) if self.together else ENCRYPT_SLICE
        contents: list[dict] = []
        lock = olm_lock(self.transport.client.crypto)
        for start in range(0, len(entries), max(step, 1)):
            await self.pause_for_fast_lane()
            async with self.phases.timed("lock"):
                await lock.acquire()
            try:
                async with self.phases.timed("encrypt"):
                    contents += await self.bulk.encrypt(
                        [
                            (device, event_type, content)
                            for device, event_type, content, _ in entries[start : start + step]
                        ],
                        sessions,
                        self.encoded,
                    )
            finally:
                lock.release()
        by_round: list[list[Encrypted]] = []
        depth: dict[str, int] = {}
        for entry, content in zip(entries, contents, strict=True):
            level = depth.get(entry[0].identity_key, 0)
            depth[entry[0].identity_key] = level + 1
            if level == len(by_round):
                by_round.append([])
            by_round[level].append((entry, content))
        return by_round

    # Sending ------------------------------------------------------------------------------------

    async def deliver(self, by_round: list[list[Encrypted]]) -> int:
        # each device goes back to the other deliveries once the call with its last message
        # came back (DeviceLeases)
        last: dict[str, int] = {}
        for level, messages in enumerate(by_round):
            for entry, _ in messages:
                last[entry[0].identity_key] = level
        finished: list[list[str]] = [[] for _ in by_round]
        for key, level in last.items():
            finished[level].append(key)
        # At most TOGETHER_ROUNDS messages per device in flight at once: a receiver keeps only
        # 40 skipped Olm message keys (libolm, vodozemac), so the homeserver must never store
        # one of a device's messages behind 40 later ones.
        step = TOGETHER_ROUNDS if self.together else 1
        done = 0
        for start in range(0, len(by_round), step):
            window = by_round[start : start + step]
            if self.together:
                done += sum(await asyncio.gather(*(self.call(messages) for messages in window)))
            else:
                done += await self.call(window[0])
            self.transport.devices.give(
                self, [key for keys in finished[start : start + step] for key in keys]
            )
        return done

    async def call(self, messages: list[Encrypted]) -> int:
        await self.pause_for_fast_lane()
        tokens = [entry[3] for entry, _ in messages]
        chunk = [(e[0].user_id, e[0].device_id, content) for e, content in messages]
        try:
            async with self.phases.timed("send"):
                await self.transport.send_chunk(EventType.TO_DEVICE_ENCRYPTED, chunk)
        except (MatrixRequestError, MatrixConnectionError) as e:
            self.transport.log.warning(f"sendToDevice of {len(chunk)} message(s) failed: {e}")
            self.transport.failed_calls += 1
            self.failed.extend(tokens)
            return 0
        self.transport.sent_calls += 1
        self.sent.extend(tokens)
        if self.on_sent:
            await self.on_sent(tokens)
        return 1
