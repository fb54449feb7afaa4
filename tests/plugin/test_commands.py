"""!encstate through maubot.testing: parsing, permissions, rendering."""

from __future__ import annotations

import time
import uuid

from maubot.matrix import MaubotMessageEvent
from maubot.testing.bot import make_message
from mautrix.types import EventType, TrustState
import pytest

from encstate_bot.ledger import MessageRecord, MessageStatus, StateRecord, Status

ROOM = "!room:example.org"
ADMIN = "@admin:example.org"
MEMBER = "@member:example.org"
BOT = "@encstate:example.org"


async def setup_room(plugin, bot_level: int = 50) -> None:
    tracker = plugin.tracker
    for raw in (
        {
            "type": "m.room.create",
            "state_key": "",
            "sender": ADMIN,
            "content": {"room_version": "10"},
        },
        {
            "type": "m.room.power_levels",
            "state_key": "",
            "content": {"users": {ADMIN: 100, BOT: bot_level}, "users_default": 0},
        },
        {
            "type": "m.room.encryption",
            "state_key": "",
            "content": {
                "algorithm": "m.megolm.v1.aes-sha2",
                "io.element.msc4362.encrypt_state_events": True,
            },
        },
    ):
        await tracker.apply_plain_state(ROOM, raw)


def record(event_id, session, index, event_type="m.room.name", ts=1000, **kw) -> StateRecord:
    return StateRecord(
        room_id=ROOM,
        event_id=event_id,
        outer_key=f"{event_type}:",
        session_id=session,
        sender=ADMIN,
        origin_ts=ts,
        msg_index=index,
        ciphertext="c",
        status=kw.pop("status", Status.VALID),
        inner_type=event_type,
        inner_key="",
        **kw,
    )


ENCRYPTED = {"was_encrypted": True, "trust_state": TrustState.UNVERIFIED, "forwarded_keys": False}


async def send(
    bot, plugin, text: str, sender: str = ADMIN, origin: dict | None = ENCRYPTED
) -> None:
    """Dispatch a message as mautrix does after decrypting it. ``origin``: how it arrived, as
    the plugin would work it out from its megolm session (None: a plaintext message); the
    maubot test bot has no crypto, so the test says it."""
    event = make_message(text, room_id=ROOM, sender=sender)
    event.event_id = f"$cmd{uuid.uuid4().hex}"

    async def command_origin(room_id, event_id, user_id):
        assert event_id == event.event_id and user_id == sender
        return origin

    plugin.gate.command_origin = command_origin
    await bot.dispatch(EventType.ROOM_MESSAGE, MaubotMessageEvent(event, bot.client))


async def run(bot, plugin, text: str, sender: str = ADMIN, origin: dict | None = ENCRYPTED):
    bot.responded.clear()
    await send(bot, plugin, text, sender, origin)
    assert bot.responded, f"no reply to {text!r}"
    content = bot.responded[-1].content
    return content.body, content.formatted_body


async def test_help_lists_every_command(maubot_test_bot, maubot_plugin) -> None:
    body, html = await run(maubot_test_bot, maubot_plugin, "!encstate help")
    for name in ("status", "audit", "links", "share", "log", "policy", "state", "seal now"):
        assert f"!encstate {name}" in body
    assert "<table>" in html and "<th>command</th>" in html
    # the plain body is a readable table too
    assert "command" in body.splitlines()[2] and "---" in body


async def test_no_arguments_shows_help(maubot_test_bot, maubot_plugin) -> None:
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate")
    assert "encstate commands" in body


async def test_unknown_command(maubot_test_bot, maubot_plugin) -> None:
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate frobnicate")
    assert "Unknown command 'frobnicate'" in body


async def test_status_says_when_the_bot_is_not_empowered(maubot_test_bot, maubot_plugin):
    await setup_room(maubot_plugin, bot_level=0)
    body, html = await run(maubot_test_bot, maubot_plugin, "!encstate status")
    assert "NOT empowered" in body and "above 0" in body
    assert "on (io.element.msc4362.encrypt_state_events)" in body
    assert "<li><strong>Bot power level</strong>" in html
    await setup_room(maubot_plugin, bot_level=50)
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate status")
    assert "50 > users_default 0: empowered" in body


async def test_changing_commands_need_state_default(maubot_test_bot, maubot_plugin) -> None:
    await setup_room(maubot_plugin)
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate policy off", sender=MEMBER)
    assert body.startswith("Sorry, policy is for room admins (power level 50")
    assert maubot_plugin.policies.get(ROOM).mode.value == "members"
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate policy off")
    assert "Policy updated" in body and "nobody (off)" in body
    assert maubot_plugin.policies.get(ROOM).mode.value == "off"
    (row,) = await maubot_plugin.store.rooms()
    assert row.mode == "off"


async def test_configured_admins_may_change_anywhere(maubot_test_bot, maubot_plugin) -> None:
    await setup_room(maubot_plugin)
    maubot_plugin.config["admins"] = [MEMBER]
    body, _ = await run(
        maubot_test_bot, maubot_plugin, "!encstate policy cross-signed", sender=MEMBER
    )
    assert "only cross-signed devices" in body


async def test_read_only_commands_can_be_restricted(maubot_test_bot, maubot_plugin) -> None:
    await setup_room(maubot_plugin)
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate status", sender=MEMBER)
    assert "Bot power level" in body
    maubot_plugin.config["read_only_commands"] = "admins"
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate status", sender=MEMBER)
    assert body.startswith("Sorry, status is for room admins")


