from __future__ import annotations

import os

from aiohttp import ClientSession
from mautrix.util.async_db import Database
import pytest
import pytest_asyncio

from encstate_bot.migrations import upgrade_table
from encstate_bot.store import Store
from harness.synapse import Synapse
from harness.world import (
    World,
    create_postgres_database,
    drop_postgres_database,
    postgres_available,
)

REQUIRE_POSTGRES = os.environ.get("ENCSTATE_REQUIRE_POSTGRES") == "1"


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--bot-database",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="where the bots of the integration tests keep their data (default sqlite)",
    )


@pytest.fixture(scope="session")
def synapse():
    hs = Synapse()
    hs.start()
    yield hs
    hs.close()


@pytest_asyncio.fixture
async def world(synapse: Synapse, tmp_path, request):
    databases = request.config.getoption("--bot-database")
    if databases == "postgres":
        await drop_postgres_database(await postgres_url_or_skip())  # reachable, or skip/fail
    async with ClientSession() as http:
        w = World(synapse, http, str(tmp_path), databases)
        try:
            yield w
        finally:
            await w.close()


async def postgres_url_or_skip() -> str:
    problem = await postgres_available()
    if problem is not None:
        if REQUIRE_POSTGRES:
            pytest.fail(f"PostgreSQL is required here (CI) but unreachable: {problem}")
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432 ({problem}); SQLite was tested")
    return await create_postgres_database()


@pytest_asyncio.fixture(params=["sqlite", "postgres"])
async def bot_database(request, tmp_path):
    """The bot's database URL, once for SQLite and once for PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:{tmp_path / 'bot.db'}"
        return
    url = await postgres_url_or_skip()
    try:
        yield url
    finally:
        await drop_postgres_database(url)


async def _opened_store(url: str):
    db = Database.create(url, upgrade_table=upgrade_table)
    await db.start()
    try:
        yield Store(db)
    finally:
        await db.stop()


@pytest_asyncio.fixture
async def store(bot_database):
    """encstate's store on SQLite, then on PostgreSQL (skipped where there is none)."""
    async for opened in _opened_store(bot_database):
        yield opened


@pytest_asyncio.fixture
async def sqlite_store(tmp_path):
    """encstate's store on a fresh SQLite file."""
    async for opened in _opened_store(f"sqlite:{tmp_path / 'bot.db'}"):
        yield opened


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
    if report.when == "call" and report.failed:
        world = item.funcargs.get("world")
        for bot in getattr(world, "bots", []):
            report.sections.append((f"bot log {bot.user_id}", bot.tail(120)))
