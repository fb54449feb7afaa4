"""The only place that reaches into mautrix's and python-olm's internals.

encstate shares mautrix's Olm machine and crypto store with maubot, and for speed and for hooks
it needs a few things neither library offers publicly:

- python-olm: libolm through its cffi module ``_libolm`` (``ed25519_verify`` with a utility
  object per thread, ``olm_encrypt`` on ``Session._session`` with ``Session._check_error``);
- mautrix's ``OlmMachine``: its Olm lock (``_olm_lock``), its key query with untracked users
  (``_fetch_keys``) and its room key receivers (``_receive_room_key``,
  ``_receive_forwarded_room_key``), wrapped on the instance;
- mautrix's SQL crypto store (``PgCryptoStore``): its tables, pickle key and Olm session cache
  (``_olm_cache``), read and written in bulk by ``BulkOlmStore``.

Every other module uses the functions here. ``check()`` runs at start and says what is missing
and which mautrix version encstate needs (``MAUTRIX_RANGE``, the same bound as pyproject.toml,
whose upper end CI tests); ``tests/unit/test_glue.py`` also checks that no other module touches
these internals.

Moving to a maintained Olm library (vodozemac's Python bindings; libolm is deprecated) means
changing this module only: ``ed25519_verify`` and ``olm_encrypt`` become calls into the new
library, ``BulkOlmStore`` pickles sessions the way the crypto store then does, and ``check()``
looks for the new library instead of ``_libolm``.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
import importlib.metadata
import inspect
import logging
import secrets
import threading
from typing import Any, Awaitable, Callable, Iterable

from mautrix.crypto import OlmMachine
from mautrix.crypto.sessions import Session
from mautrix.crypto.store.asyncpg import PgCryptoStore
from mautrix.types import CrossSigner, CrossSigningUsage, DeviceIdentity, SessionID, TrustState
import olm

from .sql import IN_CHUNK, chunks, placeholders

try:
    from _libolm import ffi, lib
except ImportError:  # reported by check()
    ffi = lib = None

MAUTRIX_RANGE = ">=0.21.1,<0.22"

# What is used of libolm's cffi module.
LIBOLM_FUNCTIONS = (
    "olm_utility_size",
    "olm_utility",
    "olm_ed25519_verify",
    "olm_error",
    "olm_encrypt_random_length",
    "olm_encrypt_message_type",
    "olm_encrypt_message_length",
    "olm_encrypt",
)
FFI_FUNCTIONS = ("new", "from_buffer", "unpack")
KEY_RECEIVERS = ("_receive_room_key", "_receive_forwarded_room_key")
_MISSING = object()


def installed_mautrix() -> str:
    """The installed mautrix version, as its package metadata says."""
    try:
        return importlib.metadata.version("mautrix")
    except importlib.metadata.PackageNotFoundError:
        import mautrix

        return str(getattr(mautrix, "__version__", "unknown"))


# libolm --------------------------------------------------------------------------------------

_utilities = threading.local()


def ed25519_verify(key: str, message: str, signature: str) -> bool:
    """Whether ``signature`` (unpadded base64) signs ``message`` for the ed25519 ``key``.

    The same libolm call as ``olm.ed25519_verify``, with a libolm utility object per thread:
    python-olm shares one between all threads, set up on first use without a lock, and clears
    its copy of the message byte by byte in Python (signed JSON is public; nothing to clear)."""
    utility = getattr(_utilities, "utility", None)
    if utility is None:
        buffer = ffi.new("char[]", lib.olm_utility_size())
        utility = _utilities.utility = lib.olm_utility(buffer)
        _utilities.buffer = buffer  # the utility lives in this buffer
    if not isinstance(key, str) or not isinstance(signature, str):
        raise TypeError("key and signature must be strings")
    key_bytes = key.encode()
    message_bytes = message.encode()
    signature_bytes = bytearray(signature, "utf-8")  # libolm decodes it in place
    result = lib.olm_ed25519_verify(
        utility,
        key_bytes,
        len(key_bytes),
        message_bytes,
        len(message_bytes),
        ffi.from_buffer(signature_bytes),
        len(signature_bytes),
    )
    return result != lib.olm_error()


def olm_encrypt(session: olm.Session, plaintext: str) -> tuple[int, str]:
    """Encrypt with an Olm session: (message type, base64 body), as ``Session.encrypt``.

    python-olm's own method clears its copy of the plaintext one byte at a time in Python,
    which costs more than the encryption (about 0.1 ms for a forwarded room key); this makes
    the same libolm calls and clears the copy in one step."""
    data = bytearray(plaintext, "utf-8")
    pointer = session._session
    random_length = lib.olm_encrypt_random_length(pointer)
    random = secrets.token_bytes(random_length)
    message_type = lib.olm_encrypt_message_type(pointer)
    session._check_error(message_type)
    length = lib.olm_encrypt_message_length(pointer, len(data))
    buffer = ffi.new("char[]", length)
    try:
        session._check_error(
            lib.olm_encrypt(
                pointer,
                ffi.from_buffer(data),
                len(data),
                ffi.from_buffer(random),
                random_length,
                buffer,
                length,
            )
        )
    finally:
        data[:] = bytes(len(data))
    return message_type, ffi.unpack(buffer, length).decode()


# mautrix's Olm machine -----------------------------------------------------------------------


def olm_lock(crypto: Any) -> asyncio.Lock:
    """The lock mautrix's Olm machine holds while it uses Olm sessions."""
    return crypto._olm_lock


