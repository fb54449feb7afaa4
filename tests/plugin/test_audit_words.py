"""!encstate audit in the words of help and status: mixed sessions, superseded values that are
readable, sealed, withheld or open to keys given earlier. Each value must land under its own
heading, and nowhere else."""

from __future__ import annotations

from encstate_bot.ledger import MessageRecord, MessageStatus
from encstate_bot.seals import Seal
from encstate_bot.store import AuditRow

from .test_commands import ROOM, record, run, setup_room

MEMBER = "@member:example.org"

MIXED_HEADING = "Sessions that encrypt state and messages (mixed)"
READABLE = "Superseded values still readable from the safe index (exposed)"
GIVEN = "Superseded values the bot shares no more, open to keys it gave earlier"
WITHHELD = "Superseded values withheld with their session (readable if shared)"
SEALED = "Superseded values sealed (no key the bot gives opens them)"


def sections(body: str) -> dict[str, str]:
    """The reply's text under each bold heading."""
    found: dict[str, str] = {}
    heading = ""
    for block in body.split("\n\n"):
        if block.startswith("**") and block.endswith("**"):
            heading = block.strip("*")
            found[heading] = ""
        else:
            found[heading] = found.get(heading, "") + block + "\n"
    return found


def only_under(parts: dict[str, str], heading: str, event_id: str) -> None:
    """The event is listed under this heading and under no other."""
    short = event_id[:12]
    where = [h for h, text in parts.items() if short in text]
    assert where == [heading], (event_id, where)


async def troubled(plugin) -> None:
    """Every verdict in one room.

    MIXED (avatar@0 current, a message @1, topic "ancient"@2 superseded): mixed, never shared;
    the ancient topic, above its safe index, is withheld with it, not sealed.
    STATE (name@0, topic "mid"@1, topic "new"@2): the mid topic sits above the safe index 0 of
    a session the bot shares: readable, exposed.
    LOW (m.custom.a "old"@0, "new"@1): the old value is below the safe index 1: sealed.
    GONE (m.custom.b "old"@0), its current value in the bot's seal SEAL: GONE holds no current
    value, so it is never shared: sealed.
    EARLY (m.custom.c "v1"@0, "v2"@1): below the safe index, but the audit records a key the
    bot gave from index 0 while v1 was current: open to that key, not sealed.
    """
    await setup_room(plugin)
    ledger = plugin.tracker.ledger(ROOM)
    ledger.add_state(record("$avatar", "MIXED", 0, "m.room.avatar", ts=1))
    ledger.add_message(MessageRecord(ROOM, "$chat", "MIXED", 1, None, MessageStatus.MESSAGE))
    ledger.add_state(record("$ancient-topic", "MIXED", 2, "m.room.topic", ts=1))
    ledger.add_state(record("$name", "STATE", 0, "m.room.name", ts=1))
    ledger.add_state(record("$mid-topic", "STATE", 1, "m.room.topic", ts=2))
    ledger.add_state(record("$new-topic", "STATE", 2, "m.room.topic", ts=3))
    ledger.add_state(record("$old-a", "LOW", 0, "m.custom.a", ts=1))
    ledger.add_state(record("$new-a", "LOW", 1, "m.custom.a", ts=2))
    ledger.add_state(record("$old-b", "GONE", 0, "m.custom.b", ts=1))
    ledger.add_state(record("$sealed-b", "SEAL", 0, "m.custom.b", ts=2))
    ledger.add_state(record("$v1-c", "EARLY", 0, "m.custom.c", ts=1))
    ledger.add_state(record("$v2-c", "EARLY", 1, "m.custom.c", ts=2))
    plugin.seals.add(
        Seal(ROOM, "SEAL", "m.custom.b:", "m.custom.b", "", "h", "$old-b", "k", 1, "$sealed-b")
    )
    await plugin.store.add_audit(
        [
            AuditRow(
                room_id=ROOM,
                user_id=MEMBER,
                device_id="DEV",
                session_id="EARLY",
                decision="share",
                reason="state session, 1 current event(s), safe index 0",
                trigger="join",
                msg_index=0,
            )
        ]
    )


