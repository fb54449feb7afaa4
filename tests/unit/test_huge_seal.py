"""Sealing a new value in a huge room (issue 15): what a seal to thousands of devices must not
cost per device. Each test failed before the change its docstring names.

- one ``m.room_key`` dict per seal, and its JSON encoded once per delivery (not per device);
- one member listing per seal, its users in waves (not a second listing per seal or per wave);
- trust resolved for a batch's devices in a few statements (not a few per device), with the
  decisions mautrix's ``resolve_trust`` makes;
- the newest Olm session per device picked in SQL, pickles read only for sessions mautrix's
  cache lacks (not every session's pickle of every device).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
import json
import logging
from types import SimpleNamespace
from typing import Any

from mautrix.crypto import PgCryptoStore
from mautrix.crypto.account import OlmAccount
from mautrix.crypto.device_lists import DeviceListMachine
from mautrix.crypto.store.memory import MemoryCryptoStore
from mautrix.types import CrossSigner, CrossSigningUsage, DeviceIdentity, EventType, TrustState
from mautrix.util.async_db import Database
import olm
import pytest
import pytest_asyncio

from encstate_bot import bulk_olm, glue
from encstate_bot import sealer as sealer_module
from encstate_bot.courier import Approved
from encstate_bot.gather import Gatherer, RoomContext
from encstate_bot.glue import BulkOlmStore
from encstate_bot.links import RoomLinks
from encstate_bot.members import Members
from encstate_bot.policy import ALL, RoomFacts
from encstate_bot.pushes import Pushes
from encstate_bot.room_policy import Mode, RoomPolicy
from encstate_bot.transport import ENCRYPT_SLICE, Transport

from .test_sealer import (
    ADMIN,
    BOT,
    MEMBER,
    PREVIEW,
    ROOM,
    FakeCourier,
    World,
    _Device,
    _Policies,
    _Policy,
)

LOG = logging.getLogger("test.huge_seal")


# One member listing, waves, one room_key dict per seal -----------------------------------------


class ListingCourier(FakeCourier):
    """Approves each listed user's one device, after reading their memberships the way the
    real courier's gatherer does (``Members.states``); records each wave and each content."""

    def __init__(self, server, members: Members, log: list) -> None:
        super().__init__(server)
        self.members = members
        self.log = log
        self.waves: list[list[str]] = []
        self.contents: list[dict] = []

    async def approved_devices(self, room_id, user_ids):
        self.waves.append(list(user_ids))
        await self.members.states(room_id, set(user_ids))
        return await super().approved_devices(room_id, user_ids)

    async def send_room_keys(self, room_id, plan, trigger, reason):
        self.contents += [content for _, content in plan]
        self.log += [("key", d.user_id) for d, _ in plan]
        return await super().send_room_keys(room_id, plan, trigger, reason)


async def test_a_seal_lists_the_room_once_and_sends_to_every_approved_device_in_waves(
    monkeypatch,
) -> None:
    """Before: the member list was read twice (``joined_and_invited``, then ``joined_members``
    again for the courier's room context), every device got a new ``room_key()`` dict (so the
    bulk encryption's JSON cache never hit), and all the room's users were approved at once.
    Now: one listing whose memberships the waves' decisions reuse, one dict per seal, waves of
    SEAL_WAVE_USERS users; every approved member device still gets its key before the event,
    every invitee's after it, each once."""
    monkeypatch.setattr(sealer_module, "SEAL_WAVE_USERS", 3, raising=False)
    world = World()
    joined = [f"@m{i}:example.org" for i in range(6)]
    invited = ["@i1:example.org", "@i2:example.org"]
    world.server.members.update({u: "join" for u in joined})
    world.server.members.update({u: "invite" for u in invited})
    log: list[tuple[str, str]] = []
    courier = ListingCourier(world.server, world.sealer.members, log)
    world.sealer.courier = courier
    request = world.server.request

    async def logged(method, path, *args, **kwargs):
        log.append((str(method), str(path)))
        return await request(method, path, *args, **kwargs)

    world.server.request = logged
    await world.admin_sets_topic("$t1", "Nightingale")

    report = await world.sealer.seal_room(ROOM)

    assert len(report.sealed) == 1
    listings = [p for m, p in log if m == "GET" and "/members" in p]
    assert len(listings) == 1 and listings[0].endswith("/members"), listings
    everyone = [ADMIN, BOT, MEMBER, *joined, *invited]
    assert [len(w) for w in courier.waves] == [3, 3, 3, 2]
    assert sorted(u for w in courier.waves for u in w) == sorted(everyone)
    put = next(i for i, (m, p) in enumerate(log) if m == "PUT")
    before = [u for kind, u in log[:put] if kind == "key"]
    after = [u for kind, u in log[put:] if kind == "key"]
    assert sorted(before) == sorted([ADMIN, MEMBER, *joined])  # not the bot's own
    assert sorted(after) == sorted(invited)  # the topic is a preview type
    assert len({id(c) for c in courier.contents}) == 1, "a room_key dict per device"


