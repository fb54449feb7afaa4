"""One delivery at a time per device (transport.DeviceLeases): whatever the lanes do at once,
a device's Olm messages reach the homeserver in ratchet order, at most TOGETHER_ROUNDS of them
uncommitted (Olm keeps 40 skipped message keys), and a bulk push never holds up an answer."""

from __future__ import annotations

import asyncio

from encstate_bot.audit import Outcome
from encstate_bot.policy import Share
from encstate_bot.seals import SealBook
from encstate_bot.store import OutboxItem
from encstate_bot.transport import DeviceLeases

from .test_courier_lanes import (
    ROOM,
    USER,
    FakeClient,
    Newcomer,
    ReorderingServer,
    courier_for,
    seals,
)


def shares(newcomer: Newcomer, trigger: str, item_id: int, part: list) -> list[Outcome]:
    item = OutboxItem(room_id=ROOM, user_id=USER, trigger=trigger, id=item_id, device_id="NEWDEV")
    return [
        Outcome(item, "NEWDEV", seal.session_id, Share(0, "member"), device=newcomer.device)
        for seal in part
    ]


async def test_an_answer_to_a_device_a_bulk_push_holds_waits_for_it_unpaused() -> None:
    """A bulk (link) push of 60 keys to a device sends them one call after the other. A key
    request from that device arrives meanwhile: its lane clears ``fast_idle``, so the push
    pauses, and the answer may not be encrypted before the push's last message went (it would
    overtake 59 of them: 19 lost). The push holds the device and is waited for, so it goes on
    without pausing; the answer follows, and the device reads every key."""
    server = ReorderingServer(slow_first=False)
    client = FakeClient(server)
    newcomer = Newcomer(client)
    book = SealBook()
    made = seals(64)
    book.load(made)
    courier = courier_for(client, book)
    first_call = asyncio.Event()
    send = server.send_to_device

    async def sending(event_type, body) -> None:
        await send(event_type, body)
        first_call.set()

    server.send_to_device = sending  # type: ignore[method-assign]
    push = asyncio.create_task(
        courier._send_keys(shares(newcomer, "link", 1, made[:60]), {}, set())
    )
    await asyncio.wait_for(first_call.wait(), 10)  # the push is under way
    courier.transport.fast_idle.clear()  # the request lane drains a batch
    answer = courier._send_keys(shares(newcomer, "request", 2, made[60:]), {}, set())
    sent, failed, _ = await asyncio.wait_for(answer, 10)
    assert len(sent) == 4 and not failed
    courier.transport.fast_idle.set()  # the request lane is done
    pushed, failed, _ = await asyncio.wait_for(push, 10)
    assert len(pushed) == 60 and not failed
    assert newcomer.read(server.stream) == (64, 0)
    assert not courier.transport.devices.holder and not courier.transport.devices.queue


async def test_a_bulk_push_not_waited_for_still_pauses_for_the_fast_lane() -> None:
    server = ReorderingServer(slow_first=False)
    client = FakeClient(server)
    newcomer = Newcomer(client)
    book = SealBook()
    made = seals(5)
    book.load(made)
    courier = courier_for(client, book)
    courier.transport.fast_idle.clear()
    push = asyncio.create_task(courier._send_keys(shares(newcomer, "link", 1, made), {}, set()))
    await asyncio.sleep(0.05)
    assert not server.stream and not push.done()
    courier.transport.fast_idle.set()
    pushed, _, _ = await asyncio.wait_for(push, 10)
    assert len(pushed) == 5 and newcomer.read(server.stream) == (5, 0)


class Holder:
    def __init__(self) -> None:
        self.held: set[str] = set()
        self.wanted = asyncio.Event()


async def test_leases_go_in_turn_and_a_cancelled_wait_leaves_nothing_behind() -> None:
    leases = DeviceLeases()
    first, second, third = Holder(), Holder(), Holder()
    await leases.take(first, ["b", "a"])  # type: ignore[arg-type]
    waiting = asyncio.create_task(leases.take(second, ["a", "c"]))  # type: ignore[arg-type]
    cancelled = asyncio.create_task(leases.take(third, ["b"]))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert first.wanted.is_set() and not waiting.done()
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    assert first.wanted.is_set()  # "a" is still waited for
    leases.give(first, ["a"])  # type: ignore[arg-type]
    await asyncio.wait_for(waiting, 1)
    assert second.held == {"a", "c"} and first.held == {"b"}
    assert not first.wanted.is_set()  # no one waits for "b" any more
    lone = asyncio.create_task(leases.take(third, ["b"]))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert first.wanted.is_set()
    lone.cancel()
    await asyncio.gather(lone, return_exceptions=True)
    assert not first.wanted.is_set()  # the one waiting gave up
    leases.give(first, ["b"])  # type: ignore[arg-type]
    leases.give(second, ["a", "c", "x"])  # type: ignore[arg-type]
    assert not leases.holder and not leases.queue
