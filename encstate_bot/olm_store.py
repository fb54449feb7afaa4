"""Bulk access to mautrix's crypto store for Olm sessions and device lists.

A fan-out to a thousand devices through mautrix's per-item store methods costs thousands of
database round trips (one query per device to find its Olm session, one write per encrypted
message). This adapter reads and writes the same rows in a few statements. For mautrix's SQL
store (`PgCryptoStore`, on SQLite or PostgreSQL) it uses that store's tables and SQL, its pickle
key and its in-memory session cache, exactly as its own methods do; for any other store it falls
back to those methods one item at a time. `tests/unit/test_olm_store.py` checks both paths give
the same answers, so a schema change in mautrix shows up as a failing test.
"""

from __future__ import annotations

from typing import Any, Iterable

from mautrix.crypto.sessions import Session
from mautrix.crypto.store.asyncpg import PgCryptoStore
from mautrix.types import CrossSigner, CrossSigningUsage, DeviceIdentity, SessionID, TrustState

CHUNK = 400  # identifiers per IN (...) list


def _marks(count: int, offset: int = 0) -> str:
    return ", ".join(f"${i + 1 + offset}" for i in range(count))


def _chunks(values: list[Any]) -> Iterable[list[Any]]:
    for start in range(0, len(values), CHUNK):
        yield values[start : start + CHUNK]