async def test_members_reusing_answers_only_inside_its_block_and_task() -> None:
    """``states`` answers from a listing only where the sealer put it: a courier batch in
    another task still reads the homeserver (its decisions stay on memberships read then)."""
    world = World()
    calls: list[str] = []
    request = world.server.request

    async def logged(method, path, *args, **kwargs):
        calls.append(str(path))
        return await request(method, path, *args, **kwargs)

    world.server.request = logged
    members = world.sealer.members
    listing = await members.listing(ROOM)
    calls.clear()
    users = {ADMIN, MEMBER, BOT, "@someone:example.org"}
    elsewhere = asyncio.Event()

    async def other_task() -> None:
        await elsewhere.wait()
        await members.states(ROOM, {ADMIN, MEMBER, BOT, "@x:example.org"})

    other = asyncio.create_task(other_task())  # started outside the block
    with members.reusing(listing):
        listed = await members.states(ROOM, {ADMIN, MEMBER, BOT})
        assert listed == {u: ("join", False) for u in (ADMIN, MEMBER, BOT)}
        assert calls == []
        elsewhere.set()
        await other
        assert any(p.endswith("/joined_members") for p in calls), calls
        calls.clear()
        # a user the listing does not name: asked of the homeserver
        assert (await members.states(ROOM, users))["@someone:example.org"] == (None, False)
        assert any(p.endswith("/joined_members") for p in calls), calls
        calls.clear()
    await members.states(ROOM, {ADMIN, MEMBER, BOT, MEMBER + "2"})
    assert any(p.endswith("/joined_members") for p in calls), calls


class JudgingCourier(ListingCourier):
    """Approves a user's device only if ``Members.states`` says they are in the room, as the
    real courier's policy does; ``during_keys`` runs while the first wave's keys go out."""

    async def approved_devices(self, room_id, user_ids):
        self.waves.append(list(user_ids))
        states = await self.members.states(room_id, set(user_ids))
        approved = []
        for user_id in dict.fromkeys(user_ids):
            membership, _ = states[user_id]
            if user_id != BOT and membership in ("join", "invite"):
                approved.append(Approved(_Device(user_id, "DEV", "k", "s"), ALL, membership))
        return approved, [], _Policy()


