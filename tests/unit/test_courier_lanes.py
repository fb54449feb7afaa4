"""The courier's two lanes and the sealer's edges, from a review of the "newcomers first"
change: each ``test_finding_*`` test shows one finding and failed before its fix (Olm's 40
skipped message keys, a key-query task left running, the rate limit charging refused seals,
a seal whose PUT answer was lost); the ``test_sanity_*`` tests show the fakes follow the
intended path.

The courier runs for real (real libolm sessions, BulkOlm, SealBook); the homeserver, the
crypto store and the database are small fakes."""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

from mautrix.crypto.account import OlmAccount
from mautrix.errors import MatrixConnectionError
from mautrix.types import DeviceIdentity, TrustState
import olm

from encstate_bot import sealer as sealer_module
from encstate_bot.audit import Audit, Outcome
from encstate_bot.bulk_olm import BulkOlm
from encstate_bot.courier import Courier
from encstate_bot.policy import Share
from encstate_bot.sealer import Sealer
from encstate_bot.seals import Seal, SealBook
from encstate_bot.store import OutboxItem
from encstate_bot.transport import Transport

ROOM = "!room:example.org"
BOT = "@encstate:example.org"
USER = "@newcomer:example.org"
LOG = logging.getLogger("test.courier_review")


# Fakes ----------------------------------------------------------------------------------------


class FakeOlmStore:
    """mautrix's crypto store as BulkOlmStore's generic path uses it (one cached object per
    session, as mautrix's stores keep)."""

    def __init__(self) -> None:
        self.sessions: dict[str, Any] = {}
        self.updates = 0

    async def get_latest_session(self, key):
        return self.sessions.get(key)

    async def update_session(self, key, session) -> None:
        self.updates += 1

    async def add_session(self, key, session) -> None:
        self.sessions[key] = session


class FakeCrypto:
    def __init__(self) -> None:
        self.account = OlmAccount()
        self.crypto_store = FakeOlmStore()
        self._olm_lock = asyncio.Lock()


class ReorderingServer:
    """sendToDevice: a call's messages join the to-device stream when the call completes.
    Concurrent calls are committed in any order a homeserver may commit them; here the first
    one started is the slowest (``slow_first``)."""

    def __init__(self, slow_first: bool = True) -> None:
        self.stream: list[dict[str, Any]] = []
        self.started = itertools.count()
        self.in_flight = 0
        self.max_in_flight = 0
        self.slow_first = slow_first

    async def send_to_device(self, event_type, body) -> None:
        seq = next(self.started)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(max(0.0, 0.2 - 0.002 * seq) if self.slow_first else 0)
            self.stream.append(body)
        finally:
            self.in_flight -= 1


class FakeClient:
    def __init__(self, server: ReorderingServer) -> None:
        self.mxid = BOT
        self.device_id = "BOTDEVICE"
        self.crypto = FakeCrypto()
        self.server = server
        self.api = None

    async def send_to_device(self, event_type, body) -> None:
        await self.server.send_to_device(event_type, body)


class FakeStore:
    async def finish(self, done, audit, deliveries=()) -> None:
        pass


class FakeTracker:
    reads_started: dict = {}
    shared_history: set = set()

    def complete(self, room_id: str) -> bool:
        return True

    def being_read(self, room_id: str) -> bool:
        return False

    def history_unread(self, room_id: str) -> bool:
        return False

    def session_source(self) -> Any:
        return object()


class FakeGather:
    """The courier's gatherer, as far as these tests use it: device lookups and rooms."""

    def __init__(self, client: Any) -> None:
        self.bulk = BulkOlm(client, LOG)

    async def devices(self, user_ids) -> dict[str, Any]:
        return await self.bulk.devices(user_ids)

    async def room(self, room_id, items) -> Any:
        raise NotImplementedError


def courier_for(client: Any, book: SealBook | None = None) -> Courier:
    gather = FakeGather(client)
    transport = Transport(client, gather.bulk, LOG)
    audit = Audit(client, {"audit_room": None}, LOG)
    return Courier(
        client, FakeStore(), FakeTracker(), book or SealBook(), gather, transport, audit, LOG
    )


