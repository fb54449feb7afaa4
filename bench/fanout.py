"""Cold and warm fan-out: 3 state sessions to N devices, through encstate's courier and through
mautrix-python's stock path (`OlmMachine.send_encrypted_to_device` per device and session)."""

from __future__ import annotations

import asyncio
import random
import time

from aiohttp import ClientSession
from mautrix.types import EventType, UserID

from encstate_bot import glue
from encstate_bot.room_keys import forwarded_content
from encstate_bot.store import OutboxItem
from harness.synapse import Synapse

from .inproc import InProcessBot
from .megolm import StateSession, check_forwarded, received_keys
from .population import Device, Population
from .report import Report, Timer, peak_rss_mb, reset_peak_rss, rss_mb

SAMPLE = 5


class Room:
    """A state-encrypted room with name, topic and avatar, each in its own session."""

    def __init__(self, room_id: str, sessions: list[StateSession]) -> None:
        self.room_id = room_id
        self.sessions = sessions


async def make_room(pop: Population, admin: Device, bot_user: str, public: bool) -> Room:
    initial_state = [
        {
            "type": "m.room.encryption",
            "state_key": "",
            "content": {
                "algorithm": "m.megolm.v1.aes-sha2",
                "io.element.msc4362.encrypt_state_events": True,
            },
        }
    ]
    if public:
        initial_state.append(
            {"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "public"}}
        )
    resp = await pop._call(
        "POST",
        "/_matrix/client/v3/createRoom",
        admin.token,
        {
            "preset": "private_chat",
            "initial_state": initial_state,
            "invite": [bot_user],
            "power_level_content_override": {"users": {bot_user: 50}, "users_default": 0},
        },
    )
    room_id = resp["room_id"]
    sessions = []
    for event_type, content in (
        ("m.room.name", {"name": "Benchmark"}),
        ("m.room.topic", {"topic": "fan-out"}),
        ("m.room.avatar", {"url": "mxc://bench/avatar"}),
    ):
        session = StateSession(admin, room_id)
        await pop._call(
            "PUT",
            f"/_matrix/client/v3/rooms/{room_id}/state/m.room.encrypted/{event_type}:",
            admin.token,
            session.encrypt(event_type, "", content),
        )
        sessions.append(session)
    return Room(room_id, sessions)


async def bot_for(synapse, http, workdir, name, bot_user, room: Room) -> InProcessBot:
    """A fresh bot device (so every Olm session is new: a cold start) holding the room's
    state sessions."""
    bot = InProcessBot(synapse, http, workdir, name)
    plugin = await bot.start(user_id=bot_user)
    for session in room.sessions:
        await session.give_to(plugin.client.crypto)
        await plugin.tracker.session_received(room.room_id, session.id)
    facts = [plugin.tracker.ledgers[room.room_id].facts(s.id) for s in room.sessions]
    assert all(f.safe_index == 0 for f in facts), facts
    return bot


async def courier_push(bot: InProcessBot, room: Room, users: list[list[Device]], trigger: str):
    plugin = bot.plugin
    assert plugin is not None
    items = [
        OutboxItem(room_id=room.room_id, user_id=u[0].user_id, trigger=trigger) for u in users
    ]
    calls0 = plugin.courier.sent_calls
    since = int(time.time() * 1000)
    reset_peak_rss()
    rss0 = rss_mb()
    with Timer() as timer:
        await plugin.courier.submit(items)
        while await plugin.store.pending_count(room.room_id):  # noqa: ASYNC110 (the queue is the observable)
            await asyncio.sleep(0.01)
    rows = await plugin.store.audit(room.room_id, limit=100_000, since_ms=since)
    shares = [r for r in rows if r.decision == "share"]
    served = {}
    for r in shares:
        served.setdefault((r.user_id, r.device_id), set()).add(r.session_id)
    complete = sum(1 for s in served.values() if len(s) == len(room.sessions))
    return {
        "wall": timer.wall,
        "cpu": timer.cpu,
        "calls": plugin.courier.sent_calls - calls0,
        "forwards": len(shares),
        "devices": complete,
        "rss_growth": peak_rss_mb() - rss0,
        "other": [r for r in rows if r.decision != "share"][:3],
    }


async def stock_push(bot: InProcessBot, room: Room, users: list[list[Device]]):
    """mautrix-python's own path: one Olm send per device and session."""
    crypto = bot.plugin.client.crypto
    contents = [
        forwarded_content(s.inbound(), room.room_id, s.id, 0, False) for s in room.sessions
    ]
    with Timer() as timer:
        devices = await glue.fetch_keys(crypto, [UserID(u[0].user_id) for u in users])
        forwards = 0
        for user_devices in devices.values():
            for device in user_devices.values():
                for content in contents:
                    await crypto.send_encrypted_to_device(
                        device, EventType.FORWARDED_ROOM_KEY, content
                    )
                    forwards += 1
    return {
        "wall": timer.wall,
        "cpu": timer.cpu,
        "forwards": forwards,
        "devices": forwards // len(contents),
    }


async def verify(pop: Population, bot: InProcessBot, room: Room, users, rng) -> int:
    """Sampled recipients decrypt what arrived from this bot device."""
    crypto = bot.plugin.client.crypto
    checked = 0
    for devices in rng.sample(users, min(SAMPLE, len(users))):
        device = rng.choice(devices)
        events = await pop.to_device(device)
        keys = received_keys(device, events, crypto.account.identity_key)
        if not keys:
            senders = [e.get("content", {}).get("sender_key") for e in events]
            raise AssertionError(
                f"{device.user_id}/{device.device_id}: {len(events)} to-device event(s), "
                f"none from {crypto.account.identity_key}: {senders}"
            )
        checked += check_forwarded(keys, room.sessions)
    return checked


async def run(synapse: Synapse, http: ClientSession, workdir: str, report: Report, quick: bool):
    sizes = (20, 100, 200) if quick else (200, 1000, 2000)
    rng = random.Random(4)
    pop = Population(synapse, http)
    (admin,) = await pop.user_with_devices("bench-admin", 1, 10)
    bot_user = await asyncio.get_running_loop().run_in_executor(
        None, synapse.register, "bench-bot"
    )
    room = await make_room(pop, admin, bot_user, public=True)
    bot_token, _ = await asyncio.get_running_loop().run_in_executor(None, synapse.login, bot_user)
    await pop._call("POST", f"/_matrix/client/v3/join/{room.room_id}", bot_token, {})
    started = time.monotonic()
    users = await pop.users("r", max(sizes) // 2, devices=2, one_time_keys=12)
    await pop.join(room.room_id, users)
    report.note(
        f"fan-out population: {len(users)} users x 2 devices joined in "
        f"{time.monotonic() - started:.0f} s"
    )

    bots: list[InProcessBot] = []
    try:
        warm_courier = warm_stock = None
        for n in sizes:
            subset = users[: n // 2]
            bot = await bot_for(synapse, http, workdir, f"cold{n}", bot_user, room)
            bots.append(bot)
            ours = await courier_push(bot, room, subset, trigger="join")
            checked = await verify(pop, bot, room, subset, rng)
            assert ours["devices"] == n, ours
            report.note(
                f"cold n={n}: courier {ours['wall']:.2f} s, {ours['calls']} sendToDevice calls, "
                f"{ours['cpu']:.2f} s CPU, sampled {checked} forwards decrypted"
            )
            if n == sizes[-1]:
                report.row(
                    f"RSS growth, {n}-device push",
                    f"{ours['rss_growth']:.1f} MB",
                    f"{rss_mb():.0f} MB resident before",
                    "<= 100 MB",
                )
                report.result(f"fanout_n{n}_rss_growth_mb", ours["rss_growth"])
                continue
            stock_bot = await bot_for(synapse, http, workdir, f"stock{n}", bot_user, room)
            bots.append(stock_bot)
            stock = await stock_push(stock_bot, room, subset)
            report.note(f"stock n={n}: {stock['forwards']} forwards in {stock['wall']:.2f} s")
            await verify(pop, stock_bot, room, subset, rng)
            ratio = stock["wall"] / ours["wall"]
            report.row(
                f"cold fan-out n={n} x 3 sessions, wall",
                f"{ours['wall']:.2f} s ({n / ours['wall']:.0f} devices/s, "
                f"{ours['cpu']:.2f} s CPU)",
                f"{stock['wall']:.2f} s stock ({n / stock['wall']:.0f} devices/s, "
                f"{stock['cpu']:.2f} s CPU)",
                f"ratio {ratio:.1f}x" + (" (>= 20x, >= 500/s)" if n == 1000 else ""),
            )
            key = f"fanout_cold_n{n}"
            report.result(f"{key}_ratio", ratio)
            report.result(f"{key}_devices_per_s", n / ours["wall"])
            report.result(f"{key}_cpu_s", ours["cpu"])
            if n == sizes[1]:
                warm_courier, warm_stock = bot, stock_bot
        n = sizes[1]
        subset = users[: n // 2]
        ours = await courier_push(warm_courier, room, subset, trigger="command")
        stock = await stock_push(warm_stock, room, subset)
        report.row(
            f"warm fan-out n={n} x 3 sessions",
            f"{ours['forwards'] / ours['wall']:.0f} forwards/s ({ours['wall']:.2f} s)",
            f"{stock['forwards'] / stock['wall']:.0f} forwards/s stock ({stock['wall']:.2f} s)",
            ">= 3000/s",
        )
        report.result(f"fanout_warm_n{n}_forwards_per_s", ours["forwards"] / ours["wall"])
        report.result(f"fanout_warm_n{n}_stock_forwards_per_s", stock["forwards"] / stock["wall"])
    finally:
        for bot in bots:
            await bot.stop()
