"""Reaching Element users: room key bundles (MSC4268) from the bot as inviter, checked with
Element's own client engine (matrix-js-sdk with its Rust crypto, headless in Node)."""

from __future__ import annotations

import json

from mautrix.api import Method, Path
from mautrix.crypto.attachments import decrypt_attachment
from mautrix.types import EncryptedFile
import olm
import pytest

from harness.client import eventually

BUNDLE = "io.element.msc4268.room_key_bundle"
CROSS_SIGNED = {"cross_signing": {"bootstrap": True}, "push_on_join": False}
SEALED = {**CROSS_SIGNED, "seal": {"enabled": True}}

pytestmark = pytest.mark.db_agnostic


async def wait_message(world, bot, event_id: str) -> None:
    store = await world.store(bot)

    async def decrypted() -> bool:
        return any(
            m.event_id == event_id and m.status.value == "message"
            for m in await store.load_messages()
        )

    await eventually(decrypted)


async def name_as_element_shows_it(peer, room: str) -> dict:
    """The room state once the name reads as "Nightingale": live, or, when the bundle's keys
    came in after the join's sync had already failed on the name (a matrix-js-sdk race, see the
    README), after the client reloads on the same device and crypto store, as Element does."""
    state = await peer.call("wait_name", room=room, name="Nightingale", seconds=30)
    if state.get("readIn") == "fresh decryption" and state["readableName"] == "Nightingale":
        await peer.call("reload", room=room, timeout=120)
        state = await peer.call("wait_name", room=room, name="Nightingale", seconds=30, live=True)
        state["readIn"] = "room state after a reload"
    return state


async def named_room(world, bot, admin, **kwargs):
    room = await world.room_with_bot(admin, bot, **kwargs)
    await admin.set_power(room, {bot.user_id: 50})
    await admin.new_session(room)
    name = await world.set_name(admin, bot, room, "Nightingale")
    await bot.wait_for_log("This device is cross-signed|Created a cross-signing identity")
    return room, name


async def seals_of(world, bot, room: str, count: int) -> list:
    """Until the bot has sent ``count`` seals in the room; returns them."""
    store = await world.store(bot)

    async def sent() -> list:
        seals = [s for s in await store.seals() if s.room_id == room and s.event_id]
        return seals if len(seals) >= count else []

    return await eventually(sent, timeout=30)


async def mixed_topic(world, bot, admin, room: str):
    """A topic in a fresh session that also carries a message, both seen by the bot."""
    await admin.new_session(room)
    topic = await admin.send_state(room, "m.room.topic", "", {"topic": "plans"})
    chat = await admin.send_message(room, "a message in the topic's session")
    await world.wait_valid(bot, topic.event_id)
    await wait_message(world, bot, chat.event_id)
    return topic


async def test_an_element_user_invited_by_the_bot_reads_the_name(world, js) -> None:
    bot = await world.bot(config=SEALED)
    admin = await world.user("admin")
    room, _ = await named_room(world, bot, admin)
    # the topic shares its session with a message: the bundle carries the seals, never it
    await mixed_topic(world, bot, admin, room)
    await seals_of(world, bot, room, 2)
    peer = await js("element")
    reply = await admin.command(room, f"!encstate invite {peer.user_id}", bot.user_id)
    assert "2 session(s)" in reply and "1 cross-signed device(s)" in reply
    await peer.call("wait_invite", room=room)
    await peer.call("join", room=room)
    state = await name_as_element_shows_it(peer, room)
    print("name read in", state["readIn"])
    assert state["name"] == "Nightingale", (state, peer.log_tail())


async def test_an_element_user_whose_knock_the_bot_approves_reads_the_name(world, js) -> None:
    bot = await world.bot(config={**SEALED, "approve_knocks": True})
    admin = await world.user("admin")
    room, _ = await named_room(world, bot, admin, join_rule={"join_rule": "knock"})
    await seals_of(world, bot, room, 1)
    peer = await js("knocker")
    await peer.call("knock", room=room)
    invited = await peer.call("wait_invite", room=room, seconds=30)
    assert invited["membership"] == "invite", peer.log_tail()
    await peer.call("join", room=room)
    state = await name_as_element_shows_it(peer, room)
    print("name read in", state["readIn"])
    assert state["name"] == "Nightingale", (state, peer.log_tail())


async def test_without_seals_an_invitee_of_the_admin_sees_ciphertext(world, js) -> None:
    """The control: with sealing off nothing reaches an Element invitee (the bot never hands
    anyone else's session to someone who is not joined)."""
    bot = await world.bot(config=CROSS_SIGNED)
    admin = await world.user("admin")
    room, _ = await named_room(world, bot, admin)
    peer = await js("control")
    await admin.invite(room, peer.user_id)  # the admin invites: no bundle from the bot
    await peer.call("wait_invite", room=room)
    await peer.call("join", room=room)
    state = await peer.call("wait_name", room=room, name="Nightingale", seconds=8)
    assert state["readableName"] is None and state["name"] != "Nightingale", state