class Newcomer:
    """A device of a newcomer with a real Olm account; the bot holds an outbound Olm session
    with it (as after a one-time-key claim)."""

    def __init__(self, client: FakeClient) -> None:
        self.account = olm.Account()
        self.account.generate_one_time_keys(1)
        otk = next(iter(self.account.one_time_keys["curve25519"].values()))
        self.account.mark_keys_as_published()
        keys = self.account.identity_keys
        self.curve = keys["curve25519"]
        self.device = DeviceIdentity(
            user_id=USER,
            device_id="NEWDEV",
            identity_key=keys["curve25519"],
            signing_key=keys["ed25519"],
            trust=TrustState.UNVERIFIED,
            deleted=False,
            name="new",
        )
        session = client.crypto.account.new_outbound_session(self.curve, otk)
        client.crypto.crypto_store.sessions[self.curve] = session
        self.bot_key = client.crypto.account.identity_key

    def read(self, stream: list[dict[str, Any]]) -> tuple[int, int]:
        """Decrypt the to-device stream as a client would, in stream order: (read, lost)."""
        inbound = None
        read = lost = 0
        for body in stream:
            content = body[USER]["NEWDEV"]
            ciphertext = content["ciphertext"][self.curve]
            message = (
                olm.OlmPreKeyMessage(ciphertext["body"])
                if ciphertext["type"] == 0
                else olm.OlmMessage(ciphertext["body"])
            )
            if inbound is None:
                inbound = olm.InboundSession(self.account, message, self.bot_key)
            try:
                inbound.decrypt(message)
                read += 1
            except olm.OlmSessionError:
                lost += 1
        return read, lost


def seals(count: int) -> list[Seal]:
    return [
        Seal(
            room_id=ROOM,
            session_id=f"seal{n:03}",
            outer_key=f"m.space.child:!child{n}:example.org",
            inner_type="m.space.child",
            inner_key=f"!child{n}:example.org",
            content_hash="h",
            source_event_id=f"$v{n}",
            session_key=f"key{n}",
            created_ts=n,
            event_id=f"$s{n}",
        )
        for n in range(count)
    ]


async def push_seals(trigger: str, count: int, slow_first: bool = True) -> tuple[int, int, int]:
    """Push ``count`` seals to one newcomer device through Courier._send_keys, as a batch of
    ``trigger`` items; returns (read, lost, most calls in flight at once)."""
    server = ReorderingServer(slow_first)
    client = FakeClient(server)
    newcomer = Newcomer(client)
    book = SealBook()
    made = seals(count)
    book.load(made)
    courier = courier_for(client, book)
    item = OutboxItem(room_id=ROOM, user_id=USER, trigger=trigger, id=1)
    shares = [
        Outcome(
            item=item,
            device_id="NEWDEV",
            session_id=seal.session_id,
            decision=Share(0, "member"),
            device=newcomer.device,
        )
        for seal in made
    ]
    sent, failed, _ = await courier._send_keys(shares, {}, set())
    assert len(sent) == count and not failed
    read, lost = newcomer.read(server.stream)
    return read, lost, server.max_in_flight


# Finding 1: newcomers' pushes now go "together" ----------------------------------------------


async def test_sanity_a_bulk_push_of_60_keys_to_one_device_is_read_in_full() -> None:
    """A bulk (link) push sends a device's messages one call after the other: the stream
    holds them in ratchet order, whatever the homeserver's timing."""
    read, lost, in_flight = await push_seals("link", 60)
    assert (read, lost, in_flight) == (60, 0, 1)


async def test_finding_1_a_join_push_of_more_than_41_keys_to_one_device_loses_keys() -> None:
    """Join/invite/bot-invite pushes now count as "waiting" in _send_keys, so olm_send sends
    with ``together=True``: every round of a group goes out at once, one call per message a
    device gets. A newcomer gets every live seal (one session per state value) and every
    other state session: in a space with 60 encrypted m.space.child values that is 60 Olm
    messages on one Olm session, in 60 concurrent sendToDevice calls. The docstring's premise
    ("Olm accepts a session's messages in any order") holds only within libolm's / vodozemac's
    40 skipped message keys: once the homeserver commits one call behind more than 40 later
    ones, the earlier messages cannot be decrypted, and the newcomer silently misses those
    room keys (nothing retries a push that "went through")."""
    read, lost, in_flight = await push_seals("join", 60)
    assert lost == 0, (
        f"the newcomer's device could decrypt {read} of 60 keys and lost {lost}: the 60 Olm "
        f"messages for one session went out in {in_flight} concurrent calls and arrived out of "
        "order beyond Olm's 40 skipped message keys"
    )


