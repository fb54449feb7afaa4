"""Review of 39fd529: bulk trust diverges from mautrix's resolve_trust when another resolver
fetches a user's cross-signing keys while the bulk call waits for ``_fetch_keys_lock``.

mautrix re-reads the user's keys after the lock whatever happened meanwhile; the bulk code
drops the user from ``missing`` (someone else fetched them) and re-reads only ``missing``, so
the keys the other resolver just stored are never seen: a cross-signed device counts as
UNVERIFIED (refused under ``require_cross_signed``). The lock is also held by mautrix's own
device-list handling (machine.py), and the courier's lanes, a seal's next wave and the gate's
``resolve_trust`` resolve trust concurrently."""

from __future__ import annotations

import asyncio

from mautrix.types import CrossSigner, CrossSigningUsage, TrustState

from encstate_bot import glue

from .test_huge_seal import LOG, Machine, crypto_store, dev, k  # noqa: F401

USER = "@late:x"


async def _world(store) -> dict:
    await store.db.execute("DELETE FROM crypto_cross_signing_keys WHERE user_id=$1", USER)
    await store.put_signature(
        CrossSigner(USER, k(f"ed-{USER}-A")), CrossSigner(USER, k(f"ssk-{USER}")), "s"
    )
    await store.put_signature(
        CrossSigner(USER, k(f"ssk-{USER}")), CrossSigner(USER, k(f"msk-{USER}")), "s"
    )
    return {
        USER: [
            (CrossSigningUsage.MASTER, k(f"msk-{USER}")),
            (CrossSigningUsage.SELF, k(f"ssk-{USER}")),
        ]
    }


async def _race(store, other, judged) -> TrustState:
    """The lock is held (mautrix handling a device-list change); ``other`` and ``judged`` both
    find no keys for USER and wait for it; ``other`` gets it first and fetches the keys."""
    server = await _world(store)
    machine = Machine(store, server)
    await machine._fetch_keys_lock.acquire()
    first = asyncio.create_task(other(machine))
    second = asyncio.create_task(judged(machine))
    for _ in range(500):
        waiters = machine._fetch_keys_lock._waiters
        if waiters is not None and len(waiters) >= 2:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the resolvers never waited for the lock")
    machine._fetch_keys_lock.release()
    await first
    return await second


async def test_review_issue15_seal_bulk_trust_sees_keys_fetched_while_it_waited(
    crypto_store,  # noqa: F811
) -> None:
    device = dev(USER, "A")

    async def mautrix(machine):
        return await machine.resolve_trust(device)

    async def bulk(machine):
        return (await glue.resolve_trust_many(machine, [device], LOG))[(USER, "A")]

    # mautrix, for both resolvers: the second re-reads the keys after the lock
    assert await _race(crypto_store, mautrix, mautrix) == TrustState.CROSS_SIGNED_TOFU
    # the same interleaving with the bulk resolver second (the gate's resolve_trust first,
    # or another lane's bulk call first) must decide the same
    assert await _race(crypto_store, mautrix, bulk) == TrustState.CROSS_SIGNED_TOFU
    assert await _race(crypto_store, bulk, bulk) == TrustState.CROSS_SIGNED_TOFU
