"""Bulk trust resolution marks users as fetched only once their key query finished: a
cancelled query leaves its users (and the chunks after it) to be fetched again, rather than
unverified until restart."""

from __future__ import annotations

import asyncio

from mautrix.types import CrossSigner, CrossSigningUsage, TrustState
import pytest

from encstate_bot import glue

from .test_huge_seal import LOG, Machine, crypto_store, dev, k  # noqa: F401

USERS = ["@a:x", "@b:x", "@c:x"]


async def _world(store) -> dict:
    server = {}
    for user in USERS:
        await store.db.execute("DELETE FROM crypto_cross_signing_keys WHERE user_id=$1", user)
        await store.put_signature(
            CrossSigner(user, k(f"ed-{user}-A")), CrossSigner(user, k(f"ssk-{user}")), "s"
        )
        await store.put_signature(
            CrossSigner(user, k(f"ssk-{user}")), CrossSigner(user, k(f"msk-{user}")), "s"
        )
        server[user] = [
            (CrossSigningUsage.MASTER, k(f"msk-{user}")),
            (CrossSigningUsage.SELF, k(f"ssk-{user}")),
        ]
    return server


class CancelledMachine(Machine):
    """Its second key query is cancelled; a failing query raises."""

    def __init__(self, store, server, fail: set[str] = frozenset()) -> None:
        super().__init__(store, server)
        self.fail = set(fail)

    async def _fetch_keys(self, users, since="", include_untracked=False):
        if len(self.fetched) == 1 and not getattr(self, "cancelled", False):
            self.cancelled = True
            raise asyncio.CancelledError
        if self.fail & set(users):
            self.fetched.append(sorted(users))
            raise RuntimeError("homeserver unavailable")
        return await super()._fetch_keys(users, since, include_untracked)


async def test_cancelled_fetch_leaves_users_to_fetch_again(
    crypto_store,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(glue, "TRUST_FETCH_CHUNK", 1)
    machine = CancelledMachine(crypto_store, await _world(crypto_store))
    devices = [dev(user, "A") for user in USERS]
    with pytest.raises(asyncio.CancelledError):
        await glue.resolve_trust_many(machine, devices, LOG)
    # only the chunk whose query finished counts as attempted
    assert machine._cs_fetch_attempted == {USERS[0]}
    assert not machine._fetch_keys_lock.locked()
    got = await glue.resolve_trust_many(machine, devices, LOG)
    assert got == {(user, "A"): TrustState.CROSS_SIGNED_TOFU for user in USERS}
    assert machine.fetched == [[USERS[0]], [USERS[1]], [USERS[2]]]
    assert machine._cs_fetch_attempted == set(USERS)


async def test_failed_fetch_counts_as_attempted_as_in_mautrix(
    crypto_store,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(glue, "TRUST_FETCH_CHUNK", 1)
    machine = CancelledMachine(crypto_store, await _world(crypto_store), fail={USERS[1]})
    machine.cancelled = True  # no cancellation here
    devices = [dev(user, "A") for user in USERS]
    got = await glue.resolve_trust_many(machine, devices, LOG)
    assert got == {
        (USERS[0], "A"): TrustState.CROSS_SIGNED_TOFU,
        (USERS[1], "A"): TrustState.UNVERIFIED,
        (USERS[2], "A"): TrustState.CROSS_SIGNED_TOFU,
    }
    assert machine._cs_fetch_attempted == set(USERS)
    await glue.resolve_trust_many(machine, devices, LOG)
    assert len(machine.fetched) == 3  # not queried again, as resolve_trust would not
