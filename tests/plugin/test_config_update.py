"""Config edits in maubot's manager reach a running instance through
``on_external_config_update``: a bad edit is refused and the old config kept (also in maubot's
copy, so the next start does not disable the instance); a good one applies live."""

from __future__ import annotations

import asyncio
import io
import logging

import aiohttp
from maubot.loader import PluginMeta
from maubot.standalone.loader import FileSystemLoader
from mautrix.util.config import RecursiveDict
import pytest
from ruamel.yaml import YAML

from encstate_bot import EncStateBot
from encstate_bot.config import Config

from .conftest import ROOT

yaml = YAML()


class ManagedInstance:
    """What maubot's PluginInstance does with a plugin's config: a YAML string it loads from,
    saves into (and stores), and replaces when the admin saves an edit."""

    def __init__(self, text: str) -> None:
        self.config_str = text
        with open(f"{ROOT}/base-config.yaml") as fh:
            self.base = RecursiveDict(yaml.load(fh))

    def load(self):
        return yaml.load(self.config_str)

    def save(self, data) -> None:
        buf = io.StringIO()
        yaml.dump(data, buf)
        self.config_str = buf.getvalue()

    def edit(self, plugin, **changes) -> None:
        """The admin edits keys (dotted) in the manager and saves (maubot's update_config)."""
        data = yaml.load(self.config_str)
        for dotted, value in changes.items():
            node = data
            *parents, last = dotted.split(".")
            for part in parents:
                node = node[part]
            node[last] = value
        buf = io.StringIO()
        yaml.dump(data, buf)
        self.config_str = buf.getvalue()
        plugin.on_external_config_update()


@pytest.fixture
async def managed(maubot_test_bot, maubot_plugin_db, maubot_plugin_meta: PluginMeta):
    instance = ManagedInstance("")
    config = Config(instance.load, instance.base.clone, instance.save)
    loader = FileSystemLoader(ROOT, maubot_plugin_meta)
    async with aiohttp.ClientSession() as http:
        plugin = EncStateBot(
            client=maubot_test_bot.client,
            loop=asyncio.get_running_loop(),
            http=http,
            instance_id="tests",
            log=logging.getLogger("test.config"),
            config=config,
            database=maubot_plugin_db,
            webapp=None,
            webapp_url=None,
            loader=loader,
        )
        await plugin.internal_start()
        try:
            yield instance, plugin
        finally:
            await plugin.internal_stop()


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("test")]


async def test_a_bad_edit_is_refused_and_the_old_config_kept(managed, caplog) -> None:
    instance, plugin = managed
    with caplog.at_level(logging.INFO):
        instance.edit(plugin, read_only_commands="everyone")
    assert plugin.config["read_only_commands"] == "members"
    # maubot's copy is the old one again: the next start loads it and does not fail
    assert yaml.load(instance.config_str)["read_only_commands"] == "members"
    refused = [m for m in messages(caplog) if "kept its previous config" in m]
    assert refused == [
        "encstate kept its previous config: config key 'read_only_commands' must be "
        '"members" or "admins", not \'everyone\''
    ]
    fresh = Config(instance.load, instance.base.clone, lambda _data: None)
    fresh.load_and_update()  # what the next start does: no ConfigError
    assert fresh["read_only_commands"] == "members"


async def test_a_config_that_is_not_yaml_is_refused(managed, caplog) -> None:
    instance, plugin = managed
    instance.config_str = "admins: [unclosed\n"
    with caplog.at_level(logging.INFO):
        plugin.on_external_config_update()
    assert any("kept its previous config" in m for m in messages(caplog))
    assert yaml.load(instance.config_str)["read_only_commands"] == "members"


async def test_rate_limits_and_the_duplicate_window_apply_live(managed, caplog) -> None:
    instance, plugin = managed
    gate = plugin.requests.gate
    assert gate.per_device.burst == 200
    for n in range(3):  # allowed under the default burst
        assert gate.admit("@u:x", "D", f"r{n}", f"s{n}", now=100.0) is None
    with caplog.at_level(logging.INFO):
        instance.edit(
            plugin,
            **{
                "rate_limits.per_device.burst": 1,
                "rate_limits.per_device.per_second": 0.01,
                "duplicate_window_seconds": 30,
            },
        )
    assert plugin.requests.gate is gate  # the same gate, new limits
    assert (gate.per_device.burst, gate.per_device.per_second, gate.recent.window) == (
        1.0,
        0.01,
        30,
    )
    # the device's tokens are capped at the new burst: one more, then no more
    assert gate.admit("@u:x", "D", "r8", "s8", now=100.5) is None
    assert gate.admit("@u:x", "D", "r9", "s9", now=100.5) == "rate limited (device)"
    assert gate.admit("@v:x", "E", "r1", "s1", now=100.5) is None
    assert gate.admit("@v:x", "E", "r2", "s2", now=100.6) == "rate limited (device)"
    assert (
        "encstate applied config changes live: rate_limits.per_device.burst, "
        "rate_limits.per_device.per_second, duplicate_window_seconds"
    ) in messages(caplog)


async def test_cross_signing_changes_run_the_set_up_again(managed, caplog, monkeypatch) -> None:
    instance, plugin = managed
    calls: list[tuple] = []

    async def set_up(recovery_key, bootstrap) -> None:
        calls.append((recovery_key, bootstrap))

    monkeypatch.setattr(plugin.identity, "set_up", set_up)
    # as if the client had encryption
    monkeypatch.setattr(type(plugin.encryption), "on", property(lambda _self: True))
    instance.edit(plugin, **{"cross_signing.bootstrap": True})
    for _ in range(50):
        if calls:
            break
        await asyncio.sleep(0.01)
    assert calls == [(None, True)]


async def test_an_edit_that_changes_nothing_says_nothing(managed, caplog) -> None:
    instance, plugin = managed
    with caplog.at_level(logging.INFO):
        instance.edit(plugin, push_on_join=True)  # the default already
    assert not [m for m in messages(caplog) if "config" in m]


async def test_an_edit_of_the_wrong_shape_or_an_infinite_number_is_refused(
    managed, caplog
) -> None:
    instance, plugin = managed
    with caplog.at_level(logging.INFO):
        instance.edit(plugin, rate_limits=5)
        instance.edit(plugin, duplicate_window_seconds=float("inf"))
    refused = [m for m in messages(caplog) if "kept its previous config" in m]
    assert refused[0].startswith(
        "encstate kept its previous config: the edited config does not have the expected shape"
    )
    assert "config key 'duplicate_window_seconds' must be a number >= 0" in refused[1]
    assert plugin.config["duplicate_window_seconds"] == 5
    assert yaml.load(instance.config_str)["rate_limits"]["per_device"]["burst"] == 200
