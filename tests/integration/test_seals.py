"""Seals through a real Synapse: every entry path with Element's engine (matrix-js-sdk with Rust
crypto, fresh users each time, the admin a js-sdk client too), and the invariants that make
seals safe, with Python clients that would accept any key they are given."""

from __future__ import annotations

import asyncio
import re

from mautrix.api import Method, Path
import pytest

from harness.client import eventually

pytestmark = pytest.mark.db_agnostic

RUNS = 3  # fresh users per entry path: a path that works one run in three is not working
SEALING = {"cross_signing": {"bootstrap": True}, "seal": {"enabled": True}}


async def element_room(world, bot, js, admin=None, **create) -> tuple:
    """A js-sdk admin's state-encrypted room with the bot at power 50: the admin encrypts the
    name and then chats in the same session, as Element does; the bot seals the name."""
    admin = admin or await js("admin")
    created = await admin.call("create", invite=[bot.user_id], power={bot.user_id: 50}, **create)
    room = created["room"]
    await bot.wait_for_log(f"Read back \\d+ timeline event\\(s\\) of {re.escape(room)}")
    await admin.call("wait_member", room=room, user=bot.user_id)
    await admin.call("set_name", room=room, name="Nightingale")
    await admin.call("send", room=room, body="chat in the name's session")
    await sealed(bot, room)
    return admin, room


async def sealed(bot, room: str, times: int = 1) -> None:
    pattern = f"Sealed m.room.name '' of {re.escape(room)}"

    def count() -> bool:
        return len(re.findall(pattern, bot.tail(100_000))) >= times

    await eventually(count, timeout=30)


async def shared_to(world, bot, room: str, user_id: str, trigger: str) -> None:
    """Until the bot has delivered a seal to this user (the audit records each key)."""

    async def done() -> bool:
        rows = await world.audit(bot, room, limit=500)
        return any(
            r.user_id == user_id and r.decision == "share" and r.trigger == trigger for r in rows
        )

    await eventually(done, timeout=30)


async def read_name(peer, room: str, name: str = "Nightingale") -> str:
    """How the newcomer's client shows the name: "live" (the room state, as it arrived), or
    "reload" (only after the client restarts on the same store), or "no"."""
    state = await peer.call("wait_name", room=room, name=name, seconds=15, live=True)
    if state.get("nameState") == name:
        return "live"
    await peer.call("reload", room=room, timeout=120)
    state = await peer.call("wait_name", room=room, name=name, seconds=15, live=True)
    return "reload" if state.get("nameState") == name else "no"


async def fresh(js, prefix: str, count: int = RUNS) -> list:
    return list(await asyncio.gather(*(js(f"{prefix}{i}") for i in range(count))))


# Entry paths, Element's engine on both sides -------------------------------------------------


async def test_public_join(world, js) -> None:
    bot = await world.bot(config=SEALING)
    _, room = await element_room(world, bot, js, preset="public_chat")
    results = []
    for peer in await fresh(js, "pub"):
        await peer.call("join", room=room)
        results.append(await read_name(peer, room))
    print("public join:", results)
    # the key follows the join (the bot learns of the joiner from it): Element's engine has
    # tried the name once by then, so it reads the name after a reload
    assert "no" not in results, results