async def fetch_keys(crypto: Any, user_ids: list[str]) -> dict[str, dict[str, DeviceIdentity]]:
    """Query the homeserver for these users' devices and store them, tracked or not."""
    return await crypto._fetch_keys(list(user_ids), include_untracked=True)


# What ``resolve_trust_many`` uses of the machine besides its crypto store: the users whose
# keys mautrix's trust resolution already fetched once, and the lock it fetches them under.
TRUST_INTERNALS = ("_cs_fetch_attempted", "_fetch_keys_lock")
TRUST_FETCH_CHUNK = 250  # users per key query when trust resolution fetches missing keys


def keys_fetched(crypto: Any, user_ids: Iterable[str]) -> None:
    """These users' device and cross-signing keys were just queried and stored: mautrix's
    trust resolution need not query them again (it queries a user without cross-signing keys
    once per process, for exactly the answer the bulk query just stored)."""
    attempted = getattr(crypto, "_cs_fetch_attempted", None)
    if isinstance(attempted, set):
        attempted.update(user_ids)


async def resolve_trust_many(
    crypto: Any, devices: list[DeviceIdentity], log: logging.Logger
) -> dict[tuple[str, str], TrustState] | None:
    """mautrix's ``resolve_trust`` for many devices, by (user, device), in a few statements:
    the same reads (cross-signing keys, the master key's signature on the self-signing key, the
    self-signing key's on the device) and the same rules, in bulk. Users without
    cross-signing keys are fetched once per process, as mautrix does, but in one key query per
    TRUST_FETCH_CHUNK users instead of one per device. None where this cannot be done in bulk
    (not mautrix's SQL store, or the machine lacks what it reads, or a read failed): the
    caller then asks ``resolve_trust`` one device at a time."""
    store = getattr(crypto, "crypto_store", None)
    if not isinstance(store, PgCryptoStore) or not all(
        hasattr(crypto, name) for name in TRUST_INTERNALS
    ):
        return None
    try:
        return await _resolve_trust_many(crypto, BulkOlmStore(store), devices, log)
    except Exception:
        log.exception("Resolving trust in bulk failed; resolving it one device at a time")
        return None


async def _resolve_trust_many(
    crypto: Any, bulk: BulkOlmStore, devices: list[DeviceIdentity], log: logging.Logger
) -> dict[tuple[str, str], TrustState]:
    result: dict[tuple[str, str], TrustState] = {}
    pending = []
    for device in devices:
        if device.device_id != crypto.client.device_id and device.trust in (
            TrustState.VERIFIED,
            TrustState.BLACKLISTED,
        ):
            result[(device.user_id, device.device_id)] = device.trust
        else:
            pending.append(device)
    users = list(dict.fromkeys(d.user_id for d in pending))
    keys = await bulk.cross_signing_keys(users)
    missing = [u for u in users if not keys.get(u) and u not in crypto._cs_fetch_attempted]
    if missing:
        async with crypto._fetch_keys_lock:
            # Whoever held the lock meanwhile may have fetched some of them already.
            fetch = [u for u in missing if u not in crypto._cs_fetch_attempted]
            for chunk in chunks(fetch, TRUST_FETCH_CHUNK):
                try:
                    await crypto._fetch_keys(list(chunk))
                except Exception:  # as resolve_trust: those devices are not cross-signed
                    log.exception(f"Fetching the keys of {len(chunk)} user(s) for trust failed")
                # Only once the query finished (or failed, as mautrix counts it): a
                # cancelled query leaves its users and later chunks to be fetched again.
                crypto._cs_fetch_attempted.update(chunk)
        # As resolve_trust, re-read every user that had no keys, whoever fetched them: keys
        # another resolver stored while this one waited for the lock count too.
        keys.update(await bulk.cross_signing_keys(missing))
    signed = await bulk.self_signatures(users)
    trusted: dict[str, bool] = {}
    warned: set[str] = set()
    for device in pending:
        user = device.user_id
        user_keys = keys.get(user, {})
        msk = user_keys.get(CrossSigningUsage.MASTER)
        ssk = user_keys.get(CrossSigningUsage.SELF)
        state = TrustState.UNVERIFIED
        if msk is None or ssk is None:
            if user not in warned:
                warned.add(user)
                absent = CrossSigningUsage.MASTER if msk is None else CrossSigningUsage.SELF
                log.debug(f"Didn't find cross-signing key {absent} of {user}")
        elif (user, ssk[0], msk[0]) not in signed:
            if user not in warned:
                warned.add(user)
                log.warning(f"Self-signing key of {user} is not signed by their master key")
        elif (user, device.signing_key, ssk[0]) in signed:
            if user not in trusted:
                trusted[user] = bool(await crypto.is_user_trusted(user))
            if trusted[user]:
                state = TrustState.CROSS_SIGNED_TRUSTED
            elif msk[0] == msk[1]:
                state = TrustState.CROSS_SIGNED_TOFU
            else:
                state = TrustState.CROSS_SIGNED_UNTRUSTED
        result[(user, device.device_id)] = state
    return result


