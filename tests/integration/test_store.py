"""The store's SQL on both SQLite and PostgreSQL: one dialect, same answers."""

from __future__ import annotations

from encstate_bot.ledger import MessageStatus, Status
from encstate_bot.store import AuditRow, OutboxItem, Store
from encstate_bot.triggers import FAST_LANE, PUSH_LANE, REQUEST_LANE

from ..unit.helpers import ROOM, message, state


async def test_ledger_round_trip(store: Store) -> None:
    await store.put_room_flag(ROOM, "io.element.msc4362.encrypt_state_events")
    await store.put_states([state("$a", "S", 0), state("$b", "S", 1, status=Status.PENDING)])
    await store.put_states([state("$b", "S", 1, "m.room.topic")])  # decrypted later
    await store.put_messages([message("$m", "S", 2), message("$p", "T", 0, MessageStatus.PENDING)])
    states = {r.event_id: r for r in await store.load_states()}
    assert states["$a"].status == Status.VALID and states["$a"].msg_index == 0
    assert states["$b"].status == Status.VALID and states["$b"].inner_type == "m.room.topic"
    messages = {m.event_id: m for m in await store.load_messages()}
    assert messages["$m"].status == MessageStatus.MESSAGE and messages["$m"].ciphertext is None
    rooms = await store.rooms()
    assert [(r.room_id, r.backfilled) for r in rooms] == [(ROOM, False)]
    await store.set_backfilled(ROOM)
    await store.set_room_policy(ROOM, "cross-signed", True, None)
    (row,) = await store.rooms()
    assert row.backfilled and row.mode == "cross-signed" and row.share_invited is True
    assert row.dry_run is None and row.state_flag.startswith("io.element")


async def test_queue_audit_and_delivery(store: Store) -> None:
    await store.enqueue(
        [
            OutboxItem(room_id=ROOM, user_id="@a:x", trigger="link"),
            OutboxItem(
                room_id=ROOM,
                user_id="@b:x",
                device_id="D",
                session_id="S",
                trigger="request",
                request_id="r1",
            ),
            OutboxItem(room_id=ROOM, user_id="@n:x", trigger="join"),  # a newcomer: fast lane
        ]
    )
    pushes = await store.due(10, PUSH_LANE)
    assert [i.user_id for i in pushes] == ["@a:x"]
    assert [i.user_id for i in await store.due(10, REQUEST_LANE)] == ["@b:x"]
    (newcomer,) = await store.due(10, FAST_LANE)
    assert newcomer.user_id == "@n:x"
    assert await store.cancel_request("@b:x", "D", "r1") == 1
    await store.finish([newcomer.id], [])
    assert await store.due(10, REQUEST_LANE) == [] and await store.due(10, FAST_LANE) == []
    await store.retry_later([pushes[0].id], 60_000)
    assert await store.due(10, PUSH_LANE) == []
    assert await store.pending_count(ROOM) == 1
    audit = AuditRow(
        room_id=ROOM,
        user_id="@a:x",
        device_id="D",
        session_id="S",
        decision="share",
        reason="state session",
        trigger="join",
        msg_index=1,
        exposed=("$old",),
    )
    await store.finish([pushes[0].id], [audit], [("@a:x", "D", "S", 1, ROOM)])
    await store.finish([], [], [("@a:x", "D", "S", 1, ROOM)])  # idempotent
    assert await store.pending_count() == 0
    assert await store.delivered(["@a:x", "@c:x"]) == {("@a:x", "D", "S", 1)}
    (row,) = await store.audit(ROOM)
    assert row.exposed == ("$old",) and row.msg_index == 1 and row.id is not None


async def test_finding_02_wide_indices_and_waits_fit_on_both_databases(store: Store) -> None:
    # A message index is a 32-bit varint from untrusted ciphertext; PostgreSQL's INTEGER
    # overflowed above 2^31 and failed the whole batch (migration v4 widens the columns).
    top = 2**32 - 1
    await store.put_messages([message("$m", "S", top, MessageStatus.GARBAGE)])
    await store.put_states([state("$s", "S", top)])
    await store.add_audit(
        [
            AuditRow(
                room_id=ROOM,
                user_id="@u:x",
                device_id="D",
                session_id="S",
                decision="share",
                reason="r",
                trigger="request",
                msg_index=top,
                waited_ms=30 * 24 * 3600 * 1000,
            )
        ]
    )
    assert {m.msg_index for m in await store.load_messages()} == {top}
    assert {r.msg_index for r in await store.load_states()} == {top}
    (row,) = await store.audit(ROOM)
    assert row.msg_index == top and row.waited_ms == 30 * 24 * 3600 * 1000


async def test_server_current_identity_changes_retention_and_flags(store: Store) -> None:
    await store.put_server_current(ROOM, {"m.room.name:": "$a"})
    await store.put_server_current(ROOM, {"m.room.name:": "$b", "m.room.topic:": "$c"})
    assert sorted(await store.server_current()) == [
        (ROOM, "m.room.name:", "$b"),
        (ROOM, "m.room.topic:", "$c"),
    ]
    row = AuditRow(
        room_id=ROOM,
        user_id="@u:x",
        device_id="D",
        session_id="S",
        decision="withhold",
        reason="@u:x's cross-signing identity changed since the bot first saw it",
        trigger="request",
    )
    await store.add_audit([row, AuditRow(**{**row.__dict__, "reason": "other", "ts": 5})])
    assert await store.identity_changes(ROOM, 0) == 1
    assert await store.prune_audit(10) == 1
    assert len(await store.audit(ROOM)) == 1
    # a forward never sets (or pins) the shared-history flag; the creator's key does
    await store.put_session_flag(ROOM, "S", False, "@mallory:x/D")
    await store.put_session_flag(ROOM, "S", True, "@admin:x/A", from_creator=True)
    await store.put_session_flag(ROOM, "S", False, "@mallory:x/D")
    assert await store.shared_history_sessions() == {(ROOM, "S")}
