"""Store.claim_owner on a database encstate used before the owner row (migration v7): the row
goes to the account the data names, else to the first account to start. On SQLite, and on
PostgreSQL where there is one (``bot_database``)."""

from __future__ import annotations

from mautrix.util.async_db import Database
import pytest_asyncio

from encstate_bot.migrations import upgrade_table
from encstate_bot.store import Store

ALICE = "@alice-bot:example.org"
BOB = "@bob-bot:example.org"
ROOM = "!room:example.org"


@pytest_asyncio.fixture
async def db(bot_database):
    db = Database.create(bot_database, upgrade_table=upgrade_table)
    await db.start()
    try:
        yield db
    finally:
        await db.stop()


async def seal(db: Database, sender: str, n: int, created_ts: int) -> None:
    await db.execute(
        "INSERT INTO encstate_state_event (room_id, event_id, outer_key, session_id, sender, "
        "origin_ts, ciphertext, status) VALUES ($1, $2, 'm.room.name:', $3, $4, 1, 'c', 'valid')",
        ROOM,
        f"$seal{n}",
        f"sess{n}",
        sender,
    )
    await db.execute(
        "INSERT INTO encstate_seal (room_id, session_id, outer_key, inner_type, inner_key, "
        "content_hash, source_event_id, event_id, session_key, created_ts) VALUES "
        "($1, $2, 'm.room.name:', 'm.room.name', '', 'h', '$v', $3, 'k', $4)",
        ROOM,
        f"sess{n}",
        f"$seal{n}",
        created_ts,
    )


async def queue_something(db: Database) -> None:
    await db.execute(
        "INSERT INTO encstate_outbox (room_id, user_id, trigger, enqueued) "
        "VALUES ($1, '@joiner:example.org', 'join', 1)",
        ROOM,
    )


async def crypto_accounts(db: Database, *accounts: str) -> None:
    await db.execute("CREATE TABLE crypto_account (account_id TEXT PRIMARY KEY)")
    for account in accounts:
        await db.execute("INSERT INTO crypto_account (account_id) VALUES ($1)", account)


async def test_the_owner_of_its_own_seals_claims_them(db) -> None:
    await seal(db, ALICE, 1, 10)
    assert (await Store(db).claim_owner(ALICE))[0] == ALICE


async def test_the_newest_seal_names_the_owner(db) -> None:
    """Seals of two accounts (a hand-over before the guard existed): the newest one's."""
    await seal(db, ALICE, 1, 10)
    await seal(db, BOB, 2, 20)
    store = Store(db)
    assert (await store.claim_owner(ALICE))[0] == BOB
    assert (await store.claim_owner(BOB))[0] == BOB


async def test_data_without_evidence_goes_to_the_first_account(db) -> None:
    await queue_something(db)
    assert (await Store(db).claim_owner(BOB))[0] == BOB


async def test_the_one_account_of_the_crypto_store_here_owns_the_data(db) -> None:
    await queue_something(db)
    await crypto_accounts(db, ALICE)
    store = Store(db)
    assert (await store.claim_owner(BOB))[0] == ALICE
    assert (await store.claim_owner(ALICE))[0] == ALICE


async def test_a_crypto_store_of_two_accounts_or_no_data_names_no_one(db) -> None:
    await crypto_accounts(db, ALICE)
    assert (await Store(db).claim_owner(BOB))[0] == BOB  # encstate has no data here
    await db.execute("DELETE FROM encstate_owner")
    await queue_something(db)
    await db.execute("INSERT INTO crypto_account (account_id) VALUES ($1)", BOB)
    assert (await Store(db).claim_owner(BOB))[0] == BOB
