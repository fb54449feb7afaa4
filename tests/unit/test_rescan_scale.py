"""Issue 15: a start with the bot in many rooms.

- A restart reads back only the timelines of the rooms that changed since the sync position
  it saved (one sync request tells which), and a changed room's catch-up stops at that position.
  Before, every restart paged back from each room's newest event to an *encrypted* event the
  ledger knew: a room whose newest 2,000 events are plain (a join storm, reactions) cost 20
  ``/messages`` calls on every restart, whatever the bot had seen.
- Without a position the catch-up stops at an event known before this start, not at one the
  rescan's own ``/state`` just recorded (the joins while the bot was away before a new value
  were never pushed).
- The position moves only while every room is caught up (no gap being filled, none lost).
- A rescan writes nothing for a room whose server-current state and flag did not change.

The intake, tracker and store run for real on SQLite; the homeserver is a small fake with
stream positions (``/state``, ``/messages`` with ``from``/``to``, ``/sync`` with ``since``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote

from mautrix.util.async_db import Database
import olm
import pytest_asyncio

from encstate_bot import protocol
from encstate_bot.intake import Intake, Origins
from encstate_bot.links import RoomLinks
from encstate_bot.migrations import upgrade_table
from encstate_bot.store import Store
from encstate_bot.tracker import Tracker

BOT = "@encstate:example.org"
ADMIN = "@admin:example.org"
ROOM = "!busy:example.org"
QUIET = "!quiet:example.org"
LOG = logging.getLogger("test.rescan_scale")
ENCRYPTION = {
    "algorithm": protocol.MEGOLM_ALGORITHM,
    "io.element.msc4362.encrypt_state_events": True,
}
# Migration v9 makes it; tests that start from an empty schema make it themselves.
POSITION_TABLE = (
    "CREATE TABLE IF NOT EXISTS encstate_sync_position (id INTEGER PRIMARY KEY, "
    "next_batch TEXT NOT NULL, saved_ts BIGINT NOT NULL)"
)


class Homeserver:
    """Rooms as timelines on one stream. A timeline is in topological order (an event may
    arrive late, with a newer stream position, behind older ones), and each event has its
    stream position: ``s<pos>`` is a sync token (sync reads the stream), ``t<i>`` a pagination
    token (the events before index ``i`` of the timeline). ``/messages`` with ``to=s<pos>``
    returns only events after that stream position, as Synapse does for a stream token, and
    ``from=s<pos>`` the events up to it."""

    def __init__(self) -> None:
        self.pos = 0
        self.timelines: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.megolm = olm.OutboundGroupSession()

    def send(self, room_id: str, event: dict[str, Any]) -> dict[str, Any]:
        self.pos += 1
        event = {
            "event_id": f"${room_id[1:4]}{self.pos}",
            "room_id": room_id,
            "sender": ADMIN,
            "origin_server_ts": 1000 + self.pos,
            **event,
        }
        self.timelines.setdefault(room_id, []).append((self.pos, event))
        return event

    def state_room(self, room_id: str) -> None:
        self.send(room_id, {"type": "m.room.create", "state_key": "", "content": {}})
        self.send(
            room_id,
            {
                "type": "m.room.power_levels",
                "state_key": "",
                "content": {"users": {ADMIN: 100, BOT: 50}, "users_default": 0},
            },
        )
        self.send(room_id, {"type": "m.room.encryption", "state_key": "", "content": ENCRYPTION})
        self.send(
            room_id,
            {
                "type": "m.room.encrypted",
                "state_key": "m.room.name:",
                "content": {
                    "algorithm": protocol.MEGOLM_ALGORITHM,
                    "sender_key": "K",
                    "device_id": "ADMINDEVICE",
                    "session_id": self.megolm.id,
                    "ciphertext": self.megolm.encrypt(json.dumps({"type": "m.room.name"})),
                },
            },
        )

    def plain(self, room_id: str, count: int) -> None:
        for n in range(count):
            self.send(room_id, {"type": "m.reaction", "content": {"n": n}})

    def join(self, room_id: str, user_id: str) -> None:
        self.send(
            room_id,
            {
                "type": "m.room.member",
                "state_key": user_id,
                "sender": user_id,
                "content": {"membership": "join"},
            },
        )

    # The client API -----------------------------------------------------------------------

    async def get_joined_rooms(self) -> list[str]:
        return list(self.timelines)

    async def request(self, method: Any, path: Any, query_params: Any = None, **_: Any) -> Any:
        path, query = str(path), dict(query_params or {})
        endpoint = path.rsplit("/", 1)[-1]
        self.calls.append((endpoint, query))
        if endpoint == "sync":
            since = int(query["since"][1:]) if "since" in query else None
            flt = json.loads(query["filter"])
            rooms = (
                {}
                if since is None
                else {
                    room_id: {"timeline": {"events": [max(events, key=lambda pe: pe[0])[1]]}}
                    for room_id, events in self.timelines.items()
                    if any(p > since for p, _ in events)
                }
            )
            assert since is not None or flt["room"]["rooms"] == []
            return {"next_batch": f"s{self.pos}", "rooms": {"join": rooms}}
        room_id = unquote(path.split("/rooms/")[1].split("/")[0])
        timeline = self.timelines[room_id]
        if endpoint == "state":
            current: dict[tuple[str, str], dict[str, Any]] = {}
            for _, event in timeline:
                if "state_key" in event:
                    current[(event["type"], event["state_key"])] = event
            return list(current.values())
        assert endpoint == "messages" and query["dir"] == "b"
        start = query.get("from")
        if start is None:
            indices: Any = range(len(timeline))
        elif start.startswith("s"):  # a sync token: the events up to that stream position
            indices = [i for i, (pos, _) in enumerate(timeline) if pos <= int(start[1:])]
        else:
            indices = range(int(start[1:]))
        after = int(query["to"][1:]) if "to" in query else 0
        events = [(i, timeline[i]) for i in reversed(indices) if timeline[i][0] > after]
        page = events[: int(query["limit"])]
        more = len(events) > len(page)
        return {"chunk": [e for _, (_, e) in page], "end": f"t{page[-1][0]}" if more else None}

    def count(self, endpoint: str) -> int:
        return sum(1 for e, _ in self.calls if e == endpoint)


class Pushes:
    def __init__(self) -> None:
        self.members: list[tuple[str, list[str]]] = []

    def departed(self, room_id: str, events: list[dict[str, Any]]) -> None:
        pass

    async def on_members(self, room_id: str, events: list[dict[str, Any]]) -> None:
        joined = [e["state_key"] for e in events if e.get("type") == "m.room.member"]
        if joined:
            self.members.append((room_id, joined))

    async def refresh_links(self) -> set:
        return set()

    async def on_new_state(self, room_id: str, session_ids: set[str], **_: Any) -> None:
        pass

    async def reconcile(self, skip: set, **_: Any) -> None:
        pass


class CountingStore(Store):
    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.writes: list[str] = []

    async def put_server_current(self, room_id: str, current: dict[str, str]) -> None:
        self.writes.append(f"current {room_id}")
        await super().put_server_current(room_id, current)

    async def put_room_flag(self, room_id: str, state_flag: str | None) -> None:
        self.writes.append(f"flag {room_id}")
        await super().put_room_flag(room_id, state_flag)


@pytest_asyncio.fixture
async def db(tmp_path):
    database = Database.create(f"sqlite:{tmp_path / 'bot.db'}", upgrade_table=upgrade_table)
    await database.start()
    try:
        yield database
    finally:
        await database.stop()


class Bot:
    """One start of the intake on the database: load, rescan; ``stop`` saves the position."""

    def __init__(self, hs: Homeserver, db: Database) -> None:
        self.hs = hs
        self.store = CountingStore(db)
        self.tracker = Tracker(self.store, None, LOG, BOT)
        self.links = RoomLinks(self.tracker, BOT, LOG)
        self.pushes = Pushes()
        client = SimpleNamespace(
            mxid=BOT,
            device_id="BOTDEVICE",
            crypto=None,
            api=SimpleNamespace(request=hs.request),
            get_joined_rooms=hs.get_joined_rooms,
            ignore_first_sync=False,
            ignore_initial_sync=False,
        )
        self.intake = Intake(
            client,
            {"backfill_limit": 2000},
            self.store,
            self.tracker,
            self.links,
            self.pushes,  # type: ignore[arg-type]
            SimpleNamespace(mark=lambda room_id, delay=0.5: None),  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            SimpleNamespace(release=_nothing),  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            Origins(),
            LOG,
        )

    async def start(self, settle: bool = True) -> Bot:
        """Load and rescan; with ``settle``, also let the reads it leaves running in the
        background (what is kept to read) finish."""
        await self.tracker.load()
        self.hs.calls.clear()
        await self.intake.rescan()
        if settle:
            await settle_tasks(self.intake)
        return self

    async def stop(self) -> None:
        await self.intake.stop()


async def _nothing(*_: Any) -> None:
    pass


LIMIT = 50  # the backfill_limit of the tests that cut reads short


async def start_limited(
    hs: Homeserver, db: Database, limit: int = LIMIT, settle: bool = False
) -> Bot:
    """One start with this backfill_limit; without ``settle`` the reads it keeps to do are
    left running in the background (``Bot.stop`` cancels them)."""
    bot = Bot(hs, db)
    bot.intake.config["backfill_limit"] = limit
    return await bot.start(settle=settle)


async def unread_rows(db: Database) -> list[tuple[str, str]]:
    """(room, token) of each timeline read kept to do (``encstate_unread``)."""
    return [
        (r["room_id"], r["from_token"])
        for r in await db.fetch("SELECT room_id, from_token FROM encstate_unread")
    ]


async def settle_tasks(intake: Intake) -> None:
    """Wait for the intake's background tasks, and those they start, to finish."""
    while intake._tasks:
        await asyncio.gather(*list(intake._tasks), return_exceptions=True)


