"""Background tasks: stopping them, and leaving nothing for asyncio to complain about."""

from __future__ import annotations

import asyncio
from typing import Iterable


def settle(tasks: Iterable[asyncio.Future | None]) -> None:
    """Cancel what is still running and retrieve what failed (it was logged or raised by the
    caller already), so that nothing is left for asyncio to complain about."""
    for task in tasks:
        if task is None:
            continue
        if not task.done():
            task.cancel()
        elif not task.cancelled():
            task.exception()


async def stop_all(tasks: Iterable[asyncio.Future | None]) -> None:
    """Cancel these tasks and wait until each has stopped (whatever it raised)."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    for task in running:
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
