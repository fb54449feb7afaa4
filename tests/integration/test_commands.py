"""!encstate on the real Synapse: what operators see, and what their controls do."""

from __future__ import annotations

import asyncio

from harness.client import eventually


def restricted(*rooms: str) -> dict:
    return {
        "join_rule": "restricted",
        "allow": [{"type": "m.room_membership", "room_id": r} for r in rooms],
    }


async def troubled_room(world, bot, admin):
    """A room with a mixed session, a superseded topic above its safe index, an invalid
    packed key and a restricted link."""
    space = await admin.create_room(
        invite=[bot.user_id], encrypted=False, join_rule={"join_rule": "public"}
    )
    await world.wait_joined(admin, space, bot.user_id)
    room = await world.room_with_bot(admin, bot, join_rule=restricted(space))
    await admin.new_session(room)
    name = await admin.send_state(room, "m.room.name", "", {"name": "Nightingale"})
    old = await admin.send_state(room, "m.room.topic", "", {"topic": "old plans"})
    new = await admin.send_state(room, "m.room.topic", "", {"topic": "new plans"})
    await admin.new_session(room)
    avatar = await admin.send_state(room, "m.room.avatar", "", {"url": "mxc://x/y"})
    chat = await admin.send_message(room, "see you at noon")
    await admin.new_session(room)
    bad = await admin.send_state(
        room, "m.room.topic", "", {"topic": "x"}, outer_key="m.room.join_rules:"
    )
    for sent in (name, new, avatar):
        await world.wait_valid(bot, sent.event_id)
    await world.wait_valid(bot, bad.event_id, status="invalid")

    async def chat_seen() -> bool:
        store = await world.store(bot)
        return any(m.event_id == chat.event_id for m in await store.load_messages())

    await eventually(chat_seen)
    return space, room, {"name": name, "old": old, "new": new, "avatar": avatar, "chat": chat}


async def test_status_audit_links_and_log_report_the_rooms_facts(world) -> None:
    bot = await world.bot()
    admin = await world.user("admin")
    space, room, sent = await troubled_room(world, bot, admin)

    status = await admin.command(room, "!encstate status", bot.user_id)
    assert "on (io.element.msc4362.encrypt_state_events)" in status
    assert "50 > users_default 0: empowered" in status
    assert "3 current, 1 superseded, 1 invalid" in status
    assert "1 state-only, 1 mixed" in status
    assert "members; invited off; dry run off" in status

    audit = await admin.command(room, "!encstate audit", bot.user_id)
    assert "Sessions that encrypt state and messages" in audit
    assert sent["avatar"].session_id[:10] in audit and "1 message(s)" in audit
    assert "Superseded values still readable" in audit and sent["old"].event_id[:12] in audit
    assert "Invalid encrypted state" in audit and "packed state key" in audit

    links = await admin.command(room, "!encstate links", bot.user_id)
    assert "admits members of" in links and space in links

    newcomer = await world.user("newcomer")
    await newcomer.join(space)
    await newcomer.join(room)  # through the restricted rule
    await eventually(lambda: newcomer.has_session(room, sent["name"].session_id))
    log = await admin.command(room, "!encstate log 5", bot.user_id)
    assert newcomer.user_id in log and "share" in log and "from 0" in log

    state = await admin.command(room, "!encstate state", bot.user_id)
    assert "Nightingale" in state and "new plans" in state and "old plans" not in state


async def test_policy_off_stops_sharing_and_members_resumes(world) -> None:
    bot = await world.bot(config={"duplicate_window_seconds": 1})
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    name = await world.set_name(admin, bot, room, "Nightingale")

    reply = await admin.command(room, "!encstate policy off", bot.user_id)
    assert "nobody (off)" in reply
    newcomer = await world.member("newcomer", admin, room)
    await newcomer.request_key(room, name.session_id, bot.user_id, [bot.device_id])
    await asyncio.sleep(3)
    assert not await newcomer.has_session(room, name.session_id)
    rows = await world.audit(bot, room, user_id=newcomer.user_id)
    assert rows and all(r.decision == "ignore" and "off" in r.reason for r in rows)

    reply = await admin.command(room, "!encstate policy members", bot.user_id)
    assert "every current member" in reply
    await newcomer.request_key(room, name.session_id, bot.user_id, [bot.device_id])
    await eventually(lambda: newcomer.has_session(room, name.session_id))