class BulkOlmStore:
    def __init__(self, store: Any) -> None:
        self.store = store

    @property
    def sql(self) -> bool:
        return isinstance(self.store, PgCryptoStore)

    def transaction(self) -> Any:
        return self.store.transaction()

    # Olm sessions -------------------------------------------------------------------------------

    async def latest_sessions(self, keys: Iterable[str]) -> dict[str, Session]:
        """The newest Olm session per identity key (by last decryption, as mautrix picks)."""
        keys = list(dict.fromkeys(keys))
        if not self.sql:
            found = {}
            for key in keys:
                session = await self.store.get_latest_session(key)
                if session is not None:
                    found[key] = session
            return found
        store: PgCryptoStore = self.store
        newest: dict[str, Any] = {}
        for chunk in _chunks(keys):
            rows = await store.db.fetch(
                "SELECT session_id, sender_key, session, created_at, last_encrypted, "
                "last_decrypted FROM crypto_olm_session "
                f"WHERE account_id=$1 AND sender_key IN ({_marks(len(chunk), 1)})",
                store.account_id,
                *chunk,
            )
            for row in rows:
                best = newest.get(row["sender_key"])
                if best is None or row["last_decrypted"] > best["last_decrypted"]:
                    newest[row["sender_key"]] = row
        found = {}
        for key, row in newest.items():
            cached = store._olm_cache[key].get(row["session_id"])
            if cached is None:
                cached = Session.from_pickle(
                    row["session"],
                    passphrase=store.pickle_key,
                    creation_time=row["created_at"],
                    last_encrypted=row["last_encrypted"],
                    last_decrypted=row["last_decrypted"],
                )
                store._olm_cache[key][SessionID(cached.id)] = cached
            found[key] = cached
        return found

    async def add_sessions(self, sessions: list[tuple[str, Session]]) -> None:
        if not self.sql:
            for key, session in sessions:
                await self.store.add_session(key, session)
            return
        store: PgCryptoStore = self.store
        rows = []
        for key, session in sessions:
            rows.append(
                (
                    session.id,
                    key,
                    session.pickle(store.pickle_key),
                    session.creation_time,
                    session.last_encrypted,
                    session.last_decrypted,
                    store.account_id,
                )
            )
        if rows:
            await store.db.executemany(
                "INSERT INTO crypto_olm_session (session_id, sender_key, session, created_at, "
                "last_encrypted, last_decrypted, account_id) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                rows,
            )
        # Into mautrix's cache only once stored: a later update of a cached session must find
        # its row.
        for key, session in sessions:
            store._olm_cache[key][SessionID(session.id)] = session

    async def update_sessions(self, sessions: list[tuple[str, Session]]) -> None:
        if not self.sql:
            for key, session in sessions:
                await self.store.update_session(key, session)
            return
        store: PgCryptoStore = self.store
        rows = [
            (
                session.pickle(store.pickle_key),
                session.last_encrypted,
                session.last_decrypted,
                session.id,
                store.account_id,
            )
            for _, session in sessions
        ]
        if rows:
            await store.db.executemany(
                "UPDATE crypto_olm_session SET session=$1, last_encrypted=$2, last_decrypted=$3 "
                "WHERE session_id=$4 AND account_id=$5",
                rows,
            )

    # Devices ------------------------------------------------------------------------------------

    async def devices(
        self, user_ids: Iterable[str]
    ) -> dict[str, dict[str, DeviceIdentity] | None]:
        """Stored devices per user; None for users whose device list is not tracked."""
        users = list(dict.fromkeys(user_ids))
        if not self.sql:
            return {u: await self.store.get_devices(u) for u in users}
        db = self.store.db
        result: dict[str, dict[str, DeviceIdentity] | None] = {u: None for u in users}
        for chunk in _chunks(users):
            marks = _marks(len(chunk))
            tracked = await db.fetch(
                f"SELECT user_id FROM crypto_tracked_user WHERE user_id IN ({marks})", *chunk
            )
            for row in tracked:
                result[row["user_id"]] = {}
            rows = await db.fetch(
                "SELECT user_id, device_id, identity_key, signing_key, trust, deleted, name "
                f"FROM crypto_device WHERE user_id IN ({marks})",
                *chunk,
            )
            for row in rows:
                devices = result.get(row["user_id"])
                if devices is None:
                    continue
                devices[row["device_id"]] = DeviceIdentity(
                    user_id=row["user_id"],
                    device_id=row["device_id"],
                    identity_key=row["identity_key"],
                    signing_key=row["signing_key"],
                    trust=TrustState(row["trust"]),
                    deleted=row["deleted"],
                    name=row["name"],
                )
        return result

    async def put_devices(self, devices: dict[str, dict[str, DeviceIdentity]]) -> None:
        """Replace the device lists of these users and mark them tracked, as put_devices does."""
        if not self.sql:
            for user_id, user_devices in devices.items():
                await self.store.put_devices(user_id, user_devices)
            return
        db = self.store.db
        users = list(devices)
        rows = [
            (
                user_id,
                device_id,
                d.identity_key,
                d.signing_key,
                d.trust,
                d.deleted,
                d.name,
            )
            for user_id, user_devices in devices.items()
            for device_id, d in user_devices.items()
        ]
        await db.executemany(
            "INSERT INTO crypto_tracked_user (user_id) VALUES ($1) "
            "ON CONFLICT (user_id) DO NOTHING",
            [(u,) for u in users],
        )
        for chunk in _chunks(users):
            await db.execute(
                f"DELETE FROM crypto_device WHERE user_id IN ({_marks(len(chunk))})", *chunk
            )
        if rows:
            await db.executemany(
                "INSERT INTO crypto_device (user_id, device_id, identity_key, signing_key, trust, "
                "deleted, name) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                rows,
            )

    # Cross-signing ------------------------------------------------------------------------------

    async def put_cross_signing(
        self,
        keys: list[tuple[str, CrossSigningUsage, str]],
        signatures: list[tuple[CrossSigner, CrossSigner, str]],
    ) -> None:
        """Store cross-signing keys and verified signatures, as put_cross_signing_key and
        put_signature do."""
        if not self.sql:
            for user_id, usage, key in keys:
                await self.store.put_cross_signing_key(user_id, usage, key)
            for target, signer, signature in signatures:
                await self.store.put_signature(target, signer, signature)
            return
        db = self.store.db
        if keys:
            await db.executemany(
                "INSERT INTO crypto_cross_signing_keys (user_id, usage, key, first_seen_key) "
                "VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (user_id, usage) DO UPDATE SET key=excluded.key",
                [(user_id, usage.value, key, key) for user_id, usage, key in keys],
            )
        if signatures:
            await db.executemany(
                "INSERT INTO crypto_cross_signing_signatures (signed_user_id, signed_key, "
                "signer_user_id, signer_key, signature) VALUES ($1, $2, $3, $4, $5) "
                "ON CONFLICT (signed_user_id, signed_key, signer_user_id, signer_key) "
                "DO UPDATE SET signature=excluded.signature",
                [
                    (target[0], target[1], signer[0], signer[1], signature)
                    for target, signer, signature in signatures
                ],
            )
