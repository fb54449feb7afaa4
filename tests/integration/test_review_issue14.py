"""Review of issue 14: the findings that need a real PostgreSQL server (maubot's plugin
databases can be PostgreSQL, with a pool of connections). Each ``test_finding_*`` test fails on
the code as reviewed."""

from __future__ import annotations

from contextlib import asynccontextmanager

from mautrix.util.async_db import Database
import pytest
import pytest_asyncio

from encstate_bot.migrations import upgrade_table
from encstate_bot.store import OutboxItem, Store
from encstate_bot.triggers import Trigger
from harness.world import drop_postgres_database

from ..conftest import postgres_url_or_skip

ROOM = "!room:example.org"
SESSION = "late-session"

pytestmark = pytest.mark.postgres


@pytest_asyncio.fixture
async def postgres_store():
    url = await postgres_url_or_skip()
    db = Database.create(url, upgrade_table=upgrade_table)
    await db.start()
    try:
        yield Store(db)
    finally:
        await db.stop()
        await drop_postgres_database(url)


class SelectThen:
    """The store's database, with a hook run (once) right after a query reading
    encstate_key_wait returns (inside take_waits' transaction): what another task does on
    another connection of the pool while take_waits waits for its next round trip."""

    def __init__(self, db: Database, hook) -> None:
        self._db = db
        self._hook = hook

    def __getattr__(self, name):
        return getattr(self._db, name)

    async def fetch(self, query, *args):
        return await _Conn(self._db, self).fetch(query, *args)

    def acquire(self):
        @asynccontextmanager
        async def conn():
            async with self._db.acquire() as real:
                yield _Conn(real, self)

        return conn()


class _Conn:
    def __init__(self, conn, owner: SelectThen) -> None:
        self._conn = conn
        self._owner = owner

    def __getattr__(self, name):
        return getattr(self._conn, name)

    async def fetch(self, query, *args):
        rows = await self._conn.fetch(query, *args)
        if "FROM encstate_key_wait" in query and self._owner._hook is not None:
            hook, self._owner._hook = self._owner._hook, None
            await hook()
        return rows


async def test_finding_a_wait_written_while_take_waits_runs_is_deleted_unseen(
    postgres_store: Store,
) -> None:
    """take_waits SELECTs a session's waits, then DELETEs by (room, session) in the same
    READ COMMITTED transaction: a wait another connection commits in between (the courier's
    add_waits for a batch decided just before the key arrived) is deleted without being
    returned. The courier's own catch-up (``_wait_for_keys`` sees the key arrived and calls
    release) then finds nothing: the newcomer or the request is never served. A DELETE ...
    RETURNING would take exactly what it deletes."""
    other = Store(postgres_store.db)  # the courier: same pool, another connection
    late = OutboxItem(
        room_id=ROOM,
        user_id="@newcomer:example.org",
        trigger=Trigger.JOIN,
        device_id="NEWDEV",
        session_id=SESSION,
    )

    async def courier_writes_its_wait() -> None:
        await other.add_waits([late])

    taker = Store(SelectThen(postgres_store.db, courier_writes_its_wait))
    taken = await taker.take_waits(ROOM, {SESSION})  # the intake: the key arrived
    again = await postgres_store.take_waits(ROOM, {SESSION})  # the courier's catch-up
    served = [i.user_id for i in taken + again]
    assert served == ["@newcomer:example.org"], (
        f"the wait committed during take_waits was deleted and never returned (taken: "
        f"{served}, left: {await postgres_store.waits_count()})"
    )
