"""The plugin's web endpoints against a real Synapse: /health and /metrics scraped while the bot
pushes a room's keys to a newcomer."""

from __future__ import annotations

import asyncio
import json

from prometheus_client.parser import text_string_to_metric_families

from harness.client import eventually


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_health_and_metrics_while_a_push_goes_out(world) -> None:
    bot = await world.bot(sealing=True)
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    await world.set_name(admin, bot, room, "Nightingale")
    await world.seal(bot, room)

    scrapes: list[tuple[int, dict, int, str]] = []
    done = asyncio.Event()

    async def scrape() -> None:
        while not done.is_set():
            async with world.http.get(f"{bot.web_url}/health") as resp:
                health_status, health = resp.status, json.loads(await resp.text())
            async with world.http.get(f"{bot.web_url}/metrics") as resp:
                metrics_status, metrics = resp.status, await resp.text()
                assert resp.headers["Content-Type"].startswith("text/plain")
            scrapes.append((health_status, health, metrics_status, metrics))
            await asyncio.sleep(0.05)

    scraper = asyncio.create_task(scrape())
    try:
        newcomer = await world.member("newcomer", admin, room)
        await eventually(
            lambda: _shared(newcomer, bot, world, room),
            timeout=30,
        )
        await asyncio.sleep(0.3)
    finally:
        done.set()
        await scraper

    assert len(scrapes) >= 3
    for status, health, metrics_status, _ in scrapes:
        assert status == 200, health
        assert metrics_status == 200
        assert health["status"] == "ok" and health["problems"] == []
        assert health["e2ee"] is True and health["ready"] is True
        assert health["sync"]["alive"] is True
        assert set(health["queue"]) == {"fast", "bulk"}
    last = samples(scrapes[-1][3])
    pushed = [
        v
        for (name, labels), v in last.items()
        if name == "encstate_keys_total"
        and dict(labels)["decision"] == "share"
        and dict(labels)["trigger"] in ("invite", "join")
    ]
    assert sum(pushed) >= 1
    assert last[("encstate_to_device_calls_total", (("outcome", "sent"),))] >= 1
    assert last[("encstate_rooms", (("empowered", "true"),))] == 1
    assert last[("encstate_seals", ())] >= 1
    assert last[("encstate_e2ee", ())] == 1
    assert ("encstate_queue_depth", (("lane", "fast"),)) in last


async def _shared(newcomer, bot, world, room) -> bool:
    rows = await world.audit(bot, room, user_id=newcomer.user_id)
    return any(r.decision == "share" and r.trigger in ("invite", "join") for r in rows)


async def test_health_says_what_is_wrong_with_503(world) -> None:
    """A bot whose client has no device ID has no encryption: unhealthy, and says why."""
    bot = await world.bot()
    bot.stop()
    bot.device_id = ""
    bot.start()
    await bot.wait_for_log(r"Rescanned \d+ room")

    async def unhealthy() -> dict | None:
        async with world.http.get(f"{bot.web_url}/health") as resp:
            body = json.loads(await resp.text())
            return body if resp.status == 503 else None

    body = await eventually(unhealthy)
    assert body["e2ee"] is False
    assert any("no device ID" in p for p in body["problems"])
