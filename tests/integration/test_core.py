"""The core against a real Synapse: requests, the safe index, refusals, push on join, restart."""

from __future__ import annotations

import asyncio

from harness.client import eventually

NO_PUSH = {"push_on_join": False}


async def test_newcomer_asks_for_the_name_and_reads_it(world, bot_database) -> None:
    bot = await world.bot(database=bot_database, config=NO_PUSH)
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    name = await world.set_name(admin, bot, room, "Project Nightingale")

    newcomer = await world.member("newcomer", admin, room)
    assert (await newcomer.read_state(room)).undecryptable == ["m.room.name:"]

    # No sender_key: it is deprecated and today's clients omit it.
    await newcomer.request_key(room, name.session_id, bot.user_id, [bot.device_id])
    await eventually(lambda: newcomer.has_session(room, name.session_id))
    state = await newcomer.read_state(room)
    assert state.get("m.room.name") == {"name": "Project Nightingale"}

    rows = await world.audit(bot, room)
    shares = [r for r in rows if r.decision == "share"]
    assert [(r.user_id, r.device_id, r.msg_index, r.trigger) for r in shares] == [
        (newcomer.user_id, newcomer.device_id, 0, "request")
    ]


async def test_export_from_the_safe_index_seals_the_old_topic(world) -> None:
    bot = await world.bot(config=NO_PUSH)
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    await admin.new_session(room)
    old = await admin.send_state(room, "m.room.topic", "", {"topic": "old"})
    name = await admin.send_state(room, "m.room.name", "", {"name": "Nightingale"})
    new = await admin.send_state(room, "m.room.topic", "", {"topic": "new"})
    assert old.session_id == name.session_id == new.session_id
    assert (old.index, name.index, new.index) == (0, 1, 2)
    await world.wait_valid(bot, new.event_id)

    newcomer = await world.member("newcomer", admin, room)
    await newcomer.request_key(room, name.session_id, bot.user_id, [bot.device_id])
    await eventually(lambda: newcomer.has_session(room, name.session_id))

    assert await newcomer.session_first_index(room, name.session_id) == 1
    state = await newcomer.read_state(room)
    assert state.get("m.room.name") == {"name": "Nightingale"}
    assert state.get("m.room.topic") == {"topic": "new"}
    assert await newcomer.try_decrypt(room, old.session_id, old.ciphertext) is None
    # the bot itself could read it: the seal is the export index, not a missing key
    rows = await world.audit(bot, room)
    assert [r.msg_index for r in rows if r.decision == "share"] == [1]


async def test_exposure_no_index_can_avoid_is_shared_and_audited(world) -> None:
    bot = await world.bot(config=NO_PUSH)
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    await admin.new_session(room)
    name = await admin.send_state(room, "m.room.name", "", {"name": "Nightingale"})
    old = await admin.send_state(room, "m.room.topic", "", {"topic": "old"})
    new = await admin.send_state(room, "m.room.topic", "", {"topic": "new"})
    await world.wait_valid(bot, new.event_id)

    newcomer = await world.member("newcomer", admin, room)
    await newcomer.request_key(room, name.session_id, bot.user_id, [bot.device_id])
    await eventually(lambda: newcomer.has_session(room, name.session_id))
    assert await newcomer.session_first_index(room, name.session_id) == 0
    assert await newcomer.try_decrypt(room, old.session_id, old.ciphertext) is not None

    shares = [r for r in await world.audit(bot, room) if r.decision == "share"]
    assert len(shares) == 1 and shares[0].msg_index == 0
    assert shares[0].exposed == (old.event_id,)


