"""Database schema. One SQL dialect for SQLite and PostgreSQL (mautrix.util.async_db)."""

from __future__ import annotations

from mautrix.util.async_db import Connection, Scheme, UpgradeTable

upgrade_table = UpgradeTable(version_table_name="encstate_version", database_name="encstate")


def _serial(scheme: Scheme) -> str:
    if scheme == Scheme.SQLITE:
        return "INTEGER PRIMARY KEY AUTOINCREMENT"
    return "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"


@upgrade_table.register(description="Ledger, audit and delivery queue")
async def upgrade_v1(conn: Connection, scheme: Scheme) -> None:
    await conn.execute(
        """CREATE TABLE encstate_room (
            room_id    TEXT PRIMARY KEY,
            state_flag TEXT,
            backfilled BOOLEAN NOT NULL DEFAULT false,
            mode       TEXT,
            share_invited BOOLEAN,
            dry_run    BOOLEAN
        )"""
    )
    await conn.execute(
        """CREATE TABLE encstate_state_event (
            room_id    TEXT NOT NULL,
            event_id   TEXT NOT NULL,
            outer_key  TEXT NOT NULL,
            session_id TEXT NOT NULL,
            sender     TEXT NOT NULL,
            sender_key TEXT,
            device_id  TEXT,
            origin_ts  BIGINT NOT NULL,
            msg_index  INTEGER,
            ciphertext TEXT NOT NULL,
            status     TEXT NOT NULL,
            inner_type TEXT,
            inner_key  TEXT,
            reason     TEXT,
            message_payload BOOLEAN NOT NULL DEFAULT false,
            PRIMARY KEY (room_id, event_id)
        )"""
    )
    await conn.execute(
        "CREATE INDEX encstate_state_event_session ON encstate_state_event (room_id, session_id)"
    )
    await conn.execute(
        """CREATE TABLE encstate_message (
            room_id    TEXT NOT NULL,
            event_id   TEXT NOT NULL,
            session_id TEXT NOT NULL,
            msg_index  INTEGER,
            ciphertext TEXT,
            status     TEXT NOT NULL,
            PRIMARY KEY (room_id, event_id)
        )"""
    )
    await conn.execute(
        """CREATE TABLE encstate_session (
            room_id    TEXT NOT NULL,
            session_id TEXT NOT NULL,
            shared_history BOOLEAN NOT NULL DEFAULT false,
            received_from TEXT,
            received_ts BIGINT NOT NULL,
            PRIMARY KEY (room_id, session_id)
        )"""
    )
    await conn.execute(
        f"""CREATE TABLE encstate_audit (
            id         {_serial(scheme)},
            ts         BIGINT NOT NULL,
            room_id    TEXT NOT NULL,
            user_id    TEXT NOT NULL,
            device_id  TEXT,
            session_id TEXT,
            decision   TEXT NOT NULL,
            code       TEXT,
            msg_index  INTEGER,
            reason     TEXT NOT NULL,
            trigger    TEXT NOT NULL,
            exposed    TEXT,
            request_id TEXT
        )"""
    )
    await conn.execute("CREATE INDEX encstate_audit_room ON encstate_audit (room_id, ts)")
    await conn.execute(
        f"""CREATE TABLE encstate_outbox (
            id         {_serial(scheme)},
            room_id    TEXT NOT NULL,
            user_id    TEXT NOT NULL,
            device_id  TEXT,
            session_id TEXT,
            trigger    TEXT NOT NULL,
            request_id TEXT,
            enqueued   BIGINT NOT NULL,
            attempts   INTEGER NOT NULL DEFAULT 0,
            not_before BIGINT NOT NULL DEFAULT 0
        )"""
    )
    await conn.execute(
        """CREATE TABLE encstate_delivered (
            user_id    TEXT NOT NULL,
            device_id  TEXT NOT NULL,
            session_id TEXT NOT NULL,
            msg_index  INTEGER NOT NULL,
            room_id    TEXT NOT NULL,
            ts         BIGINT NOT NULL,
            PRIMARY KEY (user_id, device_id, session_id, msg_index)
        )"""
    )


@upgrade_table.register(description="Restricted-room links and the room that admits a push")
async def upgrade_v2(conn: Connection) -> None:
    await conn.execute("ALTER TABLE encstate_outbox ADD COLUMN via TEXT")
    await conn.execute(
        """CREATE TABLE encstate_link (
            room_id TEXT NOT NULL,
            via     TEXT NOT NULL,
            PRIMARY KEY (room_id, via)
        )"""
    )


@upgrade_table.register(description="How long each answer waited in the queue")
async def upgrade_v3(conn: Connection) -> None:
    await conn.execute("ALTER TABLE encstate_audit ADD COLUMN waited_ms INTEGER")