def patch_key_receivers(
    crypto: Any, after: Callable[[Any, bool], Awaitable[None]], log: logging.Logger
) -> Callable[[], None]:
    """Run ``await after(evt, is_room_key)`` once mautrix's Olm machine has handled an
    ``m.room_key`` (``is_room_key`` True) or an ``m.forwarded_room_key`` (False).

    The machine's receivers are wrapped on this instance only. What ``after`` raises is logged
    and does not reach mautrix; what mautrix's receiver raises skips ``after`` and propagates as
    before. A receiver mautrix lacks is left out with a warning (callers then poll for
    sessions). Returns a function that puts the receivers back."""
    previous: dict[str, Any] = {}
    for name in KEY_RECEIVERS:
        original = getattr(crypto, name, None)
        if original is None:
            log.warning(f"mautrix has no {name}; session arrival is polled instead")
            continue
        previous[name] = vars(crypto).get(name, _MISSING)
        setattr(crypto, name, _after_receiver(original, after, name, log))

    def restore() -> None:
        for name, value in previous.items():
            if value is not _MISSING:
                setattr(crypto, name, value)
            elif name in vars(crypto):
                delattr(crypto, name)
        previous.clear()

    return restore


def _after_receiver(
    original: Callable[[Any], Awaitable[None]],
    after: Callable[[Any, bool], Awaitable[None]],
    name: str,
    log: logging.Logger,
) -> Callable[[Any], Awaitable[None]]:
    is_room_key = name == "_receive_room_key"

    async def receive(evt: Any) -> None:
        await original(evt)
        try:
            await after(evt, is_room_key)
        except Exception:
            log.exception(f"Handling a key after mautrix's {name} failed")

    return receive


# mautrix's SQL crypto store ------------------------------------------------------------------