@pytest.mark.parametrize("which", [0, -1], ids=["next-wave", "last-wave"])
async def test_a_member_kicked_while_a_seal_goes_out_gets_no_later_waves_key(
    monkeypatch, which: int
) -> None:
    """Each wave decided on the listing read before the first: a member kicked meanwhile (a
    sync showed it) still got the new value's key in a later wave. Now the sync's leave drops
    them from the listing in use, and their wave reads their membership afresh, also the
    next wave, whose devices were decided while the first wave's keys went out."""
    monkeypatch.setattr(sealer_module, "SEAL_WAVE_USERS", 2, raising=False)
    world = World()
    joined = [f"@m{i}:example.org" for i in range(5)]
    kicked = joined[which]  # waves: [admin, bot], [member, m0], [m1, m2], [m3, m4]
    world.server.members.update({u: "join" for u in joined})
    courier = JudgingCourier(world.server, world.sealer.members, [])
    world.sealer.courier = courier
    pushes = Pushes(
        BOT,
        world.store,
        world.tracker,
        courier,
        _Policies(),
        RoomLinks(world.tracker, BOT, LOG),
        world.sealer.members,
        world.book,
        SimpleNamespace(preview_types=PREVIEW.preview_types, push_on_join=True),
        LOG,
    )

    async def kick() -> None:
        for _ in range(5):  # the next wave's devices are decided while these keys go out
            await asyncio.sleep(0)
        assert len(courier.waves) == 2
        world.server.members[kicked] = "leave"
        leave = {
            "type": "m.room.member",
            "state_key": kicked,
            "sender": ADMIN,
            "content": {"membership": "leave"},
            "unsigned": {"prev_content": {"membership": "join"}},
        }
        await pushes.on_members(ROOM, [leave])  # the sync that shows it

    courier.during_keys = kick
    await world.admin_sets_topic("$t1", "Nightingale")
    report = await world.sealer.seal_room(ROOM)

    assert len(report.sealed) == 1
    assert kicked in [u for wave in courier.waves[1:] for u in wave]  # decided after the kick
    got = {user for user, _ in courier.sent}
    assert kicked not in got, "a later wave approved the kicked member from the old listing"
    assert set(joined) - {kicked} <= got
    assert world.sealer.members._departed == {}  # nothing kept once the seal is done


# JSON encoded once per delivery ------------------------------------------------------------------


def peer(user_id: str, device_id: str) -> tuple[DeviceIdentity, str]:
    account = olm.Account()
    account.generate_one_time_keys(1)
    device = DeviceIdentity(
        user_id=user_id,
        device_id=device_id,
        identity_key=account.identity_keys["curve25519"],
        signing_key=account.identity_keys["ed25519"],
        trust=TrustState.UNVERIFIED,
        deleted=False,
        name=device_id,
    )
    return device, next(iter(account.one_time_keys["curve25519"].values()))


async def test_a_delivery_encodes_a_shared_content_once(monkeypatch) -> None:
    """Before: the JSON cache lived for one encryption slice (ENCRYPT_SLICE messages), so a
    seal's key was encoded again every 100 devices (and, with a dict per device, for every
    device). Now one delivery encodes a content once, however many slices it takes."""
    account = OlmAccount()
    store = MemoryCryptoStore("@bot:x", "pickle")
    sent: list[int] = []

    async def send_to_device(event_type, body) -> None:
        sent.append(sum(len(d) for d in body.values()))

    client = SimpleNamespace(
        mxid="@bot:x",
        device_id="BOT",
        crypto=SimpleNamespace(account=account, crypto_store=store, _olm_lock=asyncio.Lock()),
        send_to_device=send_to_device,
    )
    bulk = bulk_olm.BulkOlm(client, LOG)
    count = 2 * ENCRYPT_SLICE + 10
    devices = []
    for n in range(count):
        device, otk = peer(f"@u{n}:x", "D")
        await store.add_session(
            device.identity_key, account.new_outbound_session(device.identity_key, otk)
        )
        devices.append(device)
    content = {"algorithm": "m.megolm.v1.aes-sha2", "session_id": "S", "session_key": "K"}
    encodes = 0
    dumps = json.dumps

    def counting(value, *args, **kwargs):
        nonlocal encodes
        encodes += value is content
        return dumps(value, *args, **kwargs)

    monkeypatch.setattr(bulk_olm.json, "dumps", counting)
    transport = Transport(client, bulk, LOG)
    delivered, failed, no_olm, _ = await transport.olm_send(
        [(d, EventType.ROOM_KEY, content, d.user_id) for d in devices]
    )
    assert len(delivered) == count and not failed and not no_olm
    assert sum(sent) == count
    assert encodes == 1, f"the content was encoded {encodes} times for {count} devices"


