"""Issue 15: a newcomer's key request must not wait behind a join storm.

A join storm queues an item per newcomer and room (5,000 users joining 20 restricted rooms:
100k JOIN items). A request queued after it used to share the fast lane with the joins, read
oldest first: it was answered after every join queued before it, and a request arriving
while a newcomers' batch (2,000 users, thousands of devices) was being delivered waited for
that whole batch. Answers now have a lane of their own, drained side by side with the
newcomers' lane.

The courier's lanes run for real on a real SQLite store; its delivery (``deliver``) is a
recorder, so what the tests look at is the batches the courier forms (their order and shape,
no timings)."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

from encstate_bot.audit import Audit
from encstate_bot.courier import BATCH_ITEMS, Courier
from encstate_bot.seals import SealBook
from encstate_bot.store import OutboxItem, Store
from encstate_bot.triggers import Trigger

BOT = "@encstate:example.org"
ROOMS = [f"!restricted{n}:example.org" for n in range(20)]
ELSEWHERE = "!another:example.org"
LOG = logging.getLogger("test.join_storm_request")


def storm(per_room: int = 1000) -> list[OutboxItem]:
    """``per_room`` newcomers joining each of 20 rooms, as syncs bring them: 100 joins of a
    room at a time (20,000 JOIN items by default)."""
    items = []
    for start in range(0, per_room, 100):
        for room in ROOMS:
            items += [
                OutboxItem(room_id=room, user_id=f"@joiner{n}:example.org", trigger=Trigger.JOIN)
                for n in range(start, min(start + 100, per_room))
            ]
    return items


def key_request(request_id: str = "req-1") -> OutboxItem:
    return OutboxItem(
        room_id=ELSEWHERE,
        user_id="@newcomer:example.org",
        trigger=Trigger.REQUEST,
        device_id="NEWDEV",
        session_id="state-session",
        request_id=request_id,
    )


class Recorder:
    """Courier.deliver: records each batch a lane formed and marks its items done. A batch
    without a request waits for ``hold`` (a big join batch in flight) while that is clear."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.batches: list[list[OutboxItem]] = []
        self.answered = asyncio.Event()
        self.joins_in_flight = asyncio.Event()
        self.hold = asyncio.Event()
        self.hold.set()

    async def deliver(self, items: list[OutboxItem], dry_run: bool = False) -> list:
        self.batches.append(list(items))
        if any(i.trigger == Trigger.REQUEST for i in items):
            self.answered.set()
        else:
            self.joins_in_flight.set()
            await self.hold.wait()
        await self.store.finish([i.id for i in items if i.id is not None], [])
        return []

    def joins_before_the_answer(self) -> tuple[int, list[OutboxItem]]:
        """How many join items the courier delivered in batches before the one carrying the
        request, and that batch."""
        before = 0
        for batch in self.batches:
            if any(i.trigger == Trigger.REQUEST for i in batch):
                return before, batch
            before += len(batch)
        raise AssertionError("the request was never delivered")


def courier_for(store: Store) -> tuple[Courier, Recorder, SimpleNamespace]:
    client = SimpleNamespace(mxid=BOT, device_id="BOTDEV", crypto=None)
    transport = SimpleNamespace(fast_idle=asyncio.Event(), sent_calls=0)
    transport.fast_idle.set()
    audit = Audit(client, {"audit_room": None}, LOG)
    courier = Courier(
        client, store, SimpleNamespace(), SealBook(), SimpleNamespace(), transport, audit, LOG
    )
    recorder = Recorder(store)
    courier.deliver = recorder.deliver  # type: ignore[method-assign]
    return courier, recorder, transport


# The courier ----------------------------------------------------------------------------------


async def test_a_request_queued_after_a_join_storm_is_answered_first(
    sqlite_store: Store,
) -> None:
    store = sqlite_store
    """20,000 join items in 20 rooms are queued, then one newcomer's key request in another
    room. The answer goes out in a batch of its own, before the storm's batches (at most the
    one the newcomers' lane formed at the same time). It used to share the fast lane with the
    joins, ordered by id: it came in the 11th batch, after all 20,000."""
    await store.enqueue(storm())
    await store.enqueue([key_request()])
    courier, recorder, _ = courier_for(store)
    courier.start()
    try:
        await asyncio.wait_for(recorder.answered.wait(), 120)
    finally:
        await courier.stop()
    joins, batch = recorder.joins_before_the_answer()
    assert joins <= BATCH_ITEMS, (
        f"the request was answered after {joins} join items "
        f"(in batch {len(recorder.batches)} of the courier)"
    )
    assert [i.trigger for i in batch] == [Trigger.REQUEST]


async def test_a_request_does_not_wait_for_the_join_batch_in_flight(
    sqlite_store: Store,
) -> None:
    store = sqlite_store
    """A request arrives while the courier delivers a storm's batch of 2,000 newcomers
    (thousands of devices: seconds of claims, encryption and sendToDevice calls). It is
    answered while that batch is still in flight, and bulk pushes keep pausing until the
    newcomers' batch is done too."""
    await store.enqueue(storm())
    courier, recorder, transport = courier_for(store)
    recorder.hold.clear()
    courier.start()
    try:
        await asyncio.wait_for(recorder.joins_in_flight.wait(), 60)
        assert [len(b) for b in recorder.batches] == [BATCH_ITEMS]
        await courier.submit([key_request()])
        try:
            await asyncio.wait_for(recorder.answered.wait(), 10)
        except asyncio.TimeoutError:
            pytest.fail("the request waited for the 2,000 newcomers' batch in flight")
        assert [i.trigger for i in recorder.batches[-1]] == [Trigger.REQUEST]
        for _ in range(20):  # the request lane goes idle; the join batch is still in flight
            await asyncio.sleep(0.01)
            assert not transport.fast_idle.is_set(), "bulk pushes resumed during the join batch"
        assert len(recorder.batches) == 2
    finally:
        recorder.hold.set()
        await courier.stop()