# Finding 2: the first wave's device lookup leaks when deliver fails or is cancelled -----------


class LookupProbe:
    """bulk.devices that blocks (a slow /keys/query) and records the task running it."""

    def __init__(self) -> None:
        self.task: asyncio.Task | None = None
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def devices(self, user_ids) -> dict[str, Any]:
        self.task = asyncio.current_task()
        self.started.set()
        await self.release.wait()
        return {u: {} for u in user_ids}


async def test_finding_2_a_failed_room_read_leaves_the_key_query_task_running() -> None:
    """deliver() starts the first wave's device lookup as a task before reading the rooms, but
    the try/finally that settles it begins only after the rooms are read. An error other than
    MatrixRequestError/MatrixConnectionError there (the database behind _admissions, the
    skipped items' store.finish, store.delivered, a bug) propagates out of deliver with the
    task still running: its /keys/query and crypto-store writes go on unowned, and its
    failure is never retrieved ("Task exception was never retrieved")."""
    courier = courier_for(FakeClient(ReorderingServer()))
    probe = LookupProbe()
    courier.gather.devices = probe.devices  # type: ignore[method-assign]

    async def room_context(room_id, items):
        await probe.started.wait()
        raise RuntimeError("database is locked")

    courier.gather.room = room_context  # type: ignore[method-assign]
    item = OutboxItem(room_id=ROOM, user_id=USER, trigger="join", id=1)
    try:
        await courier.deliver([item])
    except RuntimeError:
        pass
    await asyncio.sleep(0)
    task = probe.task
    assert task is not None
    try:
        assert task.done(), "deliver() raised, but its first-wave key query task still runs"
    finally:
        probe.release.set()
        await asyncio.sleep(0)


async def test_finding_2b_stopping_the_courier_mid_batch_leaves_the_key_query_running() -> None:
    """Same gap through cancellation: Courier.stop() cancels the lane while deliver() reads
    the rooms; the device lookup task is not cancelled with it and keeps querying the
    homeserver and writing the crypto store after the plugin stopped."""
    courier = courier_for(FakeClient(ReorderingServer()))
    probe = LookupProbe()
    courier.gather.devices = probe.devices  # type: ignore[method-assign]

    async def room_context(room_id, items):
        await asyncio.Event().wait()  # a slow homeserver

    courier.gather.room = room_context  # type: ignore[method-assign]
    item = OutboxItem(room_id=ROOM, user_id=USER, trigger="join", id=1)
    batch = asyncio.create_task(courier.deliver([item]))
    await probe.started.wait()
    batch.cancel()
    try:
        await batch
    except asyncio.CancelledError:
        pass
    await asyncio.sleep(0)
    task = probe.task
    assert task is not None
    try:
        assert task.done(), "the batch was cancelled, but its key query task still runs"
    finally:
        probe.release.set()
        await asyncio.sleep(0)


# Finding 3: the per-key seal budget is spent by values the room limit refused ----------------


class _Record:
    def __init__(self, outer_key: str) -> None:
        self.outer_key = outer_key


