"""The owner guard: encstate's tables have no account column, so the first bot account to start
on a database claims it, and another account is refused before it reads a row (README,
"Several bot accounts on one PostgreSQL")."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from maubot import testing
from maubot.standalone.loader import FileSystemLoader
import pytest

from encstate_bot import EncStateBot
from encstate_bot.store import Store

from .conftest import ROOT


async def start(mxid: str, db, config, meta) -> EncStateBot:
    """Another instance of the plugin, for the account ``mxid``, on the same database."""
    bot = testing.TestBot(mxid=mxid, mxurl="http://127.0.0.1:9")
    async with aiohttp.ClientSession() as http:
        plugin = EncStateBot(
            client=bot.client,
            loop=asyncio.get_running_loop(),
            http=http,
            instance_id="tests",
            log=logging.getLogger("test.owner"),
            config=config,
            database=db,
            webapp=None,
            webapp_url=None,
            loader=FileSystemLoader(ROOT, meta),
        )
        await plugin.internal_start()
    return plugin


async def test_the_first_account_claims_the_database_and_may_start_again(
    maubot_plugin, maubot_plugin_db, maubot_plugin_config, maubot_plugin_meta
) -> None:
    owner, since = await Store(maubot_plugin_db).claim_owner("@encstate:example.org")
    assert owner == "@encstate:example.org" and since > 0
    await maubot_plugin.internal_stop()
    again = await start(
        "@encstate:example.org", maubot_plugin_db, maubot_plugin_config, maubot_plugin_meta
    )
    await again.internal_stop()
    rows = await maubot_plugin_db.fetch("SELECT user_id, claimed_ts FROM encstate_owner")
    assert [(r["user_id"], r["claimed_ts"]) for r in rows] == [("@encstate:example.org", since)]


async def test_another_account_is_refused_and_told_what_to_do(
    maubot_plugin, maubot_plugin_db, maubot_plugin_config, maubot_plugin_meta, caplog
) -> None:
    with caplog.at_level(logging.CRITICAL), pytest.raises(RuntimeError) as refused:
        await start(
            "@other:example.org", maubot_plugin_db, maubot_plugin_config, maubot_plugin_meta
        )
    message = str(refused.value)
    assert message.startswith(
        "encstate will not start: its tables in this database belong to the encstate bot "
        "@encstate:example.org (since "
    )
    assert "and this bot is @other:example.org" in message
    assert "its own database or its own schema" in message
    assert "database_opts: {server_settings: {search_path: <schema>}}" in message
    assert message in [r.getMessage() for r in caplog.records if r.name == "test.owner"]
    owner, _ = await Store(maubot_plugin_db).claim_owner("@other:example.org")
    assert owner == "@encstate:example.org"  # the refused account claimed nothing
    assert maubot_plugin.ready is not None  # the owner's instance runs on


async def test_a_claim_is_one_row_whoever_asks(maubot_plugin_db) -> None:
    store = Store(maubot_plugin_db)
    first = await store.claim_owner("@a:example.org")
    assert await store.claim_owner("@b:example.org") == first
    assert await store.claim_owner("@a:example.org") == first
    assert await maubot_plugin_db.fetchval("SELECT COUNT(*) FROM encstate_owner") == 1