async def test_restricted_join_through_the_allowed_room(world, js) -> None:
    bot = await world.bot(config=SEALING)
    admin = await js("admin")
    space = (await admin.call("create", invite=[bot.user_id]))["room"]
    await bot.wait_for_log(f"Read back \\d+ timeline event\\(s\\) of {re.escape(space)}")
    rule = {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": space}]}
    _, room = await element_room(world, bot, js, admin, joinRule=rule)
    results = []
    for peer in await fresh(js, "res"):
        await admin.call("invite", room=space, user=peer.user_id)
        await peer.call("wait_invite", room=space)
        await peer.call("join", room=space)
        await shared_to(world, bot, room, peer.user_id, "link")  # the preview seal, unasked
        await peer.call("join", room=room)  # no invite: admitted through the allowed room
        results.append(await read_name(peer, room))
    print("restricted join:", results)
    assert results == ["live"] * RUNS, results


async def test_invited_by_an_admin_who_is_not_the_bot(world, js) -> None:
    bot = await world.bot(config=SEALING)
    admin, room = await element_room(world, bot, js)
    results = []
    for peer in await fresh(js, "inv"):
        await admin.call("invite", room=room, user=peer.user_id)
        await peer.call("wait_invite", room=room)
        await shared_to(world, bot, room, peer.user_id, "invite")
        await peer.call("join", room=room)
        results.append(await read_name(peer, room))
    print("invited by the admin:", results)
    assert results == ["live"] * RUNS, results


async def test_knock_approved_by_the_admin(world, js) -> None:
    bot = await world.bot(config=SEALING)
    admin, room = await element_room(world, bot, js, joinRule={"join_rule": "knock"})
    results = []
    for peer in await fresh(js, "knk"):
        await peer.call("knock", room=room)
        await admin.call("wait_member", room=room, user=peer.user_id, membership="knock")
        await admin.call("invite", room=room, user=peer.user_id)
        await peer.call("wait_invite", room=room)
        await shared_to(world, bot, room, peer.user_id, "invite")
        await peer.call("join", room=room)
        results.append(await read_name(peer, room))
    print("knock approved:", results)
    assert results == ["live"] * RUNS, results


async def test_encstate_invite(world, js) -> None:
    bot = await world.bot(config=SEALING)
    admin, room = await element_room(world, bot, js)
    results = []
    for peer in await fresh(js, "cmd"):
        await admin.call("send", room=room, body=f"!encstate invite {peer.user_id}")
        await peer.call("wait_invite", room=room)
        await shared_to(world, bot, room, peer.user_id, "bundle")
        await peer.call("join", room=room)
        results.append(await read_name(peer, room))
    print("!encstate invite:", results)
    assert results == ["live"] * RUNS, results


async def test_an_admin_renames_and_members_never_see_ciphertext(world, js) -> None:
    bot = await world.bot(config=SEALING)
    admin, room = await element_room(world, bot, js)
    members = await fresh(js, "mem", 2)
    for peer in members:
        await admin.call("invite", room=room, user=peer.user_id)
        await peer.call("wait_invite", room=room)
        await peer.call("join", room=room)
        assert await read_name(peer, room) == "live"
        await peer.call("watch", room=room)
    await admin.call("set_name", room=room, name="Nightjar")
    await sealed(bot, room, times=2)
    for peer in members:
        state = await peer.call("wait_name", room=room, name="Nightjar", seconds=20, live=True)
        assert state["nameState"] == "Nightjar", (state, peer.log_tail())
        await asyncio.sleep(1)  # the seal's event arrives after the admin's
        history = await peer.call("history", room=room)
        assert not any(h["undecryptable"] for h in history), history
        assert history[-1] == {"name": "Nightjar", "undecryptable": False}, history
    newcomer = (await fresh(js, "new", 1))[0]
    await admin.call("invite", room=room, user=newcomer.user_id)
    await newcomer.call("wait_invite", room=room)
    await shared_to(world, bot, room, newcomer.user_id, "invite")
    await newcomer.call("join", room=room)
    assert await read_name(newcomer, room, "Nightjar") == "live"


async def test_with_the_bot_stopped_the_admins_own_bundle_carries_the_seal(world, js) -> None:
    bot = await world.bot(config=SEALING)
    admin, room = await element_room(world, bot, js)
    bot.stop()
    peer = (await fresh(js, "off", 1))[0]
    await admin.call("invite", room=room, user=peer.user_id)  # Element shares history on invite
    await peer.call("wait_invite", room=room)
    await peer.call("join", room=room)
    how = await read_name(peer, room)
    print("bot stopped, admin's bundle:", how)
    assert how != "no", peer.log_tail()


# Invariants, with clients that take any key ---------------------------------------------------


async def room_events(user, room: str) -> list[dict]:
    resp = await user.client.api.request(
        Method.GET, Path.v3.rooms[room].messages, query_params={"dir": "b", "limit": 500}
    )
    return resp["chunk"]


async def identity_key(user, bot) -> str:
    resp = await user.client.api.request(
        Method.POST, Path.v3.keys.query, {"device_keys": {bot.user_id: []}}
    )
    return resp["device_keys"][bot.user_id][bot.device_id]["keys"][f"curve25519:{bot.device_id}"]


async def test_seal_invariants(world) -> None:
    bot = await world.bot(sealing=True)
    admin = await world.user("admin")
    space = await admin.create_room(invite=[bot.user_id])
    await world.wait_joined(admin, space, bot.user_id)
    rule = {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": space}]}
    room = await world.room_with_bot(admin, bot, join_rule=rule)
    member = await world.member("member", admin, room)
    # anyone may send m.room.encrypted state here; the inner type's level is what counts
    levels = await admin.client.api.request(
        Method.GET, Path.v3.rooms[room].state["m.room.power_levels"][""]
    )
    levels.setdefault("events", {})["m.room.encrypted"] = 0
    await admin.put_state(room, "m.room.power_levels", "", levels)
    await admin.new_session(room)
    name = await world.set_name(admin, bot, room, "Nightingale")
    topic = await admin.send_state(room, "m.room.topic", "", {"topic": "plans"})
    await world.wait_valid(bot, topic.event_id)
    await eventually(lambda: bot.tail(100_000).count("Sealed m.room.topic") >= 1, timeout=30)
    # an invalid value (a member without the power for names) is never sealed
    await member.new_session(room)
    bad = await member.send_state(room, "m.room.name", "", {"name": "Hijacked"})
    await world.wait_valid(bot, bad.event_id, status="invalid")

    # someone admitted through the allowed room, and an invitee, get the preview seals only
    admitted = await world.member("admitted", admin, space)
    invitee = await world.user("invitee")
    await admin.invite(room, invitee.user_id)
    store = await world.store(bot)

    async def seals() -> dict[str, str]:
        rows = await store.seals()
        return {s.session_id: s.inner_type for s in rows if s.room_id == room}

    await eventually(lambda: seals(), timeout=30)
    bot_key = await identity_key(admin, bot)
    for user in (admitted, invitee):
        seal_ids = await seals()
        await eventually(lambda u=user: u.sessions_from(room, bot_key), timeout=30)
        held = user.sessions_from(room, bot_key)
        assert held and held <= set(seal_ids), (held, seal_ids)
        assert not await user.has_session(room, name.session_id)
        assert not await user.has_session(room, topic.session_id)
    # the admin chats on in the name's session: nobody outside the room reads it
    chat = await admin.send_message(room, "members only")
    for user in (admitted, invitee):
        assert await user.try_decrypt(room, chat.session_id, chat.ciphertext) is None

    # every seal session encrypts exactly one event, and the invalid name got none
    events = await room_events(admin, room)
    per_session: dict[str, int] = {}
    for evt in events:
        session_id = evt.get("content", {}).get("session_id")
        if session_id:
            per_session[session_id] = per_session.get(session_id, 0) + 1
    made = await seals()
    assert sorted(made.values()) == ["m.room.name", "m.room.topic"], made
    assert all(per_session.get(s) == 1 for s in made), (per_session, made)
    name_seal = next(
        e for e in events if made.get(e["content"].get("session_id")) == "m.room.name"
    )
    content = name_seal["content"]
    opened = await member.try_decrypt(room, content["session_id"], content["ciphertext"])
    assert opened["content"] == {"name": "Nightingale"} and opened["type"] == "m.room.name"


async def test_two_encstate_instances_do_not_reseal_each_other(world) -> None:
    first, second = await world.bot(sealing=True), await world.bot(sealing=True)
    admin = await world.user("admin")
    room = await admin.create_room(
        invite=[first.user_id, second.user_id], power={first.user_id: 50, second.user_id: 50}
    )
    for bot in (first, second):
        await world.wait_joined(admin, room, bot.user_id)
        await bot.wait_for_log(f"Read back \\d+ timeline event\\(s\\) of {re.escape(room)}")
    await admin.new_session(room)
    sent = await admin.send_state(room, "m.room.name", "", {"name": "Nightingale"})
    for bot in (first, second):
        await world.wait_valid(bot, sent.event_id)
        await sealed(bot, room)
    await asyncio.sleep(6)  # long enough for several rounds of a loop
    names = [
        e
        for e in await room_events(admin, room)
        if e.get("type") == "m.room.encrypted" and e.get("state_key") == "m.room.name:"
    ]
    assert len(names) <= 3, [e["sender"] for e in names]  # the admin's, at most one per bot
    for bot in (first, second):
        assert bot.tail(100_000).count("Sealed m.room.name") <= 1


async def test_element_newcomers_who_joined_before_the_bot_held_the_key_read_it_once_it_came(
    world, js
) -> None:
    """Members who joined while the bot could not read the room's state (its key never sent to
    the bot) read it in Element's engine once someone hands the bot the key: the bot seals the
    value then, and the seal goes to every member."""
    bot = await world.bot(config={**SEALING, "self_supply": {"enabled": False}})
    admin = await world.user("admin")
    room = await admin.create_room(power={bot.user_id: 50}, join_rule={"join_rule": "public"})
    name = await admin.send_state(room, "m.room.name", "", {"name": "Nightingale"})
    await admin.invite(room, bot.user_id)
    await world.wait_joined(admin, room, bot.user_id)
    await world.wait_valid(bot, name.event_id, status="pending")
    peers = await fresh(js, "early")
    for peer in peers:
        await peer.call("join", room=room)
    for peer in peers:
        await world.wait_joined(admin, room, peer.user_id)

    await admin.forward_key_to(room, name.session_id, bot.user_id, bot.device_id)
    await sealed(bot, room)
    results = [await read_name(peer, room) for peer in peers]
    print("joined before the key:", results)
    assert "no" not in results, results