async def test_a_session_that_encrypted_messages_is_refused(world) -> None:
    bot = await world.bot(config=NO_PUSH)
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    await admin.new_session(room)
    name = await admin.send_state(room, "m.room.name", "", {"name": "Nightingale"})
    msg = await admin.send_message(room, "the plan is to meet at noon")
    assert msg.session_id == name.session_id
    await world.wait_valid(bot, name.event_id)

    async def mixed() -> bool:
        store = await world.store(bot)
        return any(m.event_id == msg.event_id for m in await store.load_messages())

    await eventually(mixed)

    newcomer = await world.member("newcomer", admin, room)
    await newcomer.request_key(room, name.session_id, bot.user_id, [bot.device_id])
    await eventually(lambda: newcomer.withheld_for(name.session_id))
    withheld = newcomer.withheld_for(name.session_id)[0]
    assert withheld["code"] == "m.unauthorised"
    assert "messages" in withheld["reason"]
    await asyncio.sleep(1)
    assert not await newcomer.has_session(room, name.session_id)


async def test_a_non_member_is_refused(world) -> None:
    bot = await world.bot(config=NO_PUSH)
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    name = await world.set_name(admin, bot, room, "Nightingale")

    outsider = await world.user("outsider")
    await outsider.request_key(room, name.session_id, bot.user_id, [bot.device_id])
    await eventually(lambda: outsider.withheld_for(name.session_id))
    assert outsider.withheld_for(name.session_id)[0]["code"] == "m.unauthorised"
    await asyncio.sleep(1)
    assert not await outsider.has_session(room, name.session_id)


async def test_at_default_power_nothing_is_sent(world) -> None:
    bot = await world.bot()
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot, bot_level=0)
    name = await world.set_name(admin, bot, room, "Nightingale")

    newcomer = await world.member("newcomer", admin, room)
    await newcomer.request_key(room, name.session_id, bot.user_id, [bot.device_id])

    async def decided() -> list:
        rows = await world.audit(bot, room)
        return [r for r in rows if r.trigger == "request"]

    rows = await eventually(decided)
    assert rows[0].decision == "ignore" and "power level" in rows[0].reason
    joins = [r for r in await world.audit(bot, room) if r.trigger == "join"]
    assert joins and all(r.decision == "ignore" for r in joins)
    await asyncio.sleep(1)
    assert not await newcomer.has_session(room, name.session_id)
    assert newcomer.withheld == []


async def test_push_on_join_reaches_a_newcomer_who_never_asks(world) -> None:
    bot = await world.bot()
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    name = await admin.send_state(room, "m.room.name", "", {"name": "Nightingale"})
    await admin.new_session(room)
    topic = await admin.send_state(room, "m.room.topic", "", {"topic": "birds"})
    await world.wait_valid(bot, topic.event_id)

    newcomer = await world.member("newcomer", admin, room)

    async def readable() -> bool:
        state = await newcomer.read_state(room)
        return state.get("m.room.name") is not None and state.get("m.room.topic") is not None

    await eventually(readable)
    assert newcomer.forwarded_for(name.session_id)[0]["sender"] == bot.user_id
    shares = [r for r in await world.audit(bot, room) if r.decision == "share"]
    assert {(r.session_id, r.trigger) for r in shares} == {
        (name.session_id, "join"),
        (topic.session_id, "join"),
    }


async def test_ledger_survives_a_restart_and_the_bot_still_answers(world, bot_database) -> None:
    bot = await world.bot(database=bot_database, config=NO_PUSH)
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    name = await world.set_name(admin, bot, room, "Nightingale")
    store = await world.store(bot)
    before = sorted((r.event_id, r.status, r.msg_index) for r in await store.load_states())

    bot.stop()
    # While the bot is down a new session carries the topic; its m.room_key waits for the bot
    # in the one sync maubot ignores after a start. The bot keeps it if it sees that sync in
    # time, and otherwise asks the room's empowered members for it (self-supply).
    admin.answer_key_requests()
    await admin.new_session(room)
    topic = await admin.send_state(room, "m.room.topic", "", {"topic": "birds"})
    bot.start()
    await bot.wait_ready()
    await world.wait_valid(bot, topic.event_id)
    after = sorted((r.event_id, r.status, r.msg_index) for r in await store.load_states())
    assert set(before) <= set(after)

    newcomer = await world.member("newcomer", admin, room)
    for sent in (name, topic):
        await newcomer.request_key(room, sent.session_id, bot.user_id, [bot.device_id])
    await eventually(lambda: newcomer.has_session(room, topic.session_id))
    await eventually(lambda: newcomer.has_session(room, name.session_id))
    state = await newcomer.read_state(room)
    assert state.get("m.room.name") == {"name": "Nightingale"}
    assert state.get("m.room.topic") == {"topic": "birds"}