def busy_world() -> Homeserver:
    """Two state-encrypted rooms; the busy one's newest 2,100 events are plain."""
    hs = Homeserver()
    hs.state_room(ROOM)
    hs.state_room(QUIET)
    hs.plain(ROOM, 2100)
    return hs


async def test_a_restart_reads_no_timeline_of_a_room_unchanged_since_its_position(db) -> None:
    await db.execute(POSITION_TABLE)
    hs = busy_world()
    first = await Bot(hs, db).start()
    assert first.tracker.backfilled == {ROOM, QUIET}
    await first.stop()

    again = await Bot(hs, db).start()
    assert hs.count("messages") == 0  # before: 20 for the busy room, 1 for the quiet one
    assert hs.count("sync") == 1
    assert first.intake.position == again.intake.position == f"s{hs.pos}"


async def test_a_changed_room_reads_back_to_the_position_and_pushes_the_joins(db) -> None:
    await db.execute(POSITION_TABLE)
    hs = busy_world()
    await (await Bot(hs, db).start()).stop()
    position = f"s{hs.pos}"
    hs.join(ROOM, "@late:example.org")  # while the bot was away
    hs.plain(ROOM, 3)

    again = await Bot(hs, db).start()
    pages = [q for e, q in hs.calls if e == "messages"]
    assert len(pages) == 1 and pages[0]["to"] == position  # not the 2,100 plain events
    assert again.pushes.members == [(ROOM, ["@late:example.org"])]


