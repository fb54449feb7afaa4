"""Several encstate bot accounts on one PostgreSQL database (README, "Several bot accounts on one
PostgreSQL"): standalone bots, each in a schema of its own set by the standalone config's
``database_opts: {server_settings: {search_path: ...}}``, serve their own rooms and touch none of
each other's rows; a second account pointed at a schema another bot owns refuses to start.

The test makes its own database (it needs PostgreSQL, and skips without it unless CI demands
it), so it is ``db_agnostic``: the suite's PostgreSQL re-run does not repeat it."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncpg
from mautrix.util.async_db import Database
import pytest
import pytest_asyncio

from encstate_bot.migrations import upgrade_table
from encstate_bot.store import Store
from harness.botproc import BotProcess
from harness.client import TestUser, eventually
from harness.world import World, drop_postgres_database, unique

from ..conftest import postgres_url_or_skip

pytestmark = [pytest.mark.postgres, pytest.mark.db_agnostic]

SEALING = {"seal": {"enabled": True}}
# Every encstate table that names a room.
ROOM_TABLES = (
    "encstate_room",
    "encstate_state_event",
    "encstate_message",
    "encstate_session",
    "encstate_audit",
    "encstate_outbox",
    "encstate_delivered",
    "encstate_current",
    "encstate_seal",
    "encstate_key_wait",
    "encstate_link",
)


class SharedDatabase:
    """One PostgreSQL database with a schema per bot account, and the bots started on it."""

    def __init__(self, world: World, url: str) -> None:
        self.world = world
        self.url = url
        self.dbs: list[Database] = []

    async def schema(self, name: str) -> str:
        """A new, empty schema: what an operator creates for each bot account."""
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute(f'CREATE SCHEMA "{name}"')
        finally:
            await conn.close()
        return name

    def process(self, schema: str, user_id: str, token: str, device_id: str) -> BotProcess:
        workdir = os.path.join(self.world.workdir, user_id.split(":")[0].lstrip("@"))
        os.makedirs(workdir, exist_ok=True)
        bot = BotProcess(
            self.world.synapse,
            user_id,
            token,
            device_id,
            database=self.url,
            schema=schema,
            plugin_config=SEALING,
            workdir=workdir,
        )
        self.world.bots.append(bot)  # stopped with the world; its log in a failure's report
        return bot

    async def account(self) -> tuple[str, str, str]:
        loop = asyncio.get_running_loop()
        user_id = await loop.run_in_executor(None, self.world.synapse.register, unique("encstate"))
        token, device_id = await loop.run_in_executor(None, self.world.synapse.login, user_id)
        return user_id, token, device_id

    async def bot(self, schema: str) -> BotProcess:
        """A new bot account, running, keeping its data in ``schema``."""
        bot = self.process(schema, *await self.account())
        bot.start()
        await bot.wait_ready()
        return bot

    async def store(self, schema: str) -> Store:
        """The data of the bot in ``schema``, as the bot sees it."""
        db = Database.create(
            self.url,
            upgrade_table=upgrade_table,
            db_args={"min_size": 1, "max_size": 2, "server_settings": {"search_path": schema}},
        )
        await db.start()
        self.dbs.append(db)
        return Store(db)

    async def rows(self, sql: str) -> list[Any]:
        conn = await asyncpg.connect(self.url)
        try:
            return await conn.fetch(sql)
        finally:
            await conn.close()


@pytest_asyncio.fixture
async def shared(world):
    url = await postgres_url_or_skip()
    db = SharedDatabase(world, url)
    try:
        yield db
    finally:
        for bot in world.bots:  # before the database goes
            bot.stop()
        for pool in db.dbs:
            await pool.stop()
        await drop_postgres_database(url)


async def valid(store: Store, event_id: str) -> None:
    async def recorded() -> bool:
        return any(
            rec.event_id == event_id and rec.status.value == "valid"
            for rec in await store.load_states()
        )

    await eventually(recorded, timeout=30)


async def sealed(store: Store, room_id: str) -> None:
    """Until the bot has sent its seal of the room's name."""

    async def sent() -> bool:
        return any(s.room_id == room_id and s.event_id for s in await store.seals())

    await eventually(sent, timeout=30)


async def named(user: TestUser, room_id: str, name: str) -> None:
    async def readable() -> bool:
        return (await user.read_state(room_id)).get("m.room.name") == {"name": name}

    await eventually(readable, timeout=30)


def key_senders(user: TestUser) -> set[str]:
    """Who sent this device megolm keys (room keys and forwarded ones) over Olm."""
    return {
        p["sender"]
        for p in user.olm_plaintexts
        if p.get("type") in ("m.room_key", "m.forwarded_room_key")
    }


