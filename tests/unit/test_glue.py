"""glue.py: what it relies on in mautrix and python-olm is there, the dependency bound matches
pyproject.toml, its hooks behave, and nothing else reaches into those internals."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
import re
from types import SimpleNamespace
from typing import Any

from mautrix.crypto import OlmMachine, PgCryptoStore
from mautrix.crypto.encrypt_olm import OlmEncryptionMachine
import olm
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
import pytest

from encstate_bot import glue, sql

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
NEED = f"encstate needs mautrix {glue.MAUTRIX_RANGE} (installed: {glue.installed_mautrix()})"


def machine() -> OlmMachine:
    """A real Olm machine on mautrix's SQL crypto store (nothing is opened or sent)."""
    store = PgCryptoStore("@bot:x", "pickle", SimpleNamespace(log=logging.getLogger("test")))
    client = SimpleNamespace(add_event_handler=lambda *args, **kwargs: None)
    return OlmMachine(client, store, None)


def defining_class(cls: type, name: str) -> type:
    return next(klass for klass in cls.__mro__ if name in vars(klass))


# check() ------------------------------------------------------------------------------------


def test_check_finds_everything_with_the_installed_packages() -> None:
    assert glue.check() == []
    assert glue.check(machine()) == []


@pytest.mark.parametrize(
    "name", ["_fetch_keys", "_receive_room_key", "_receive_forwarded_room_key"]
)
def test_check_names_a_missing_machine_method(monkeypatch, name: str) -> None:
    monkeypatch.delattr(defining_class(OlmMachine, name), name)
    problems = glue.check()
    assert len(problems) == 1
    assert name in problems[0] and problems[0].endswith(NEED)


def test_check_names_a_fetch_keys_without_include_untracked(monkeypatch) -> None:
    async def _fetch_keys(self: Any, users: list[str]) -> dict:
        return {}

    monkeypatch.setattr(defining_class(OlmMachine, "_fetch_keys"), "_fetch_keys", _fetch_keys)
    problems = glue.check()
    assert len(problems) == 1 and "include_untracked" in problems[0]


def test_check_names_a_lock_mautrix_no_longer_sets(monkeypatch) -> None:
    def __init__(self: Any) -> None:
        self._claim_keys_lock = asyncio.Lock()

    monkeypatch.setattr(OlmEncryptionMachine, "__init__", __init__)
    problems = glue.check()
    assert len(problems) == 1
    assert "_olm_lock" in problems[0] and problems[0].endswith(NEED)


def test_check_names_what_an_instance_lacks() -> None:
    crypto = machine()
    del crypto._olm_lock
    del crypto.crypto_store._olm_cache
    problems = glue.check(crypto)
    assert len(problems) == 2
    assert "_olm_lock" in problems[0] and "_olm_cache" in problems[1]
    assert all(problem.endswith(NEED) for problem in problems)


def test_check_names_missing_python_olm_internals(monkeypatch) -> None:
    monkeypatch.delattr(olm.Session, "_check_error")
    monkeypatch.setattr(glue, "lib", SimpleNamespace(olm_error=lambda: 0))
    problems = glue.check()
    assert any("_check_error" in problem for problem in problems)
    assert any("lib.olm_encrypt" in problem for problem in problems)
    assert all(problem.endswith(NEED) for problem in problems)
    monkeypatch.setattr(glue, "lib", None)
    assert any("cannot be imported" in problem for problem in glue.check())


# The dependency bound -----------------------------------------------------------------------