async def test_finding_3_a_value_refused_by_the_room_limit_still_spends_its_key_budget(
    monkeypatch,
) -> None:
    """Sealer._allowed takes a token from the per-key bucket first and only then asks the
    per-room bucket (``a.allow(...) and b.allow(...)``): a value the room limit refuses is
    charged a per-key seal anyway. In a room whose room budget is used up (a first sealing of
    200 values, a burst of changes marking the room every 0.5 s), a value that was never
    sealed loses its 3 "at once" tokens in three refused passes and then waits for the
    one-a-minute refill although the room budget is back: the per-key limit ("3 seals at
    once, then one a minute") counts seals that were never made."""
    clock = [1000.0]
    monkeypatch.setattr(sealer_module.time, "monotonic", lambda: clock[0])
    sealer = Sealer(None, None, None, None, SealBook(), None, None, None, LOG)
    first = [(_Record(f"m.space.child:!c{n}"), {}) for n in range(200)]
    name = (_Record("m.room.topic:"), {})
    allowed = sealer._allowed(ROOM, first + [name])  # the room's first sealing
    assert len(allowed) == 200 and name not in allowed  # the room budget is used up
    for _ in range(2):  # two more passes while other changes keep the room marked
        clock[0] += 0.4
        assert sealer._allowed(ROOM, [name]) == []  # the room has < 1 token
    clock[0] += 1.0  # the room budget has refilled; the topic was never sealed
    assert sealer._allowed(ROOM, [name]) == [name], (
        "the room budget has tokens again and the topic was never sealed, but its per-key "
        "budget was spent by the passes the room limit refused: it waits for the "
        "one-a-minute refill"
    )


# Finding 4: a seal whose PUT went through but whose answer was lost -------------------------


async def test_finding_4_a_seal_sent_despite_a_lost_answer_never_reaches_the_invitees() -> None:
    """A PUT whose answer is lost (a timeout, a reset after the homeserver stored the event)
    is handled as a failed send: the seal is abandoned (SealBook.finish with no event id) and
    is left out of ``live``, so the invitees' preview keys (``later_plan``) and the retries of
    missed keys skip it. When the event comes back through sync it is the room's current
    value and, being the bot's own session, counts as sealed: no later pass seals it again,
    and the invitees, who may read the topic, never get its key. (Before this change the
    unsent seal's key went to the invitees regardless.)"""
    from tests.unit.test_sealer import World

    INVITEE = "@invitee:example.org"
    world = World()
    world.server.members[INVITEE] = "invite"
    await world.admin_sets_topic("$t1", "Nightingale")

    original = world.server.request

    async def put_then_lose_the_answer(method, path, content=None, **kw):
        resp = await original(method, path, content, **kw)
        if "/state/m.room.encrypted/" in str(path):
            raise MatrixConnectionError("timed out waiting for the answer")
        return resp

    world.server.request = put_then_lose_the_answer  # type: ignore[method-assign]
    await world.sealer.seal_room(ROOM)
    world.server.request = original  # type: ignore[method-assign]
    assert len(world.server.puts) == 1  # the homeserver stored the seal event
    await world.seal_events_come_back()  # ... and sync brings it back as the current topic
    await world.sealer.seal_room(ROOM)  # the retry pass seal_room scheduled
    await world.seal_events_come_back()
    current = world.tracker.ledgers[ROOM].current_state()
    sessions = {r.session_id for r in current if r.outer_key == "m.room.topic:"}
    got = {s for u, s in world.courier.sent if u == INVITEE}
    assert sessions & got, (
        "the current topic is the bot's seal, but the invitee never got its key (and no pass "
        "will send it: the value counts as sealed)"
    )


# What held ----------------------------------------------------------------------------------


async def test_sanity_the_fast_lane_never_waits_on_its_own_pause() -> None:
    """Inside the fast lane _fast_idle is cleared; its batches only hold FAST_TRIGGERS items,
    so _send_keys sends with together=True and never waits on the event (no self-deadlock)."""
    for trigger in ("request", "join", "invite", "bot-invite"):
        server = ReorderingServer(slow_first=False)
        client = FakeClient(server)
        newcomer = Newcomer(client)
        book = SealBook()
        made = seals(3)
        book.load(made)
        courier = courier_for(client, book)
        courier.transport.fast_idle.clear()  # as while the fast lane drains a batch
        item = OutboxItem(room_id=ROOM, user_id=USER, trigger=trigger, id=1)
        shares = [
            Outcome(item, "NEWDEV", s.session_id, Share(0, "member"), device=newcomer.device)
            for s in made
        ]
        sent, _, _ = await asyncio.wait_for(courier._send_keys(shares, {}, set()), 5)
        assert len(sent) == 3
