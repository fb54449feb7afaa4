"""Review of issue 15's owner guard (migration v7, Store.claim_owner, bot.owner_refusal): each
test shows one defect and fails on the code as reviewed. On SQLite, and on PostgreSQL where
there is one (``bot_database``)."""

from __future__ import annotations

from mautrix.util.async_db import Database, UpgradeTable

from encstate_bot.bot import owner_refusal
from encstate_bot.migrations import upgrade_table
from encstate_bot.store import Store

ALICE = "@alice-bot:example.org"
BOB = "@bob-bot:example.org"
ROOM = "!room:example.org"


async def test_upgrading_a_populated_database_lets_another_account_take_it_over(
    bot_database,
) -> None:
    """A database that encstate used before v7 holds one account's data: its seals, whose
    state events that account sent (the ledger's ``sender``), its queue. v7 adds an EMPTY
    ``encstate_owner``, so after the upgrade the first account to start claims the data, even
    another bot pointed at it by accident (the very accident the guard is for: every existing
    standalone deployment upgrades through this path). That account then drains and answers
    with the other's queue and seals, and the real owner is refused from its own data at its
    next start."""
    before = UpgradeTable(version_table_name="encstate_version", database_name="encstate")
    before.upgrades = upgrade_table.upgrades[:6]
    db = Database.create(bot_database, upgrade_table=before)
    await db.start()
    try:
        await db.execute(
            "INSERT INTO encstate_state_event (room_id, event_id, outer_key, session_id, sender, "
            "origin_ts, ciphertext, status) VALUES ($1, '$seal1', 'm.room.name:', 'sealsess', "
            "$2, 1, 'c', 'valid')",
            ROOM,
            ALICE,
        )
        await db.execute(
            "INSERT INTO encstate_seal (room_id, session_id, outer_key, inner_type, inner_key, "
            "content_hash, source_event_id, event_id, session_key, created_ts) VALUES "
            "($1, 'sealsess', 'm.room.name:', 'm.room.name', '', 'h', '$v1', '$seal1', 'k', 1)",
            ROOM,
        )
        await db.execute(
            "INSERT INTO encstate_outbox (room_id, user_id, trigger, enqueued) "
            "VALUES ($1, '@joiner:example.org', 'join', 1)",
            ROOM,
        )
    finally:
        await db.stop()
    db = Database.create(bot_database, upgrade_table=upgrade_table)
    await db.start()
    try:
        store = Store(db)
        owner, _ = await store.claim_owner(BOB)  # Bob's bot, started on Alice's database
        assert owner != BOB, (
            f"{BOB} claimed a database whose seals {ALICE} sent: the upgrade left the owner "
            "table empty, so the first account to start took over another account's data"
        )
        assert (await store.claim_owner(ALICE))[0] == ALICE
    finally:
        await db.stop()


def test_the_refusal_tells_an_instance_whose_account_changed_how_to_hand_over() -> None:
    """In a full maubot server an instance's primary user can be switched in the manager
    (PluginInstance.update_primary_user): the instance keeps its schema ``mbp_<id>``, which
    the old account owns, so encstate refuses and maubot disables the instance. The only
    remedy is the README's ``DELETE FROM encstate_owner``; the log line instead tells the
    admin that "in a full maubot server every instance has its own schema", which is
    already so here, and never names the remedy."""
    message = owner_refusal(ALICE, 0, BOB)
    assert "DELETE FROM encstate_owner" in message, message
