"""Issue 15: the pushes of a start with 1,000 restricted rooms admitting one space.

- ``on_new_state`` per room that gained state looks at that room's links only: before, each
  call walked every link (``links.actionable()``), O(rooms x links) for a start.
- A pass reads each room's member list once: before, every (link x new session) read the space's
  members and the room's again, and ``reconcile`` read them per link.
- ``reconcile`` reads the space members' deliveries once, of the wanted sessions only (before:
  every delivery of those users in every room, once per link), and a restricted room's own
  members only where someone lacks a key.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

from mautrix.util.async_db import Database

from encstate_bot.links import Link, RoomLinks
from encstate_bot.migrations import upgrade_table
from encstate_bot.pushes import Pushes
from encstate_bot.room_policy import RoomPolicy
from encstate_bot.store import Store as RealStore

BOT = "@encstate:example.org"
SPACE = "!space:example.org"
ROOMS = [f"!r{n:04}:example.org" for n in range(1000)]
SPACE_MEMBERS = [BOT] + [f"@m{n}:example.org" for n in range(10)]
LOG = logging.getLogger("test.pushes_rescan")


class Links(RoomLinks):
    """The real links, counting the walks over the whole graph."""

    def __init__(self) -> None:
        view = SimpleNamespace(empowered=lambda user_id: True)
        super().__init__(SimpleNamespace(view=lambda room_id: view), BOT, LOG)
        self.walks = 0
        self.set_joined([SPACE, *ROOMS])
        for room_id in ROOMS:
            self.graph.set_allow(room_id, [SPACE])

    def actionable(self) -> set[Link]:
        self.walks += 1
        return super().actionable()


class Members:
    def __init__(self) -> None:
        self.reads: list[str] = []

    async def joined(self, room_id: str) -> list[str]:
        self.reads.append(room_id)
        if room_id == SPACE:
            return SPACE_MEMBERS
        return [BOT, "@admin:example.org"]


class Store:
    def __init__(self, served: set[tuple[str, str, int]]) -> None:
        self.served = served
        self.queries: list[tuple[int, int]] = []

    async def delivered_sessions(self, user_ids, session_ids) -> set[tuple[str, str, int]]:
        users, sessions = set(user_ids), set(session_ids)
        self.queries.append((len(users), len(sessions)))
        return {d for d in self.served if d[0] in users and d[1] in sessions}

    async def delivered(self, user_ids):  # the old whole-history read must not be used
        raise AssertionError("delivered() reads every delivery of these users")


class Courier:
    def __init__(self) -> None:
        self.items: list = []

    async def submit(self, items) -> None:
        self.items += list(items)


class PreviewPushes(Pushes):
    def preview_seals(self, room_id: str) -> list[str]:
        return [f"seal-{room_id}"]


def pushes(served: set[tuple[str, str, int]] = frozenset()):
    links, members, store, courier = Links(), Members(), Store(set(served)), Courier()
    ledger = SimpleNamespace(state_sessions=lambda: ["S"])
    p = PreviewPushes(
        BOT,
        store,
        SimpleNamespace(ledgers={room_id: ledger for room_id in ROOMS}),
        courier,
        SimpleNamespace(get=lambda room_id: RoomPolicy()),
        links,
        members,
        SimpleNamespace(),
        {"push_on_join": True},
        LOG,
    )
    return p, links, members, store, courier


async def test_new_state_in_every_room_walks_no_whole_graph() -> None:
    p, links, _, _, courier = pushes()
    for room_id in ROOMS:
        await p.on_new_state(room_id, {f"seal-{room_id}", "not-a-seal"})
    assert links.walks == 0  # before: one walk over the 1,000 links per room
    assert len(courier.items) == len(ROOMS) * 10


async def test_new_state_in_every_room_reads_the_space_once_in_a_pass() -> None:
    p, links, members, _, courier = pushes()
    shared: dict[str, list[str]] = {}
    for room_id in ROOMS:
        await p.on_new_state(room_id, {f"seal-{room_id}", "not-a-seal"}, members=shared)
    assert members.reads.count(SPACE) == 1  # before: once per room (and per new seal)
    assert len(members.reads) == 1 + len(ROOMS)
    assert len(courier.items) == len(ROOMS) * 10  # each space member, each room's one seal
    assert {i.session_id for i in courier.items if i.room_id == ROOMS[7]} == {f"seal-{ROOMS[7]}"}


async def test_new_state_skips_a_link_just_pushed_and_a_room_without_links() -> None:
    p, links, members, _, courier = pushes()
    await p.on_new_state(ROOMS[0], {f"seal-{ROOMS[0]}"}, skip={Link(ROOMS[0], SPACE)})
    links.graph.set_allow(ROOMS[1], [])
    await p.on_new_state(ROOMS[1], {f"seal-{ROOMS[1]}"})
    assert courier.items == [] and members.reads == []


async def test_reconcile_reads_the_space_and_its_deliveries_once() -> None:
    everyone = {(u, f"seal-{r}", 0) for u in SPACE_MEMBERS[1:] for r in ROOMS}
    late = "@m3:example.org"  # joined the space while the bot was away
    served = {d for d in everyone if not (d[0] == late and d[1] == f"seal-{ROOMS[5]}")}
    p, links, members, store, courier = pushes(served)
    await p.reconcile(skip=set())
    assert links.walks == 1
    assert members.reads == [SPACE, ROOMS[5]]  # a room's own members only where one lacks
    assert store.queries == [(10, len(ROOMS))]  # one read, of the wanted sessions only
    assert [(i.room_id, i.user_id, i.via) for i in courier.items] == [(ROOMS[5], late, SPACE)]


async def test_the_store_reads_deliveries_of_the_wanted_sessions_in_chunks(tmp_path) -> None:
    db = Database.create(f"sqlite:{tmp_path / 'bot.db'}", upgrade_table=upgrade_table)
    await db.start()
    try:
        users = [f"@u{n}:example.org" for n in range(900)]
        rows = [(u, "DEV", f"S{n % 450}", 0, "!r:example.org", 1) for n, u in enumerate(users)]
        rows.append((users[0], "DEV2", "S0", 0, "!r:example.org", 1))  # a second device
        rows.append((users[1], "DEV", "other", 0, "!r:example.org", 1))  # not asked for
        await db.executemany(
            "INSERT INTO encstate_delivered (user_id, device_id, session_id, msg_index, "
            "room_id, ts) VALUES ($1, $2, $3, $4, $5, $6)",
            rows,
        )
        found = await RealStore(db).delivered_sessions(users, [f"S{n}" for n in range(450)])
        assert found == {(u, f"S{n % 450}", 0) for n, u in enumerate(users)}
    finally:
        await db.stop()
