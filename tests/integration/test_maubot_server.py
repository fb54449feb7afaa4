"""encstate in a full maubot server (``python -m maubot``), set up the way an operator does it:
the management API logs in, uploads the ``.mbp`` that ``mbc build`` made, creates the bot's
client and an instance. Each story runs once on SQLite and once on PostgreSQL (the
``maubot_server`` fixture's parameter), so the suite's PostgreSQL rerun skips them
(``db_agnostic``)."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from ruamel.yaml import YAML

from harness.client import all_hold, eventually
from harness.maubot_server import PLUGIN_ID, MaubotServer

pytestmark = [pytest.mark.integration, pytest.mark.db_agnostic]

ANY_STATUS = tuple(range(100, 600))


def config_of(instance: dict) -> dict:
    return YAML(typ="safe").load(instance["config"])


def reads_name(user, room: str, name: str):
    async def check() -> bool:
        return (await user.read_state(room)).get("m.room.name") == {"name": name}

    return check


def took(what: str, since: float) -> None:
    print(f"{what}: {time.monotonic() - since:.1f} s")


async def test_core_story_through_the_management_api(
    world, maubot_server: MaubotServer, maubot_plugin
) -> None:
    server = maubot_server
    started = time.monotonic()
    uploaded = await server.upload_plugin(maubot_plugin)
    assert uploaded["id"] == PLUGIN_ID
    bot = await server.bot()
    client = await server.get_client(bot.user_id)
    assert client["started"] and client["device_id"] == bot.device_id
    assert client["fingerprint"]  # maubot gave it end-to-end encryption
    instance = await bot.instance()
    assert (instance["type"], instance["enabled"], instance["started"]) == (PLUGIN_ID, True, True)
    assert instance["database_engine"] == ("postgres" if server.postgres else "sqlite")

    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)  # invited, power level 50, joined
    name = await world.set_name(admin, bot, room, "Project Nightingale")

    # A newcomer gets the state session pushed on join and can read the room name.
    newcomer = await world.member("newcomer", admin, room)
    await eventually(reads_name(newcomer, room, "Project Nightingale"))
    assert newcomer.forwarded_for(name.session_id)[0]["sender"] == bot.user_id

    # A member's new device asks for the session, and is answered.
    laptop = await world.second_device(newcomer)
    request_id = await laptop.request_key(room, name.session_id, bot.user_id, [bot.device_id])
    await eventually(reads_name(laptop, room, "Project Nightingale"))
    rows = await world.audit(bot, room)
    assert [(r.decision, r.trigger) for r in rows if r.request_id == request_id] == [
        ("share", "request")
    ]

    status = await admin.command(room, "!encstate status", bot.user_id)
    assert "on (io.element.msc4362.encrypt_state_events)" in status
    assert "50 > users_default 0: empowered" in status

    # maubot mounts the plugin's web app: health and metrics, where the README says
    web = f"{server.url}/_matrix/maubot/plugin/{bot.instance_id}"
    async with world.http.get(f"{web}/health") as resp:
        health = await resp.json(content_type=None)
        assert resp.status == 200, health
    assert health["e2ee"] is True and health["status"] == "ok"
    async with world.http.get(f"{web}/metrics") as resp:
        assert resp.status == 200
        assert 'encstate_keys_total{decision="share",trigger="request"}' in await resp.text()
    took("story", started)

    # maubot goes down; someone joins meanwhile; once it is back, they get the keys too.
    started = time.monotonic()
    server.stop()
    late = await world.member("late", admin, room)
    await server.restart()
    await bot.wait_ready()
    await eventually(reads_name(late, room, "Project Nightingale"), timeout=30)
    assert late.forwarded_for(name.session_id)[0]["sender"] == bot.user_id
    assert (await bot.instance())["started"]
    took("restart story", started)


async def test_a_device_id_added_after_the_instance_exists_turns_encryption_on(
    world, maubot_server: MaubotServer
) -> None:
    server = maubot_server
    started = time.monotonic()
    bot = await server.bot(with_device=False)
    await bot.wait_for_log(r"\[ERROR@[^\]]+\] .*end-to-end encryption")
    assert not (await server.get_client(bot.user_id))["fingerprint"]

    # maubot swaps in a new client with encryption but leaves the instance running on the old
    # one: encstate has to notice and restart itself.
    bot.mark()
    client = await server.put_client(bot.user_id, bot.access_token, device_id=bot.device_id)
    assert client["device_id"] == bot.device_id and client["fingerprint"]
    await bot.wait_for_log(r"encstate: the client changed", timeout=30, everything=True)
    await bot.wait_ready()
    assert (await bot.instance())["started"]

    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    name = await world.set_name(admin, bot, room, "Nightingale")
    newcomer = await world.member("newcomer", admin, room)
    await eventually(reads_name(newcomer, room, "Nightingale"))
    assert newcomer.forwarded_for(name.session_id)[0]["sender"] == bot.user_id
    took("device id story", started)


async def test_a_bad_config_edit_is_rejected_and_the_old_config_kept(
    world, maubot_server: MaubotServer
) -> None:
    server = maubot_server
    started = time.monotonic()
    bot = await server.bot()
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    assert config_of(await bot.instance())["read_only_commands"] == "members"

    bot.mark()
    bad = bot.config_text({"read_only_commands": "everyone"})
    status, body = await server.request(
        "PUT", f"/instance/{bot.instance_id}", json={"config": bad}, ok=ANY_STATUS
    )
    assert status == 200, body
    instance = await bot.instance()
    assert config_of(instance)["read_only_commands"] == "members"
    assert instance["started"] and instance["enabled"]
    kept = r"encstate kept its previous config: config key 'read_only_commands'"
    await bot.wait_for_log(kept, timeout=10, everything=True)
    await asyncio.sleep(0.5)
    lines = [line for line in bot.log_text(everything=True).splitlines() if re.search(kept, line)]
    assert len(lines) == 1, lines

    reply = await admin.command(room, "!encstate status", bot.user_id)
    assert "on (io.element.msc4362.encrypt_state_events)" in reply

    await server.restart()
    await bot.wait_ready()
    instance = await bot.instance()
    assert instance["enabled"] and instance["started"]
    assert config_of(instance)["read_only_commands"] == "members"
    took("bad config story", started)


async def test_a_rate_limit_change_applies_live(world, maubot_server: MaubotServer) -> None:
    server = maubot_server
    started = time.monotonic()
    bot = await server.bot(config={"push_on_join": False})
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    await admin.new_session(room)
    name = await admin.send_state(room, "m.room.name", "", {"name": "Nightingale"})
    await admin.new_session(room)
    topic = await admin.send_state(room, "m.room.topic", "", {"topic": "birds"})
    for sent in (name, topic):
        await world.wait_valid(bot, sent.event_id)
    newcomer = await world.member("newcomer", admin, room)

    # Under the default limits one device asking for two sessions at once gets both.
    for sent in (name, topic):
        await newcomer.request_key(room, sent.session_id, bot.user_id, [bot.device_id])
    await eventually(lambda: all_hold([newcomer], room, [name.session_id, topic.session_id]))

    bot.mark()
    await bot.put_config({"rate_limits": {"per_device": {"burst": 1, "per_second": 0.01}}})
    await bot.wait_for_log(
        r"encstate applied config changes live: .*rate_limits", timeout=10, everything=True
    )
    assert (await bot.instance())["started"]

    # Now a device gets one answer; its second request is dropped.
    laptop = await world.second_device(newcomer)
    await laptop.request_key(room, name.session_id, bot.user_id, [bot.device_id])
    second = await laptop.request_key(room, topic.session_id, bot.user_id, [bot.device_id])
    await eventually(lambda: laptop.has_session(room, name.session_id))
    await bot.wait_for_log(rf"Dropping key request {second} from \S+: rate limited \(device\)")
    rows = [r for r in await world.audit(bot, room) if r.request_id == second]
    assert len(rows) == 1 and rows[0].decision == "ignore", rows
    assert rows[0].reason.startswith("rate limited (device)")
    await asyncio.sleep(1)
    assert not await laptop.has_session(room, topic.session_id)
    took("rate limit story", started)