async def bundle_for(invitee, bot) -> dict:
    def pointer() -> dict | None:
        for plaintext in invitee.olm_plaintexts:
            if plaintext.get("type") == BUNDLE and plaintext.get("sender") == bot.user_id:
                return plaintext
        return None

    found = await eventually(pointer)
    file = EncryptedFile.deserialize(found["content"]["file"])
    ciphertext = await invitee.client.download_media(file.url)
    return json.loads(decrypt_attachment(ciphertext, file.key.key, file.hashes["sha256"], file.iv))


async def test_the_bundle_carries_seals_only_and_every_message_carries_device_keys(world) -> None:
    bot = await world.bot(config=SEALED)
    admin = await world.user("admin")
    room, name = await named_room(world, bot, admin)
    topic = await mixed_topic(world, bot, admin, room)
    seals = {s.session_id: s for s in await seals_of(world, bot, room, 2)}

    invitee = await world.user("invitee")
    await invitee.crypto.generate_recovery_key()  # bundles go to cross-signed devices only
    await admin.command(room, f"!encstate invite {invitee.user_id}", bot.user_id)
    contents = await bundle_for(invitee, bot)
    assert {k["session_id"] for k in contents["room_keys"]} == set(seals)
    for key in contents["room_keys"]:
        seal = seals[key["session_id"]]
        exported = olm.InboundGroupSession.import_session(key["session_key"])
        assert exported.first_known_index == 0 and key["shared_history"] is True
        state = await admin.client.api.request(
            Method.GET, Path.v3.rooms[room].event[seal.event_id]
        )
        payload = json.loads(exported.decrypt(state["content"]["ciphertext"])[0])
        assert payload["type"] == seal.inner_type
    # the topic's own session (it also carries a message) reaches the invitee in no form
    await invitee.join(room)

    async def holds_seals() -> bool:
        return all([await invitee.has_session(room, s) for s in seals])

    await eventually(holds_seals)
    assert not await invitee.has_session(room, topic.session_id)
    assert not await invitee.has_session(room, name.session_id)

    # every Olm message from the bot carries its device keys, self-signed and cross-signed
    from_bot = [p for p in invitee.olm_plaintexts if p.get("sender") == bot.user_id]
    assert {p["type"] for p in from_bot} >= {BUNDLE, "m.room_key_bundle", "m.room_key"}
    for plaintext in from_bot:
        keys = plaintext["sender_device_keys"]
        assert keys["user_id"] == bot.user_id and keys["device_id"] == bot.device_id
        assert keys["keys"][f"ed25519:{bot.device_id}"] == plaintext["keys"]["ed25519"]
        assert keys["keys"][f"curve25519:{bot.device_id}"] == plaintext["_sender_key"]
        signatures = keys["signatures"][bot.user_id]
        unsigned = {k: v for k, v in keys.items() if k not in ("signatures", "unsigned")}
        canonical = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        olm.ed25519_verify(
            plaintext["keys"]["ed25519"], canonical, signatures[f"ed25519:{bot.device_id}"]
        )
        assert len(signatures) == 2, "no cross-signing signature"


async def test_without_seals_the_bundle_carries_nobody_elses_session(world) -> None:
    bot = await world.bot(config=CROSS_SIGNED)
    admin = await world.user("admin")
    room, name = await named_room(world, bot, admin)
    invitee = await world.user("invitee")
    await invitee.crypto.generate_recovery_key()
    reply = await admin.command(room, f"!encstate invite {invitee.user_id}", bot.user_id)
    assert "0 session(s), 1 withheld" in reply
    contents = await bundle_for(invitee, bot)
    assert contents["room_keys"] == []
    assert [w["session_id"] for w in contents["withheld"]] == [name.session_id]
    assert "only to joined members" in contents["withheld"][0]["reason"]


async def test_an_element_member_reads_the_resealed_name_live(world, js) -> None:
    """With sealing off in the config, an admin's `seal now` hands the new session to members as
    the bot's own m.room_key, before the state: Element's engine takes that key and shows the
    sealed name without a reload."""
    bot = await world.bot(config={"push_on_join": False})
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    await admin.new_session(room)
    await world.set_name(admin, bot, room, "Nightingale")
    chat = await admin.send_message(room, "a message in the name's session")  # mixed
    await wait_message(world, bot, chat.event_id)
    peer = await js("member")
    await admin.invite(room, peer.user_id)
    await peer.call("wait_invite", room=room)
    await peer.call("join", room=room)
    await world.wait_joined(admin, room, peer.user_id)
    before = await peer.call("room", room=room)
    assert before["nameState"] != "Nightingale", before  # the admin's session never reached it
    await admin.command(room, "!encstate seal now", bot.user_id)
    await admin.wait_for_edit(bot.user_id, room, "Sealed 1 value(s)")
    state = await peer.call("wait_name", room=room, name="Nightingale", seconds=30, live=True)
    assert state["nameState"] == "Nightingale" and state["readIn"] == "room state", (
        state,
        peer.log_tail(),
    )