async def test_without_a_position_the_plain_room_pages_back_as_before(db) -> None:
    # (no position saved: the first start after the upgrade to v9, or a save that failed)
    hs = busy_world()
    await (await Bot(hs, db).start()).stop()
    await db.execute("DELETE FROM encstate_sync_position")
    bot = await Bot(hs, db).start(settle=False)
    # back to the limit (2,000 events: a first page of 10, then 20 of at most 100), and the
    # quiet room's first page
    assert hs.count("messages") == 21 + 1
    assert bot.tracker.history_unread(ROOM)
    # then the rest, in the background, where the cut read stopped (104 events: 2 pages)
    await settle_tasks(bot.intake)
    assert hs.count("messages") == 21 + 1 + 2
    assert not bot.tracker.history_unread(ROOM)


async def test_without_a_position_the_catch_up_passes_a_value_the_rescan_just_read(db) -> None:
    hs = busy_world()
    await (await Bot(hs, db).start()).stop()
    hs.join(QUIET, "@late:example.org")  # while the bot was away, then a new value
    hs.send(
        QUIET,
        {
            "type": "m.room.encrypted",
            "state_key": "m.room.topic:",
            "content": {
                "algorithm": protocol.MEGOLM_ALGORITHM,
                "sender_key": "K",
                "device_id": "ADMINDEVICE",
                "session_id": hs.megolm.id,
                "ciphertext": hs.megolm.encrypt(json.dumps({"type": "m.room.topic"})),
            },
        },
    )
    again = await Bot(hs, db).start()
    # /state recorded the new value first; before, the catch-up stopped at it at once
    assert again.pushes.members == [(QUIET, ["@late:example.org"])]