async def test_the_courier_hands_the_transport_one_room_key_dict_per_seal() -> None:
    """Before: the courier built ``seal.room_key()`` for every share of a seal, so each of a
    push's devices had its own dict and its own JSON encoding."""
    from encstate_bot.audit import Outcome
    from encstate_bot.policy import Share
    from encstate_bot.seals import SealBook
    from encstate_bot.store import OutboxItem

    from .test_courier_lanes import FakeClient, ReorderingServer, courier_for, seals

    made = seals(2)
    book = SealBook()
    book.load(made)
    courier = courier_for(FakeClient(ReorderingServer()), book)
    handed: list = []

    async def olm_send(entries, on_sent=None, together=False, phases=None):
        handed.extend(entries)
        return [], [], [], 0

    courier.transport.olm_send = olm_send  # type: ignore[method-assign]
    shares = [
        Outcome(
            item=OutboxItem(room_id=seal.room_id, user_id=f"@u{n}:x", trigger="join"),
            device_id="D",
            session_id=seal.session_id,
            decision=Share(0, "member"),
            device=dev(f"@u{n}:x", "D"),
        )
        for n in range(5)
        for seal in made
    ]
    await courier._send_keys(shares, {}, set())
    contents = {
        seal.session_id: {id(c) for _, _, c, o in handed if o.session_id == seal.session_id}
        for seal in made
    }
    assert all(len(ids) == 1 for ids in contents.values()), contents
    assert all(c == made[0].room_key() for _, _, c, o in handed if o.session_id == "seal000")


# Trust in bulk -----------------------------------------------------------------------------------


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


class Machine(DeviceListMachine):
    """mautrix's trust resolution (DeviceListMachine) on a real crypto store; the key query
    it makes for users without cross-signing keys is recorded, and answers with what
    ``server`` holds."""

    def __init__(self, store: PgCryptoStore, server: dict[str, list]) -> None:
        self.crypto_store = store
        self.client = SimpleNamespace(device_id="BOTDEV", mxid="@bot:x")
        self.log = logging.getLogger("test.machine")
        self._cs_fetch_attempted: set[str] = set()
        self._fetch_keys_lock = asyncio.Lock()
        self.server = server
        self.fetched: list[list[str]] = []

    async def _fetch_keys(self, users, since="", include_untracked=False):
        self.fetched.append(sorted(users))
        for user in users:
            for usage, key in self.server.get(user, []):
                await self.crypto_store.put_cross_signing_key(user, usage, key)
        return {}


def k(text: str) -> str:
    """A fake key as long as a real one (the store's key columns are CHAR(43))."""
    return text.ljust(43, "A")


def dev(
    user: str, device_id: str, trust: TrustState = TrustState.UNVERIFIED, deleted: bool = False
) -> DeviceIdentity:
    return DeviceIdentity(
        user_id=user,
        device_id=device_id,
        identity_key=k(f"curve-{user}-{device_id}"),
        signing_key=k(f"ed-{user}-{device_id}"),
        trust=trust,
        deleted=deleted,
        name=device_id,
    )


