"""Review of issue 14 (late keys, live config edits, health): each ``test_finding_*`` test
shows one finding and fails on the code as reviewed; it passes once the finding is fixed.

The courier runs for real on a real SQLite store; the gatherer (what the homeserver says about
the room, its members and their devices), the transport and the tracker are small fakes."""

from __future__ import annotations

import io
import json
import logging
from types import SimpleNamespace
from typing import Any

from mautrix.types import DeviceIdentity, TrustState
from mautrix.util.async_db import Database
from mautrix.util.config import RecursiveDict
import pytest
import pytest_asyncio
from ruamel.yaml import YAML

from encstate_bot import protocol
from encstate_bot.audit import Audit
from encstate_bot.bot import EncStateBot
from encstate_bot.config import BASE_CONFIG, Config
from encstate_bot.courier import Courier
from encstate_bot.gather import RoomContext
from encstate_bot.health import Counts, Health, LastError
from encstate_bot.keyrequests import KeyRequests
from encstate_bot.ledger import RoomLedger, Status
from encstate_bot.migrations import upgrade_table
from encstate_bot.planner import DeviceFacts, RoomBatch, SessionInfo, UserFacts
from encstate_bot.policy import RoomFacts
from encstate_bot.ratelimit import RequestGate
from encstate_bot.seals import SealBook
from encstate_bot.store import OutboxItem, Store
from encstate_bot.triggers import REQUEST_LANE, Trigger

from .helpers import ROOM, state

BOT = "@encstate:example.org"
USER = "@member:example.org"
DEV = "MEMBERDEV"
PENDING = "pending-session"  # named by the room's current topic; the bot lacks its key
LOG = logging.getLogger("test.review_issue14")


# Fakes ------------------------------------------------------------------------------------------


class Gather:
    """The homeserver's word for one batch: USER is joined with one device; ``during_batch``
    runs while the batch is being decided (the gatherer's reads take round trips)."""

    def __init__(self, ledger: RoomLedger) -> None:
        self.ledger = ledger
        self.during_batch: Any = None

    async def devices(self, user_ids) -> dict[str, Any]:
        return {
            u: {
                DEV: DeviceIdentity(
                    user_id=u,
                    device_id=DEV,
                    identity_key="curve",
                    signing_key="ed",
                    trust=TrustState.UNVERIFIED,
                    deleted=False,
                    name="phone",
                )
            }
            for u in user_ids
        }

    async def room(self, room_id, items) -> RoomContext:
        facts = RoomFacts(room_id=room_id, bot_level=100, users_default=0)
        return RoomContext(room_id, facts, {USER: "join"}, {})

    async def batch(self, context, items, devices, source):
        if self.during_batch is not None:
            await self.during_batch()
        users = {USER: UserFacts(membership="join", devices=(DeviceFacts(DEV),))}
        wanted = {i.session_id for i in items if i.session_id}
        sessions = {s: SessionInfo(s, facts=self.ledger.facts(s), held=None) for s in wanted}
        return RoomBatch(context.facts, users, sessions, ()), {}


class Transport:
    def __init__(self) -> None:
        self.withheld: list[tuple] = []
        self.sent_calls = 0

    async def send_withheld(self, messages) -> None:
        self.withheld += messages


class Tracker:
    def __init__(self, ledger: RoomLedger) -> None:
        self.ledgers = {ROOM: ledger}
        self.shared_history: set = set()
        self.reads_started: dict[str, int] = {}

    def complete(self, room_id: str) -> bool:
        return True

    def being_read(self, room_id: str) -> bool:
        return False

    def history_unread(self, room_id: str) -> bool:
        return False

    def session_source(self) -> Any:
        return object()


@pytest_asyncio.fixture
async def store(tmp_path):
    db = Database.create(f"sqlite:{tmp_path / 'bot.db'}", upgrade_table=upgrade_table)
    await db.start()
    try:
        yield Store(db)
    finally:
        await db.stop()


def pending_room() -> RoomLedger:
    ledger = RoomLedger(ROOM)
    ledger.add_state(state("$topic", PENDING, 0, "m.room.topic", status=Status.PENDING))
    ledger.set_server_current("m.room.topic:", "$topic")
    return ledger


def courier_for(store: Store, gather: Gather, ledger: RoomLedger) -> Courier:
    client = SimpleNamespace(mxid=BOT, device_id="BOTDEV", crypto=None)
    audit = Audit(client, {"audit_room": None}, LOG)
    return Courier(client, store, Tracker(ledger), SealBook(), gather, Transport(), audit, LOG)


def request(request_id: str) -> OutboxItem:
    return OutboxItem(
        room_id=ROOM,
        user_id=USER,
        trigger=Trigger.REQUEST,
        device_id=DEV,
        session_id=PENDING,
        request_id=request_id,
    )


async def answer(store: Store, courier: Courier, item: OutboxItem) -> None:
    """The request arrives (queued) and the request lane takes it up."""
    await store.enqueue([item])
    await courier.deliver(await store.due(10, REQUEST_LANE))


# Late keys --------------------------------------------------------------------------------------


