"""Transport: Olm-encrypted to-device messages, in bulk, and withheld notices.

Given (device, event type, content) messages it claims one-time keys for the devices lacking an
Olm session, encrypts in process (the ratchets stored before anything is sent) and sends at most
MAX_PER_CALL messages per ``sendToDevice`` call, one message per device per call. It decides
nothing and records nothing: the caller hears about every call that went through.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
import logging
from typing import Any, Awaitable, Callable, Generic, TypeVar

from mautrix.errors import MatrixConnectionError, MatrixRequestError
from mautrix.types import DeviceIdentity, EventType

from .bulk_olm import BulkOlm
from .glue import olm_lock
from .tasks import settle

MAX_PER_CALL = 250
ENCRYPT_SLICE = 100  # Olm messages a bulk delivery encrypts before letting the fast lane in
TOGETHER_ROUNDS = 32  # calls sent at once to one device, below Olm's 40 skipped message keys
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


class Transport:
    def __init__(self, client: Any, bulk: BulkOlm, log: logging.Logger) -> None:
        self.client = client
        self.bulk = bulk
        self.log = log
        # Set while no one waits for an answer: bulk deliveries pause for it between their
        # calls and encryption slices, so an answer or a newcomer's keys go first.
        self.fast_idle = asyncio.Event()
        self.fast_idle.set()
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
    ) -> tuple[list[T], list[T], list[T], int]:
        """Bulk Olm delivery of (device, event type, content, token), in groups of at most
        MAX_PER_CALL devices: one one-time-key claim for the group's devices lacking an Olm
        session, encryption in process, then one sendToDevice call per message a device gets.
        While a group's calls are in flight the next group is claimed and encrypted. ``on_sent``
        gets the tokens of each call that went through. A group's calls go one after the other,
        so a crash repeats at most the one in flight; with ``together`` (answers, a newcomer's
        keys: a repeat is harmless and latency matters) up to TOGETHER_ROUNDS go at once: each
        carries one message per device, and Olm accepts a session's messages out of order
        within its 40 skipped message keys. Returns (sent, failed, no Olm session, calls)."""
        delivery = _Delivery(self, plan, on_sent, together)
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
    ) -> None:
        self.transport = transport
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

    async def pause_for_fast_lane(self) -> None:
        if not self.together:
            await self.transport.fast_idle.wait()

    async def run(self) -> None:
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
            sessions.update(await task)
        entries: list[Message[T]] = []
        for key in group:
            if key in sessions:
                entries += self.per_device[key]
            else:
                self.no_olm += [entry[3] for entry in self.per_device[key]]
        # A bulk delivery encrypts in slices and lets the fast lane take the Olm lock between
        # them (both lanes use the same cached session objects, each slice stores the ratchets
        # it moved, so nothing forks).
        step = len(entries) if self.together else ENCRYPT_SLICE
        contents: list[dict] = []
        lock = olm_lock(self.transport.client.crypto)
        for start in range(0, len(entries), max(step, 1)):
            await self.pause_for_fast_lane()
            async with lock:
                contents += await self.bulk.encrypt(
                    [
                        (device, event_type, content)
                        for device, event_type, content, _ in entries[start : start + step]
                    ],
                    sessions,
                )
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
        if self.together:
            # At most TOGETHER_ROUNDS messages per device in flight at once: a receiver keeps
            # only 40 skipped Olm message keys (libolm, vodozemac), so the homeserver must
            # never store one of a device's messages behind 40 later ones.
            done = 0
            for start in range(0, len(by_round), TOGETHER_ROUNDS):
                window = by_round[start : start + TOGETHER_ROUNDS]
                done += sum(await asyncio.gather(*(self.call(messages) for messages in window)))
            return done
        return sum([await self.call(messages) for messages in by_round])

    async def call(self, messages: list[Encrypted]) -> int:
        await self.pause_for_fast_lane()
        tokens = [entry[3] for entry, _ in messages]
        chunk = [(e[0].user_id, e[0].device_id, content) for e, content in messages]
        try:
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
