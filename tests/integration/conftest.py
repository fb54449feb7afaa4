from __future__ import annotations

import asyncio
import os

import pytest

from harness import jspeer
from harness.maubot_server import PLUGIN_ID, MaubotServer, build_plugin
from harness.world import create_postgres_database, drop_postgres_database, postgres_available


@pytest.fixture
async def js(world, request):
    """Fresh matrix-js-sdk (Rust crypto) users: Element's engine, headless in Node."""
    problem = jspeer.available()
    if problem:
        pytest.skip(problem)
    peers = []

    async def make(name: str) -> jspeer.JsPeer:
        peer = await jspeer.JsPeer(world.synapse, f"{name}-{request.node.name[-8:]}").start()
        peers.append(peer)
        return peer

    yield make
    failed = getattr(getattr(request.node, "rep_call", None), "failed", False)
    for peer in peers:
        await peer.stop()
        if failed:
            print(f"--- js peer {peer.user_id}\n" + "\n".join(peer.stderr[-300:]))


@pytest.fixture(scope="session")
def maubot_plugin(tmp_path_factory) -> str:
    """encstate's .mbp, built once per session by ``mbc build`` from the repository root."""
    return build_plugin(str(tmp_path_factory.mktemp("mbp")))


def _run(coro):
    """Run a coroutine from a synchronous fixture, on a loop of its own (asyncio.run would
    also clear the thread's current loop, which is pytest-asyncio's business)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def maubot_process(request, synapse, tmp_path_factory):
    """A ``python -m maubot`` server for a test module, once on SQLite and once on PostgreSQL
    (maubot's, the crypto store's and the plugins' databases alike)."""
    database = None
    if request.param == "postgres":
        problem = _run(postgres_available())
        if problem is not None:
            if os.environ.get("ENCSTATE_REQUIRE_POSTGRES") == "1":
                pytest.fail(f"PostgreSQL is required here (CI) but unreachable: {problem}")
            pytest.skip(f"no PostgreSQL at 127.0.0.1:5432 ({problem}); SQLite was tested")
        database = _run(create_postgres_database())
    server = MaubotServer(
        synapse, str(tmp_path_factory.mktemp(f"maubot-{request.param}")), database
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if database is not None:
            _run(drop_postgres_database(database))


@pytest.fixture
async def maubot_server(maubot_process: MaubotServer, maubot_plugin: str, request):
    """The module's maubot server, running, with the plugin uploaded; the bots a test makes
    on it (``await maubot_server.bot()``) are removed afterwards, so tests share nothing."""
    server = maubot_process
    if not server.running:  # a test before this one left it stopped
        await server.restart()
    if not any(p["id"] == PLUGIN_ID for p in await server.plugins()):
        await server.upload_plugin(maubot_plugin)
    yield server
    if getattr(getattr(request.node, "rep_call", None), "failed", False):
        print(f"--- maubot log ({server.workdir})\n{server.tail(150)}")
    if not server.running:
        await server.restart()
    for bot in list(server.bots):
        await bot.remove()