async def test_dry_run_sends_nothing_and_says_what_it_would_send(world) -> None:
    bot = await world.bot(config={"push_on_join": False, "duplicate_window_seconds": 1})
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    name = await world.set_name(admin, bot, room, "Nightingale")
    newcomer = await world.member("newcomer", admin, room)

    reply = await admin.command(room, f"!encstate share {newcomer.user_id} --dry-run", bot.user_id)
    assert reply.startswith("**Dry run: nothing sent**")
    assert newcomer.device_id in reply and "would share from index 0" in reply
    await asyncio.sleep(2)
    assert not await newcomer.has_session(room, name.session_id)

    # the room-wide dry run: requests are decided and recorded, nothing goes out
    await admin.command(room, "!encstate policy --dry-run on", bot.user_id)
    await newcomer.request_key(room, name.session_id, bot.user_id, [bot.device_id])
    await bot.wait_for_log("dry run: would share")
    await asyncio.sleep(1)
    assert not await newcomer.has_session(room, name.session_id)

    await admin.command(room, "!encstate policy --dry-run off", bot.user_id)
    reply = await admin.command(room, f"!encstate share {newcomer.user_id}", bot.user_id)
    assert reply.startswith("**Shared now**") and "from 0" in reply
    await eventually(lambda: newcomer.has_session(room, name.session_id))


async def test_a_member_without_power_is_refused(world) -> None:
    bot = await world.bot()
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    member = await world.member("member", admin, room)
    reply = await member.command(room, "!encstate policy off", bot.user_id)
    assert reply.startswith("Sorry, policy is for room admins")
    status = await member.command(room, "!encstate status", bot.user_id)
    assert "members; invited off" in status


async def test_seal_now_moves_current_state_to_fresh_sessions(world) -> None:
    """Sealing off in the config; an admin seals by hand (``reseal`` is the old name)."""
    bot = await world.bot()
    admin = await world.user("admin")
    space, room, sent = await troubled_room(world, bot, admin)
    preview = await admin.command(room, "!encstate seal now --dry-run", bot.user_id)
    assert "Would seal 3 value(s)" in preview and "Dry run: nothing was sent" in preview
    shown = await admin.command(room, "!encstate seal", bot.user_id)
    assert "Sealing: off" in shown and "Sealed: 0 of 3" in shown

    await admin.command(room, "!encstate reseal", bot.user_id)
    await admin.wait_for_edit(bot.user_id, room, "Sealed 3 value(s)")

    # the admin, a current member, got the new sessions and still reads everything
    async def admin_reads() -> bool:
        state = await admin.read_state(room)
        return (
            state.get("m.room.name") == {"name": "Nightingale"}
            and state.get("m.room.topic") == {"topic": "new plans"}
            and state.get("m.room.avatar") == {"url": "mxc://x/y"}
        )

    await eventually(admin_reads)

    newcomer = await world.user("newcomer")
    await newcomer.join(space)
    await newcomer.join(room)

    async def newcomer_reads() -> bool:
        state = await newcomer.read_state(room)
        return state.get("m.room.name") is not None and state.get("m.room.avatar") is not None

    await eventually(newcomer_reads)
    await asyncio.sleep(1)
    # nothing of the old sessions: neither the superseded topic nor the chat
    for key in ("old", "chat", "name", "avatar"):
        s = sent[key]
        assert await newcomer.try_decrypt(room, s.session_id, s.ciphertext) is None, key
    audit = await admin.command(room, "!encstate audit", bot.user_id)
    # the old session holds only superseded state now: it is never shared, nothing is exposed
    assert "Superseded values still readable" not in audit
    status = await admin.command(room, "!encstate status", bot.user_id)
    assert "3 current" in status


async def test_the_audit_room_gets_a_notice_for_shares(world) -> None:
    admin = await world.user("admin")
    # the operators' room, unencrypted; the bot is configured to report there
    audit_room = await admin.create_room(encrypted=False)
    bot = await world.bot(config={"audit_room": audit_room})
    await admin.invite(audit_room, bot.user_id)
    await world.wait_joined(admin, audit_room, bot.user_id)
    room = await world.room_with_bot(admin, bot)
    name = await world.set_name(admin, bot, room, "Nightingale")
    newcomer = await world.member("newcomer", admin, room)
    await eventually(lambda: newcomer.has_session(room, name.session_id))

    def notice() -> str | None:
        for evt in admin.messages:
            if evt.room_id == audit_room and evt.sender == bot.user_id:
                return evt.content.body
        return None

    text = await eventually(notice)
    assert "encstate shared 1 key(s)" in text and newcomer.user_id in text
