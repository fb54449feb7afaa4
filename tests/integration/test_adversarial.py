"""Attacks through the real homeserver: garbage the bot must survive, and each security
invariant tried on purpose."""

from __future__ import annotations

import asyncio
import base64
import random
import re
from typing import Any

from harness.client import MEGOLM, eventually

NO_PUSH = {"push_on_join": False, "duplicate_window_seconds": 0}


def junk(rng: random.Random, depth: int = 0) -> Any:
    """Random JSON of the kinds a broken or hostile client sends."""
    choice = rng.randrange(9 if depth < 3 else 6)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 2**53, 3.5])
    if choice == 3:
        return "".join(rng.choice("ab:@!$\u0000é") for _ in range(rng.randrange(0, 12)))
    if choice == 4:
        return "x" * rng.choice([256, 5000])
    if choice == 5:
        return rng.choice(["request", "request_cancellation", MEGOLM, "m.olm.v1"])
    if choice == 6:
        return [junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = [
        "action",
        "requesting_device_id",
        "request_id",
        "body",
        "algorithm",
        "room_id",
        "session_id",
        "sender_key",
        "extra",
    ]
    return {rng.choice(keys): junk(rng, depth + 1) for _ in range(rng.randrange(6))}


def key_requests(room: str, session_id: str, device: str, count: int) -> list[Any]:
    """Handcrafted malformed m.room_key_request contents, then random ones."""
    body = {"algorithm": MEGOLM, "room_id": room, "session_id": session_id}
    crafted = [
        {},
        {"action": "request"},
        {"action": "request", "requesting_device_id": device},
        {"action": "request", "requesting_device_id": device, "request_id": "r", "body": "x"},
        {"action": "share", "requesting_device_id": device, "request_id": "r", "body": body},
        {"action": "request", "requesting_device_id": 5, "request_id": "r", "body": body},
        {"action": "request", "requesting_device_id": device, "request_id": None, "body": body},
        {
            "action": "request",
            "requesting_device_id": device,
            "request_id": "r1",
            "body": {**body, "algorithm": "m.olm.v1.curve25519-aes-sha2"},
        },
        {
            "action": "request",
            "requesting_device_id": device,
            "request_id": "r2",
            "body": {**body, "room_id": "!not-a-room:nowhere"},
        },
        {
            "action": "request",
            "requesting_device_id": device,
            "request_id": "r3",
            "body": {**body, "session_id": "x" * 5000},
        },
        {"action": "request_cancellation", "requesting_device_id": device, "request_id": "nope"},
        {
            "action": "request",
            "requesting_device_id": "OTHERDEVICE",
            "request_id": "r4",
            "body": body,
        },
    ]
    rng = random.Random(3414)
    randoms = []
    while len(crafted) + len(randoms) < count:
        content = junk(rng)
        # The homeserver itself refuses to-device content that is not an object.
        randoms.append(content if isinstance(content, dict) else {"action": content})
    return crafted + randoms


async def test_garbage_through_the_homeserver_leaves_the_bot_answering(world) -> None:
    bot = await world.bot(config=NO_PUSH)
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    await admin.new_session(room)
    name = await world.set_name(admin, bot, room, "Nightingale")
    mallory = await world.member("mallory", admin, room)
    await admin.set_power(room, {mallory.user_id: 50})  # a hostile moderator
    tried = 0

    # 1. Key requests of every malformed shape, straight to the bot's device.
    for content in key_requests(room, name.session_id, mallory.device_id, 200):
        await mallory.send_to_device("m.room_key_request", {bot.user_id: {bot.device_id: content}})
        tried += 1

    # 2. Encrypted state that must never count, some of it naming the name's session.
    await mallory.new_session(room)
    valid_wire, session_id, _, _ = await mallory._encrypt(
        room, {"type": "m.room.topic", "state_key": "", "content": {"topic": "x"}, "room_id": room}
    )
    bogus_ciphertext = base64.b64encode(b"\x03\x08\x05" + bytes(80)).decode().rstrip("=")
    states = [
        ("m.room.topic:", {"type": "m.room.name", "state_key": "", "content": {}}),  # mismatch
        ("m.room.power_levels:", {"type": "m.room.power_levels", "state_key": "", "content": {}}),
        (
            "m.room.topic:",
            {"type": "m.room.topic", "state_key": "", "content": {}, "room_id": "!elsewhere:x"},
        ),
        ("m.room.topic:", {"type": "m.room.topic", "content": {"body": "a message"}}),
        ("m.room.topic:", {"type": "m.room.topic", "state_key": "", "content": "not an object"}),
    ]
    for outer, payload in states:
        payload.setdefault("room_id", room)
        await mallory.send_state(room, "", "", {}, outer_key=outer, payload=payload)
        tried += 1
    raw_contents = [
        {**valid_wire, "ciphertext": bogus_ciphertext},  # undecryptable
        {**valid_wire, "ciphertext": valid_wire["ciphertext"][:20]},  # truncated
        {**valid_wire, "algorithm": "m.olm.v1.curve25519-aes-sha2"},
        {k: v for k, v in valid_wire.items() if k != "session_id"},
        {**valid_wire, "ciphertext": 12345},
        {**valid_wire, "session_id": name.session_id, "ciphertext": bogus_ciphertext},  # DoS try
    ]
    for content in raw_contents:
        await mallory.put_state(room, "m.room.encrypted", "m.room.topic:", content)
        tried += 1
    # A replay: the name event's ciphertext posted as a timeline message (must not make the
    # name's session "mixed"), and garbage messages claiming the name's session.
    await mallory.send_raw_message(
        room, {"algorithm": MEGOLM, "session_id": name.session_id, "ciphertext": name.ciphertext}
    )
    await mallory.send_raw_message(
        room, {"algorithm": MEGOLM, "session_id": name.session_id, "ciphertext": bogus_ciphertext}
    )
    tried += 2

    # 3. Room state with odd values: garbage allow entries, odd but legal power levels, and a
    # room whose encryption flag is not a boolean.
    await admin.put_state(
        room,
        "m.room.join_rules",
        "",
        {"join_rule": "restricted", "allow": [{"type": "m.room_membership"}, "junk", 5, {}]},
    )
    await admin.set_power(room, {"@ghost:nowhere": 2**53 - 1, mallory.user_id: -(2**53) + 1})
    odd = await admin.create_room(invite=[bot.user_id], flag=None)
    await admin.put_state(
        odd, "m.room.encryption", "", {"algorithm": MEGOLM, "encrypt_state_events": "yes"}
    )
    tried += 3
    print(f"tried {tried} malformed inputs through Synapse")

    await bot.wait_for_log("Skipping a garbage allow entry")
    assert bot.running, "the bot died"
    assert f"State encryption is on in {odd}" not in bot.log_text()

    # The legitimate newcomer is still served, from the name's state-only session.
    newcomer = await world.member("newcomer", admin, room)
    await newcomer.request_key(room, name.session_id, bot.user_id, [bot.device_id])
    await eventually(lambda: newcomer.has_session(room, name.session_id))
    assert (await newcomer.read_state(room)).get("m.room.name") == {"name": "Nightingale"}
    store = await world.store(bot)
    records = {r.event_id: r for r in await store.load_states()}
    assert records[name.event_id].status.value == "valid"
    invalid = [r for r in records.values() if r.status.value == "invalid"]
    assert len(invalid) >= len(states) + 2  # everything that decrypted or claimed a session
    assert session_id not in {r.session_id for r in records.values() if r.status.value == "valid"}
    # nothing Mallory sent reached anyone: the bot shared exactly one key
    shares = [r for r in await world.audit(bot, room) if r.decision == "share"]
    assert [(r.user_id, r.session_id) for r in shares] == [(newcomer.user_id, name.session_id)]


async def test_mixed_sessions_need_the_flag_the_config_and_visible_history(world) -> None:
    bot = await world.bot(config={**NO_PUSH, "allow_mixed_shared_history": True})
    admin = await world.user("admin")
    results = {}
    for visibility in ("shared", "joined"):
        room = await world.room_with_bot(admin, bot, history_visibility=visibility)
        flagged = await admin.share_flagged_session(room, shared_history=True)
        name = await admin.send_state(room, "m.room.name", "", {"name": visibility})
        assert name.session_id == flagged
        await admin.send_message(room, "history everyone may read")
        await world.wait_valid(bot, name.event_id)
        newcomer = await world.member("newcomer", admin, room)
        await newcomer.request_key(room, flagged, bot.user_id, [bot.device_id])
        await eventually(
            lambda n=newcomer, s=flagged: n.withheld_for(s) or n.has_session(room, s)  # noqa: B023
        )
        results[visibility] = await newcomer.has_session(room, flagged)
    assert results == {"shared": True, "joined": False}


async def test_no_keys_for_those_who_left_or_were_banned(world) -> None:
    bot = await world.bot(config=NO_PUSH)
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    name = await world.set_name(admin, bot, room, "Nightingale")
    leaver, banned = await world.user("leaver"), await world.user("banned")
    for user in (leaver, banned):
        await admin.invite(room, user.user_id)
        await user.join(room)
    await leaver.leave(room)
    await admin.client.ban_user(room, banned.user_id, "test")
    for user in (leaver, banned):
        await user.request_key(room, name.session_id, bot.user_id, [bot.device_id])
    for user, state in ((leaver, "leave"), (banned, "ban")):
        await eventually(lambda u=user: u.withheld_for(name.session_id))
        withheld = user.withheld_for(name.session_id)[0]
        assert withheld["code"] == "m.unauthorised" and f"({state})" in withheld["reason"]
        assert not await user.has_session(room, name.session_id)


async def test_membership_is_checked_when_sending_not_when_asked(world) -> None:
    proxy = await world.proxy()
    bot = await world.bot(config=NO_PUSH, homeserver=proxy.url)
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    name = await world.set_name(admin, bot, room, "Nightingale")
    quitter = await world.member("quitter", admin, room)
    # The bot's membership check for this request is held until the user has left.
    hold = proxy.hold(r"/state/m\.room\.member/", method="GET")
    await quitter.request_key(room, name.session_id, bot.user_id, [bot.device_id])
    await asyncio.wait_for(hold.holding.wait(), 30)
    await quitter.leave(room)
    proxy.clear()
    await eventually(lambda: quitter.withheld_for(name.session_id))
    assert "(leave)" in quitter.withheld_for(name.session_id)[0]["reason"]
    assert not await quitter.has_session(room, name.session_id)


async def test_a_ghost_device_gets_nothing_under_the_cross_signed_policy(world) -> None:
    bot = await world.bot(config={"require_cross_signed": True})
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    name = await world.set_name(admin, bot, room, "Nightingale")
    carol = await world.user("carol")
    await carol.crypto.generate_recovery_key()  # cross-signs this device
    ghost = await world.second_device(carol)  # a device nobody signed
    await admin.invite(room, carol.user_id)
    await carol.join(room)
    await eventually(lambda: carol.has_session(room, name.session_id))
    await ghost.request_key(room, name.session_id, bot.user_id, [bot.device_id])
    await eventually(lambda: ghost.withheld_for(name.session_id))
    assert ghost.withheld_for(name.session_id)[0]["code"] == "m.unverified"
    assert not await ghost.has_session(room, name.session_id)


async def test_a_member_cannot_launder_keys_through_the_bot(world) -> None:
    bot = await world.bot(config=NO_PUSH)
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    await world.set_name(admin, bot, room, "Nightingale")
    mallory = await world.member("mallory", admin, room)
    await admin.set_power(room, {mallory.user_id: 50})
    # A session the bot never received: Mallory encrypts a message with it, names it in fake
    # state, then hands it to the bot unasked.
    await mallory.share_flagged_session(room, shared_history=False, recipients=[])
    secret = await mallory.send_message(room, "a message in a session only Mallory has")
    await mallory.put_state(
        room,
        "m.room.encrypted",
        "m.room.topic:",
        {"algorithm": MEGOLM, "session_id": secret.session_id, "ciphertext": secret.ciphertext},
    )
    await mallory.forward_key_to(room, secret.session_id, bot.user_id, bot.device_id)
    await bot.wait_for_log(re.escape(f"Session {secret.session_id} in {room} arrived"))
    newcomer = await world.member("newcomer", admin, room)
    await newcomer.request_key(room, secret.session_id, bot.user_id, [bot.device_id])
    await eventually(lambda: newcomer.withheld_for(secret.session_id))
    assert newcomer.withheld_for(secret.session_id)[0]["code"] == "m.unauthorised"
    assert not await newcomer.has_session(room, secret.session_id)
