"""Restricted rooms: the members of the rooms a join rule allows get the room's preview seals
(the bot's own one-value sessions for the name, topic and avatar), and nobody else's session."""

from __future__ import annotations

import asyncio
from collections import Counter

from harness.client import TestUser, all_hold, eventually

SEND_KEYS = r"/sendToDevice/m\.room\.encrypted/"


def restricted(*rooms: str) -> dict:
    return {
        "join_rule": "restricted",
        "allow": [{"type": "m.room_membership", "room_id": r} for r in rooms],
    }


async def space(world, admin: TestUser, bot) -> str:
    """A public, unencrypted room the bot is in: the 'space' whose members are admitted."""
    room = await admin.create_room(
        invite=[bot.user_id], encrypted=False, join_rule={"join_rule": "public"}
    )
    await world.wait_joined(admin, room, bot.user_id)
    return room


async def restricted_room(world, admin, bot, *allowed: str, bot_level: int = 50) -> str:
    power = {bot.user_id: bot_level} if bot_level else {}
    room = await admin.create_room(
        invite=[bot.user_id], power=power, join_rule=restricted(*allowed)
    )
    await world.wait_joined(admin, room, bot.user_id)
    await bot.wait_for_log(f"Read back \\d+ timeline event\\(s\\) of {room}")
    return room


async def test_joining_the_allowed_room_brings_the_restricted_rooms_name(world) -> None:
    bot = await world.bot(sealing=True)
    admin = await world.user("admin")
    room_a = await space(world, admin, bot)
    room_b = await restricted_room(world, admin, bot, room_a)
    name = await world.set_name(admin, bot, room_b, "Back office")
    seal = await world.seal(bot, room_b)

    carol = await world.user("carol")
    await carol.join(room_a)
    await eventually(lambda: carol.has_session(room_b, seal.session_id))
    payload = await carol.open_event(room_b, seal.event_id, fetcher=admin)
    assert payload["content"] == {"name": "Back office"}
    assert not await carol.has_session(room_b, name.session_id)  # the admin's: never hers
    # and once she walks in through the join rule, her client shows the name
    await carol.join(room_b)
    assert (await carol.read_state(room_b)).get("m.room.name") == {"name": "Back office"}
    shares = [
        r for r in await world.audit(bot, room_b) if r.decision == "share" and r.trigger != "seal"
    ]
    assert [(r.user_id, r.trigger) for r in shares] == [(carol.user_id, "link")]


async def test_a_room_added_to_the_allow_list_gets_the_keys(world) -> None:
    bot = await world.bot(sealing=True)
    admin = await world.user("admin")
    room_a = await space(world, admin, bot)
    room_c = await space(world, admin, bot)
    room_b = await restricted_room(world, admin, bot, room_a)
    await world.set_name(admin, bot, room_b, "Back office")
    seal = await world.seal(bot, room_b)
    members = [await world.user("dave"), await world.user("erin")]
    for member in members:
        await member.join(room_c)
    await asyncio.sleep(1)
    assert not any([await m.has_session(room_b, seal.session_id) for m in members])

    await admin.put_state(room_b, "m.room.join_rules", "", restricted(room_a, room_c))
    for member in members:
        await eventually(lambda m=member: m.has_session(room_b, seal.session_id))
        payload = await member.open_event(room_b, seal.event_id, fetcher=admin)
        assert payload["content"]["name"] == "Back office"


async def test_a_join_storm_into_a_space_is_served_in_few_calls(world) -> None:
    proxy = await world.proxy()
    bot = await world.bot(homeserver=proxy.url, sealing=True)
    admin = await world.user("admin")
    room_a = await space(world, admin, bot)
    sessions = {}
    for label in ("one", "two", "three"):
        room_b = await restricted_room(world, admin, bot, room_a)
        await admin.send_state(room_b, "m.room.name", "", {"name": f"Room {label}"})
        sessions[room_b] = None
    for room_b in sessions:
        sessions[room_b] = await world.seal(bot, room_b)

    first = await asyncio.gather(*(world.user(f"m{i}") for i in range(30)))
    second = await asyncio.gather(*(world.second_device(u) for u in first))
    devices = list(first) + list(second)
    calls_before = proxy.count(SEND_KEYS)
    await asyncio.gather(*(u.join(room_a) for u in first))

    async def everyone_has_everything() -> bool:
        for device in devices:
            for room_b, sent in sessions.items():
                if not await device.has_session(room_b, sent.session_id):
                    return False
        return True

    await eventually(everyone_has_everything, timeout=60)
    await asyncio.sleep(2)  # anything sent twice would arrive by now
    for device in devices:
        received = Counter(
            p["content"]["session_id"] for p in device.olm_plaintexts if p["type"] == "m.room_key"
        )
        assert received == Counter({s.session_id: 1 for s in sessions.values()}), device.user_id
        assert device.forwarded == []
    calls = proxy.count(SEND_KEYS) - calls_before
    assert calls < len(devices), f"{calls} sendToDevice calls for {len(devices)} devices"
    print(f"{len(devices)} devices x 3 sessions in {calls} sendToDevice calls")


