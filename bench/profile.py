"""`python -m bench.profile [users]`: cProfile of one cold push (2 devices per user), sorted by
the time spent in each function itself, on the event loop's thread (Olm sessions are made in
worker threads; `python -m bench.timeline` shows those). What docs/performance.md's table
comes from."""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import logging
import pstats
import sys
import tempfile
from typing import AsyncIterator

from aiohttp import ClientSession, TCPConnector

from harness.synapse import Synapse

from . import fanout
from .population import Device, Population


@contextlib.asynccontextmanager
async def cold_push_setup(
    count: int,
) -> AsyncIterator[tuple[fanout.InProcessBot, fanout.Room, list[list[Device]]]]:
    """A throwaway Synapse, a room with the bot, and `count` users with 2 fresh devices each
    who joined the room: everything a cold push needs, ready to time."""
    with Synapse() as synapse, tempfile.TemporaryDirectory() as workdir:
        async with ClientSession(connector=TCPConnector(limit=200)) as http:
            pop = Population(synapse, http)
            (admin,) = await pop.user_with_devices("profile-admin", 1, 10)
            loop = asyncio.get_running_loop()
            bot_user = await loop.run_in_executor(None, synapse.register, "profile-bot")
            room = await fanout.make_room(pop, admin, bot_user, public=True)
            token, _ = await loop.run_in_executor(None, synapse.login, bot_user)
            await pop._call("POST", f"/_matrix/client/v3/join/{room.room_id}", token, {})
            users = await pop.users("p", count, devices=2, one_time_keys=5)
            await pop.join(room.room_id, users)
            bot = await fanout.bot_for(synapse, http, workdir, "profiled", bot_user, room)
            try:
                yield bot, room, users
            finally:
                await bot.stop()


async def main(count: int) -> None:
    async with cold_push_setup(count) as (bot, room, users):
        profile = cProfile.Profile()
        profile.enable()
        result = await fanout.courier_push(bot, room, users, "join")
        profile.disable()
    print({k: v for k, v in result.items() if k != "other"})
    pstats.Stats(profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 500))
