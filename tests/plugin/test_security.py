"""Findings of the security review that live in the command wiring, through maubot.testing.
Each failed before its fix."""

from __future__ import annotations

from mautrix.types import TrustState

from .test_commands import ADMIN, BOT, ENCRYPTED, MEMBER, ROOM, run, setup_room

MOD = "@mod:example.org"


async def levels(plugin, **extra) -> None:
    await plugin.tracker.apply_plain_state(
        ROOM,
        {
            "type": "m.room.power_levels",
            "state_key": "",
            "content": {"users": {ADMIN: 100, BOT: 50, MOD: 50}, "users_default": 0, **extra},
        },
    )


async def test_finding_06_state_is_for_admins_only(maubot_test_bot, maubot_plugin) -> None:
    await setup_room(maubot_plugin)
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate state", sender=MEMBER)
    assert body.startswith("Sorry, state is for room admins")


async def test_finding_11_invite_needs_the_rooms_invite_level(
    maubot_test_bot, maubot_plugin
) -> None:
    await setup_room(maubot_plugin)
    await levels(maubot_plugin, invite=100)
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate invite @x:example.org", MOD)
    assert "invite power level 100" in body and "you have 50" in body
    # configured admins do not lend the bot's power to someone below the room's level
    maubot_plugin.config["admins"] = [MOD]
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate invite @x:example.org", MOD)
    assert "invite power level 100" in body


async def test_finding_11_reseal_needs_the_power_to_send_the_state(
    maubot_test_bot, maubot_plugin
) -> None:
    from .test_commands import record

    await setup_room(maubot_plugin)
    await levels(maubot_plugin, events={"m.room.name": 100})
    ledger = maubot_plugin.tracker.ledger(ROOM)
    ledger.add_state(record("$n", "S", 0))
    from encstate_bot.ledger import MessageRecord, MessageStatus

    ledger.add_message(MessageRecord(ROOM, "$m", "S", 1, None, MessageStatus.MESSAGE))
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate reseal", MOD)
    assert "takes power level 100; you have 50" in body


async def test_finding_12_replies_mention_nobody(maubot_test_bot, maubot_plugin) -> None:
    await setup_room(maubot_plugin)
    await run(maubot_test_bot, maubot_plugin, "!encstate log @room")
    content = maubot_test_bot.responded[-1].content
    assert content["m.mentions"] == {}
    assert content.serialize()["m.mentions"] == {}


async def test_finding_13_plaintext_commands_in_an_encrypted_room_are_not_obeyed(
    maubot_test_bot, maubot_plugin
) -> None:
    await setup_room(maubot_plugin)
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate policy off", origin=None)
    assert "must be sent encrypted" in body
    assert maubot_plugin.policies.get(ROOM).mode.value == "members"


async def test_finding_13_commands_count_only_from_a_device_of_the_sender(
    maubot_test_bot, maubot_plugin
) -> None:
    await setup_room(maubot_plugin)
    for trust in (TrustState.UNKNOWN_DEVICE, TrustState.FORWARDED, TrustState.BLACKLISTED):
        origin = {**ENCRYPTED, "trust_state": trust}
        body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate policy off", origin=origin)
        assert "did not act" in body, trust
    forwarded = {**ENCRYPTED, "forwarded_keys": True, "trust_state": TrustState.VERIFIED}
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate policy off", origin=forwarded)
    assert "did not act" in body
    assert maubot_plugin.policies.get(ROOM).mode.value == "members"


async def test_finding_13_under_cross_signed_only_cross_signed_devices_command(
    maubot_test_bot, maubot_plugin
) -> None:
    await setup_room(maubot_plugin)
    await run(maubot_test_bot, maubot_plugin, "!encstate policy cross-signed")
    for trust in (TrustState.UNVERIFIED, TrustState.CROSS_SIGNED_UNTRUSTED):
        origin = {**ENCRYPTED, "trust_state": trust}
        body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate policy off", origin=origin)
        assert "only from cross-signed devices" in body, trust
    assert maubot_plugin.policies.get(ROOM).mode.value == "cross-signed"
    origin = {**ENCRYPTED, "trust_state": TrustState.CROSS_SIGNED_TOFU}
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate policy off", origin=origin)
    assert "nobody (off)" in body


async def test_commands_in_an_unencrypted_room_need_no_encryption(
    maubot_test_bot, maubot_plugin
) -> None:
    await levels(maubot_plugin)  # the room's state is read: no m.room.encryption
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate help", origin=None)
    assert "encstate commands" in body


async def test_finding_13_the_gate_fails_closed_before_the_rooms_state_is_read(
    maubot_test_bot, maubot_plugin
) -> None:
    # After a start, before the rescan reads the room (or when reading it failed), a plaintext
    # command must not be obeyed: the room may well be encrypted.
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate policy off", origin=None)
    assert "must be sent encrypted" in body
    assert maubot_plugin.policies.get(ROOM).mode.value == "members"


async def test_finding_08_no_bundle_keys_while_the_rooms_events_are_unrecorded(
    maubot_test_bot, maubot_plugin
) -> None:
    from .test_commands import record

    await setup_room(maubot_plugin)
    maubot_plugin.tracker.ledger(ROOM).add_state(record("$n", "S", 0))
    maubot_plugin.tracker.backlog[ROOM] = [([], True)]
    assert await maubot_plugin.bundles.contents(ROOM, MEMBER) == ([], [])
