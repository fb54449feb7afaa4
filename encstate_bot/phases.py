"""Where a delivery's time went: wall milliseconds per named phase, for the batch log line.

An operator reading why an answer was slow, and the scale benchmark's request timeline, read
these lines (``Batch of …: … (0.05 s: rooms 3 ms, devices 10 ms, …)``)."""

from __future__ import annotations

from contextlib import asynccontextmanager
import time
from typing import AsyncIterator


class Phases:
    """Milliseconds per phase, in the order first seen. ``mark(name)`` books the time since
    the previous mark to ``name``; ``timed(name)`` books a block's time (blocks of concurrent
    groups overlap, so their sum may exceed the wall time)."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self.at = time.monotonic()

    def add(self, name: str, ms: float) -> None:
        self.ms[name] = self.ms.get(name, 0.0) + ms

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.add(name, 1000 * (now - self.at))
        self.at = now

    @asynccontextmanager
    async def timed(self, name: str) -> AsyncIterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.add(name, 1000 * (time.monotonic() - started))

    def text(self) -> str:
        return ", ".join(f"{name} {ms:.0f} ms" for name, ms in self.ms.items())

    def report(self) -> str:
        """The phases so far, as text, and a fresh start for the next report."""
        text = self.text()
        self.ms = {}
        self.at = time.monotonic()
        return text
