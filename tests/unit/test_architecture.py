"""The shape docs/architecture.md promises: data flows one way, no module reads another's
private members, and only the glue module touches mautrix's and libolm's internals."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "encstate_bot"


def local_imports(path: Path) -> set[str]:
    """The encstate_bot modules a module imports (TYPE_CHECKING imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    return {p.stem: local_imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def test_the_modules_import_each_other_without_a_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for other in sorted(edges.get(module, ())):
            if state.get(other) == 1:
                cycle = path[path.index(other) :] + [other]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if other not in state:
                visit(other)
        path.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_the_pure_core_does_no_io() -> None:
    """The policy, the planner and the pure models import nothing that talks to the network,
    the database or mautrix's crypto."""
    pure = ("policy", "planner", "ledger", "links", "seals", "room_policy", "triggers", "protocol")
    edges = graph()
    # the planner names OutboxItem (a plain value); seals build their m.room_key in room_keys
    allowed = set(pure) | {"store", "room_keys"}
    for module in pure:
        assert edges[module] <= allowed, (module, edges[module] - allowed)
        source = (PACKAGE / f"{module}.py").read_text()
        for word in ("import mautrix", "from mautrix", "import olm", "aiohttp", "asyncio"):
            assert word not in source, (module, word)


def test_no_module_reads_another_modules_private_members() -> None:
    """``x._name`` only on ``self`` and ``cls`` (glue.py, whose job it is, excepted)."""
    offenders = []
    for path in PACKAGE.glob("*.py"):
        if path.stem == "glue":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not offenders, offenders
