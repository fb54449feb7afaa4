"""The bulk crypto-store adapter reads and writes what mautrix's own per-item methods do, on
SQLite and PostgreSQL. A schema change in mautrix fails here first."""

from __future__ import annotations

from mautrix.crypto import PgCryptoStore
from mautrix.crypto.account import OlmAccount
from mautrix.crypto.store.memory import MemoryCryptoStore
from mautrix.types import CrossSigner, CrossSigningUsage, DeviceIdentity, TrustState
from mautrix.util.async_db import Database
import olm
import pytest_asyncio

from encstate_bot.glue import BulkOlmStore


@pytest_asyncio.fixture
async def crypto_store(bot_database):
    db = Database.create(bot_database, upgrade_table=PgCryptoStore.upgrade_table)
    await db.start()
    store = PgCryptoStore(account_id="@bot:x", pickle_key="k", db=db)
    await store.upgrade_table.upgrade(db)
    await store.open()
    try:
        yield store
    finally:
        await db.stop()


def sessions(count: int):
    me = OlmAccount()
    out = []
    for _ in range(count):
        them = olm.Account()
        them.generate_one_time_keys(1)
        key = them.identity_keys["curve25519"]
        otk = next(iter(them.one_time_keys["curve25519"].values()))
        out.append((key, me.new_outbound_session(key, otk)))
    return out


async def test_sessions_round_trip_like_mautrix(crypto_store) -> None:
    bulk = BulkOlmStore(crypto_store)
    assert bulk.sql
    made = sessions(6)
    await bulk.add_sessions(made[:3])
    for key, session in made[3:]:
        await crypto_store.add_session(key, session)
    for _, session in made:
        session.encrypt("advance the ratchet")
    await bulk.update_sessions(made[:3])
    for key, session in made[3:]:
        await crypto_store.update_session(key, session)
    crypto_store._olm_cache.clear()  # force the unpickling path
    keys = [k for k, _ in made] + ["unknown-key"]
    latest = await bulk.latest_sessions(keys)
    assert set(latest) == {k for k, _ in made}
    for key, _ in made:
        theirs = await crypto_store.get_latest_session(key)
        assert latest[key].id == theirs.id
        assert latest[key].pickle("p") == theirs.pickle("p")


async def test_devices_round_trip_like_mautrix(crypto_store) -> None:
    bulk = BulkOlmStore(crypto_store)
    devices = {
        f"@u{i}:x": {
            f"D{j}": DeviceIdentity(
                user_id=f"@u{i}:x",
                device_id=f"D{j}",
                identity_key=f"curve{i}{j}".ljust(43, "A"),  # keys are 43 characters
                signing_key=f"ed{i}{j}".ljust(43, "B"),
                trust=TrustState.UNVERIFIED,
                deleted=False,
                name=f"phone {j}",
            )
            for j in range(2)
        }
        for i in range(3)
    }
    await bulk.put_devices(devices)
    await bulk.put_devices({"@u0:x": {}})  # a user who logged out everywhere
    found = await bulk.devices(["@u0:x", "@u1:x", "@u2:x", "@nobody:x"])
    assert found["@nobody:x"] is None and found["@u0:x"] == {}
    for user in ("@u0:x", "@u1:x", "@u2:x"):
        assert found[user] == await crypto_store.get_devices(user)
    assert found["@u1:x"] == devices["@u1:x"]


async def test_cross_signing_is_what_trust_resolution_reads(crypto_store) -> None:
    bulk = BulkOlmStore(crypto_store)
    msk, ssk, device = ("M" * 43), ("S" * 43), ("D" * 43)
    await bulk.put_cross_signing(
        [("@u:x", CrossSigningUsage.MASTER, msk), ("@u:x", CrossSigningUsage.SELF, ssk)],
        [(CrossSigner("@u:x", device), CrossSigner("@u:x", ssk), "sig")],
    )
    keys = await crypto_store.get_cross_signing_keys("@u:x")
    assert keys[CrossSigningUsage.MASTER].key == msk
    assert await crypto_store.is_key_signed_by(
        CrossSigner("@u:x", device), CrossSigner("@u:x", ssk)
    )


async def test_other_stores_use_their_own_methods() -> None:
    store = MemoryCryptoStore("@bot:x", "k")
    bulk = BulkOlmStore(store)
    assert not bulk.sql
    made = sessions(2)
    await bulk.add_sessions(made)
    latest = await bulk.latest_sessions([k for k, _ in made])
    assert {s.id for s in latest.values()} == {s.id for _, s in made}
    assert (await bulk.devices(["@u:x"])) == {"@u:x": None}
