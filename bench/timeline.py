"""`python -m bench.timeline [users]`: the phases of one cold push (2 devices per user) on a
time line: the homeserver calls the bot makes, and the courier's CPU work (device keys, Olm
sessions, encryption, crypto-store writes). Shows what waits on what, which a profile of the
event loop's thread cannot."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import time
from typing import Any, Awaitable, Callable

from encstate_bot.glue import BulkOlmStore

from . import fanout
from .profile import cold_push_setup

TRACED_BULK = ("devices", "sessions_from_claim", "encrypt")
TRACED_STORE = ("put_devices", "add_sessions", "update_sessions")


class Timeline:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.marks: list[tuple[float, str]] = []

    def mark(self, what: str) -> None:
        self.marks.append((time.perf_counter() - self.start, what))

    def traced(self, name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.mark(f"{name} starts")
            try:
                return await fn(*args, **kwargs)
            finally:
                self.mark(f"{name} ends")

        return wrapper


def endpoint(path: Any) -> str:
    text = str(path)
    return "sendToDevice" if "sendToDevice" in text else text.rstrip("/").rsplit("/", 1)[-1]


async def main(count: int) -> None:
    async with cold_push_setup(count) as (bot, room, users):
        plugin = bot.plugin
        assert plugin is not None
        line = Timeline()
        api, bulk = plugin.client.api, plugin.transport.bulk
        request = api.request

        async def traced_request(method: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
            return await line.traced(f"HTTP {endpoint(path)}", request)(
                method, path, *args, **kwargs
            )

        api.request = traced_request
        for name in TRACED_BULK:
            setattr(bulk, name, line.traced(name, getattr(bulk, name)))
        plugin.store.finish = line.traced("store audit", plugin.store.finish)
        originals = {name: getattr(BulkOlmStore, name) for name in TRACED_STORE}
        for name, fn in originals.items():
            setattr(BulkOlmStore, name, line.traced(f"store {name}", fn))
        try:
            line.start = time.perf_counter()
            result = await fanout.courier_push(bot, room, users, "join")
        finally:
            api.request = request
            for name, fn in originals.items():
                setattr(BulkOlmStore, name, fn)
    for at, what in line.marks:
        print(f"{at * 1000:8.0f} ms  {what}")
    print({k: v for k, v in result.items() if k != "other"})


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 500))
