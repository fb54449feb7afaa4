"""One test world: a Synapse, its users, and encstate bots, torn down together."""

from __future__ import annotations

import asyncio
import os
from typing import Any
import uuid

from aiohttp import ClientSession
from mautrix.util.async_db import Database

from encstate_bot.migrations import upgrade_table
from encstate_bot.store import AuditRow, Store

from .botproc import BotProcess
from .client import TestUser, eventually
from .proxy import FaultProxy
from .synapse import Synapse

POSTGRES_ADMIN = os.environ.get(
    "ENCSTATE_POSTGRES_ADMIN", "postgres://postgres@127.0.0.1:5432/postgres"
)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


async def postgres_available() -> str | None:
    """None if the server answers, else why not."""
    import asyncpg

    try:
        conn = await asyncpg.connect(POSTGRES_ADMIN, timeout=3)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    await conn.close()
    return None


async def create_postgres_database() -> str:
    import asyncpg

    name = f"encstate_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(POSTGRES_ADMIN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return POSTGRES_ADMIN.rsplit("/", 1)[0] + f"/{name}"


async def drop_postgres_database(url: str) -> None:
    import asyncpg

    name = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(POSTGRES_ADMIN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


class World:
    def __init__(
        self, synapse: Synapse, http: ClientSession, workdir: str, databases: str = "sqlite"
    ) -> None:
        """``databases``: where bots keep their data unless a test says otherwise, "sqlite"
        (a file per bot) or "postgres" (a fresh database per bot on the local server)."""
        self.synapse = synapse
        self.http = http
        self.workdir = workdir
        self.databases = databases
        self._postgres: list[str] = []
        self.users: list[TestUser] = []
        self.bots: list[BotProcess] = []
        self._dbs: list[Database] = []
        self._stores: dict[str, Store] = {}
        self._proxies: list[FaultProxy] = []

    async def user(self, name: str) -> TestUser:
        user = await TestUser.create(self.synapse, unique(name), self.http)
        self.users.append(user)
        return user

    async def set_name(self, admin: TestUser, bot: BotProcess, room_id: str, name: str) -> Any:
        """Encrypt the room name, and wait until the bot has it as valid state."""
        sent = await admin.send_state(room_id, "m.room.name", "", {"name": name})
        await self.wait_valid(bot, sent.event_id)
        return sent

    async def member(self, name: str, inviter: TestUser, room_id: str) -> TestUser:
        """A new user, invited by ``inviter`` and joined to the room."""
        user = await self.user(name)
        await inviter.invite(room_id, user.user_id)
        await user.join(room_id)
        return user

    async def second_device(self, user: TestUser) -> TestUser:
        """Another logged-in E2EE device of the same user."""
        device = await TestUser.create(self.synapse, user.localpart, self.http, register=False)
        self.users.append(device)
        return device

    async def proxy(self) -> FaultProxy:
        proxy = await FaultProxy(self.synapse.url).start()
        self._proxies.append(proxy)
        return proxy

    async def bot(
        self,
        database: str | None = None,
        config: dict[str, Any] | None = None,
        homeserver: str | None = None,
        sealing: bool = False,
        ignore_first_sync: bool = True,
    ) -> BotProcess:
        """A running encstate bot. Sealing is off unless asked for: most suites test the rules
        for forwarding other people's sessions (what the bot does where it cannot seal), and a
        seal would supersede the values they look at. Tests of seals, and the demo, turn it on
        (the product's default)."""
        config = {"seal": {"enabled": sealing}, **(config or {})}
        loop = asyncio.get_running_loop()
        user_id = await loop.run_in_executor(None, self.synapse.register, unique("encstate"))
        token, device_id = await loop.run_in_executor(None, self.synapse.login, user_id)
        workdir = os.path.join(self.workdir, user_id.split(":")[0].lstrip("@"))
        os.makedirs(workdir, exist_ok=True)
        if database is None and self.databases == "postgres":
            database = await create_postgres_database()
            self._postgres.append(database)
        bot = BotProcess(
            self.synapse,
            user_id,
            token,
            device_id,
            database=database,
            plugin_config=config,
            workdir=workdir,
            homeserver=homeserver,
            ignore_first_sync=ignore_first_sync,
        )
        bot.start()
        self.bots.append(bot)
        await bot.wait_ready()
        return bot

    async def restart(self, bot: BotProcess, kill: bool = False) -> None:
        bot.stop(kill=kill)
        bot.start()
        await bot.wait_ready()

    async def store(self, bot: BotProcess) -> Store:
        """The bot's database, opened from the test (SQLite in WAL mode or PostgreSQL): one
        small pool per database for the whole test, however often a test polls it (a pool
        per call ran PostgreSQL out of connections)."""
        opened = self._stores.get(bot.database)
        if opened is None:
            db = Database.create(
                bot.database, upgrade_table=upgrade_table, db_args={"min_size": 1, "max_size": 3}
            )
            await db.start()
            self._dbs.append(db)
            opened = self._stores[bot.database] = Store(db)
        return opened

    async def room_with_bot(
        self, admin: TestUser, bot: BotProcess, bot_level: int = 50, **kwargs: Any
    ) -> str:
        """A state-encrypted room created by ``admin`` that the bot has joined."""
        power = {bot.user_id: bot_level} if bot_level else {}
        room_id = await admin.create_room(invite=[bot.user_id], power=power, **kwargs)
        await self.wait_joined(admin, room_id, bot.user_id)
        await bot.wait_for_log(f"Read back \\d+ timeline event\\(s\\) of {room_id}")
        return room_id

    async def wait_joined(self, observer: TestUser, room_id: str, user_id: str) -> None:
        async def joined() -> bool:
            return user_id in await observer.joined_members(room_id)

        await eventually(joined, timeout=30)

    async def wait_valid(self, bot: BotProcess, event_id: str, status: str = "valid") -> None:
        store = await self.store(bot)

        async def recorded() -> bool:
            return any(
                rec.event_id == event_id and rec.status.value == status
                for rec in await store.load_states()
            )

        await eventually(recorded, timeout=20)

    async def seal(self, bot: BotProcess, room_id: str, inner_type: str = "m.room.name") -> Any:
        """The bot's newest seal of this type in the room, once its event is sent."""
        store = await self.store(bot)

        async def sent() -> Any:
            seals = [
                s
                for s in await store.seals()
                if s.room_id == room_id and s.inner_type == inner_type and s.event_id
            ]
            return max(seals, key=lambda s: s.created_ts) if seals else None

        return await eventually(sent, timeout=30)

    async def audit(self, bot: BotProcess, room_id: str, **kwargs: Any) -> list[AuditRow]:
        store = await self.store(bot)
        return await store.audit(room_id, **kwargs)

    async def close(self) -> None:
        for user in self.users:
            await user.stop()
        for bot in self.bots:
            bot.stop()
        for db in self._dbs:
            await db.stop()
        for proxy in self._proxies:
            await proxy.close()
        for url in self._postgres:
            await drop_postgres_database(url)