@upgrade_table.register(description="Wide integers, the server's current state, audit retention")
async def upgrade_v4(conn: Connection, scheme: Scheme) -> None:
    # A message index is a 32-bit varint from untrusted ciphertext, and a queue wait can exceed
    # 2^31 ms: PostgreSQL's INTEGER overflowed on both. SQLite's INTEGER is 64 bits already.
    if scheme != Scheme.SQLITE:
        for table, column in (
            ("encstate_state_event", "msg_index"),
            ("encstate_message", "msg_index"),
            ("encstate_audit", "msg_index"),
            ("encstate_audit", "waited_ms"),
            ("encstate_delivered", "msg_index"),
            ("encstate_outbox", "attempts"),
        ):
            await conn.execute(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE BIGINT")
    await conn.execute(
        """CREATE TABLE encstate_current (
            room_id   TEXT NOT NULL,
            outer_key TEXT NOT NULL,
            event_id  TEXT NOT NULL,
            PRIMARY KEY (room_id, outer_key)
        )"""
    )
    await conn.execute("CREATE INDEX encstate_audit_ts ON encstate_audit (ts)")


@upgrade_table.register(description="Seals: the bot's own one-value sessions, per room on/off")
async def upgrade_v5(conn: Connection) -> None:
    await conn.execute("ALTER TABLE encstate_room ADD COLUMN seal BOOLEAN")
    await conn.execute(
        """CREATE TABLE encstate_seal (
            room_id         TEXT NOT NULL,
            session_id      TEXT NOT NULL,
            outer_key       TEXT NOT NULL,
            inner_type      TEXT NOT NULL,
            inner_key       TEXT NOT NULL,
            content_hash    TEXT NOT NULL,
            source_event_id TEXT NOT NULL,
            event_id        TEXT,
            session_key     TEXT NOT NULL,
            created_ts      BIGINT NOT NULL,
            PRIMARY KEY (room_id, session_id)
        )"""
    )


@upgrade_table.register(description="Deliveries waiting for a key the bot does not hold yet")
async def upgrade_v6(conn: Connection) -> None:
    # One row per (device, session, trigger) that was asked for, or pushed to, while the bot
    # lacked the session's key (a device asking again adds nothing: the first request id is
    # kept); taken (and queued again) when the key arrives, so it survives a restart.
    await conn.execute(
        """CREATE TABLE encstate_key_wait (
            room_id    TEXT NOT NULL,
            session_id TEXT NOT NULL,
            user_id    TEXT NOT NULL,
            device_id  TEXT NOT NULL,
            trigger    TEXT NOT NULL,
            request_id TEXT NOT NULL DEFAULT '',
            via        TEXT,
            since      BIGINT NOT NULL,
            PRIMARY KEY (room_id, session_id, user_id, device_id, trigger)
        )"""
    )


@upgrade_table.register(description="The bot account that owns this database (or schema)")
async def upgrade_v7(conn: Connection) -> None:
    # encstate's tables have no account column: two bot accounts on one database and schema
    # would drain each other's queue and adopt each other's seals. The first account to start
    # claims the one row; another account is refused at start (bot.py).
    await conn.execute(
        """CREATE TABLE encstate_owner (
            id         INTEGER PRIMARY KEY CHECK (id = 0),
            user_id    TEXT NOT NULL,
            claimed_ts BIGINT NOT NULL
        )"""
    )


@upgrade_table.register(description="The outbox's lanes, indexed")
async def upgrade_v8(conn: Connection) -> None:
    # Per courier lane (triggers.LANE_TRIGGERS, as the store writes the condition): its items
    # oldest first, and per room, so a batch is read without a pass over the whole queue (a
    # join storm queues 100k items) and a busy room's share of it is capped cheaply. Partial
    # indexes, not one on (lane, id): PostgreSQL would walk the primary key instead, through
    # every item of the other lanes, whenever it thinks the lane is most of the queue.
    for name, condition in (
        ("request", "trigger IN ('request')"),
        ("fast", "trigger IN ('bot-invite', 'invite', 'join')"),
        ("push", "trigger NOT IN ('bot-invite', 'invite', 'join', 'request')"),
    ):
        await conn.execute(
            f"CREATE INDEX encstate_outbox_{name} ON encstate_outbox (id) WHERE {condition}"
        )
        await conn.execute(
            f"CREATE INDEX encstate_outbox_{name}_room ON encstate_outbox (room_id, id) "
            f"WHERE {condition}"
        )


@upgrade_table.register(description="The sync position every tracked event was processed up to")
async def upgrade_v9(conn: Connection) -> None:
    await conn.execute(
        """CREATE TABLE encstate_sync_position (
            id         INTEGER PRIMARY KEY,
            next_batch TEXT NOT NULL,
            saved_ts   BIGINT NOT NULL
        )"""
    )


@upgrade_table.register(description="Timeline reads kept to do, to go on with")
async def upgrade_v10(conn: Connection) -> None:
    await conn.execute(
        """CREATE TABLE encstate_unread (
            room_id    TEXT NOT NULL,
            from_token TEXT NOT NULL,
            to_token   TEXT,
            away       BOOLEAN NOT NULL,
            before_bot BOOLEAN NOT NULL DEFAULT false,
            since_ts   BIGINT NOT NULL,
            PRIMARY KEY (room_id, from_token)
        )"""
    )
