"""Without encryption the bot says what to do: python-olm missing (the plugin still loads and
refuses to start with the install hint), no device ID, a client maubot swapped underneath."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

from encstate_bot import e2ee

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WITHOUT_OLM = """
import asyncio, logging, sys
from unittest.mock import MagicMock

class NoOlm:
    def find_spec(self, name, path=None, target=None):
        if name == "olm" or name.startswith("olm.") or name == "_libolm":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoOlm())
import encstate_bot  # what maubot's loader does
from encstate_bot import EncStateBot

assert EncStateBot.get_config_class().__name__ == "Config"
assert EncStateBot.get_db_upgrade_table() is not None
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
plugin = EncStateBot(
    client=MagicMock(), loop=asyncio.new_event_loop(), http=None, instance_id="encstate",
    log=logging.getLogger("encstate"), config=MagicMock(), database=None, webapp=None,
    webapp_url=None, loader=None,
)
try:
    asyncio.run(plugin.start())
except RuntimeError as e:
    print("START FAILED:", e)
else:
    print("STARTED")
"""


def test_the_plugin_loads_without_python_olm_and_start_says_to_install_the_extra() -> None:
    out = subprocess.run(
        [sys.executable, "-c", WITHOUT_OLM],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=60,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "START FAILED: " + e2ee.INSTALL_ENCRYPTION in text, text
    assert "CRITICAL " + e2ee.INSTALL_ENCRYPTION in text, text  # in the log too


def test_olm_missing_tells_olm_from_other_import_errors() -> None:
    assert e2ee.olm_missing(ModuleNotFoundError("x", name="olm"))
    assert e2ee.olm_missing(ModuleNotFoundError("x", name="_libolm"))
    assert not e2ee.olm_missing(ModuleNotFoundError("x", name="asyncpg"))
    assert not e2ee.olm_missing(ImportError("cannot import name 'x'"))


class Instance:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def stop(self) -> None:
        self.calls.append("stop")

    async def start(self) -> None:
        self.calls.append("start")


def encryption(client, current, instance, log=None):
    return e2ee.Encryption(
        client,
        "encstate",
        log or logging.getLogger("t"),
        find_client=lambda _: current,
        find_instance=lambda _: instance,
    )


def test_problem_names_what_the_admin_must_do() -> None:
    with_crypto = SimpleNamespace(crypto=object(), device_id="DEV")
    assert encryption(with_crypto, None, None).problem() is None
    no_device = SimpleNamespace(crypto=None, device_id=None)
    assert encryption(no_device, None, None).problem() == e2ee.NO_DEVICE
    not_set_up = SimpleNamespace(crypto=None, device_id="DEV")
    assert encryption(not_set_up, None, None).problem() == e2ee.NOT_SET_UP


async def test_the_same_client_is_not_a_change() -> None:
    client = SimpleNamespace(crypto=None, device_id=None)
    enc = encryption(client, SimpleNamespace(client=client), Instance())
    assert not enc.check()
    assert not enc.stale
    assert not encryption(client, None, Instance()).check()  # standalone: nothing to compare


async def test_a_swapped_client_restarts_the_instance_once(caplog) -> None:
    old = SimpleNamespace(crypto=None, device_id=None)
    new = SimpleNamespace(crypto=object(), device_id="DEV")
    instance = Instance()
    enc = encryption(old, SimpleNamespace(client=new), instance)
    with caplog.at_level(logging.WARNING):
        assert enc.check()
        assert enc.check()  # once
        await asyncio.wait_for(enc._restart, 5)
    assert instance.calls == ["stop", "start"]
    assert [r.message for r in caplog.records].count(e2ee.CHANGED) == 1
    assert not enc.on
    assert enc.problem() == e2ee.RESTART_BY_HAND


async def test_a_swapped_client_without_an_instance_to_restart_says_so(caplog) -> None:
    old = SimpleNamespace(crypto=object(), device_id="A")
    new = SimpleNamespace(crypto=object(), device_id="B")
    enc = encryption(old, SimpleNamespace(client=new), None)
    with caplog.at_level(logging.ERROR):
        assert enc.check()
        assert enc.check()
    assert [r.message for r in caplog.records] == [e2ee.RESTART_BY_HAND]
