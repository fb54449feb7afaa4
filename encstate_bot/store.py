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
from .triggers import FAST, Trigger


def now_ms() -> int:
    return int(time.time() * 1000)


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

    @staticmethod
    def _lane(requests: bool) -> str:
        # the fast lane: answers, and the work for one newcomer waiting to read the room
        fast = "trigger IN (" + ", ".join(f"'{t}'" for t in sorted(FAST)) + ")"
        return fast if requests else f"NOT ({fast})"

    async def due(
        self, limit: int, requests: bool, per_room: int | None = None
    ) -> list[OutboxItem]:
        """Due queue items of one lane (the fast one, or bulk pushes), oldest first, at most
        ``per_room`` from any one room so a busy room cannot starve the others."""
        rows = await self.db.fetch(
            "SELECT id, room_id, user_id, device_id, session_id, trigger, request_id, via, "
            "enqueued, attempts, not_before FROM (SELECT *, ROW_NUMBER() OVER "
            "(PARTITION BY room_id ORDER BY id) AS room_rank FROM encstate_outbox "
            f"WHERE {self._lane(requests)} AND not_before <= $1) AS due "
            "WHERE room_rank <= $2 ORDER BY id LIMIT $3",
            now_ms(),
            per_room or limit,
            limit,
        )
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
            for r in rows
        ]

    async def next_due_ms(self, requests: bool) -> int | None:
        return await self.db.fetchval(
            f"SELECT MIN(not_before) FROM encstate_outbox WHERE {self._lane(requests)}"
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
        for lane, requests in (("fast", True), ("bulk", False)):
            row = await self.db.fetchrow(
                "SELECT COUNT(*) AS n, MIN(enqueued) AS oldest FROM encstate_outbox "
                f"WHERE {self._lane(requests)}"
            )
            stats[lane] = (int(row["n"] or 0), row["oldest"])
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
        rows = await self.db.fetch(
            "SELECT id FROM encstate_outbox WHERE user_id=$1 AND device_id=$2 AND request_id=$3",
            user_id,
            device_id,
            request_id,
        )
        await self.db.execute(
            "DELETE FROM encstate_outbox WHERE user_id=$1 AND device_id=$2 AND request_id=$3",
            user_id,
            device_id,
            request_id,
        )
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
