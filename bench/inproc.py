"""encstate in this process, wired exactly as maubot's standalone mode wires it (one SQLite
database for the plugin, the crypto store and the sync token), so the benchmark can time the
courier and the rescan directly and read this process's CPU time and memory."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Awaitable, Callable

from aiohttp import ClientSession
from maubot.matrix import MaubotMatrixClient
from maubot.standalone.database import NextBatch
from maubot.standalone.database import upgrade_table as standalone_upgrade_table
from mautrix.crypto import OlmMachine, PgCryptoStateStore, PgCryptoStore
from mautrix.util.async_db import Database

from encstate_bot import EncStateBot
from encstate_bot.config import Config, _packaged_base
from encstate_bot.migrations import upgrade_table
from harness.synapse import Synapse


class InProcessBot:
    def __init__(
        self,
        synapse: Synapse,
        http: ClientSession,
        workdir: str,
        name: str,
        homeserver: str | None = None,
    ) -> None:
        self.synapse = synapse
        self.homeserver = homeserver or synapse.url
        self.http = http
        self.path = os.path.join(workdir, f"{name}.db")
        self.name = name
        self.plugin: EncStateBot | None = None
        self.db: Database | None = None
        self.pickle_key = "bench"  # a bot process on the same database needs its own key

    async def start(
        self,
        user_id: str | None = None,
        config: dict | None = None,
        before_plugin: Callable[[OlmMachine], Awaitable[None]] | None = None,
        reuse_device: bool = False,
        plugin: bool = True,
    ) -> EncStateBot | None:
        """Log in a new device (or reuse the last one and its database) and start the plugin;
        ``before_plugin`` runs once the crypto store is open, before the plugin's rescan.
        ``plugin`` false stops there: the device and its crypto store only (its keys
        uploaded), for a bot process to run on the same database later."""
        loop = asyncio.get_running_loop()
        if user_id is None:
            user_id = await loop.run_in_executor(None, self.synapse.register, self.name)
        self.user_id = user_id
        if reuse_device:
            token, device_id = self.token, self.device_id
        else:
            token, device_id = await loop.run_in_executor(None, self.synapse.login, user_id)
        self.token, self.device_id = token, device_id
        self.db = Database.create(
            f"sqlite:{self.path}",
            upgrade_table=standalone_upgrade_table,
            db_args={"min_size": 1},
            log=logging.getLogger("bench.db"),
        )
        await self.db.start()
        next_batch = await NextBatch(self.db, user_id).load()
        crypto_store = PgCryptoStore(account_id=user_id, pickle_key=self.pickle_key, db=self.db)
        state_store = PgCryptoStateStore(self.db)
        await crypto_store.upgrade_table.upgrade(self.db)
        await state_store.upgrade_table.upgrade(self.db)
        await crypto_store.open()
        client = MaubotMatrixClient(
            mxid=user_id,
            base_url=self.homeserver,
            token=token,
            client_session=self.http,
            loop=loop,
            log=logging.getLogger("bench.client"),
            sync_store=next_batch,
            state_store=state_store,
            device_id=device_id,
        )
        client.crypto = OlmMachine(client, crypto_store, state_store)
        await client.crypto.load()
        await crypto_store.put_device_id(device_id)
        if not reuse_device:
            await client.crypto.share_keys()
        if before_plugin is not None:
            await before_plugin(client.crypto)
        if not plugin:
            return None
        # sealing off unless asked for: the other parts measure forwarding, and a seal would
        # change the room's state under the next bot
        overrides = {
            "push_on_join": False,
            "self_supply": {"enabled": False},
            "seal": {"enabled": False},
            **(config or {}),
        }
        plugin_config = Config(
            load=lambda: overrides, load_base=_packaged_base, save=lambda _: None
        )
        await upgrade_table.upgrade(self.db)
        self.plugin = EncStateBot(
            client=client,
            loop=loop,
            http=self.http,
            instance_id=self.name,
            log=logging.getLogger(f"bench.{self.name}"),
            config=plugin_config,
            database=self.db,
            webapp=None,
            webapp_url=None,
            loader=None,
        )
        await self.plugin.internal_start()
        await self.plugin.ready.wait()
        return self.plugin

    async def stop(self) -> None:
        if self.plugin is not None:
            await self.plugin.internal_stop()
            self.plugin = None
        if self.db is not None:
            await self.db.stop()
            self.db = None
