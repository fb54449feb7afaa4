"""Review of issue 15 (the request lane): each test shows one defect and fails on the code as
reviewed."""

from __future__ import annotations

import asyncio

from encstate_bot.audit import Outcome
from encstate_bot.policy import Share
from encstate_bot.seals import SealBook
from encstate_bot.store import OutboxItem
from encstate_bot.transport import TOGETHER_ROUNDS
from encstate_bot.triggers import FAST_LANE, Trigger

from .test_courier_lanes import (
    ROOM,
    USER,
    FakeClient,
    Newcomer,
    ReorderingServer,
    courier_for,
    seals,
)


async def test_request_lane_and_fast_lane_together_exceed_olms_40_skipped_keys() -> None:
    """The request lane now runs beside the fast lane, and both send "together" (up to
    TOGETHER_ROUNDS = 32 calls at once to one device). TOGETHER_ROUNDS is below Olm's 40
    skipped message keys only while one delivery at a time sends to a device; a newcomer whose
    join push (fast lane) and key requests (request lane) are delivered at the same time gets
    up to 64 messages of one Olm session in flight, and the homeserver may commit them so that
    the first is more than 40 behind: those keys are lost for good (nothing retries a push or
    an answer that "went through"). Before, requests and joins shared one lane and one
    delivery at a time."""
    server = ReorderingServer(slow_first=True)
    client = FakeClient(server)
    newcomer = Newcomer(client)
    book = SealBook()
    made = seals(2 * TOGETHER_ROUNDS)
    book.load(made)
    courier = courier_for(client, book)

    def shares(trigger: str, item_id: int, part: list) -> list[Outcome]:
        item = OutboxItem(
            room_id=ROOM, user_id=USER, trigger=trigger, id=item_id, device_id="NEWDEV"
        )
        return [
            Outcome(
                item=item,
                device_id="NEWDEV",
                session_id=seal.session_id,
                decision=Share(0, "member"),
                device=newcomer.device,
            )
            for seal in part
        ]

    join = shares("join", 1, made[:TOGETHER_ROUNDS])  # the fast lane's batch
    request = shares("request", 2, made[TOGETHER_ROUNDS:])  # the request lane's, meanwhile
    results = await asyncio.gather(
        courier._send_keys(join, {}, set()), courier._send_keys(request, {}, set())
    )
    assert all(len(sent) == TOGETHER_ROUNDS and not failed for sent, failed, _ in results)
    read, lost = newcomer.read(server.stream)
    assert lost == 0, (
        f"the newcomer read {read} of {2 * TOGETHER_ROUNDS} keys and lost {lost}: the two lanes "
        f"had {server.max_in_flight} calls to one device in flight at once (Olm keeps 40 "
        "skipped message keys)"
    )


# Store.due ---------------------------------------------------------------------------------


def joins(room: str, tag: str, count: int) -> list[OutboxItem]:
    return [
        OutboxItem(room_id=room, user_id=f"@{tag}{n}:x", trigger=Trigger.JOIN)
        for n in range(count)
    ]


async def test_a_room_with_one_item_in_backoff_jumps_ahead_of_older_rooms(store) -> None:
    """due() fills a batch whose busy room hit its share from the other rooms in the order of
    each room's oldest item, read without ``not_before``: an item in backoff (retried for up
    to a day, every 5 minutes) makes its room "the one waiting longest" for as long as it
    sits there. Room X has such an item and a stream of new joins; room Y's joins, all older
    than X's new ones, get nothing while busy room A has a backlog: X's newer items fill every
    batch. The window function this replaced (and the oldest-first rule) served Y in the
    first batch."""
    a, x, y = "!a:x", "!x:x", "!y:x"
    await store.enqueue(joins(x, "stuck", 1))
    stuck = [i.id for i in await store.due(10, FAST_LANE)]
    await store.retry_later(stuck, 3_600_000)  # e.g. its room could not be read
    await store.enqueue(joins(a, "a", 100))  # a busy room's backlog
    await store.enqueue(joins(y, "y", 5))  # Y's newcomers
    batches_before_y = 0
    for n in range(5):
        await store.enqueue(joins(x, f"x{n}-", 5))  # X's newcomers keep coming
        batch = await store.due(10, FAST_LANE, per_room=5)
        if any(i.room_id == y for i in batch):
            break
        batches_before_y += 1
        assert all(i.room_id in (a, x) for i in batch)
        await store.finish([i.id for i in batch if i.id is not None], [])
    assert batches_before_y == 0, (
        f"room Y's joins waited {batches_before_y} batches while room X's newer joins were "
        "served: X's one item in backoff ranks X as the oldest room"
    )
