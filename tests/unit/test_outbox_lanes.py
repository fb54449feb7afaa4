"""The outbox's lanes (issue 15): each lane's items are read through its own indexes, oldest
first with at most a share per room (a busy room cannot starve the others), without a pass
over the whole queue; and the push lane's "are only a few queued?" reads at most that few.

On SQLite, and on PostgreSQL where a test takes ``bot_database`` (skipped without one)."""

from __future__ import annotations

import re
import sqlite3

from mautrix.util.async_db import Database, UpgradeTable

from encstate_bot.courier import BATCH_ITEMS, PER_ROOM_ITEMS
from encstate_bot.migrations import upgrade_table
from encstate_bot.store import OutboxItem, Store
from encstate_bot.triggers import (
    FAST_LANE,
    LANE_TRIGGERS,
    LANES,
    PUSH_LANE,
    REQUEST_LANE,
    Trigger,
    is_fast,
    lane,
)

from .test_join_storm_request import ROOMS, key_request, storm


async def test_the_push_lane_does_not_count_the_whole_queue_after_each_batch(
    store: Store,
) -> None:
    """The push lane asks whether few items are queued (to wait for more); it used to
    COUNT(*) the whole outbox after every batch. Now it counts at most that few."""
    await store.enqueue(storm(100))
    assert await store.queued(FAST_LANE, 50) == 50
    assert await store.queued(PUSH_LANE, 50) == 0
    await store.enqueue([OutboxItem(room_id=ROOMS[0], user_id="@m:x", trigger=Trigger.LINK)])
    assert await store.queued(PUSH_LANE, 50) == 1
    assert await store.queued(REQUEST_LANE, 50) == 0


# The store's lanes -------------------------------------------------------------------------------


def test_every_trigger_has_one_lane_and_waiting_ones_are_not_bulk() -> None:
    for trigger in Trigger:
        assert lane(trigger) in LANES
        assert (lane(trigger) != PUSH_LANE) == is_fast(trigger)
    assert lane(Trigger.REQUEST) == REQUEST_LANE
    assert lane("some-trigger-of-a-later-version") == PUSH_LANE


async def test_each_lane_holds_its_own_items(store: Store) -> None:
    items = [
        OutboxItem(room_id=ROOMS[0], user_id=f"@{t.value}:x", trigger=t, request_id="r")
        for t in Trigger
    ]
    await store.enqueue(items)
    for name in LANES:
        got = {i.trigger for i in await store.due(100, name, per_room=10)}
        assert got == {t.value for t in Trigger if lane(t) == name}, name
    stats = await store.queue_stats()
    assert stats["fast"][0] == len(LANE_TRIGGERS[REQUEST_LANE] | LANE_TRIGGERS[FAST_LANE])
    assert stats["bulk"][0] == len(items) - stats["fast"][0]


async def test_a_busy_room_gets_its_share_and_the_others_fill_the_batch(store: Store) -> None:
    """Room A's 3,000 joins were queued first, then B's and C's: a batch of 2,000 takes A's
    oldest 1,000 and all of B's and C's, oldest first (as the window function did)."""
    a, b, c = ROOMS[:3]

    def joins(room: str, count: int, tag: str) -> list[OutboxItem]:
        return [
            OutboxItem(room_id=room, user_id=f"@{tag}{n}:x", trigger=Trigger.JOIN)
            for n in range(count)
        ]

    await store.enqueue(joins(a, 3000, "a"))
    await store.enqueue(joins(c, 5, "c") + joins(b, 10, "b") + joins(c, 5, "c-late"))
    await store.enqueue(joins(a, 10, "a-late"))
    await store.enqueue([key_request()])
    batch = await store.due(BATCH_ITEMS, FAST_LANE, per_room=PER_ROOM_ITEMS)
    ids = [i.id for i in batch]
    assert ids == sorted(ids)
    rooms = {room: [i.user_id for i in batch if i.room_id == room] for room in (a, b, c)}
    assert rooms[a] == [f"@a{n}:x" for n in range(1000)]
    assert len(rooms[b]) == 10 and len(rooms[c]) == 10
    assert len(batch) == 1020
    # the next batch: A's next 1,000 (nothing of B or C left)
    await store.finish(ids, [])
    batch = await store.due(BATCH_ITEMS, FAST_LANE, per_room=PER_ROOM_ITEMS)
    assert [i.user_id for i in batch] == [f"@a{n}:x" for n in range(1000, 2000)]


