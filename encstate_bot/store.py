"""All of encstate's SQL: the ledger, session flags, the audit, the delivery queue."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any, Callable, Iterable

from attr import dataclass
from mautrix.util.async_db import Database, Scheme

from . import sql
from .ledger import MessageRecord, MessageStatus, StateRecord, Status
from .policy import IDENTITY_CHANGED
from .seals import Seal
from .triggers import FAST, LANE_TRIGGERS, LANES, PUSH_LANE, REQUEST_LANE, Trigger


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class UnreadHistory:
    """A timeline read kept to do (cut short by backfill_limit, failed, or the time the bot
    was out of a room): go on from ``from_token`` (backwards), down to ``to_token`` (a sync
    token) or, with ``away``, to the bot's own leave or ban. ``before_bot``: the rest of a
    room's first read, history from before the bot came (no joins to push there)."""

    room_id: str
    from_token: str
    to_token: str | None
    away: bool
    before_bot: bool = False


@dataclass(frozen=True)
class RoomRow:
    room_id: str
    state_flag: str | None
    backfilled: bool
    mode: str | None
    share_invited: bool | None
    dry_run: bool | None
    seal: bool | None = None


@dataclass(frozen=True)
class AuditRow:
    room_id: str
    user_id: str
    device_id: str | None
    session_id: str | None
    decision: str
    reason: str
    trigger: str
    code: str | None = None
    msg_index: int | None = None
    exposed: tuple[str, ...] = ()
    request_id: str | None = None
    ts: int = 0
    id: int | None = None
    waited_ms: int | None = None  # from the request (or push) being queued to this decision

    @classmethod
    def user_ignored(cls, room_id: str, user_id: str, reason: str, trigger: str) -> AuditRow:
        """A decision about a user as a whole (no device, no session) to do nothing."""
        return cls(
            room_id=room_id,
            user_id=user_id,
            device_id=None,
            session_id=None,
            decision="ignore",
            reason=reason,
            trigger=trigger,
        )


@dataclass(frozen=True)
class OutboxItem:
    """A wish to deliver keys: to one device or all of a user's devices, one session or all of a
    room's current state sessions. The courier decides and sends at send time."""

    room_id: str
    user_id: str
    trigger: str
    device_id: str | None = None
    session_id: str | None = None
    request_id: str | None = None
    via: str | None = None  # for pushes to the members of a room a join rule allows
    id: int | None = None
    enqueued: int = 0
    attempts: int = 0
    not_before: int = 0


def _opt_bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


