"""`mbc build` packs a working .mbp: the plugin package, its metadata and base config; the wheel
holds the package alone; requirements, pyproject.toml and constraints.txt agree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version
import pytest
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


# Packaging: the wheel, the dependency specifiers and the constraints file.

COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv*",
    "node_modules",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "*.mbp",
)

WHERE_IS_THE_BASE_CONFIG = """
import encstate_bot, encstate_bot.config as config
print(encstate_bot.__file__)
print(config.BASE_CONFIG)
"""


def test_the_wheel_holds_the_plugin_package_and_its_base_config(tmp_path) -> None:
    """`pip install .` installs encstate_bot with base-config.yaml, and nothing else."""
    src = tmp_path / "src"  # a copy, so that the build leaves nothing behind in the checkout
    shutil.copytree(ROOT, src, ignore=COPY_IGNORE)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["--quiet", "--wheel-dir", str(dist), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("encstate-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        packaged_base = whl.read("encstate_bot/base-config.yaml")
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert whl.read(top_level).decode().split() == ["encstate_bot"]
        whl.extractall(tmp_path / "site")
    assert {"encstate_bot/__init__.py", "encstate_bot/config.py", "encstate_bot/bot.py"} <= names
    with open(os.path.join(ROOT, "base-config.yaml"), "rb") as fh:
        assert packaged_base == fh.read()
    assert not any(n.split("/")[0] in ("harness", "bench", "tests") for n in names)
    assert not any(n.startswith("base-config.yaml") for n in names)

    # installed (a wheel is installed by unpacking it), config.py finds the packaged copy
    result = subprocess.run(
        [sys.executable, "-c", WHERE_IS_THE_BASE_CONFIG],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
    )
    package, base_config = result.stdout.split()
    assert package == str(tmp_path / "site" / "encstate_bot" / "__init__.py")
    assert base_config == str(tmp_path / "site" / "encstate_bot" / "base-config.yaml")


def _requirements(name: str) -> list[Requirement]:
    """The requirements a requirements file lists itself (not those it pulls in with -r)."""
    with open(os.path.join(ROOT, name)) as fh:
        lines = (line.split("#", 1)[0].strip() for line in fh)
        return [Requirement(line) for line in lines if line and not line.startswith("-")]


def _key(req: Requirement) -> tuple[str, tuple[str, ...], SpecifierSet]:
    return canonicalize_name(req.name), tuple(sorted(req.extras)), req.specifier


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)


def test_pyproject_and_requirements_agree_and_bound_every_dependency() -> None:
    project = _pyproject()["project"]
    runtime = [Requirement(r) for r in project["dependencies"]]
    test = [Requirement(r) for r in project["optional-dependencies"]["test"]]
    assert sorted(map(_key, runtime)) == sorted(map(_key, _requirements("requirements.txt")))
    assert sorted(map(_key, test)) == sorted(map(_key, _requirements("requirements-dev.txt")))
    for req in runtime + test:
        assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), (
            f"{req} has no upper bound"
        )
    assert _pyproject()["tool"]["setuptools"]["packages"] == ["encstate_bot"]


def _constraints() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    with open(os.path.join(ROOT, "constraints.txt")) as fh:
        for line in fh:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_constraints_pin_every_requirement_within_its_range() -> None:
    pins = _constraints()
    assert "encstate" not in pins and "pip" not in pins
    for name in ("requirements.txt", "requirements-dev.txt"):
        for req in _requirements(name):
            pin = pins.get(canonicalize_name(req.name))
            assert pin is not None, f"{req.name} ({name}) is not pinned in constraints.txt"
            assert req.specifier.contains(pin, prereleases=True), (
                f"constraints.txt pins {req.name}=={pin}, outside {req.specifier} ({name})"
            )
    # the build system's setuptools too: tests build the wheel with the venv's own
    (backend,) = map(Requirement, _pyproject()["build-system"]["requires"])
    assert backend.specifier.contains(pins[canonicalize_name(backend.name)])


def _make_dry_run(target: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("no make on PATH")
    # MBC as if no mbc were on PATH; -B: every recipe, as on a fresh checkout
    result = subprocess.run(
        ["make", "-n", "-B", target, "MBC=.venv-build/bin/mbc"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout


def test_make_build_installs_maubot_alone_and_make_venv_the_constraints() -> None:
    build = _make_dry_run("build")
    assert "pip install --quiet -c constraints.txt maubot\n" in build
    assert ".venv-build/bin/mbc build -o encstate.mbp" in build
    for needless in ("requirements", "synapse", "pytest", "ruff", ".venv/"):
        assert needless not in build
    assert "-c constraints.txt -r requirements-dev.txt" in _make_dry_run("venv")
