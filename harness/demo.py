"""`make demo`: encstate at work against a throwaway Synapse, told as a transcript.

Alice runs a room whose name and topic are encrypted (MSC4362); her client encrypts them and her
chat in one megolm session, as Element does. encstate sits in the room with a raised power
level and seals each value: it re-sends it in a session of its own that opens nothing else.
Bob joins and reads the name and topic through the seals, and still cannot read Alice's chat;
Bob asking for Alice's session, and Mallory, who is not a member, are refused. Everything runs
on 127.0.0.1 and is removed at the end.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
import time

from aiohttp import ClientSession

from .client import TestUser, eventually
from .synapse import Synapse
from .world import World

STARTED = time.monotonic()


def say(who: str, text: str) -> None:
    print(f"[{time.monotonic() - STARTED:5.1f}s] {who:<9} {text}", flush=True)


def short(session_id: str) -> str:
    return session_id[:10] + "…"


async def show_state(user: TestUser, room: str) -> None:
    state = await user.read_state(room)
    for (event_type, _), content in sorted(state.values.items()):
        value = content.get("name") or content.get("topic") or content
        say(user.localpart.split("-")[0].title(), f"decrypts {event_type}: {value!r}")
    for outer in state.undecryptable:
        say(user.localpart.split("-")[0].title(), f"sees only ciphertext for {outer}")


async def demo(synapse: Synapse, workdir: str) -> None:
    async with ClientSession() as http:
        world = World(synapse, http, workdir)
        try:
            await run(world)
        finally:
            await world.close()


async def run(world: World) -> None:
    say("setup", "starting encstate in maubot standalone mode (python -m maubot.standalone)")
    bot = await world.bot(sealing=True)
    say("encstate", f"online as {bot.user_id}, device {bot.device_id}")

    alice = await world.user("alice")
    room = await alice.create_room(invite=[bot.user_id], power={bot.user_id: 50})
    say("Alice", f"creates {room} with io.element.msc4362.encrypt_state_events: true")
    say("Alice", "invites encstate with power level 50 (users_default is 0)")
    await world.wait_joined(alice, room, bot.user_id)
    await bot.wait_for_log(f"Read back \\d+ timeline event\\(s\\) of {room}")
    say("encstate", "joins and sees state encryption is on")

    await alice.new_session(room)
    name = await alice.send_state(room, "m.room.name", "", {"name": "Nightingale"})
    topic = await alice.send_state(room, "m.room.topic", "", {"topic": "Launch on Thursday"})
    chat = await alice.send_message(room, "Thursday it is. Keep it quiet.")
    say(
        "Alice",
        f"encrypts the name, the topic and her chat in one session ({short(name.session_id)}, "
        "indices 0, 1, 2), as Element does",
    )
    await world.wait_valid(bot, topic.event_id)
    say("encstate", "decrypts both state events: valid and current, in a session with a message")
    store = await world.store(bot)

    async def both_sealed() -> list:
        seals = [s for s in await store.seals() if s.room_id == room and s.event_id]
        return seals if len(seals) == 2 else []

    for seal in sorted(await eventually(both_sealed, timeout=30), key=lambda s: s.inner_type):
        say(
            "encstate",
            f"seals {seal.inner_type}: the same value re-sent in its own session "
            f"{short(seal.session_id)}, key to the members first ({seal.event_id[:10]}…)",
        )

    bob = await world.user("bob")
    await alice.invite(room, bob.user_id)
    say("Alice", "invites Bob; encstate sends him the preview seals (name, topic) at once")
    await bob.join(room)
    say("Bob", "joins the room (his client never asks another user for keys)")

    async def readable() -> bool:
        state = await bob.read_state(room)
        return len(state.values) == 2

    await eventually(readable, timeout=30)
    for row in reversed(await world.audit(bot, room, user_id=bob.user_id)):
        if row.decision == "share":
            say(
                "encstate",
                f"{row.decision} {short(row.session_id)} to {row.device_id} "
                f"from index {row.msg_index} ({row.trigger}): {row.reason}",
            )
    await show_state(bob, room)
    opened = await bob.try_decrypt(room, chat.session_id, chat.ciphertext)
    say("Bob", f"tries Alice's chat: {'reads it!' if opened else 'cannot decrypt it'}")

    say("Bob", f"asks encstate for Alice's session {short(chat.session_id)} itself")
    await bob.request_key(room, chat.session_id, bot.user_id, [bot.device_id])
    await eventually(lambda: bob.withheld_for(chat.session_id), timeout=30)
    withheld = bob.withheld_for(chat.session_id)[0]
    say("encstate", f"withholds it: {withheld['code']} ({withheld['reason']})")

    mallory = await world.user("mallory")
    say("Mallory", f"is not in the room, asks for {short(name.session_id)} anyway")
    await mallory.request_key(room, name.session_id, bot.user_id, [bot.device_id])
    await eventually(lambda: mallory.withheld_for(name.session_id), timeout=30)
    withheld = mallory.withheld_for(name.session_id)[0]
    say("encstate", f"withholds it: {withheld['code']} ({withheld['reason']})")

    print()
    print("The audit, newest first (what was shared, why, and from which index):")
    for row in await world.audit(bot, room):
        index = "" if row.msg_index is None else f"@{row.msg_index}"
        code = f" {row.code}" if row.code else ""
        print(
            f"  {row.decision:<8}{code:<15} {row.user_id.split(':')[0]:<16} "
            f"{short(row.session_id or '-')}{index:<4} {row.trigger:<8} {row.reason}"
        )


def main() -> None:
    logging.basicConfig(level=logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="encstate-demo-") as workdir:
        say("setup", "starting a throwaway Synapse on 127.0.0.1 (SQLite, rate limits relaxed)")
        with Synapse() as synapse:
            say("setup", f"Synapse answers at {synapse.url}")
            try:
                asyncio.run(demo(synapse, workdir))
            except Exception as e:
                print(f"demo failed: {type(e).__name__}: {e}", file=sys.stderr)
                raise SystemExit(1) from e
        say("setup", "stopped Synapse and removed everything")


if __name__ == "__main__":
    main()
