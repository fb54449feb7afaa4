"""Command tests through maubot.testing: the real plugin class, a mocked homeserver."""

from __future__ import annotations

import os

from maubot.testing import TestBot
from maubot.testing.fixtures import (  # noqa: F401  (pytest fixtures)
    maubot_plugin,
    maubot_plugin_config,
    maubot_plugin_db,
    maubot_plugin_meta,
)
import pytest
import pytest_asyncio

from encstate_bot import EncStateBot
from encstate_bot.config import Config
from encstate_bot.migrations import upgrade_table

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest_asyncio.fixture
async def maubot_test_bot():
    # Port 9 on loopback refuses at once: the plugin's start-up rescan fails fast and quietly.
    return TestBot(mxid="@encstate:example.org", mxurl="http://127.0.0.1:9")


@pytest.fixture
def maubot_plugin_path():
    from pathlib import Path

    return Path(ROOT)


@pytest.fixture
def maubot_plugin_class():
    return EncStateBot


@pytest.fixture
def maubot_plugin_config_class():
    return Config


@pytest.fixture
def maubot_upgrade_table():
    return upgrade_table


@pytest.fixture
def maubot_plugin_config_dict():
    return {}


@pytest.fixture
def maubot_plugin_config_overrides():
    return {}


@pytest.fixture(autouse=True)
def encryption_assumed(request):
    """maubot.testing's client has no end-to-end encryption, so every reply would open with
    the warning that says so: the command tests assume a bot that works, except those marked
    ``no_encryption``."""
    if "maubot_plugin" in request.fixturenames and not request.node.get_closest_marker(
        "no_encryption"
    ):
        plugin = request.getfixturevalue("maubot_plugin")
        plugin.commands.problem = lambda: None