class BulkOlmStore:
    """Bulk access to mautrix's crypto store for Olm sessions and device lists.

    A fan-out to a thousand devices through mautrix's per-item store methods costs thousands
    of database round trips (one query per device to find its Olm session, one write per
    encrypted message). This adapter reads and writes the same rows in a few statements. For
    mautrix's SQL store (``PgCryptoStore``, on SQLite or PostgreSQL) it uses that store's tables
    and SQL, its pickle key and its in-memory session cache, exactly as its own methods do; for
    any other store it falls back to those methods one item at a time.
    ``tests/integration/test_olm_store.py`` checks both paths give the same answers, so a schema
    change in mautrix shows up as a failing test."""

    def __init__(self, store: Any) -> None:
        self.store = store

    @property
    def sql(self) -> bool:
        return isinstance(self.store, PgCryptoStore)

    def transaction(self) -> Any:
        return self.store.transaction()

    # Olm sessions ------------------------------------------------------------------------------

    async def latest_sessions(self, keys: Iterable[str]) -> dict[str, Session]:
        """The newest Olm session per identity key (by last decryption, as mautrix picks).

        The database picks the newest row per key and only those rows' pickles are read, and
        only for sessions mautrix's cache lacks (a device may have many old sessions; a warm
        push needs no pickle at all). ``crypto_olm_session`` has no index on ``sender_key``:
        each statement filtering on it scans the account's sessions, so more keys than one
        ``IN`` list holds are picked in one scan of the account's rows, not one per chunk."""
        keys = list(dict.fromkeys(keys))
        if not self.sql:
            found = {}
            for key in keys:
                session = await self.store.get_latest_session(key)
                if session is not None:
                    found[key] = session
            return found
        store: PgCryptoStore = self.store
        if not keys:
            return {}
        wanted = set(keys)
        newest: dict[str, str] = {}  # identity key -> session id
        few = len(keys) <= IN_CHUNK
        where = f" AND sender_key IN ({placeholders(len(keys), 1)})" if few else ""
        rows = await store.db.fetch(
            "SELECT session_id, sender_key FROM (SELECT session_id, sender_key, ROW_NUMBER() "
            "OVER (PARTITION BY sender_key ORDER BY last_decrypted DESC, session_id DESC) AS nth "
            f"FROM crypto_olm_session WHERE account_id=$1{where}) AS ranked WHERE nth=1",
            store.account_id,
            *(keys if few else ()),
        )
        for row in rows:
            if row["sender_key"] in wanted:
                newest[row["sender_key"]] = row["session_id"]
        found: dict[str, Session] = {}
        unpickle: dict[str, str] = {}  # session id -> identity key
        for key, session_id in newest.items():
            cached = store._olm_cache[key].get(session_id) if key in store._olm_cache else None
            if cached is not None:
                found[key] = cached
            else:
                unpickle[session_id] = key
        for chunk in chunks(list(unpickle)):
            rows = await store.db.fetch(
                "SELECT session_id, session, created_at, last_encrypted, last_decrypted "
                "FROM crypto_olm_session "
                f"WHERE account_id=$1 AND session_id IN ({placeholders(len(chunk), 1)})",
                store.account_id,
                *chunk,
            )
            for row in rows:
                key = unpickle[row["session_id"]]
                cached = store._olm_cache[key].get(row["session_id"])  # loaded meanwhile?
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

    # Devices -----------------------------------------------------------------------------------

    async def devices(
        self, user_ids: Iterable[str]
    ) -> dict[str, dict[str, DeviceIdentity] | None]:
        """Stored devices per user; None for users whose device list is not tracked."""
        users = list(dict.fromkeys(user_ids))
        if not self.sql:
            return {u: await self.store.get_devices(u) for u in users}
        db = self.store.db
        result: dict[str, dict[str, DeviceIdentity] | None] = {u: None for u in users}
        for chunk in chunks(users):
            marks = placeholders(len(chunk))
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
        for chunk in chunks(users):
            await db.execute(
                f"DELETE FROM crypto_device WHERE user_id IN ({placeholders(len(chunk))})",
                *chunk,
            )
        if rows:
            await db.executemany(
                "INSERT INTO crypto_device (user_id, device_id, identity_key, signing_key, trust, "
                "deleted, name) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                rows,
            )

    # Cross-signing -----------------------------------------------------------------------------

    async def cross_signing_keys(
        self, user_ids: Iterable[str]
    ) -> dict[str, dict[CrossSigningUsage, tuple[str, str]]]:
        """Per user, what get_cross_signing_keys reads: usage -> (key, first seen key)."""
        found: dict[str, dict[CrossSigningUsage, tuple[str, str]]] = {}
        for chunk in chunks(list(dict.fromkeys(user_ids))):
            rows = await self.store.db.fetch(
                "SELECT user_id, usage, key, first_seen_key FROM crypto_cross_signing_keys "
                f"WHERE user_id IN ({placeholders(len(chunk))})",
                *chunk,
            )
            for row in rows:
                found.setdefault(row["user_id"], {})[CrossSigningUsage(row["usage"])] = (
                    row["key"],
                    row["first_seen_key"],
                )
        return found

    async def self_signatures(self, user_ids: Iterable[str]) -> set[tuple[str, str, str]]:
        """(user, signed key, signer key) of every signature a user made on their own keys:
        what is_key_signed_by looks up for the self-signing key and the devices."""
        found: set[tuple[str, str, str]] = set()
        for chunk in chunks(list(dict.fromkeys(user_ids))):
            rows = await self.store.db.fetch(
                "SELECT signed_user_id, signed_key, signer_key "
                "FROM crypto_cross_signing_signatures "
                f"WHERE signed_user_id IN ({placeholders(len(chunk))}) "
                "AND signer_user_id=signed_user_id",
                *chunk,
            )
            found.update((r["signed_user_id"], r["signed_key"], r["signer_key"]) for r in rows)
        return found

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


# The start-up check --------------------------------------------------------------------------