async def cross_signed_world(store: PgCryptoStore) -> tuple[list[DeviceIdentity], dict]:
    """Users in every state trust resolution tells apart, and the devices to judge."""

    async def identity(user: str, signed_ssk: bool = True) -> str:
        msk, ssk = k(f"msk-{user}"), k(f"ssk-{user}")
        await store.put_cross_signing_key(user, CrossSigningUsage.MASTER, msk)
        await store.put_cross_signing_key(user, CrossSigningUsage.SELF, ssk)
        if signed_ssk:
            await store.put_signature(CrossSigner(user, ssk), CrossSigner(user, msk), "sig")
        return ssk

    async def sign(device: DeviceIdentity, ssk: str) -> None:
        await store.put_signature(
            CrossSigner(device.user_id, device.signing_key), CrossSigner(device.user_id, ssk), "s"
        )

    devices = []
    ssk = await identity("@tofu:x")
    for device_id in ("A", "B"):
        devices.append(dev("@tofu:x", device_id))
    await sign(devices[0], ssk)  # B is not signed
    ssk = await identity("@changed:x")
    # the master key changed since first seen (what a homeserver swapping it in looks like)
    await store.put_cross_signing_key("@changed:x", CrossSigningUsage.MASTER, k("msk-new"))
    await store.put_signature(
        CrossSigner("@changed:x", ssk), CrossSigner("@changed:x", k("msk-new")), "sig"
    )
    devices.append(dev("@changed:x", "A"))
    await sign(devices[-1], ssk)
    ssk = await identity("@badssk:x", signed_ssk=False)
    devices.append(dev("@badssk:x", "A"))
    await sign(devices[-1], ssk)
    await store.put_cross_signing_key("@nossk:x", CrossSigningUsage.MASTER, k("msk-nossk"))
    devices.append(dev("@nossk:x", "A"))
    devices.append(dev("@none:x", "A"))  # no keys, and the server has none either
    devices.append(dev("@late:x", "A"))  # no keys stored yet; the server has them
    await store.put_signature(
        CrossSigner("@late:x", k("ed-@late:x-A")), CrossSigner("@late:x", k("ssk-@late:x")), "s"
    )
    await store.put_signature(
        CrossSigner("@late:x", k("ssk-@late:x")), CrossSigner("@late:x", k("msk-@late:x")), "s"
    )
    # someone else's signature does not make a device cross-signed
    await store.put_signature(
        CrossSigner("@tofu:x", k("ed-@tofu:x-B")),
        CrossSigner("@changed:x", k("ssk-@changed:x")),
        "s",
    )
    devices.append(dev("@verified:x", "A", TrustState.VERIFIED))
    devices.append(dev("@blocked:x", "A", TrustState.BLACKLISTED))
    devices.append(dev("@tofu:x", "BOTDEV", TrustState.BLACKLISTED))  # the bot's device ID
    server = {
        "@late:x": [
            (CrossSigningUsage.MASTER, k("msk-@late:x")),
            (CrossSigningUsage.SELF, k("ssk-@late:x")),
        ]
    }
    return devices, server


async def test_trust_in_bulk_decides_as_mautrix_does_and_fetches_once(crypto_store) -> None:
    """Before: ``Identity.trust`` per device, each a few crypto-store reads plus one key query
    per user without cross-signing keys (4,000 devices: 6-7 s, 200 queries). Now a few
    statements for all, one query for all such users, and the same trust states."""
    devices, server = await cross_signed_world(crypto_store)
    bulk_machine = Machine(crypto_store, server)
    got = await glue.resolve_trust_many(bulk_machine, devices, LOG)
    assert bulk_machine.fetched == [["@late:x", "@none:x"]]  # one query, both users
    mautrix = Machine(crypto_store, server)
    expected = {(d.user_id, d.device_id): await mautrix.resolve_trust(d) for d in devices}
    assert got == expected
    assert expected[("@tofu:x", "A")] == TrustState.CROSS_SIGNED_TOFU
    assert expected[("@changed:x", "A")] == TrustState.CROSS_SIGNED_UNTRUSTED
    assert expected[("@late:x", "A")] == TrustState.CROSS_SIGNED_TOFU
    # fetched once per process, as mautrix does: not again, and not for users just queried
    assert await glue.resolve_trust_many(bulk_machine, devices, LOG) == expected
    assert len(bulk_machine.fetched) == 1
    fresh = Machine(crypto_store, server)
    glue.keys_fetched(fresh, ["@none:x"])
    await glue.resolve_trust_many(fresh, devices, LOG)
    assert fresh.fetched == []  # @late:x has keys stored by now; @none:x was just queried


async def test_trust_in_bulk_falls_back_to_mautrix_one_device_at_a_time() -> None:
    """Without mautrix's SQL store there is nothing to read in bulk: None (the caller asks
    ``resolve_trust`` per device)."""
    machine = SimpleNamespace(crypto_store=MemoryCryptoStore("@bot:x", "k"))
    assert await glue.resolve_trust_many(machine, [dev("@u:x", "A")], LOG) is None


class RecordingIdentity:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def trust_many(self, devices):
        self.batches.append(sorted(f"{d.user_id}/{d.device_id}" for d in devices))
        return {(d.user_id, d.device_id): (d.device_id == "A", False) for d in devices}