async def test_self_supply_fetches_state_the_bot_cannot_decrypt(world) -> None:
    bot = await world.bot(config=NO_PUSH)
    admin = await world.user("admin")
    admin.answer_key_requests()
    room = await admin.create_room(power={bot.user_id: 50})
    name = await admin.send_state(room, "m.room.name", "", {"name": "Nightingale"})
    # The bot joins after the name was encrypted: nobody shared the session with it.
    await admin.invite(room, bot.user_id)
    await world.wait_joined(admin, room, bot.user_id)
    await bot.wait_for_log(r"Missing 1 state session\(s\) in 1 room\(s\); asking for them")
    await world.wait_valid(bot, name.event_id)
    assert "m.room_key_request" in admin.to_device_types

    newcomer = await world.member("newcomer", admin, room)
    await newcomer.request_key(room, name.session_id, bot.user_id, [bot.device_id])
    await eventually(lambda: newcomer.has_session(room, name.session_id))
    assert (await newcomer.read_state(room)).get("m.room.name") == {"name": "Nightingale"}


async def test_a_request_waits_for_the_key_and_a_cancellation_voids_it(world) -> None:
    bot = await world.bot(config={**NO_PUSH, "self_supply": {"enabled": False}})
    admin = await world.user("admin")
    room = await admin.create_room(power={bot.user_id: 50})
    name = await admin.send_state(room, "m.room.name", "", {"name": "Nightingale"})
    await admin.invite(room, bot.user_id)
    await world.wait_joined(admin, room, bot.user_id)
    await world.wait_valid(bot, name.event_id, status="pending")

    patient = await world.user("patient")
    quitter = await world.user("quitter")
    request_ids = {}
    for user in (patient, quitter):
        await admin.invite(room, user.user_id)
        await user.join(room)
        request_ids[user.user_id] = await user.request_key(
            room, name.session_id, bot.user_id, [bot.device_id]
        )
    for user in (patient, quitter):
        await eventually(lambda u=user: u.withheld_for(name.session_id))
        assert user.withheld_for(name.session_id)[0]["code"] == "m.unavailable"
    await quitter.cancel_request(request_ids[quitter.user_id], bot.user_id, [bot.device_id])
    await bot.wait_for_log(f"Request {request_ids[quitter.user_id]} .* cancelled")

    # Now someone hands the bot the session: it answers the request still standing.
    await admin.forward_key_to(room, name.session_id, bot.user_id, bot.device_id)
    await eventually(lambda: patient.has_session(room, name.session_id))
    await asyncio.sleep(2)
    assert not await quitter.has_session(room, name.session_id)


async def test_duplicate_requests_get_one_answer(world) -> None:
    bot = await world.bot(config=NO_PUSH)
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    name = await world.set_name(admin, bot, room, "Nightingale")
    newcomer = await world.member("newcomer", admin, room)
    request_id = await newcomer.request_key(room, name.session_id, bot.user_id, [bot.device_id])
    await newcomer.request_key(
        room, name.session_id, bot.user_id, [bot.device_id], request_id=request_id
    )
    await newcomer.request_key(room, name.session_id, bot.user_id, [bot.device_id])
    await eventually(lambda: newcomer.has_session(room, name.session_id))
    await asyncio.sleep(2)
    rows = await world.audit(bot, room, user_id=newcomer.user_id)
    assert [r.decision for r in rows if r.decision == "share"] == ["share"]
    assert len(newcomer.forwarded_for(name.session_id)) == 1