async def test_each_superseded_value_is_named_as_help_names_it(
    maubot_test_bot, maubot_plugin
) -> None:
    await troubled(maubot_plugin)
    body, html = await run(maubot_test_bot, maubot_plugin, "!encstate audit")
    parts = sections(body)
    # the summary counts as status does, by verdict
    assert "Sessions: 5 state-only, 1 mixed; mixed sessions never shared" in body
    assert "Superseded values: 5 (1 readable, 2 sealed, 1 withheld with their session, " in body
    assert "1 open to keys given earlier)" in body
    # the mixed session: named mixed, and what the policy does with it
    assert "MIXED" in parts[MIXED_HEADING]
    assert "never shared: this room never shares mixed sessions" in parts[MIXED_HEADING]
    # above the safe index of a shared session: readable (exposed), never sealed
    only_under(parts, READABLE, "$mid-topic")
    # above the safe index of a mixed session: withheld with it, not sealed
    only_under(parts, WITHHELD, "$ancient-topic")
    assert "its session is mixed, not shared" in parts[WITHHELD]
    # below the safe index, and in a session holding no current value: sealed, with why
    only_under(parts, SEALED, "$old-a")
    only_under(parts, SEALED, "$old-b")
    assert "below the safe index 1" in parts[SEALED]
    assert "holds no current value" in parts[SEALED]
    assert "the current value is sealed" in parts[SEALED]
    assert "record of every key it delivered, which is never pruned" in body
    # below the safe index, but a key given from index 0 opens it: not sealed
    only_under(parts, GIVEN, "$v1-c")
    assert "a key the bot gave from index 0 opens it" in parts[GIVEN]
    # the current values are listed nowhere
    for current in ("$avatar", "$name", "$new-topic", "$new-a", "$sealed-b", "$v2-c"):
        assert current[:12] not in body, current
    assert "!encstate seal now" in body
    assert html.count("<table>") == 5


async def test_mixed_sessions_shared_as_history_say_from_which_index(
    maubot_test_bot, maubot_plugin
) -> None:
    """Where the room shares mixed sessions as history and the session is flagged, the audit
    says it is shared from its safe index, and the superseded value above it is readable."""
    await troubled(maubot_plugin)
    maubot_plugin.config["allow_mixed_shared_history"] = True
    maubot_plugin.tracker.shared_history.add((ROOM, "MIXED"))
    maubot_plugin.tracker.view(ROOM).history_visibility = "shared"
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate audit")
    parts = sections(body)
    assert "shared from the safe index 0, as shared history" in parts[MIXED_HEADING]
    assert "mixed sessions shared as history" in body
    only_under(parts, READABLE, "$ancient-topic")
    assert WITHHELD not in parts
    # flagged, but history hidden from newcomers: never shared, and it says why
    maubot_plugin.tracker.view(ROOM).history_visibility = "joined"
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate audit")
    parts = sections(body)
    assert "history visibility joined hides history" in parts[MIXED_HEADING]
    only_under(parts, WITHHELD, "$ancient-topic")


async def test_a_value_sealed_below_the_safe_index_is_not_sealed_once_keys_went_lower(
    maubot_test_bot, maubot_plugin
) -> None:
    await troubled(maubot_plugin)
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate audit")
    only_under(sections(body), SEALED, "$old-a")
    # a key for LOW given from index 0 (before "new" replaced "old"): "old" is open to it
    await maubot_plugin.store.add_audit(
        [
            AuditRow(
                room_id=ROOM,
                user_id=MEMBER,
                device_id="DEV",
                session_id="LOW",
                decision="share",
                reason="state session",
                trigger="request",
                msg_index=0,
            )
        ]
    )
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate audit")
    only_under(sections(body), GIVEN, "$old-a")


async def test_help_explains_the_audits_words(maubot_test_bot, maubot_plugin) -> None:
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate help")
    assert "superseded values (readable, sealed or withheld)" in body
    assert "a mixed session encrypted both state and messages" in body
    assert "a superseded value is sealed when no key the bot gives opens it" in body


async def test_a_clean_room_reports_no_exposure_and_its_sealed_values(
    maubot_test_bot, maubot_plugin
) -> None:
    await setup_room(maubot_plugin)
    ledger = maubot_plugin.tracker.ledger(ROOM)
    ledger.add_state(record("$old-name", "S", 0, ts=1))
    ledger.add_state(record("$new-name", "S", 1, ts=2))
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate audit")
    assert "No exposure found" in body
    only_under(sections(body), SEALED, "$old-name")
    assert "!encstate seal now" not in body


async def test_where_nothing_is_shared_the_audit_says_so(maubot_test_bot, maubot_plugin) -> None:
    await troubled(maubot_plugin)
    await setup_room(maubot_plugin, bot_level=0)
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate audit")
    assert "The bot shares nothing here now (it is not empowered)" in body
    # the verdicts are the policy's for a session, whatever the room's power
    only_under(sections(body), READABLE, "$mid-topic")
    await setup_room(maubot_plugin)
    await run(maubot_test_bot, maubot_plugin, "!encstate policy off")
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate audit")
    assert "The bot shares nothing here now (the room's policy is off)" in body


async def test_a_delivery_whose_audit_row_was_pruned_still_opens_the_value(
    maubot_test_bot, maubot_plugin
) -> None:
    """The audit is pruned after audit_retention_days; the delivery records are not: a key
    given from below a value, whose audit row is gone, still keeps the value from being called
    sealed."""
    await troubled(maubot_plugin)
    await maubot_plugin.store.finish([], [], [(MEMBER, "DEV", "LOW", 0, ROOM)])
    body, _ = await run(maubot_test_bot, maubot_plugin, "!encstate audit")
    only_under(sections(body), GIVEN, "$old-a")
