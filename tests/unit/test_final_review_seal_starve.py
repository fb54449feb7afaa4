"""Final review (seal waves, lanes): a bulk delivery paused for the urgent lanes never resumes
while an urgent lane drains batch after batch.

``Courier._run`` ends a batch with ``_waited_for(-1)`` (``fast_idle.set()``) and starts the next
with ``_waited_for(1)`` (``fast_idle.clear()``) with no await in between. Before da64d78's
follow-ups ``pause_for_fast_lane`` was ``await fast_idle.wait()``: the set woke it, so a bulk
delivery made one call per urgent batch. Now it loops ``while not idle.is_set()``: woken, it
finds the event cleared again and sleeps on. A steady stream of key requests (any member, many
devices; or a homeserver's ghost devices) holds every push and every seal in every room
(PROTOCOL 5 rule 4)."""

from __future__ import annotations

import asyncio

from encstate_bot.seals import SealBook

from .test_courier_lanes import FakeClient, Newcomer, ReorderingServer, courier_for, seals
from .test_device_leases import shares


async def test_final_review_seal_bulk_push_starves_while_request_lane_drains_back_to_back():
    server = ReorderingServer(slow_first=False)
    client = FakeClient(server)
    newcomer = Newcomer(client)
    book = SealBook()
    made = seals(5)
    book.load(made)
    courier = courier_for(client, book)

    async def request_lane() -> None:  # what Courier._run does with a queue that keeps filling
        while True:
            courier._waited_for(1)
            try:
                await asyncio.sleep(0.01)  # drain(REQUEST_LANE): one batch
            finally:
                courier._waited_for(-1)

    lane = asyncio.create_task(request_lane())
    await asyncio.sleep(0.005)
    push = asyncio.create_task(courier._send_keys(shares(newcomer, "link", 1, made), {}, set()))
    try:
        # 100 request batches: the old single wait() let the push make a call after each
        done, _ = await asyncio.wait([push], timeout=1.0)
        assert done, f"bulk push still paused after 100 urgent batches ({len(server.stream)} sent)"
    finally:
        lane.cancel()
        push.cancel()
        await asyncio.gather(lane, push, return_exceptions=True)
