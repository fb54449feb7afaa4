"""SQL ``IN (...)`` lists: numbered placeholders (``$1, $2, ...``, which mautrix's database layer
also serves on SQLite) and the chunks a long list of values is queried in.

A chunk stays well under SQLite's oldest limit on bound parameters (999), with room for the
few other parameters a statement binds before the list.
"""

from __future__ import annotations

from typing import Iterator, Sequence, TypeVar

T = TypeVar("T")

IN_CHUNK = 400  # values per IN (...) list


def placeholders(count: int, offset: int = 0) -> str:
    """``$n`` markers for ``count`` values that follow ``offset`` other parameters."""
    return ", ".join(f"${i + 1 + offset}" for i in range(count))


def chunks(values: Sequence[T], size: int = IN_CHUNK) -> Iterator[Sequence[T]]:
    """``values`` in slices of at most ``size``, in order."""
    for start in range(0, len(values), size):
        yield values[start : start + size]