async def test_finding_a_cancellation_while_the_request_is_decided_is_answered_anyway(
    store: Store,
) -> None:
    """PROTOCOL §4: a cancellation voids the pending request. The wait is written by the
    courier *after* deciding, so a cancellation that arrives while the batch is being decided
    (the gatherer's homeserver round trips) finds nothing to remove: the wait outlives it and
    the key's arrival answers the cancelled request. (The removed in-memory list was filled
    at arrival and emptied by the cancellation: no such window.)"""
    ledger = pending_room()
    gather = Gather(ledger)
    courier = courier_for(store, gather, ledger)
    requests = KeyRequests(courier, store, RequestGate(200, 20, 500, 50, 5), BOT, "BOTDEV", LOG)

    async def cancelled_meanwhile() -> None:
        gather.during_batch = None
        await requests.cancel(protocol.KeyCancellation(USER, DEV, "req-1"))

    gather.during_batch = cancelled_meanwhile
    await answer(store, courier, request("req-1"))
    await courier.release(ROOM, {PENDING})  # the key arrives
    answered = [i.request_id for i in await store.due(10, REQUEST_LANE)]
    assert answered == [], (
        f"the cancelled request {answered} is queued to be answered once the key arrived "
        f"({await store.waits_count()} wait(s) left)"
    )


async def test_finding_every_request_id_keeps_its_own_wait_without_bound(store: Store) -> None:
    """encstate_key_wait's key includes the request id and nothing caps the table (the removed
    in-memory list kept at most 10,000): a joined member asking again and again for a session
    the bot lacks (a fresh request id each time past the 5 s duplicate window, up to the
    per-user rate of 50/s across its devices and the room's pending sessions) adds a row per
    request for 1-2 h, and the key's arrival takes them all in one query and queues one
    answer per row, the same key to the same device every time."""
    ledger = pending_room()
    courier = courier_for(store, Gather(ledger), ledger)
    for n in range(40):
        await answer(store, courier, request(f"again-{n}"))
    rows = await store.waits_count()
    await courier.release(ROOM, {PENDING})
    queued = await store.due(100, REQUEST_LANE)
    assert rows == 1 and len(queued) == 1, (
        f"one device waiting for one session holds {rows} rows, and the key's arrival queues "
        f"{len(queued)} answers of the same key to it"
    )


# Config edits and /health ----------------------------------------------------------------------

RECOVERY_KEY = "EsTc Sec1 Ret2 Key3 Do4n 0tLe Ak5x AbCd EfGh IjKl MnOp QrSt"


class Managed:
    """maubot's copy of the instance config (as tests/plugin/test_config_update.py)."""

    def __init__(self, text: str) -> None:
        self.yaml = YAML()
        self.config_str = text
        with open(BASE_CONFIG) as fh:
            self.base = RecursiveDict(self.yaml.load(fh))

    def load(self):
        return self.yaml.load(self.config_str)

    def save(self, data) -> None:
        buf = io.StringIO()
        self.yaml.dump(data, buf)
        self.config_str = buf.getvalue()


class HealthStore:
    async def queue_stats(self):
        return {"fast": (0, None), "bulk": (0, None)}

    async def waits_count(self) -> int:
        return 0


@pytest.mark.parametrize(
    "slip, secret",
    [
        # the closing quote of the recovery key left out: the key's head is quoted back
        (f'cross_signing:\n    recovery_key: "{RECOVERY_KEY}\n    bootstrap: false\n', "Ret2 Ke"),
        # a stray colon after it: the key's tail is quoted back
        (f"cross_signing:\n    recovery_key: {RECOVERY_KEY}:\n    bootstrap: false\n", "MnOp Qr"),
        # the web_token being added, its quote left open: all of it
        ('web_token: "s3cr3t-t0ken-abcdefgh\n', "s3cr3t-t0ken-abcdefgh"),
    ],
    ids=["recovery-key-head", "recovery-key-tail", "web-token"],
)
async def test_finding_a_yaml_slip_puts_config_secrets_on_the_open_health_endpoint(
    slip: str, secret: str
) -> None:
    """The admin edits the config in the manager and slips on a secret's line (a quote left
    open, a stray colon). The edit is refused, and the refusal is logged at ERROR with the
    YAML parser's message, which quotes the offending line (up to about 40 characters either
    side of the error). LastError keeps it and /health serves it to anyone who can reach
    maubot while web_token is null (the default; a web_token being added is not in force
    until the edit goes through). ConfigError hides these two values ("(hidden)"); the
    parser's message does not."""
    managed = Managed("web_token: null\n")
    config = Config(managed.load, managed.base.clone, managed.save)
    config.load_and_update()
    log = logging.getLogger("test.review_issue14.plugin")
    last_error = LastError()
    log.addHandler(last_error)
    try:
        managed.config_str = slip
        EncStateBot.on_external_config_update(SimpleNamespace(config=config, log=log))
        assert config["web_token"] is None  # refused: the old config is kept
    finally:
        log.removeHandler(last_error)

    async def identity_status() -> str:
        return "cross-signed"

    health = Health(
        HealthStore(),
        SimpleNamespace(tracked=lambda r: True),
        SimpleNamespace(joined=set(), empowered=lambda r: True),
        SimpleNamespace(sent_calls=0, failed_calls=0),
        SimpleNamespace(problem=lambda: None, on=True),
        Counts(),
        last_error,
        identity_status,
        lambda: True,
        lambda: None,
        lambda: True,
        lambda: config["web_token"],
    )
    assert health.refused(SimpleNamespace(headers={})) is None  # open: no web_token in force
    _, body = await health.report()
    served = json.dumps(body)
    assert secret not in served, f"/health serves a config secret: {served}"
