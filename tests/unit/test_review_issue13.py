"""Review of the issue 13 refactor (224098a..HEAD): behaviour that changed under "behaviour
unchanged". Each ``test_finding_*`` test fails on the refactored code and pins what the code
before it did (or shows the new attack).

- Reactions to newly decryptable sessions moved out of the tracker's write path (an inline
  callback) into ``Intake.react()``, which takes every room's gains at once. A reaction that
  fails now loses the other rooms' reactions taken with it, and aborts the rest of the sync (its
  key requests); a reaction run by another step (the maintenance loop, a catch-up) can now land
  after the requests of the sync that produced the gain, and answers them a second time.
- The gatherer resolves the cross-signing trust of every device of every user in a batch, where
  the courier resolved it only for the devices an item targets: a key request naming one device
  costs one trust resolution per device the requester has (any Matrix user, member or not).

The intake runs for real (``Intake``, ``KeyRequests``, ``RoomLinks``, ``Gatherer``,
``Identity``); the tracker, pushes, sealer, courier queue and homeserver are small fakes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace
from typing import Any

from mautrix.types import DeviceIdentity, TrustState
import pytest

from encstate_bot import protocol
from encstate_bot.gather import Gatherer, RoomContext
from encstate_bot.identity import Identity
from encstate_bot.intake import Intake, Origins
from encstate_bot.keyrequests import KeyRequests
from encstate_bot.ledger import RoomLedger
from encstate_bot.links import RoomLinks
from encstate_bot.policy import RoomFacts
from encstate_bot.ratelimit import RequestGate
from encstate_bot.room_policy import Mode, RoomPolicy
from encstate_bot.seals import SealBook
from encstate_bot.store import OutboxItem
from encstate_bot.tracker import Tracker
from encstate_bot.triggers import Trigger

from .helpers import state

BOT = "@encstate:example.org"
ROOM = "!room:example.org"  # gains a state session in the sync; a member asks for it
OTHER = "!other:example.org"  # a second state-encrypted room with a gain of its own
QUIET = "!quiet:example.org"  # a room whose processing takes a while
MEMBER = "@member:example.org"
LOG = logging.getLogger("test.review_issue13")


# Fakes ----------------------------------------------------------------------------------------


class FakeTracker:
    """The tracker as the intake uses it. ``ingest`` settles what the test scripted for the
    room: the sessions that gained valid state are kept for the reactions, as
    ``Tracker._settle`` keeps them."""

    take_gained = Tracker.take_gained
    give_back = Tracker.give_back

    def __init__(self, gains: dict[str, set[str]] | None = None) -> None:
        self.gained: dict[str, dict[str, float]] = {}
        self.gains = gains or {}
        self.backfilled = {ROOM, OTHER, QUIET}  # read back already: no catch-up is spawned
        self.hold: dict[str, asyncio.Event] = {}  # room -> released when its ingest may end

    def tracked(self, room_id: str) -> bool:
        return True

    async def apply_plain_state(self, room_id: str, raw: dict[str, Any]) -> bool:
        return False

    async def ingest(self, room_id: str, events: Any, current: bool = False) -> set[str]:
        if room_id in self.hold:
            await self.hold[room_id].wait()
        gained = set(self.gains.get(room_id, ()))
        if gained:
            room_gains = self.gained.setdefault(room_id, {})
            for session_id in gained:
                room_gains.setdefault(session_id, time.monotonic())
        return gained


class FakePushes:
    def __init__(self) -> None:
        self.fail: dict[str, Exception] = {}  # room -> what on_new_state raises for it
        self.hold: dict[str, asyncio.Event] = {}  # room -> released when on_new_state may end
        self.new_state: list[tuple[str, set[str]]] = []

    def departed(self, room_id: str, events: Any) -> None:
        pass

    async def on_members(self, room_id: str, events: Any) -> None:
        pass

    async def on_new_state(self, room_id: str, session_ids: set[str], skip: Any = ()) -> None:
        if room_id in self.hold:
            await self.hold[room_id].wait()
        if room_id in self.fail:
            raise self.fail[room_id]
        self.new_state.append((room_id, set(session_ids)))

    async def refresh_links(self) -> set:
        return set()


class FakeSealer:
    def __init__(self) -> None:
        self.marked: list[str] = []

    def mark(self, room_id: str, delay: float = 0.5) -> None:
        self.marked.append(room_id)


class Queue:
    """The courier as the intake uses it: what was queued, in order. A request for a session in
    ``pending`` (the bot cannot read its state yet) waits for the key, as the courier's
    decision keeps it in the database; ``release`` queues it again."""

    def __init__(self) -> None:
        self.items: list[OutboxItem] = []
        self.pending: set[str] = set()
        self.waits: list[OutboxItem] = []

    async def submit(self, items: Any) -> int:
        items = list(items)
        self.items += items
        self.waits += [i for i in items if i.session_id in self.pending]
        return len(items)

    async def release(self, room_id: str, session_ids: set[str]) -> None:
        self.pending -= session_ids
        taken = [w for w in self.waits if w.room_id == room_id and w.session_id in session_ids]
        self.waits = [w for w in self.waits if w not in taken]
        await self.submit(taken)

    def answers(self, request_id: str) -> list[OutboxItem]:
        return [i for i in self.items if i.request_id == request_id]


class World:
    """An intake after start-up (the rescan done), with real key-request handling."""

    def __init__(self, gains: dict[str, set[str]] | None = None) -> None:
        self.tracker = FakeTracker(gains)
        self.pushes = FakePushes()
        self.sealer = FakeSealer()
        self.queue = Queue()
        self.client = SimpleNamespace(
            mxid=BOT,
            device_id="BOTDEVICE",
            crypto=None,
            ignore_first_sync=True,
            ignore_initial_sync=False,
        )
        self.links = RoomLinks(self.tracker, BOT, LOG)
        self.links.set_joined({ROOM, OTHER, QUIET})
        self.requests = KeyRequests(
            self.queue,  # type: ignore[arg-type]
            store=None,  # type: ignore[arg-type]
            gate=RequestGate(100, 10, 100, 10, 0),
            own_user=BOT,
            own_device="BOTDEVICE",
            log=LOG,
            links=self.links,
        )
        self.intake = Intake(
            self.client,
            {"backfill_limit": 0},
            None,  # type: ignore[arg-type]
            self.tracker,  # type: ignore[arg-type]
            self.links,
            self.pushes,  # type: ignore[arg-type]
            self.sealer,  # type: ignore[arg-type]
            self.requests,
            self.queue,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            Origins(),
            LOG,
        )
        self.intake.ready.set()


def key_request(request_id: str, room_id: str = ROOM, session_id: str = "S") -> dict[str, Any]:
    return {
        "type": "m.room_key_request",
        "sender": MEMBER,
        "content": {
            "action": "request",
            "requesting_device_id": "PHONE",
            "request_id": request_id,
            "body": {
                "algorithm": protocol.MEGOLM_ALGORITHM,
                "room_id": room_id,
                "session_id": session_id,
            },
        },
    }


def sync(rooms: list[str], to_device: list[dict[str, Any]]) -> dict[str, Any]:
    """A live sync (not the first): these joined rooms, each with one timeline event."""
    join = {
        room_id: {"timeline": {"events": [{"type": "m.room.encrypted", "event_id": f"$e{n}"}]}}
        for n, room_id in enumerate(rooms)
    }
    data = {
        "rooms": {"join": join},
        "to_device": {"events": to_device},
        "net.maunium.mautrix": {"is_first": False, "is_initial": False},
    }
    return {"data": data}


async def run_like_mautrix(handler: Any) -> None:
    """mautrix runs a sync handler under ``_catch_errors``: what it raises is logged, and the
    next sync comes."""
    try:
        await handler
    except Exception:
        LOG.info("handler failed (mautrix logs it and goes on)", exc_info=True)


# Finding 1: one failing reaction loses the sync's key requests ---------------------------------


async def test_finding_1_a_failing_reaction_drops_the_key_requests_of_its_sync() -> None:
    """Before: the reaction ran inside the tracker's ``ingest`` (the ``on_new_state``
    callback), whose ``except Exception`` contained a failure to the room (it waited in the
    backlog); ``_on_sync`` went on and handled the sync's key requests. Now ``Intake.on_sync``
    calls ``react()`` between the rooms and the requests, unguarded: a reaction that raises (a
    database that is locked for a moment, a malformed answer from the homeserver) ends
    ``on_sync`` and the key requests that came with the sync are never answered (the
    requester's client does not ask again)."""
    world = World(gains={ROOM: {"S"}})
    world.pushes.fail[ROOM] = RuntimeError("database is locked")
    await run_like_mautrix(world.intake.on_sync(sync([ROOM], [key_request("r1", OTHER)])))
    assert world.queue.answers("r1"), "the key request that came with the sync was dropped"


# Finding 2: one failing reaction loses the other rooms' reactions -------------------------------


async def test_finding_2_a_failing_reaction_loses_every_other_rooms_reactions() -> None:
    """``react()`` takes every room's gains (``Tracker.take_gained``) before acting on any: when
    the reaction for one room raises, the gains of the rooms after it are gone, so the requests
    that waited for their sessions are never answered again and their admitting rooms' members
    never get the new preview seals. Before, each room's gain was acted on in its own tracker
    call, so one room's failure could not take another room's reactions with it."""
    world = World()
    world.queue.pending.add("S2")
    # A member asked for OTHER's session S2 before the bot could read the state it encrypts.
    await world.requests.handle([(MEMBER, key_request("r2", OTHER, "S2")["content"])])
    assert len(world.queue.answers("r2")) == 1
    # Both rooms gain state; the reaction for ROOM fails.
    world.tracker.gained = {ROOM: {"S": time.monotonic()}, OTHER: {"S2": time.monotonic()}}
    world.pushes.fail[ROOM] = RuntimeError("database is locked")
    await run_like_mautrix(world.intake.react())
    world.pushes.fail.clear()
    await world.intake.react()  # the next step (a sync, the maintenance tick) reacts again
    assert len(world.queue.answers("r2")) == 2, "the waiting request for S2 is never answered"
    assert (OTHER, {"S2"}) in world.pushes.new_state
    assert OTHER in world.sealer.marked


# Finding 3: a reaction can land after the requests of its sync ---------------------------------


async def test_finding_3_a_reaction_taken_by_another_step_runs_after_the_syncs_requests() -> None:
    """The order in a sync was: rooms, the reactions to what they made decryptable, then the key
    requests. A request for a session that became readable in the same sync was answered once
    (the reaction found it not waiting yet). Now any ``react()`` takes every room's gains: the
    maintenance loop's (or a catch-up's) can take the sync's gain while the sync is still busy
    with another room, and reach it after the sync handled its requests; it then answers the
    request a second time (requests are never deduplicated at delivery)."""
    world = World(gains={ROOM: {"S"}})
    # A gain of OTHER waits for its reaction (a catch-up page, the maintenance flush).
    world.tracker.gained = {OTHER: {"S2": time.monotonic()}}
    quiet = world.tracker.hold[QUIET] = asyncio.Event()  # the sync is busy with QUIET
    slow = world.pushes.hold[OTHER] = asyncio.Event()  # OTHER's pushes take a while
    request = key_request("r3", ROOM, "S")
    on_sync = asyncio.create_task(world.intake.on_sync(sync([ROOM, QUIET], [request])))
    await asyncio.sleep(0.01)  # ROOM's events are in; QUIET's are on their way
    maintenance = asyncio.create_task(world.intake.react())  # what maintain() does each tick
    await asyncio.sleep(0.01)
    quiet.set()
    await asyncio.wait_for(on_sync, 5)
    slow.set()
    await asyncio.wait_for(maintenance, 5)
    answers = world.queue.answers("r3")
    assert len(answers) == 1, f"the request was answered {len(answers)} times"


# Finding 4: a request naming one device costs a trust check per device of the requester --------


class TrustCounter:
    """mautrix's ``resolve_trust`` (a few crypto-store queries per call), counted."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def resolve_trust(self, device: DeviceIdentity) -> TrustState:
        self.calls.append(device.device_id)
        return TrustState.CROSS_SIGNED_TOFU


class Source:
    async def get(self, room_id: str, session_id: str) -> Any:
        return None


@pytest.mark.parametrize("membership", [None, "join"])
async def test_finding_4_one_request_costs_a_trust_check_per_device_of_the_requester(
    membership: str | None,
) -> None:
    """In a cross-signed room the courier resolved trust for the devices an item targets: one
    for a key request (it names its device). The gatherer resolves it for every device of every
    user in the batch, before the policy looks at membership: any Matrix user, member or not,
    with many devices (each login makes one) makes every request of theirs cost that many trust
    resolutions (several crypto-store queries each, and a warning per device when the user has
    no cross-signing keys). The per-device rate limits bound the requests, not this cost."""
    crypto = TrustCounter()
    crypto.account = SimpleNamespace(identity_key="BOTKEY")  # type: ignore[attr-defined]
    client = SimpleNamespace(mxid=BOT, device_id="BOTDEVICE", crypto=crypto)
    ledger = RoomLedger(ROOM)
    ledger.add_state(state("$name", "S", 0))
    tracker = SimpleNamespace(ledgers={ROOM: ledger}, shared_history=set())
    gather = Gatherer(
        client,
        tracker,  # type: ignore[arg-type]
        SealBook(),
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        Identity(client, LOG),
        None,  # type: ignore[arg-type]
        SimpleNamespace(preview_types=("m.room.name",)),
        LOG,
    )
    devices = {
        MEMBER: {
            f"D{n}": DeviceIdentity(
                user_id=MEMBER,
                device_id=f"D{n}",
                identity_key=f"curve{n}",
                signing_key=f"ed{n}",
                trust=TrustState.UNVERIFIED,
                deleted=False,
                name="",
            )
            for n in range(300)
        }
    }
    facts = RoomFacts(
        room_id=ROOM, bot_level=50, users_default=0, policy=RoomPolicy(mode=Mode.CROSS_SIGNED)
    )
    context = RoomContext(ROOM, facts, {MEMBER: membership}, {})
    ask = OutboxItem(
        room_id=ROOM,
        user_id=MEMBER,
        device_id="D7",
        session_id="S",
        trigger=Trigger.REQUEST,
        request_id="r4",
    )
    await gather.batch(context, [ask], devices, Source())  # type: ignore[arg-type]
    assert len(crypto.calls) <= 1, f"{len(crypto.calls)} trust resolutions for one request"
