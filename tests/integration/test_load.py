"""Floods: the per-device and per-user limits hold, memory stays bounded, and a newcomer in
another room is still served promptly."""

from __future__ import annotations

import asyncio
import time
import uuid

from aiohttp import ClientSession
import pytest

from bench.report import proc_rss_mb
from harness.client import MEGOLM, eventually
from harness.proxy import FaultProxy  # noqa: F401  (documents the other fault tool)

LIMITS = {
    "per_device": {"burst": 200, "per_second": 20},
    "per_user": {"burst": 500, "per_second": 50},
}

pytestmark = pytest.mark.db_agnostic


async def flood(http: ClientSession, url: str, token: str, bot, room: str, device: str, n: int):
    """``n`` key requests from one device, each for a different (unknown) session, so only the
    rate limits can stop them."""
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        content = {
            "action": "request",
            "requesting_device_id": device,
            "request_id": f"flood-{i}",
            "body": {"algorithm": MEGOLM, "room_id": room, "session_id": f"s{i}-{uuid.uuid4()}"},
        }
        async with sem:
            async with http.put(
                f"{url}/_matrix/client/v3/sendToDevice/m.room_key_request/{uuid.uuid4()}",
                json={"messages": {bot.user_id: {bot.device_id: content}}},
                headers={"Authorization": f"Bearer {token}"},
            ) as resp:
                assert resp.status == 200

    await asyncio.gather(*(one(i) for i in range(n)))


async def all_seen(bot, count: int) -> None:
    """Until the bot has taken in ``count`` flood requests (admitted or dropped): the
    homeserver hands them over at most 100 per sync."""
    await eventually(lambda: bot.log_text().count("ey request flood-") >= count, timeout=120)


def admitted(rows, user_id: str, device_id: str | None = None) -> int:
    """Requests that got past the gate (decided), not the counted drops."""
    return sum(
        1
        for r in rows
        if r.trigger == "request"
        and r.user_id == user_id
        and (device_id is None or r.device_id == device_id)
        and "rate limited" not in r.reason
        and "duplicate" not in r.reason
    )


async def test_five_thousand_requests_from_one_device(world) -> None:
    bot = await world.bot(config={"push_on_join": False, "rate_limits": LIMITS})
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    other = await world.room_with_bot(admin, bot)
    topic = await admin.send_state(other, "m.room.topic", "", {"topic": "still served"})
    await world.wait_valid(bot, topic.event_id)
    flooder = await world.member("flooder", admin, room)
    newcomer = await world.member("newcomer", admin, other)
    rss_before = proc_rss_mb(bot.proc.pid)

    started = time.monotonic()
    flooding = asyncio.create_task(
        flood(
            world.http,
            world.synapse.url,
            flooder.client.api.token,
            bot,
            room,
            flooder.device_id,
            5000,
        )
    )
    await asyncio.sleep(2)  # well into the flood
    asked = time.monotonic()
    await newcomer.request_key(other, topic.session_id, bot.user_id, [bot.device_id])
    await eventually(lambda: newcomer.has_session(other, topic.session_id), timeout=30)
    served_in = time.monotonic() - asked
    await flooding
    await all_seen(bot, 5000)
    elapsed = time.monotonic() - started
    await asyncio.sleep(1)
    rows = await world.audit(bot, room, limit=100_000)
    decided = admitted(rows, flooder.user_id, flooder.device_id)
    allowed = 200 + 20 * elapsed
    growth = proc_rss_mb(bot.proc.pid) - rss_before
    print(
        f"5000 requests in {elapsed:.1f} s: {decided} decided (limit {allowed:.0f}), "
        f"{len(rows) - decided} audit rows for drops, newcomer served in {served_in:.2f} s, "
        f"bot RSS +{growth:.1f} MB"
    )
    assert decided <= allowed
    assert len(rows) - decided <= 5  # drops are counted, not one row each
    assert served_in < 5
    assert growth < 60


async def test_fifty_devices_of_one_user_share_the_user_limit(world) -> None:
    bot = await world.bot(config={"push_on_join": False, "rate_limits": LIMITS})
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    swarm = await world.member("swarm", admin, room)
    loop = asyncio.get_running_loop()
    logins = await asyncio.gather(
        *(loop.run_in_executor(None, world.synapse.login, swarm.user_id) for _ in range(50))
    )
    started = time.monotonic()
    await asyncio.gather(
        *(
            flood(world.http, world.synapse.url, token, bot, room, device, 20)
            for token, device in logins
        )
    )
    await all_seen(bot, 1000)
    elapsed = time.monotonic() - started
    await asyncio.sleep(1)
    rows = await world.audit(bot, room, limit=100_000)
    decided = admitted(rows, swarm.user_id)
    allowed = 500 + 50 * elapsed
    print(f"1000 requests, 50 devices, {elapsed:.1f} s: {decided} decided, {allowed:.0f} allowed")
    assert decided <= allowed < 1000