async def test_policy_flags_and_usage_errors(maubot_test_bot, maubot_plugin) -> None:
    await setup_room(maubot_plugin)
    body, _ = await run(
        maubot_test_bot, maubot_plugin, "!encstate policy --invited on --dry-run on"
    )
    assert "get every seal, as members do" in body and "sends nothing" in body
    policy = maubot_plugin.policies.get(ROOM)
    assert policy.share_with_invited and policy.dry_run and policy.mode.value == "members"
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate policy --invited maybe")
    assert "--invited takes on or off" in body
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate policy sometimes")
    assert "unknown policy 'sometimes'" in body
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate policy")
    assert body.startswith("**Policy in force**")


async def test_log_parses_its_count(maubot_test_bot, maubot_plugin) -> None:
    await setup_room(maubot_plugin)
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate log many")
    assert "log takes a number" in body
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate log 5")
    assert "No decisions yet" in body


async def test_audit_reports_each_kind_of_exposure(maubot_test_bot, maubot_plugin) -> None:
    await setup_room(maubot_plugin)
    ledger = maubot_plugin.tracker.ledger(ROOM)
    ledger.add_state(record("$mixname", "MIXED", 0))
    ledger.add_message(MessageRecord(ROOM, "$msg", "MIXED", 1, None, MessageStatus.MESSAGE))
    ledger.add_state(record("$name", "EXPOSED", 0, "m.room.avatar", ts=1))
    ledger.add_state(record("$oldtopic", "EXPOSED", 1, "m.room.topic", ts=2))
    ledger.add_state(record("$newtopic", "EXPOSED", 2, "m.room.topic", ts=3))
    ledger.add_state(
        record(
            "$bad",
            "BAD",
            0,
            status=Status.INVALID,
            reason="packed state key does not match the payload's type and state_key",
        )
    )
    ledger.add_state(
        record(
            "$weak",
            "WEAK",
            0,
            "m.room.topic",
            status=Status.INVALID,
            reason="sender's power level 0 is below 50 for m.room.topic",
        )
    )
    far = int(time.time() * 1000) + 10**12
    ledger.add_state(record("$pin", "PIN", 0, "m.custom.thing", ts=far))
    ledger.add_state(record("$wait", "WAIT", 0, "m.custom.other", status=Status.PENDING))
    body, html = await run(maubot_test_bot, maubot_plugin, "!encstate audit")
    assert "Sessions that encrypt state and messages" in body and "1 message(s)" in body
    assert "Superseded values still readable" in body and "$oldtopic" in body
    assert "Invalid encrypted state" in body and "packed state key" in body
    assert "lacked the power level" in body and "below 50" in body
    assert "Far-future timestamps" in body and "$pin" in body
    assert "cannot supply" in body and "WAIT" in body
    assert "!encstate seal now" in body
    assert html.count("<table>") >= 4


async def test_audit_of_a_clean_room(maubot_test_bot, maubot_plugin) -> None:
    await setup_room(maubot_plugin)
    maubot_plugin.tracker.ledger(ROOM).add_state(record("$name", "S", 0))
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate audit")
    assert "No exposure found" in body


@pytest.mark.parametrize("text", ["!encstate share", "!encstate share nobody"])
async def test_share_usage(maubot_test_bot, maubot_plugin, text: str) -> None:
    await setup_room(maubot_plugin)
    body, _ = await run(maubot_test_bot, maubot_plugin, text)
    assert "Try !encstate help" in body


async def test_seal_now_with_nothing_to_do(maubot_test_bot, maubot_plugin) -> None:
    from encstate_bot.seals import Seal

    await setup_room(maubot_plugin)
    maubot_plugin.tracker.ledger(ROOM).add_state(record("$name", "S", 0))
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate seal now --dry-run")
    assert "Cannot seal: the bot has no end-to-end encryption" in body
    # the current value sits in one of the bot's seals: nothing to do ("reseal" is an alias)
    maubot_plugin.seals.add(Seal(ROOM, "S", "m.room.name:", "m.room.name", "", "h", "$x", "k", 1))
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate reseal --dry-run")
    assert "Nothing to seal: 1 of 1 current value(s) are sealed" in body


async def test_seal_shows_turns_on_and_off_and_needs_an_admin(
    maubot_test_bot, maubot_plugin
) -> None:
    await setup_room(maubot_plugin)
    maubot_plugin.tracker.ledger(ROOM).add_state(record("$name", "S", 0))
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate seal", MEMBER)
    assert "Sealed: 0 of 1 current value(s)" in body
    assert "Not sealed: 1 (m.room.name:): the bot has no end-to-end encryption" in body
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate seal off", MEMBER)
    assert "for room admins" in body and maubot_plugin.policies.seal_on(ROOM)
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate seal off")
    assert "Sealing is off in this room" in body and not maubot_plugin.policies.seal_on(ROOM)
    assert maubot_plugin.policies.overrides[ROOM].seal is False
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate seal on")
    assert "Sealing is on" in body and maubot_plugin.policies.seal_on(ROOM)
    # status reports the seals and, per way in, which clients they reach
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate status")
    assert "Sealed: 0 of 1" in body
    assert "mautrix-style clients only" in body and "Invited by anyone" in body
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate seal sideways")
    assert "seal takes on, off or now" in body


@pytest.mark.no_encryption
async def test_without_encryption_every_reply_says_so_first(
    maubot_test_bot, maubot_plugin
) -> None:
    """The bot runs without E2EE (here: maubot.testing's client has no device ID): every
    command's reply opens with what the admin must do."""
    from encstate_bot import e2ee

    for text in ("!encstate help", "!encstate status", "!encstate frobnicate"):
        body, html = await run(maubot_test_bot, maubot_plugin, text)
        assert body.startswith(f"⚠️ {e2ee.NO_DEVICE}"), body[:200]
        assert html.startswith("<p><strong>⚠️ encstate has no end-to-end encryption")