async def test_a_rescan_of_an_unchanged_room_writes_nothing(db) -> None:
    hs = busy_world()
    first = await Bot(hs, db).start()
    assert sorted(first.store.writes) == sorted(
        [f"current {QUIET}", f"current {ROOM}", f"flag {QUIET}", f"flag {ROOM}"]
    )
    await first.stop()
    again = await Bot(hs, db).start()
    assert again.store.writes == []  # before: a flag and a current-state transaction per room


async def test_the_position_waits_for_a_gap_and_stops_at_a_lost_room(db) -> None:
    await db.execute(POSITION_TABLE)
    hs = busy_world()
    bot = await Bot(hs, db).start()
    intake = bot.intake
    start = intake.position
    gate = asyncio.Event()
    real = hs.request

    async def slow(method: Any, path: Any, query_params: Any = None, **kw: Any) -> Any:
        if str(path).endswith("/messages"):
            await gate.wait()
        return await real(method, path, query_params, **kw)

    bot.intake.client.api.request = slow
    hs.plain(ROOM, 30)
    last = len(hs.timelines[ROOM]) - 1  # the sync holds the newest event; the gap is before
    limited = {"events": [hs.timelines[ROOM][last][1]], "limited": True, "prev_batch": f"t{last}"}
    await intake.on_sync(
        {"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {ROOM: {"timeline": limited}}}}}
    )
    assert intake.position == start  # the gap is not filled yet
    gate.set()
    await asyncio.gather(*intake._tasks)
    hs.plain(QUIET, 1)
    await intake.on_sync({"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {}}}})
    assert intake.position == f"s{hs.pos}"
    gap = [q for e, q in hs.calls if e == "messages"][-1]
    assert gap["to"] == start  # the gap ends where the last sync processed did

    intake._lost.add(ROOM)  # e.g. a room whose sync could not be processed
    moved = intake.position
    hs.plain(QUIET, 1)
    await intake.on_sync({"data": {"next_batch": f"s{hs.pos}", "rooms": {"join": {}}}})
    assert intake.position == moved


async def test_the_store_keeps_the_position(db) -> None:
    await db.execute(POSITION_TABLE)
    store = Store(db)
    assert await store.sync_position() is None
    await store.put_sync_position("s1")
    await store.put_sync_position("s2")
    assert await store.sync_position() == "s2"


async def test_a_late_event_behind_known_ones_is_read_from_the_position(db) -> None:
    # An event that reaches the homeserver while the bot is down but sits before events the bot
    # saw (federation: a late event with an older depth). Without a position the catch-up
    # stops at the first event it knew (see test_review_issue15_rescan_late_event); from the
    # position, the sync names the room and the pages hold exactly what came after it.
    await db.execute(POSITION_TABLE)
    hs = busy_world()
    known = hs.timelines[QUIET][-1][1]
    hs.plain(QUIET, 20)
    await (await Bot(hs, db).start()).stop()
    hs.pos += 1
    late = {
        "event_id": f"$late{hs.pos}",
        "room_id": QUIET,
        "sender": ADMIN,
        "origin_server_ts": 1000 + hs.pos,
        "type": "m.room.encrypted",
        "content": {
            "algorithm": protocol.MEGOLM_ALGORITHM,
            "sender_key": "K",
            "device_id": "ADMINDEVICE",
            "session_id": hs.megolm.id,
            "ciphertext": hs.megolm.encrypt(json.dumps({"type": "m.room.message"})),
        },
    }
    timeline = hs.timelines[QUIET]
    at = next(i for i, (_, e) in enumerate(timeline) if e is known)
    timeline.insert(at + 1, (hs.pos, late))

    again = await Bot(hs, db).start()
    assert late["event_id"] in again.tracker.ledger(QUIET).messages
    assert [q.get("to") for e, q in hs.calls if e == "messages"] == [f"s{hs.pos - 1}"]