async def test_two_bots_in_two_schemas_of_one_database_each_serve_only_their_own_rooms(
    shared,
) -> None:
    world = shared.world
    schema_a, schema_b = await shared.schema("bot_a"), await shared.schema("bot_b")
    bot_a, bot_b = await shared.bot(schema_a), await shared.bot(schema_b)
    store_a, store_b = await shared.store(schema_a), await shared.store(schema_b)
    admin = await world.user("admin")
    room_a = await world.room_with_bot(admin, bot_a)
    room_b = await world.room_with_bot(admin, bot_b)
    name_a = await admin.send_state(room_a, "m.room.name", "", {"name": "Alder"})
    name_b = await admin.send_state(room_b, "m.room.name", "", {"name": "Birch"})
    await valid(store_a, name_a.event_id)
    await valid(store_b, name_b.event_id)
    await sealed(store_a, room_a)
    await sealed(store_b, room_b)

    joiner_a = await world.member("joiner-a", admin, room_a)
    joiner_b = await world.member("joiner-b", admin, room_b)
    await named(joiner_a, room_a, "Alder")
    await named(joiner_b, room_b, "Birch")

    # Each joiner's keys came from its room's bot alone.
    assert key_senders(joiner_a) == {bot_a.user_id}
    assert key_senders(joiner_b) == {bot_b.user_id}
    for bot, store, room, joiner in (
        (bot_a, store_a, room_a, joiner_a),
        (bot_b, store_b, room_b, joiner_b),
    ):

        async def shared_to_joiner(store=store, room=room, joiner=joiner) -> bool:
            rows = await store.audit(room)
            return any(r.user_id == joiner.user_id and r.decision == "share" for r in rows)

        async def drained(store=store) -> bool:
            return not await store.db.fetch("SELECT id FROM encstate_outbox")

        await eventually(shared_to_joiner, timeout=30)
        await eventually(drained, timeout=30)
        audited = {r.user_id for r in await store.audit(room)}
        assert audited <= {admin.user_id, joiner.user_id, bot.user_id}, audited
    # Neither schema holds a row about the other bot's room.
    for schema, own in ((schema_a, room_a), (schema_b, room_b)):
        for table in ROOM_TABLES:
            rooms = {
                r["room_id"] for r in await shared.rows(f"SELECT room_id FROM {schema}.{table}")
            }
            assert rooms <= {own}, (schema, table, rooms)
        assert own in {
            r["room_id"] for r in await shared.rows(f"SELECT room_id FROM {schema}.encstate_audit")
        }
    for schema, bot in ((schema_a, bot_a), (schema_b, bot_b)):
        owners = await shared.rows(f"SELECT user_id FROM {schema}.encstate_owner")
        assert [r["user_id"] for r in owners] == [bot.user_id]
        # the crypto store and the sync token went into the schema too (keyed by account)
        accounts = await shared.rows(f"SELECT account_id FROM {schema}.crypto_account")
        assert [r["account_id"] for r in accounts] == [bot.user_id]
    public = await shared.rows(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
    )
    assert not public, [r["table_name"] for r in public]
    assert bot_a.running and bot_b.running


async def test_a_second_account_on_the_same_schema_refuses_to_start_and_the_first_runs_on(
    shared,
) -> None:
    world = shared.world
    schema = await shared.schema("bot_a")
    first = await shared.bot(schema)
    store = await shared.store(schema)
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, first)
    name = await admin.send_state(room, "m.room.name", "", {"name": "Alder"})
    await valid(store, name.event_id)
    await sealed(store, room)

    second = shared.process(schema, *await shared.account())
    second.start()
    assert second.proc is not None
    code = await asyncio.get_running_loop().run_in_executor(None, second.proc.wait, 60)
    log = second.log_text()
    assert code != 0
    assert (
        "encstate will not start: its tables in this database belong to the encstate bot "
        f"{first.user_id} (since "
    ) in log
    assert f"and this bot is {second.user_id}" in log
    assert "database_opts: {server_settings: {search_path: <schema>}}" in log
    assert "Rescanned" not in log  # it read nothing of the first bot's

    owners = await shared.rows(f"SELECT user_id FROM {schema}.encstate_owner")
    assert [r["user_id"] for r in owners] == [first.user_id]
    # The first bot works on: a newcomer gets its keys.
    joiner = await world.member("joiner", admin, room)
    await named(joiner, room, "Alder")
    assert key_senders(joiner) == {first.user_id}
    assert first.running
