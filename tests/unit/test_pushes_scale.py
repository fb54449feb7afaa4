"""A join to a room that many restricted rooms admit through (a space) reads the bot's
actionable links once, not once per admitting room (each read walks every link: with 1,000
rooms that was about 6 s of CPU per join)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from encstate_bot.links import Link
from encstate_bot.pushes import Pushes
from encstate_bot.room_policy import RoomPolicy

SPACE = "!space:example.org"
ROOMS = [f"!r{n}:example.org" for n in range(1000)]


class Links:
    def __init__(self) -> None:
        self.reads = 0
        self.graph = SimpleNamespace(allowing=lambda via: set(ROOMS) if via == SPACE else set())

    def actionable(self) -> set[Link]:
        self.reads += 1
        return {Link(room, SPACE) for room in ROOMS[::2]}  # the bot may act in half of them


class Courier:
    def __init__(self) -> None:
        self.items: list = []

    async def submit(self, items) -> None:
        self.items += list(items)


async def test_a_join_to_a_space_reads_the_actionable_links_once() -> None:
    links, courier = Links(), Courier()
    ledger = SimpleNamespace(state_sessions=lambda: ["S"], pending_current_sessions=lambda: [])
    pushes = Pushes(
        "@encstate:example.org",
        SimpleNamespace(),
        SimpleNamespace(ledgers={room: ledger for room in ROOMS}),
        courier,
        SimpleNamespace(get=lambda room: RoomPolicy()),
        links,
        SimpleNamespace(),
        SimpleNamespace(),
        {"push_on_join": True},
        logging.getLogger("test.pushes"),
    )
    joins = [
        {
            "type": "m.room.member",
            "state_key": f"@u{n}:example.org",
            "sender": f"@u{n}:example.org",
            "content": {"membership": "join"},
            "event_id": f"$j{n}",
        }
        for n in range(3)
    ]
    await pushes.on_members(SPACE, joins)
    assert links.reads == 1
    assert len(courier.items) == 3 * 500  # each joiner, to each room the bot may act in
    assert {i.via for i in courier.items} == {SPACE}
