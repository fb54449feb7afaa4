"""`mbc build` packs a working .mbp: the plugin package, its metadata and base config."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from ruamel.yaml import YAML

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_mbc_build_produces_a_loadable_plugin(tmp_path) -> None:
    out = tmp_path / "encstate.mbp"
    mbc = os.path.join(os.path.dirname(sys.executable), "mbc")
    subprocess.run([mbc, "build", "-o", str(out), ROOT], check=True, capture_output=True)
    with zipfile.ZipFile(out) as mbp:
        names = set(mbp.namelist())
        meta = YAML(typ="safe").load(mbp.read("maubot.yaml"))
        base = YAML(typ="safe").load(mbp.read("base-config.yaml"))
    assert {"maubot.yaml", "base-config.yaml", "encstate_bot/__init__.py"} <= names
    assert "encstate_bot/bot.py" in names and "encstate_bot/policy.py" in names
    assert not any(n.startswith(("tests/", "harness/")) for n in names)
    assert meta["database"] is True and meta["database_type"] == "asyncpg"
    assert meta["config"] is True and meta["main_class"] == "EncStateBot"
    assert base["push_on_join"] is True


LOAD = """
import asyncio, sys
from maubot.loader.zip import ZippedPluginLoader

async def main():
    cls = await ZippedPluginLoader.get(sys.argv[1]).load()
    import encstate_bot
    print(cls.__name__, cls.get_config_class().__name__, encstate_bot.__file__)

asyncio.run(main())
"""


def test_maubot_loads_the_plugin_class_from_the_package(tmp_path) -> None:
    """maubot's own zip loader imports the plugin from the .mbp, not from this checkout."""
    out = tmp_path / "encstate.mbp"
    mbc = os.path.join(os.path.dirname(sys.executable), "mbc")
    subprocess.run([mbc, "build", "-o", str(out), ROOT], check=True, capture_output=True)
    result = subprocess.run(
        [sys.executable, "-c", LOAD, str(out)],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    name, config, origin = result.stdout.split()
    assert (name, config) == ("EncStateBot", "Config")
    assert origin.startswith(str(out))