async def test_the_fill_takes_the_room_waiting_longest_and_skips_items_in_backoff(
    store: Store,
) -> None:
    a, b, c, d = ROOMS[:4]
    await store.enqueue(
        [OutboxItem(room_id=a, user_id=f"@a{n}:x", trigger=Trigger.JOIN) for n in range(30)]
    )
    for n in range(3):  # D's oldest item is older than C's, C's than B's
        await store.enqueue(
            [OutboxItem(room_id=r, user_id=f"@{n}:x", trigger=Trigger.JOIN) for r in (d, c, b)]
        )
    in_backoff = [i.id for i in await store.due(100, FAST_LANE) if i.room_id == c]
    await store.retry_later([i for i in in_backoff if i is not None], 60_000)
    # the oldest 14 are A's, whose share is 10: the other 4 are D's 3 and B's oldest (C's
    # items wait for their retry)
    batch = await store.due(14, FAST_LANE, per_room=10)
    assert [i.room_id for i in batch] == [a] * 10 + [d, b, d, d]
    assert [i.user_id for i in batch if i.room_id == a] == [f"@a{n}:x" for n in range(10)]


async def test_the_interleaved_storm_is_served_oldest_first(store: Store) -> None:
    """20 rooms' joins interleaved (no room over its share): a batch is the 2,000 oldest."""
    await store.enqueue(storm(200))
    batch = await store.due(BATCH_ITEMS, FAST_LANE, per_room=PER_ROOM_ITEMS)
    everything = await store.due(10_000, FAST_LANE)
    assert [i.id for i in batch] == [i.id for i in everything[:BATCH_ITEMS]]


# Indexes ----------------------------------------------------------------------------------------


async def test_the_lanes_are_read_through_their_indexes_not_a_scan(
    sqlite_store: Store, tmp_path
) -> None:
    """Every outbox query a batch makes uses the lane's own partial index (migration v8): the
    conditions the store writes are the ones indexed, and no query walks the whole queue."""
    await sqlite_store.enqueue(storm(10))
    conn = sqlite3.connect(tmp_path / "bot.db")
    try:
        conn.execute("ANALYZE")
        for name in LANES:
            where = Store._lane(name)
            queries = [
                f"SELECT id FROM encstate_outbox WHERE {where} AND not_before <= 1 "
                "ORDER BY id LIMIT 10",
                Store._rooms(name),
                f"SELECT id FROM encstate_outbox WHERE {where} AND (room_id, id) > ('!r', 5) "
                "AND room_id <= '!r' AND not_before <= 1 ORDER BY room_id, id LIMIT 10",
                f"SELECT COUNT(*) FROM (SELECT 1 FROM encstate_outbox WHERE {where} LIMIT 50)",
            ]
            for query in queries:
                plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + query)]
                reads = [s for s in plan if re.match(r"(SCAN|SEARCH) (encstate_outbox|o)\b", s)]
                assert reads, plan
                for step in reads:
                    index = re.search(r"USING (COVERING )?INDEX (\w+)", step)
                    assert index and index[2].startswith(f"encstate_outbox_{name}"), (query, plan)
    finally:
        conn.close()


async def test_migration_v8_indexes_an_outbox_that_has_items(bot_database) -> None:
    """Items queued before the upgrade are drained by the right lane afterwards."""
    before = UpgradeTable(version_table_name="encstate_version", database_name="encstate")
    before.upgrades = upgrade_table.upgrades[:7]
    db = Database.create(bot_database, upgrade_table=before)
    await db.start()
    try:
        await db.execute(
            "INSERT INTO encstate_outbox (room_id, user_id, trigger, enqueued) VALUES "
            "($1, '@a:x', 'join', 1), ($1, '@b:x', 'request', 2), ($1, '@c:x', 'link', 3)",
            ROOMS[0],
        )
    finally:
        await db.stop()
    db = Database.create(bot_database, upgrade_table=upgrade_table)
    await db.start()
    try:
        assert await db.fetchval("SELECT version FROM encstate_version") == len(
            upgrade_table.upgrades
        )
        store = Store(db)
        for name, user in ((FAST_LANE, "@a:x"), (REQUEST_LANE, "@b:x"), (PUSH_LANE, "@c:x")):
            assert [i.user_id for i in await store.due(10, name)] == [user]
    finally:
        await db.stop()