def check(crypto: Any | None = None) -> list[str]:
    """What this module relies on and cannot find, one readable problem per item ([] if all is
    there). Without ``crypto`` the classes are checked; with an Olm machine, also the instance
    (its lock, its receivers, its crypto store's session cache)."""
    missing: list[str] = []
    missing += _check_libolm()
    missing += _check_olm_session()
    missing += _check_machine(crypto)
    missing += _check_store(getattr(crypto, "crypto_store", None) if crypto is not None else None)
    need = f"encstate needs mautrix {MAUTRIX_RANGE} (installed: {installed_mautrix()})"
    return [f"{problem}; {need}" for problem in missing]


def _python_olm() -> str:
    try:
        return f"python-olm {importlib.metadata.version('python-olm')}"
    except importlib.metadata.PackageNotFoundError:
        return "python-olm"


def _check_libolm() -> list[str]:
    if ffi is None or lib is None:
        return [f"libolm's cffi module _libolm (from {_python_olm()}) cannot be imported"]
    problems = [
        f"_libolm (from {_python_olm()}) has no lib.{name}"
        for name in LIBOLM_FUNCTIONS
        if not hasattr(lib, name)
    ]
    problems += [
        f"_libolm (from {_python_olm()}) has no ffi.{name}"
        for name in FFI_FUNCTIONS
        if not hasattr(ffi, name)
    ]
    return problems


def _check_olm_session() -> list[str]:
    problems = []
    if not callable(getattr(olm.Session, "_check_error", None)):
        problems.append(f"olm.Session (from {_python_olm()}) has no _check_error method")
    try:
        # Allocates libolm's session struct without making keys (what __new__ does).
        has_pointer = hasattr(olm.Session.__new__(olm.Session), "_session")
    except Exception:
        has_pointer = False
    if not has_pointer:
        problems.append(f"olm.Session (from {_python_olm()}) has no _session pointer")
    return problems


def _check_machine(crypto: Any | None) -> list[str]:
    problems = []
    if not _assigned(OlmMachine, "_olm_lock"):
        problems.append("mautrix's OlmMachine does not set _olm_lock")
    if crypto is not None and not isinstance(getattr(crypto, "_olm_lock", None), asyncio.Lock):
        problems.append("this Olm machine has no _olm_lock (an asyncio.Lock)")
    fetch = getattr(crypto if crypto is not None else OlmMachine, "_fetch_keys", None)
    if not inspect.iscoroutinefunction(fetch):
        problems.append("mautrix's OlmMachine has no async _fetch_keys")
    else:
        try:
            parameters = inspect.signature(fetch).parameters
        except (TypeError, ValueError):
            parameters = {"include_untracked": None}  # nothing to tell
        if "include_untracked" not in parameters:
            problems.append("mautrix's OlmMachine._fetch_keys takes no include_untracked")
    for name in TRUST_INTERNALS:
        if not _assigned(OlmMachine, name):
            problems.append(f"mautrix's OlmMachine does not set {name}")
        elif crypto is not None and not hasattr(crypto, name):
            problems.append(f"this Olm machine has no {name}")
    for name in KEY_RECEIVERS:
        if not inspect.iscoroutinefunction(getattr(OlmMachine, name, None)):
            problems.append(f"mautrix's OlmMachine has no async {name}")
        elif crypto is not None and not inspect.iscoroutinefunction(getattr(crypto, name, None)):
            problems.append(f"this Olm machine has no async {name}")
    return problems


def _check_store(store: Any | None) -> list[str]:
    problems = [
        f"mautrix's PgCryptoStore does not set {name}"
        for name in ("_olm_cache", "db", "account_id", "pickle_key")
        if not _assigned(PgCryptoStore, name)
    ]
    if isinstance(store, PgCryptoStore):
        cache = getattr(store, "_olm_cache", None)
        if not isinstance(cache, defaultdict):
            problems.append("this crypto store has no _olm_cache (a defaultdict of sessions)")
    return problems


def _assigned(cls: type, name: str) -> bool:
    """Whether instances of ``cls`` get ``name``: a class attribute, or an assignment in an
    ``__init__`` of the class or a base (by source; by annotation if no source is at hand)."""
    if any(name in vars(klass) for klass in cls.__mro__):
        return True
    annotated = read = False
    for klass in cls.__mro__:
        annotated = annotated or name in vars(klass).get("__annotations__", {})
        init = vars(klass).get("__init__")
        try:
            source = inspect.getsource(init) if init is not None else ""
        except (OSError, TypeError):
            continue
        read = read or bool(source)
        if f"self.{name} =" in source or f"self.{name}:" in source:
            return True
    return annotated and not read