class Store:
    def __init__(self, db: Database) -> None:
        self.db = db
        # Told every audit row once it is written (the metrics count them).
        self.audit_observers: list[Callable[[list[AuditRow]], None]] = []

    def _audited(self, rows: list[AuditRow]) -> None:
        for observe in self.audit_observers:
            observe(rows)

    # Rooms --------------------------------------------------------------------------------------

    async def rooms(self) -> list[RoomRow]:
        rows = await self.db.fetch(
            "SELECT room_id, state_flag, backfilled, mode, share_invited, dry_run, seal "
            "FROM encstate_room"
        )
        return [
            RoomRow(
                room_id=r["room_id"],
                state_flag=r["state_flag"],
                backfilled=bool(r["backfilled"]),
                mode=r["mode"],
                share_invited=_opt_bool(r["share_invited"]),
                dry_run=_opt_bool(r["dry_run"]),
                seal=_opt_bool(r["seal"]),
            )
            for r in rows
        ]

    async def set_room_seal(self, room_id: str, seal: bool | None) -> None:
        await self.db.execute(
            "INSERT INTO encstate_room (room_id, seal) VALUES ($1, $2) "
            "ON CONFLICT (room_id) DO UPDATE SET seal=excluded.seal",
            room_id,
            seal,
        )

    # Seals --------------------------------------------------------------------------------------

    _SEAL_COLUMNS = (
        "room_id, session_id, outer_key, inner_type, inner_key, content_hash, source_event_id, "
        "event_id, session_key, created_ts"
    )

    async def put_seal(self, seal: Seal) -> None:
        """Written before its key leaves or its event is sent, so no seal is ever out that the
        bot cannot hand out again after a restart."""
        await self.db.execute(
            f"INSERT INTO encstate_seal ({self._SEAL_COLUMNS}) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
            "ON CONFLICT (room_id, session_id) DO UPDATE SET event_id=excluded.event_id",
            seal.room_id,
            seal.session_id,
            seal.outer_key,
            seal.inner_type,
            seal.inner_key,
            seal.content_hash,
            seal.source_event_id,
            seal.event_id,
            seal.session_key,
            seal.created_ts,
        )

    async def seals(self) -> list[Seal]:
        rows = await self.db.fetch(f"SELECT {self._SEAL_COLUMNS} FROM encstate_seal")
        return [
            Seal(
                room_id=r["room_id"],
                session_id=r["session_id"],
                outer_key=r["outer_key"],
                inner_type=r["inner_type"],
                inner_key=r["inner_key"],
                content_hash=r["content_hash"],
                source_event_id=r["source_event_id"],
                event_id=r["event_id"],
                session_key=r["session_key"],
                created_ts=int(r["created_ts"]),
            )
            for r in rows
        ]

    async def put_room_flag(self, room_id: str, state_flag: str | None) -> None:
        await self.db.execute(
            "INSERT INTO encstate_room (room_id, state_flag) VALUES ($1, $2) "
            "ON CONFLICT (room_id) DO UPDATE SET state_flag=excluded.state_flag",
            room_id,
            state_flag,
        )

    async def set_backfilled(self, room_id: str) -> None:
        await self.db.execute("UPDATE encstate_room SET backfilled=true WHERE room_id=$1", room_id)

    async def set_room_policy(
        self,
        room_id: str,
        mode: str | None,
        share_invited: bool | None,
        dry_run: bool | None,
    ) -> None:
        await self.db.execute(
            "INSERT INTO encstate_room (room_id, mode, share_invited, dry_run) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (room_id) DO UPDATE SET "
            "mode=excluded.mode, share_invited=excluded.share_invited, dry_run=excluded.dry_run",
            room_id,
            mode,
            share_invited,
            dry_run,
        )

    # Ledger -------------------------------------------------------------------------------------

    _STATE_COLUMNS = (
        "room_id, event_id, outer_key, session_id, sender, sender_key, device_id, origin_ts, "
        "msg_index, ciphertext, status, inner_type, inner_key, reason, message_payload"
    )

    @staticmethod
    def _state_args(rec: StateRecord) -> tuple:
        return (
            rec.room_id,
            rec.event_id,
            rec.outer_key,
            rec.session_id,
            rec.sender,
            rec.sender_key,
            rec.device_id,
            rec.origin_ts,
            rec.msg_index,
            rec.ciphertext,
            rec.status.value,
            rec.inner_type,
            rec.inner_key,
            rec.reason,
            rec.message_payload,
        )

    async def put_states(self, records: Iterable[StateRecord]) -> None:
        """Insert or update state records, in one transaction."""
        args = [self._state_args(rec) for rec in records]
        if not args:
            return
        query = (
            f"INSERT INTO encstate_state_event ({self._STATE_COLUMNS}) VALUES "
            "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) "
            "ON CONFLICT (room_id, event_id) DO UPDATE SET status=excluded.status, "
            "inner_type=excluded.inner_type, inner_key=excluded.inner_key, "
            "reason=excluded.reason, message_payload=excluded.message_payload, "
            "msg_index=excluded.msg_index, ciphertext=excluded.ciphertext"
        )
        async with self.db.acquire() as conn, conn.transaction():
            await conn.executemany(query, args)

    async def load_states(self) -> list[StateRecord]:
        rows = await self.db.fetch(f"SELECT {self._STATE_COLUMNS} FROM encstate_state_event")
        return [
            StateRecord(
                room_id=r["room_id"],
                event_id=r["event_id"],
                outer_key=r["outer_key"],
                session_id=r["session_id"],
                sender=r["sender"],
                sender_key=r["sender_key"],
                device_id=r["device_id"],
                origin_ts=r["origin_ts"],
                msg_index=r["msg_index"],
                ciphertext=r["ciphertext"],
                status=Status(r["status"]),
                inner_type=r["inner_type"],
                inner_key=r["inner_key"],
                reason=r["reason"],
                message_payload=bool(r["message_payload"]),
            )
            for r in rows
        ]

    async def put_messages(self, records: Iterable[MessageRecord]) -> None:
        args = [
            (
                m.room_id,
                m.event_id,
                m.session_id,
                m.msg_index,
                m.ciphertext if m.status == MessageStatus.PENDING else None,
                m.status.value,
            )
            for m in records
        ]
        if not args:
            return
        query = (
            "INSERT INTO encstate_message "
            "(room_id, event_id, session_id, msg_index, ciphertext, status) "
            "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (room_id, event_id) DO UPDATE SET "
            "ciphertext=excluded.ciphertext, status=excluded.status, msg_index=excluded.msg_index"
        )
        async with self.db.acquire() as conn, conn.transaction():
            await conn.executemany(query, args)

    async def load_messages(self) -> list[MessageRecord]:
        rows = await self.db.fetch(
            "SELECT room_id, event_id, session_id, msg_index, ciphertext, status "
            "FROM encstate_message"
        )
        return [
            MessageRecord(
                room_id=r["room_id"],
                event_id=r["event_id"],
                session_id=r["session_id"],
                msg_index=r["msg_index"],
                ciphertext=r["ciphertext"],
                status=MessageStatus(r["status"]),
            )
            for r in rows
        ]

    async def put_server_current(self, room_id: str, current: dict[str, str]) -> None:
        """The events the homeserver's state holds now, per packed key."""
        args = [(room_id, key, event_id) for key, event_id in current.items()]
        async with self.db.acquire() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO encstate_current (room_id, outer_key, event_id) VALUES ($1, $2, $3) "
                "ON CONFLICT (room_id, outer_key) DO UPDATE SET event_id=excluded.event_id",
                args,
            )

    async def server_current(self) -> list[tuple[str, str, str]]:
        rows = await self.db.fetch("SELECT room_id, outer_key, event_id FROM encstate_current")
        return [(r["room_id"], r["outer_key"], r["event_id"]) for r in rows]

    async def put_session_flag(
        self,
        room_id: str,
        session_id: str,
        shared_history: bool,
        received_from: str | None,
        from_creator: bool = False,
    ) -> None:
        """Record a received session; only the creator's own ``m.room_key`` sets the flag (a
        forward that came first must not pin it either way)."""
        conflict = (
            "DO UPDATE SET shared_history=excluded.shared_history, "
            "received_from=excluded.received_from, received_ts=excluded.received_ts"
            if from_creator
            else "DO NOTHING"
        )
        await self.db.execute(
            "INSERT INTO encstate_session "
            "(room_id, session_id, shared_history, received_from, received_ts) "
            f"VALUES ($1, $2, $3, $4, $5) ON CONFLICT (room_id, session_id) {conflict}",
            room_id,
            session_id,
            shared_history,
            received_from,
            now_ms(),
        )

    async def shared_history_sessions(self) -> set[tuple[str, str]]:
        rows = await self.db.fetch(
            "SELECT room_id, session_id FROM encstate_session WHERE shared_history=true"
        )
        return {(r["room_id"], r["session_id"]) for r in rows}

    # Audit --------------------------------------------------------------------------------------

    _AUDIT_INSERT = (
        "INSERT INTO encstate_audit (ts, room_id, user_id, device_id, session_id, decision, "
        "code, msg_index, reason, trigger, exposed, request_id, waited_ms) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
    )

    @staticmethod
    def _audit_args(rows: Iterable[AuditRow]) -> list[tuple]:
        ts = now_ms()
        return [
            (
                row.ts or ts,
                row.room_id,
                row.user_id,
                row.device_id,
                row.session_id,
                row.decision,
                row.code,
                row.msg_index,
                row.reason,
                str(row.trigger),
                json.dumps(list(row.exposed)) if row.exposed else None,
                row.request_id,
                row.waited_ms,
            )
            for row in rows
        ]

    async def add_audit(self, rows: Iterable[AuditRow]) -> None:
        rows = list(rows)
        args = self._audit_args(rows)
        if args:
            async with self.db.acquire() as conn, conn.transaction():
                await conn.executemany(self._AUDIT_INSERT, args)
            self._audited(rows)

    async def audit(
        self,
        room_id: str | None = None,
        limit: int = 50,
        since_ms: int = 0,
        user_id: str | None = None,
    ) -> list[AuditRow]:
        """The newest audit rows first."""
        conditions = ["ts >= $1"]
        args: list[Any] = [since_ms]
        if room_id is not None:
            args.append(room_id)
            conditions.append(f"room_id=${len(args)}")
        if user_id is not None:
            args.append(user_id)
            conditions.append(f"user_id=${len(args)}")
        args.append(limit)
        rows = await self.db.fetch(
            "SELECT id, ts, room_id, user_id, device_id, session_id, decision, code, msg_index, "
            f"reason, trigger, exposed, request_id, waited_ms FROM encstate_audit WHERE "
            f"{' AND '.join(conditions)} ORDER BY id DESC LIMIT ${len(args)}",
            *args,
        )
        return [
            AuditRow(
                id=r["id"],
                ts=r["ts"],
                room_id=r["room_id"],
                user_id=r["user_id"],
                device_id=r["device_id"],
                session_id=r["session_id"],
                decision=r["decision"],
                code=r["code"],
                msg_index=r["msg_index"],
                reason=r["reason"],
                trigger=r["trigger"],
                exposed=tuple(json.loads(r["exposed"])) if r["exposed"] else (),
                request_id=r["request_id"],
                waited_ms=r["waited_ms"],
            )
            for r in rows
        ]

    async def identity_changes(self, room_id: str, since_ms: int) -> int:
        """Refusals because a user's cross-signing identity changed since first seen."""
        return await self.db.fetchval(
            "SELECT COUNT(*) FROM encstate_audit WHERE room_id=$1 AND ts >= $2 AND reason LIKE $3",
            room_id,
            since_ms,
            f"%{IDENTITY_CHANGED}%",
        )

    async def prune_audit(self, before_ms: int) -> int:
        """Drop audit rows older than a time (the retention setting); returns how many."""
        count = await self.db.fetchval(
            "SELECT COUNT(*) FROM encstate_audit WHERE ts < $1", before_ms
        )
        if count:
            await self.db.execute("DELETE FROM encstate_audit WHERE ts < $1", before_ms)
        return count or 0

    async def answer_times(self, room_id: str | None, since_ms: int) -> list[int]:
        """How long answers to key requests waited, in ms, since a time."""
        args: list[Any] = [since_ms]
        where = "trigger='request' AND waited_ms IS NOT NULL AND ts >= $1"
        if room_id is not None:
            args.append(room_id)
            where += " AND room_id=$2"
        rows = await self.db.fetch(f"SELECT waited_ms FROM encstate_audit WHERE {where}", *args)
        return [r["waited_ms"] for r in rows]

    async def audit_counts(self, room_id: str, since_ms: int) -> dict[str, int]:
        rows = await self.db.fetch(
            "SELECT decision, COUNT(*) AS n FROM encstate_audit WHERE room_id=$1 AND ts >= $2 "
            "GROUP BY decision",
            room_id,
            since_ms,
        )
        return {r["decision"]: r["n"] for r in rows}

    # Delivery queue -----------------------------------------------------------------------------

    async def enqueue(self, items: Iterable[OutboxItem]) -> int:
        ts = now_ms()
        args = [
            (
                i.room_id,
                i.user_id,
                i.device_id,
                i.session_id,
                str(i.trigger),
                i.request_id,
                i.via,
                i.enqueued or ts,
                i.not_before,
            )
            for i in items
        ]
        if args:
            async with self.db.acquire() as conn, conn.transaction():
                await conn.executemany(
                    "INSERT INTO encstate_outbox (room_id, user_id, device_id, session_id, "
                    "trigger, request_id, via, enqueued, not_before) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    args,
                )
        return len(args)

    @classmethod
    def _lane(cls, lane: str) -> str:
        """The condition on a lane's items, exactly as migration v8 indexed it."""
        if lane not in LANES:
            raise ValueError(f"no lane {lane!r}")
        if lane == PUSH_LANE:
            return f"trigger NOT IN ({cls._listed(FAST)})"
        return f"trigger IN ({cls._listed(LANE_TRIGGERS[lane])})"

    @staticmethod
    def _listed(triggers: Iterable[str]) -> str:
        return ", ".join(f"'{t}'" for t in sorted(str(t) for t in triggers))

    _OUTBOX_COLUMNS = (
        "id, room_id, user_id, device_id, session_id, trigger, request_id, via, enqueued, "
        "attempts, not_before"
    )

    @classmethod
    def _rooms(cls, lane: str, now: int = 0, after: int = 0) -> str:
        """The rooms with items in a lane, each with its oldest item due at ``now`` (ms) after
        item ``after`` (NULL if none): one step through the lane's (room_id, id) index per
        room, and past the room's items in backoff after ``after``, however many items each
        holds. (The steps order by room_id, and the item is found as the first in a range of
        one room: given room_id=x and ORDER BY id, PostgreSQL may walk the lane by id instead.)
        ``now`` and ``after`` are written into the query as numbers."""
        where = cls._lane(lane)
        return (
            "WITH RECURSIVE rooms(room_id) AS ("
            f"SELECT (SELECT room_id FROM encstate_outbox WHERE {where} ORDER BY room_id LIMIT 1) "
            "UNION ALL SELECT (SELECT o.room_id FROM encstate_outbox o "
            f"WHERE {where} AND o.room_id > rooms.room_id ORDER BY o.room_id LIMIT 1) "
            "FROM rooms WHERE rooms.room_id IS NOT NULL) "
            f"SELECT room_id, (SELECT o.id FROM encstate_outbox o WHERE {where} "
            f"AND (o.room_id, o.id) > (rooms.room_id, {int(after)}) "
            f"AND o.room_id <= rooms.room_id AND o.not_before <= {int(now)} "
            "ORDER BY o.room_id, o.id LIMIT 1) AS first "
            "FROM rooms WHERE room_id IS NOT NULL"
        )

    async def due(self, limit: int, lane: str, per_room: int | None = None) -> list[OutboxItem]:
        """Due queue items of one lane (``triggers.LANES``), oldest first, at most ``per_room``
        from any one room so a busy room cannot starve the others: the oldest ``limit`` items,
        and where a room had more than its share of them, the rest of the batch from the other
        rooms, each up to its share, the room with the oldest due item first (an item in backoff
        does not count: its room waits as long as its due items do). Reads about ``limit`` rows
        through the lane's indexes (and one index step per room that has items, and its items
        in backoff after the oldest ``limit``), however long the queue is."""
        now = now_ms()
        share = per_room or limit
        where = self._lane(lane)
        rows = await self.db.fetch(
            f"SELECT {self._OUTBOX_COLUMNS} FROM encstate_outbox "
            f"WHERE {where} AND not_before <= $1 ORDER BY id LIMIT $2",
            now,
            limit,
        )
        taken: dict[str, int] = {}
        batch = []
        for r in rows:
            if taken.get(r["room_id"], 0) < share:
                taken[r["room_id"]] = taken.get(r["room_id"], 0) + 1
                batch.append(r)
        if len(rows) == limit and len(batch) < limit:  # a room had more than its share
            last = rows[-1]["id"]
            # Each room's oldest due item: for a room among the rows, its first there; for the
            # others (all their due items come after the last row), the first due after it.
            oldest: dict[str, int] = {}
            for r in rows:
                oldest.setdefault(r["room_id"], r["id"])
            others = sorted(
                (oldest.get(r["room_id"], r["first"]), r["room_id"])
                for r in await self.db.fetch(self._rooms(lane, now, last))
                if r["first"] is not None and taken.get(r["room_id"], 0) < share
            )
            for _, room_id in others:
                wanted = min(limit - len(batch), share - taken.get(room_id, 0))
                if wanted <= 0:
                    break
                # the room's items after the last one read, in its (room_id, id) index
                # (written as a range: with room_id=$1 PostgreSQL may walk the lane by id)
                batch += await self.db.fetch(
                    f"SELECT {self._OUTBOX_COLUMNS} FROM encstate_outbox WHERE {where} AND "
                    "(room_id, id) > ($1, $2) AND room_id <= $1 AND not_before <= $3 "
                    "ORDER BY room_id, id LIMIT $4",
                    room_id,
                    last,
                    now,
                    wanted,
                )
            batch.sort(key=lambda r: r["id"])
        return [
            OutboxItem(
                id=r["id"],
                room_id=r["room_id"],
                user_id=r["user_id"],
                device_id=r["device_id"],
                session_id=r["session_id"],
                trigger=r["trigger"],
                request_id=r["request_id"],
                via=r["via"],
                enqueued=r["enqueued"],
                attempts=r["attempts"],
                not_before=r["not_before"],
            )
            for r in batch
        ]

    async def next_due_ms(self, lane: str) -> int | None:
        return await self.db.fetchval(
            f"SELECT MIN(not_before) FROM encstate_outbox WHERE {self._lane(lane)}"
        )

    async def queued(self, lane: str, at_most: int) -> int:
        """How many items a lane holds, counted up to ``at_most`` (reads no more rows)."""
        return int(
            await self.db.fetchval(
                "SELECT COUNT(*) FROM (SELECT 1 FROM encstate_outbox "
                f"WHERE {self._lane(lane)} LIMIT $1) AS head",
                at_most,
            )
            or 0
        )

    async def lowest_delivered(self, room_id: str) -> dict[str, int]:
        """Per session of a room, the lowest index any key the bot delivered starts from (the
        delivery records are never pruned)."""
        rows = await self.db.fetch(
            "SELECT session_id, MIN(msg_index) AS low FROM encstate_delivered WHERE room_id=$1 "
            "GROUP BY session_id",
            room_id,
        )
        return {r["session_id"]: int(r["low"]) for r in rows}

    async def queue_stats(self) -> dict[str, tuple[int, int | None]]:
        """Per lane ("fast", "bulk"): how many items are queued, and the oldest one's enqueue
        time (ms)."""
        stats: dict[str, tuple[int, int | None]] = {}
        for name, where in (
            ("fast", f"trigger IN ({self._listed(FAST)})"),
            ("bulk", self._lane(PUSH_LANE)),
        ):
            row = await self.db.fetchrow(
                f"SELECT COUNT(*) AS n, MIN(enqueued) AS oldest FROM encstate_outbox WHERE {where}"
            )
            stats[name] = (int(row["n"] or 0), row["oldest"])
        return stats

    async def seal_count(self) -> int:
        return int(await self.db.fetchval("SELECT COUNT(*) FROM encstate_seal") or 0)

    async def pending_count(self, room_id: str | None = None) -> int:
        if room_id is None:
            return await self.db.fetchval("SELECT COUNT(*) FROM encstate_outbox")
        return await self.db.fetchval(
            "SELECT COUNT(*) FROM encstate_outbox WHERE room_id=$1", room_id
        )

    # Deliveries waiting for a key ------------------------------------------------------------

    async def add_waits(self, items: Iterable[OutboxItem]) -> None:
        """Remember deliveries (one device, one session each) that waited for a key the bot did
        not hold: asked for, or pushed to someone who joined before the key arrived."""
        ts = now_ms()
        args = [
            (
                i.room_id,
                i.session_id,
                i.user_id,
                i.device_id or "",
                str(i.trigger),
                i.request_id or "",
                i.via,
                ts,
            )
            for i in items
        ]
        if args:
            await self.db.executemany(
                "INSERT INTO encstate_key_wait (room_id, session_id, user_id, device_id, trigger,"
                " request_id, via, since) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
                "ON CONFLICT DO NOTHING",
                args,
            )

    async def take_waits(self, room_id: str, session_ids: Iterable[str]) -> list[OutboxItem]:
        """The deliveries that waited for these sessions' keys, removed (the caller queues
        them)."""
        items: list[OutboxItem] = []
        columns = "session_id, user_id, device_id, trigger, request_id, via"
        for chunk in sql.chunks(sorted(set(session_ids))):
            marks = sql.placeholders(len(chunk), offset=1)
            where = f"WHERE room_id=$1 AND session_id IN ({marks})"
            if self.db.scheme != Scheme.SQLITE or sqlite3.sqlite_version_info >= (3, 35):
                # one statement: a wait another connection commits meanwhile is either taken
                # and returned, or left for the next take
                rows = await self.db.fetch(
                    f"DELETE FROM encstate_key_wait {where} RETURNING {columns}", room_id, *chunk
                )
            else:  # an SQLite before RETURNING: a write the read missed fails the transaction
                async with self.db.acquire() as conn, conn.transaction():
                    rows = await conn.fetch(
                        f"SELECT {columns} FROM encstate_key_wait {where}", room_id, *chunk
                    )
                    await conn.execute(f"DELETE FROM encstate_key_wait {where}", room_id, *chunk)
            items += [
                OutboxItem(
                    room_id=room_id,
                    user_id=r["user_id"],
                    trigger=r["trigger"],
                    device_id=r["device_id"] or None,
                    session_id=r["session_id"],
                    request_id=r["request_id"] or None,
                    via=r["via"],
                )
                for r in rows
            ]
        return items

    async def drop_waits(self, before_ms: int, requests_before_ms: int) -> None:
        """Forget waits older than ``before_ms``, and key requests' waits older than
        ``requests_before_ms`` (their clients stopped waiting)."""
        await self.db.execute(
            "DELETE FROM encstate_key_wait WHERE since < $1 OR (since < $2 AND trigger=$3)",
            before_ms,
            requests_before_ms,
            str(Trigger.REQUEST),
        )

    async def waits_count(self) -> int:
        return int(await self.db.fetchval("SELECT COUNT(*) FROM encstate_key_wait") or 0)

    async def cancel_waits(self, user_id: str, device_id: str, request_id: str) -> None:
        await self.db.execute(
            "DELETE FROM encstate_key_wait WHERE user_id=$1 AND device_id=$2 AND request_id=$3",
            user_id,
            device_id,
            request_id,
        )

    async def cancel_request(self, user_id: str, device_id: str, request_id: str) -> int:
        # answers wait in the request lane: a join storm's items are not read
        lane = self._lane(REQUEST_LANE)
        where = f"WHERE {lane} AND user_id=$1 AND device_id=$2 AND request_id=$3"
        args = (user_id, device_id, request_id)
        rows = await self.db.fetch(f"SELECT id FROM encstate_outbox {where}", *args)
        await self.db.execute(f"DELETE FROM encstate_outbox {where}", *args)
        return len(rows)

    async def retry_later(self, ids: Iterable[int], delay_ms: int) -> None:
        args = [(now_ms() + delay_ms, i) for i in ids]
        if args:
            async with self.db.acquire() as conn, conn.transaction():
                await conn.executemany(
                    "UPDATE encstate_outbox SET attempts=attempts+1, not_before=$1 WHERE id=$2",
                    args,
                )

    async def finish(
        self,
        done_ids: Iterable[int],
        audit: Iterable[AuditRow],
        delivered: Iterable[tuple[str, str, str, int, str]] = (),
    ) -> None:
        """Record outcomes in one transaction: drop done queue rows, audit, and remember what
        was delivered. The courier calls it after every sendToDevice call that carried keys,
        so a crash repeats at most the call that was in flight."""
        ts = now_ms()
        audit = list(audit)
        audit_args = self._audit_args(audit)
        delivered_args = [(*d, ts) for d in delivered]
        done = [(i,) for i in done_ids]
        async with self.db.acquire() as conn, conn.transaction():
            if done:
                await conn.executemany("DELETE FROM encstate_outbox WHERE id=$1", done)
            if audit_args:
                await conn.executemany(self._AUDIT_INSERT, audit_args)
            if delivered_args:
                await conn.executemany(
                    "INSERT INTO encstate_delivered "
                    "(user_id, device_id, session_id, msg_index, room_id, ts) "
                    "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                    delivered_args,
                )
        if audit:
            self._audited(audit)

    # Links --------------------------------------------------------------------------------------

    async def links(self) -> set[tuple[str, str]]:
        rows = await self.db.fetch("SELECT room_id, via FROM encstate_link")
        return {(r["room_id"], r["via"]) for r in rows}

    async def set_links(self, links: Iterable[tuple[str, str]]) -> None:
        """Remember the links the bot acted on, so changes while it was down are noticed."""
        args = list(links)
        async with self.db.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM encstate_link")
            if args:
                await conn.executemany(
                    "INSERT INTO encstate_link (room_id, via) VALUES ($1, $2)", args
                )

    async def delivered(self, user_ids: Iterable[str]) -> set[tuple[str, str, str, int]]:
        """Every (user, device, session, index) already pushed to these users."""
        users = list(set(user_ids))
        found: set[tuple[str, str, str, int]] = set()
        for chunk in sql.chunks(users):
            rows = await self.db.fetch(
                "SELECT user_id, device_id, session_id, msg_index FROM encstate_delivered "
                f"WHERE user_id IN ({sql.placeholders(len(chunk))})",
                *chunk,
            )
            found |= {
                (r["user_id"], r["device_id"], r["session_id"], r["msg_index"]) for r in rows
            }
        return found

    # The owner ----------------------------------------------------------------------------------

    async def claim_owner(self, user_id: str) -> tuple[str, int]:
        """Claim the database (its one ``encstate_owner`` row) for this bot account unless an
        account has; return the owner and when it claimed (ms), ``user_id`` if it was free.

        A database encstate used before the owner row existed (migration v7 adds it empty)
        holds one account's data: the row goes to that account, as the data names it, in the
        same statement (two bots starting at once read the same evidence; one insert wins).
        The sender of the newest seal's event (the seals are the bot's own sessions, and their
        events came back with the sender the homeserver gave them); failing that, in standalone
        mode, the one account of the crypto store in this schema, if encstate has data here.
        Without evidence the row goes to ``user_id``."""
        evidence = [
            "(SELECT e.sender FROM encstate_seal s JOIN encstate_state_event e "
            "ON e.room_id = s.room_id AND e.event_id = s.event_id "
            "ORDER BY s.created_ts DESC, s.session_id LIMIT 1)"
        ]
        if await self._has_crypto_account():
            evidence.append(
                "(SELECT MIN(account_id) FROM crypto_account HAVING COUNT(*) = 1 AND ("
                + " OR ".join(f"EXISTS(SELECT 1 FROM {table})" for table in self._DATA_TABLES)
                + "))"
            )
        await self.db.execute(
            "INSERT INTO encstate_owner (id, user_id, claimed_ts) "
            f"SELECT 0, COALESCE({', '.join(evidence)}, $1), $2 "
            "WHERE NOT EXISTS(SELECT 1 FROM encstate_owner) "  # (and SQLite needs a WHERE)
            "ON CONFLICT (id) DO NOTHING",
            user_id,
            now_ms(),
        )
        row = await self.db.fetchrow("SELECT user_id, claimed_ts FROM encstate_owner WHERE id = 0")
        return row["user_id"], row["claimed_ts"]

    # what a bot that ran leaves behind (its rooms, queue, audit, seals)
    _DATA_TABLES = ("encstate_room", "encstate_outbox", "encstate_audit", "encstate_seal")

    async def _has_crypto_account(self) -> bool:
        """Whether mautrix's crypto store has its accounts table in this database and schema
        (the standalone mode keeps it there, keyed by account; a maubot server keeps it in its
        own database)."""
        if self.db.scheme == Scheme.SQLITE:
            query = (
                "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type='table' "
                "AND name='crypto_account')"
            )
        else:  # the schema encstate's tables are in, not another one on the search path
            query = (
                "SELECT to_regclass(quote_ident(current_schema()) || '.crypto_account') "
                "IS NOT NULL"
            )
        return bool(await self.db.fetchval(query))

    # The sync position --------------------------------------------------------------------------
    # ``encstate_sync_position`` (migration v9; one row: id 0, next_batch, saved_ts).

    async def sync_position(self) -> str | None:
        """The sync token up to which every event of the state-encrypted rooms was processed."""
        return await self.db.fetchval("SELECT next_batch FROM encstate_sync_position WHERE id = 0")

    async def put_sync_position(self, next_batch: str) -> None:
        await self.db.execute(
            "INSERT INTO encstate_sync_position (id, next_batch, saved_ts) VALUES (0, $1, $2) "
            "ON CONFLICT (id) DO UPDATE SET next_batch=excluded.next_batch, "
            "saved_ts=excluded.saved_ts",
            next_batch,
            now_ms(),
        )

    # Unread history ------------------------------------------------------------------------------
    # ``encstate_unread`` (migration v10): timeline reads cut short by backfill_limit, each with
    # where it resumes (the pagination token it stopped at, and the read's own bound: a sync
    # token ``to_token``, or ``away``: the bot's own leave). A room may have several.

    async def unread(self) -> list[UnreadHistory]:
        rows = await self.db.fetch(
            "SELECT room_id, from_token, to_token, away, before_bot FROM encstate_unread "
            "ORDER BY since_ts"
        )
        return [
            UnreadHistory(
                r["room_id"],
                r["from_token"],
                r["to_token"],
                bool(r["away"]),
                bool(r["before_bot"]),
            )
            for r in rows
        ]

    async def put_unread(self, unread: UnreadHistory, replacing: str | None = None) -> None:
        """Record where a cut read resumes; ``replacing``: the token of the read it resumed
        (one step further along the same stretch of timeline)."""
        async with self.db.acquire() as conn, conn.transaction():
            if replacing is not None:
                await conn.execute(
                    "DELETE FROM encstate_unread WHERE room_id=$1 AND from_token=$2",
                    unread.room_id,
                    replacing,
                )
            await conn.execute(
                "INSERT INTO encstate_unread "
                "(room_id, from_token, to_token, away, before_bot, since_ts) "
                "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (room_id, from_token) DO NOTHING",
                unread.room_id,
                unread.from_token,
                unread.to_token,
                unread.away,
                unread.before_bot,
                now_ms(),
            )

    async def drop_unread(self, room_id: str, from_token: str) -> None:
        await self.db.execute(
            "DELETE FROM encstate_unread WHERE room_id=$1 AND from_token=$2", room_id, from_token
        )

    async def delivered_sessions(
        self, user_ids: Iterable[str], session_ids: Iterable[str]
    ) -> set[tuple[str, str, int]]:
        """(user, session, index) of what was delivered to any device of these users, of these
        sessions only (``delivered`` returns every session of the users, in every room)."""
        users = sorted(set(user_ids))
        sessions = sorted(set(session_ids))
        found: set[tuple[str, str, int]] = set()
        for some_sessions in sql.chunks(sessions, sql.IN_CHUNK // 2):
            for some_users in sql.chunks(users):
                rows = await self.db.fetch(
                    "SELECT DISTINCT user_id, session_id, msg_index FROM encstate_delivered "
                    f"WHERE session_id IN ({sql.placeholders(len(some_sessions))}) AND user_id "
                    f"IN ({sql.placeholders(len(some_users), len(some_sessions))})",
                    *some_sessions,
                    *some_users,
                )
                found |= {(r["user_id"], r["session_id"], r["msg_index"]) for r in rows}
        return found
