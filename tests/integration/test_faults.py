"""Faults: the homeserver going away in the middle of a push, the database missing at start.
(The bot killed in the middle of a push is in test_links.py.)"""

from __future__ import annotations

import asyncio
import tempfile

from aiohttp import ClientSession

from harness.botproc import BotProcess
from harness.client import all_hold, eventually
from harness.synapse import Synapse
from harness.world import World

SEND_KEYS = r"/sendToDevice/m\.room\.encrypted/"


async def test_a_push_completes_after_synapse_comes_back(tmp_path, request) -> None:
    # A homeserver of its own: this test stops it.
    synapse = Synapse()
    synapse.start()
    try:
        async with ClientSession() as http:
            world = World(synapse, http, str(tmp_path), request.config.getoption("--bot-database"))
            try:
                await _push_across_a_restart(world, synapse)
            finally:
                await world.close()
    finally:
        synapse.close()


async def _push_across_a_restart(world: World, synapse: Synapse) -> None:
    proxy = await world.proxy()
    bot = await world.bot(homeserver=proxy.url)
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot, join_rule={"join_rule": "public"})
    sent = []
    for event_type in ("m.room.name", "m.room.topic"):
        await admin.new_session(room)
        sent.append(await admin.send_state(room, event_type, "", {"name": "n", "topic": "t"}))
    await world.wait_valid(bot, sent[-1].event_id)
    members = [await world.user(f"m{i}") for i in range(4)]

    hold = proxy.hold(SEND_KEYS, after=0)
    for member in members:
        await member.join(room)
    await asyncio.wait_for(hold.holding.wait(), 30)
    synapse.stop()  # the push is in flight and the homeserver goes away
    proxy.clear()  # the held call now fails: the courier backs off and retries
    await bot.wait_for_log("sendToDevice of .* failed")
    await asyncio.sleep(3)
    synapse.start()

    await eventually(lambda: all_hold(members, room, [s.session_id for s in sent]), timeout=90)
    assert bot.running


async def test_an_unreachable_database_stops_the_bot_with_a_clear_error(synapse) -> None:
    loop = asyncio.get_running_loop()
    user_id = await loop.run_in_executor(None, synapse.register, "dbless")
    token, device_id = await loop.run_in_executor(None, synapse.login, user_id)
    workdir = tempfile.mkdtemp(prefix="encstate-dbless-")
    bot = BotProcess(
        synapse,
        user_id,
        token,
        device_id,
        database="postgres://postgres@127.0.0.1:1/encstate",
        workdir=workdir,
    )
    bot.start()
    assert bot.proc is not None
    code = await loop.run_in_executor(None, bot.proc.wait, 60)
    output = bot.tail(200)  # its log and what it printed
    assert code != 0
    assert "Connect call failed ('127.0.0.1', 1)" in output