async def test_the_gatherer_resolves_a_batchs_trust_at_once() -> None:
    """Before: ``Identity.trust`` was awaited per device, one after the other. Now one
    ``trust_many`` for the devices the decisions are about, of users who may pass."""
    identity = RecordingIdentity()
    gather = Gatherer(None, None, None, None, None, None, identity, None, None, LOG)  # type: ignore
    devices = {
        "@m:x": {
            "A": dev("@m:x", "A"),
            "B": dev("@m:x", "B"),
            "GONE": dev("@m:x", "G", deleted=True),
        },
        "@banned:x": {"A": dev("@banned:x", "A")},
        "@out:x": {"A": dev("@out:x", "A")},
    }
    facts = RoomFacts(
        room_id=ROOM, bot_level=50, users_default=0, policy=RoomPolicy(mode=Mode.CROSS_SIGNED)
    )
    context = RoomContext(ROOM, facts, {"@m:x": "join", "@banned:x": "ban", "@out:x": None}, {})
    targets = {u: (True, set()) for u in devices}
    users = await gather.users(context, devices, targets)
    assert identity.batches == [["@m:x/A", "@m:x/B"]]
    assert [d.cross_signed for d in users["@m:x"].devices] == [True, False, False]
    members = RoomFacts(room_id=ROOM, bot_level=50, users_default=0, policy=RoomPolicy())
    await gather.users(RoomContext(ROOM, members, context.memberships, {}), devices, targets)
    assert len(identity.batches) == 1  # the members policy needs no trust


# The newest Olm session, in SQL ------------------------------------------------------------------


def olm_sessions(account: OlmAccount, count: int) -> list[tuple[str, Any]]:
    out = []
    for _ in range(count):
        device, otk = peer("@p:x", "P")
        out.append((device.identity_key, account.new_outbound_session(device.identity_key, otk)))
    return out


@pytest.mark.parametrize("in_chunk", [400, 2])  # one IN list; more keys than one holds
async def test_latest_sessions_reads_only_the_newest_uncached_pickles(
    crypto_store, monkeypatch, in_chunk: int
) -> None:
    """Before: every Olm session row of every device was read, pickle included, and the
    newest picked in Python (and with more than one ``IN`` list of keys, the account's
    sessions were scanned once per list: ``sender_key`` has no index). Now the database picks
    the newest row per key and only pickles mautrix's cache lacks are read; the answer is
    mautrix's ``get_latest_session``."""
    monkeypatch.setattr(glue, "IN_CHUNK", in_chunk, raising=False)
    account = OlmAccount()
    bulk = BulkOlmStore(crypto_store)
    keys = []
    base = datetime(2025, 1, 1)
    for n in range(5):
        made = olm_sessions(account, 1)
        key = made[0][0]
        keys.append(key)
        for age in range(3):  # three sessions with the same device, the middle one newest
            session = (
                account.new_outbound_session(key, peer("@p:x", "P")[1]) if age else made[0][1]
            )
            session.last_decrypted = base + timedelta(minutes=10 * n + (5 if age == 1 else age))
            await crypto_store.add_session(key, session)
    crypto_store._olm_cache.clear()
    newest = {k: (await crypto_store.get_latest_session(k)).id for k in keys}
    cached = {k: crypto_store._olm_cache[k][newest[k]] for k in keys[:2]}  # mautrix loaded these
    for k in keys[2:]:
        crypto_store._olm_cache.pop(k)
    rows_read: list[dict] = []
    fetch = crypto_store.db.fetch

    async def recording(query, *args):
        rows = await fetch(query, *args)
        rows_read.extend(dict(r) for r in rows)
        return rows

    monkeypatch.setattr(crypto_store.db, "fetch", recording)
    latest = await bulk.latest_sessions([*keys, "unknown-key"])
    assert {k: s.id for k, s in latest.items()} == newest
    assert all(latest[k] is cached[k] for k in keys[:2])  # mautrix's objects, not copies
    pickles = [r for r in rows_read if "session" in r]
    assert sorted(r["session_id"] for r in pickles) == sorted(newest[k] for k in keys[2:])
    assert len(rows_read) - len(pickles) <= len(keys), "rows of older sessions were read"
    for key in keys[2:]:  # the ones unpickled went into mautrix's cache
        assert crypto_store._olm_cache[key][newest[key]] is latest[key]