def test_installed_mautrix_is_in_the_range_pyproject_declares() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(dep) for dep in project["dependencies"]]
    mautrix = next(req for req in declared if req.name == "mautrix")
    assert mautrix.specifier == SpecifierSet(glue.MAUTRIX_RANGE)
    assert mautrix.specifier.contains(glue.installed_mautrix(), prereleases=True)
    assert any(spec.operator == "<" for spec in mautrix.specifier), "no upper bound"
    required = [
        Requirement(line)
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert next(req for req in required if req.name == "mautrix").specifier == mautrix.specifier


# Hooks on the Olm machine -------------------------------------------------------------------


class Receivers:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self._olm_lock = asyncio.Lock()

    async def _receive_room_key(self, evt: Any) -> None:
        self.calls.append(("room_key", evt))
        if evt == "mautrix fails":
            raise ValueError(evt)

    async def _receive_forwarded_room_key(self, evt: Any) -> None:
        self.calls.append(("forwarded", evt))

    async def _fetch_keys(self, users: list[str], include_untracked: bool = False) -> dict:
        self.calls.append(("fetch", (users, include_untracked)))
        return {user: {} for user in users}


async def test_after_runs_once_mautrix_has_handled_the_key(caplog) -> None:
    crypto = Receivers()
    seen: list[tuple[Any, bool]] = []

    async def after(evt: Any, is_room_key: bool) -> None:
        crypto.calls.append(("after", evt))
        seen.append((evt, is_room_key))
        if evt == "after fails":
            raise RuntimeError("boom")

    restore = glue.patch_key_receivers(crypto, after, logging.getLogger("test.glue"))
    await crypto._receive_room_key("a")
    await crypto._receive_forwarded_room_key("b")
    assert crypto.calls == [("room_key", "a"), ("after", "a"), ("forwarded", "b"), ("after", "b")]
    assert seen == [("a", True), ("b", False)]
    with caplog.at_level(logging.ERROR, logger="test.glue"):
        await crypto._receive_room_key("after fails")  # logged, not raised to mautrix
    assert "_receive_room_key" in caplog.text and "boom" in caplog.text
    with pytest.raises(ValueError):
        await crypto._receive_room_key("mautrix fails")
    assert seen[-1] == ("after fails", True)  # no after for what mautrix failed on
    restore()
    assert "_receive_room_key" not in vars(crypto)
    assert "_receive_forwarded_room_key" not in vars(crypto)
    crypto.calls.clear()
    await crypto._receive_room_key("c")
    assert crypto.calls == [("room_key", "c")]


async def test_a_missing_receiver_is_skipped_with_a_warning(caplog) -> None:
    crypto = SimpleNamespace(calls=[])

    async def receive(evt: Any) -> None:
        crypto.calls.append(evt)

    crypto._receive_forwarded_room_key = receive

    async def after(evt: Any, is_room_key: bool) -> None:
        crypto.calls.append(("after", evt, is_room_key))

    with caplog.at_level(logging.WARNING, logger="test.glue"):
        restore = glue.patch_key_receivers(crypto, after, logging.getLogger("test.glue"))
    assert "mautrix has no _receive_room_key" in caplog.text
    await crypto._receive_forwarded_room_key("x")
    assert crypto.calls == ["x", ("after", "x", False)]
    restore()  # an instance attribute from before the patch is put back, not deleted
    assert crypto._receive_forwarded_room_key is receive


async def test_fetch_keys_and_the_lock_are_the_machines() -> None:
    crypto = Receivers()
    assert await glue.fetch_keys(crypto, ["@a:x"]) == {"@a:x": {}}
    assert crypto.calls == [("fetch", (["@a:x"], True))]
    assert glue.olm_lock(crypto) is crypto._olm_lock
    real = machine()
    assert glue.olm_lock(real) is real._olm_lock


# SQL IN lists -------------------------------------------------------------------------------


def test_in_lists_are_numbered_and_chunked() -> None:
    assert sql.placeholders(3) == "$1, $2, $3"
    assert sql.placeholders(2, offset=1) == "$2, $3"
    values = list(range(sql.IN_CHUNK * 2 + 1))
    parts = list(sql.chunks(values))
    assert [len(part) for part in parts] == [sql.IN_CHUNK, sql.IN_CHUNK, 1]
    assert [v for part in parts for v in part] == values
    assert list(sql.chunks([])) == []


# Nothing else reaches into the internals ----------------------------------------------------

INTERNALS = (
    "_libolm",
    "._session",
    "._olm_cache",
    "._olm_lock",
    "._fetch_keys",
    "_receive_room_key",
    "_receive_forwarded_room_key",
    "._check_error",
)


def test_only_glue_touches_mautrix_and_libolm_internals() -> None:
    pattern = re.compile("|".join(rf"{re.escape(name)}\b" for name in INTERNALS))
    offenders = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted((ROOT / "encstate_bot").glob("**/*.py"))
        if path.name != "glue.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
