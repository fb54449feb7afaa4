"""Reaching Element users: room key bundles (MSC4268) from the bot as inviter, checked with
Element's own client engine (matrix-js-sdk with its Rust crypto, headless in Node)."""

from __future__ import annotations

import json

from mautrix.crypto.attachments import decrypt_attachment
from mautrix.types import EncryptedFile
import olm
import pytest

from harness.client import eventually

BUNDLE = "io.element.msc4268.room_key_bundle"
CROSS_SIGNED = {"cross_signing": {"bootstrap": True}, "push_on_join": False}

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


async def mixed_topic(world, bot, admin, room: str):
    """A topic in a fresh session that also carries a message, both seen by the bot."""
    await admin.new_session(room)
    topic = await admin.send_state(room, "m.room.topic", "", {"topic": "plans"})
    chat = await admin.send_message(room, "a message in the topic's session")
    await world.wait_valid(bot, topic.event_id)
    await wait_message(world, bot, chat.event_id)
    return topic


async def test_an_element_user_invited_by_the_bot_reads_the_name(world, js) -> None:
    bot = await world.bot(config=CROSS_SIGNED)
    admin = await world.user("admin")
    room, _ = await named_room(world, bot, admin)
    # the bundle lists the mixed topic session as withheld; the Rust crypto must take the rest
    await mixed_topic(world, bot, admin, room)
    peer = await js("element")
    reply = await admin.command(room, f"!encstate invite {peer.user_id}", bot.user_id)
    assert "1 session(s), 1 withheld" in reply and "1 cross-signed device(s)" in reply
    await peer.call("wait_invite", room=room)
    await peer.call("join", room=room)
    state = await name_as_element_shows_it(peer, room)
    print("name read in", state["readIn"])
    assert state["name"] == "Nightingale", (state, peer.log_tail())


async def test_an_element_user_whose_knock_the_bot_approves_reads_the_name(world, js) -> None:
    bot = await world.bot(config={**CROSS_SIGNED, "approve_knocks": True})
    admin = await world.user("admin")
    room, _ = await named_room(world, bot, admin, join_rule={"join_rule": "knock"})
    peer = await js("knocker")
    await peer.call("knock", room=room)
    invited = await peer.call("wait_invite", room=room, seconds=30)
    assert invited["membership"] == "invite", peer.log_tail()
    await peer.call("join", room=room)
    state = await name_as_element_shows_it(peer, room)
    print("name read in", state["readIn"])
    assert state["name"] == "Nightingale", (state, peer.log_tail())


async def test_without_the_bundle_the_name_stays_encrypted(world, js) -> None:
    bot = await world.bot(config=CROSS_SIGNED)
    admin = await world.user("admin")
    room, _ = await named_room(world, bot, admin)
    peer = await js("control")
    await admin.invite(room, peer.user_id)  # the admin invites: no bundle from the bot
    await peer.call("wait_invite", room=room)
    await peer.call("join", room=room)
    state = await peer.call("wait_name", room=room, name="Nightingale", seconds=8)
    assert state["readableName"] is None and state["name"] != "Nightingale", state


async def test_the_bundle_withholds_mixed_sessions_and_every_message_carries_device_keys(
    world,
) -> None:
    bot = await world.bot(config=CROSS_SIGNED)
    admin = await world.user("admin")
    room, name = await named_room(world, bot, admin)
    topic = await mixed_topic(world, bot, admin, room)

    invitee = await world.user("invitee")
    await invitee.crypto.generate_recovery_key()  # bundles go to cross-signed devices only
    await admin.command(room, f"!encstate invite {invitee.user_id}", bot.user_id)

    def bundle() -> dict | None:
        for plaintext in invitee.olm_plaintexts:
            if plaintext.get("type") == BUNDLE and plaintext.get("sender") == bot.user_id:
                return plaintext
        return None

    pointer = await eventually(bundle)
    file = EncryptedFile.deserialize(pointer["content"]["file"])
    ciphertext = await invitee.client.download_media(file.url)
    contents = json.loads(
        decrypt_attachment(ciphertext, file.key.key, file.hashes["sha256"], file.iv)
    )
    assert [k["session_id"] for k in contents["room_keys"]] == [name.session_id]
    assert [w["session_id"] for w in contents["withheld"]] == [topic.session_id]
    assert "messages" in contents["withheld"][0]["reason"]
    exported = olm.InboundGroupSession.import_session(contents["room_keys"][0]["session_key"])
    assert json.loads(exported.decrypt(name.ciphertext)[0])["content"] == {"name": "Nightingale"}

    # The invite also queued forwarded keys; reseal-style room keys and withheld notices aside,
    # every Olm message from the bot carries its device keys, self-signed and cross-signed.
    await invitee.join(room)
    await eventually(lambda: invitee.has_session(room, name.session_id))
    from_bot = [p for p in invitee.olm_plaintexts if p.get("sender") == bot.user_id]
    assert {p["type"] for p in from_bot} >= {BUNDLE, "m.room_key_bundle", "m.forwarded_room_key"}
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


async def test_an_element_member_reads_the_resealed_name_live(world, js) -> None:
    """Reseal hands its new sessions to members as the bot's own m.room_key, before the state:
    Element's engine takes that key and shows the resealed name without a reload."""
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
    await admin.command(room, "!encstate reseal", bot.user_id)
    await admin.wait_for_edit(bot.user_id, room, "Resealed 1 value(s)")
    state = await peer.call("wait_name", room=room, name="Nightingale", seconds=30, live=True)
    assert state["nameState"] == "Nightingale" and state["readIn"] == "room state", (
        state,
        peer.log_tail(),
    )