async def test_a_push_killed_in_flight_resumes_without_sending_twice(world) -> None:
    proxy = await world.proxy()
    bot = await world.bot(homeserver=proxy.url, sealing=True)
    admin = await world.user("admin")
    room_a = await space(world, admin, bot)
    room_b = await restricted_room(world, admin, bot)  # restricted, allowing nobody yet
    for event_type, content in (
        ("m.room.name", {"name": "Back office"}),
        ("m.room.topic", {"topic": "payroll"}),
        ("m.room.avatar", {"url": "mxc://x/y"}),
    ):
        await admin.new_session(room_b)
        await admin.send_state(room_b, event_type, "", content)
    sent = [
        await world.seal(bot, room_b, t) for t in ("m.room.name", "m.room.topic", "m.room.avatar")
    ]
    members = list(await asyncio.gather(*(world.user(f"m{i}") for i in range(10))))
    members += await asyncio.gather(*(world.second_device(u) for u in members))
    await asyncio.gather(*(m.join(room_a) for m in members[:10]))

    # The first sendToDevice call of the push goes through, the second is held in flight.
    hold = proxy.hold(SEND_KEYS, after=1)
    await admin.put_state(room_b, "m.room.join_rules", "", restricted(room_a))
    await asyncio.wait_for(hold.holding.wait(), 30)
    bot.stop(kill=True)
    await asyncio.wait_for(hold.dropped.wait(), 10)  # the held call died with the bot
    proxy.clear()
    bot.start()
    await bot.wait_ready()

    await eventually(lambda: all_hold(members, room_b, [s.session_id for s in sent]), timeout=60)
    await asyncio.sleep(2)
    for m in members:
        received = Counter(
            p["content"]["session_id"] for p in m.olm_plaintexts if p["type"] == "m.room_key"
        )
        assert set(received.values()) == {1}, (m.user_id, received, [s.session_id for s in sent])


async def test_at_default_power_in_the_restricted_room_nothing_is_pushed(world) -> None:
    bot = await world.bot(sealing=True)
    admin = await world.user("admin")
    room_a = await space(world, admin, bot)
    room_b = await restricted_room(world, admin, bot, room_a, bot_level=0)
    name = await world.set_name(admin, bot, room_b, "Back office")
    carol = await world.user("carol")
    await carol.join(room_a)
    await asyncio.sleep(3)
    assert not await carol.has_session(room_b, name.session_id)
    assert carol.forwarded == [] and carol.olm_plaintexts == []
    assert "Sealed" not in bot.tail(100_000)  # not empowered: it seals nothing either


async def test_a_room_removed_from_the_allow_list_gets_nothing_more(world) -> None:
    bot = await world.bot(sealing=True)
    admin = await world.user("admin")
    room_a = await space(world, admin, bot)
    room_c = await space(world, admin, bot)
    room_b = await restricted_room(world, admin, bot, room_a, room_c)
    await world.set_name(admin, bot, room_b, "Back office")
    name = await world.seal(bot, room_b)
    early = await world.user("early")
    await early.join(room_c)
    await eventually(lambda: early.has_session(room_b, name.session_id))

    await admin.put_state(room_b, "m.room.join_rules", "", restricted(room_a))
    await bot.wait_for_log(f"{room_c} no longer admits into {room_b}")
    late = await world.user("late")
    await late.join(room_c)
    # and a request through the old link is refused too
    await late.request_key(room_b, name.session_id, bot.user_id, [bot.device_id])
    await eventually(lambda: late.withheld_for(name.session_id))
    assert late.withheld_for(name.session_id)[0]["code"] == "m.unauthorised"
    assert not await late.has_session(room_b, name.session_id)


async def test_joins_to_the_allowed_room_while_the_bot_was_down_are_caught_up(world) -> None:
    bot = await world.bot(sealing=True)
    admin = await world.user("admin")
    room_a = await space(world, admin, bot)
    room_b = await restricted_room(world, admin, bot, room_a)
    await world.set_name(admin, bot, room_b, "Back office")
    name = await world.seal(bot, room_b)
    bot.stop()
    carol = await world.user("carol")
    await carol.join(room_a)
    bot.start()
    await bot.wait_ready()
    await eventually(lambda: carol.has_session(room_b, name.session_id))
    await asyncio.sleep(1)
    assert len(carol.room_keys_for(name.session_id)) == 1
