"""One test per finding of the security review that the pure core can show (the rest go
through maubot.testing or a real Synapse: tests/plugin/test_security.py and
tests/integration/test_security.py). Each failed before its fix."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from types import SimpleNamespace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mautrix.crypto.sessions import InboundGroupSession
import olm

from encstate_bot import protocol
from encstate_bot.audit import MAX_ATTEMPTS, expired
from encstate_bot.identity import Identity
from encstate_bot.keyrequests import KeyRequests
from encstate_bot.ledger import MessageStatus, RoomLedger, SessionKind, Status
from encstate_bot.members import member_state as _member_state
from encstate_bot.policy import (
    HeldSession,
    Mode,
    Requester,
    RoomFacts,
    SealFacts,
    Share,
    decide,
    decide_seal,
)
from encstate_bot.ratelimit import RequestGate
from encstate_bot.room_policy import RoomPolicy
from encstate_bot.rooms import RoomView
from encstate_bot.store import OutboxItem
from encstate_bot.tracker import Tracker

from .helpers import ROOM, OneSessionCrypto, state

ADMIN = "@admin:example.org"
MEMBER = "@member:example.org"
MOD = "@mod:example.org"


class MemoryStore:
    """The store calls the tracker makes, kept in memory; ``fail`` makes the next writes
    raise, as a database that is down or refuses a value does."""

    def __init__(self) -> None:
        self.states: dict[str, object] = {}
        self.messages: dict[str, object] = {}
        self.fail = 0

    def _check(self) -> None:
        if self.fail:
            self.fail -= 1
            raise OSError("database unavailable")

    async def put_states(self, records) -> None:
        records = list(records)
        if records:
            self._check()
        self.states.update({r.event_id: r for r in records})

    async def put_messages(self, records) -> None:
        records = list(records)
        if records:
            self._check()
        self.messages.update({m.event_id: m for m in records})

    async def put_server_current(self, room_id, current) -> None:
        if not all(protocol.storable(t) for pair in current.items() for t in pair):
            raise OSError("invalid byte sequence for encoding UTF8: 0x00")  # as PostgreSQL


def room_view_events(tracker: Tracker, power_levels: dict) -> None:
    tracker.view(ROOM).apply(
        {"type": "m.room.power_levels", "state_key": "", "content": power_levels}
    )


_CLOCK = itertools.count(1000)


def encrypted(outbound, event_id: str, sender: str, payload: object, outer: str | None) -> dict:
    plaintext = payload if isinstance(payload, str) else json.dumps(payload)
    raw = {
        "type": "m.room.encrypted",
        "event_id": event_id,
        "sender": sender,
        "origin_server_ts": next(_CLOCK),
        "content": {
            "algorithm": protocol.MEGOLM_ALGORITHM,
            "session_id": outbound.id,
            "ciphertext": outbound.encrypt(plaintext),
        },
    }
    if outer is not None:
        raw["state_key"] = outer
    return raw


def topic(value: str) -> dict:
    return {"type": "m.room.topic", "state_key": "", "content": {"topic": value}, "room_id": ROOM}


def admin_tracker() -> tuple[object, MemoryStore, Tracker]:
    """A tracker on an in-memory store, in a room where the admin (level 100) owns a session."""
    outbound, inbound = session_pair()
    store = MemoryStore()
    crypto = OneSessionCrypto(inbound, {ADMIN: {("curve-admin", "sig")}})
    tracker = Tracker(store, crypto, logging.getLogger("test"))
    room_view_events(tracker, {"users": {ADMIN: 100}})
    return outbound, store, tracker


def session_pair():
    outbound = olm.OutboundGroupSession()
    inbound = InboundGroupSession(outbound.session_key, "sig", "curve-admin", ROOM)
    return outbound, inbound


# 1 -----------------------------------------------------------------------------------------


def test_finding_01_per_type_power_levels_count() -> None:
    view = RoomView(ROOM)
    view.apply(
        {
            "type": "m.room.power_levels",
            "state_key": "",
            "content": {
                "users": {ADMIN: 100, MOD: 50},
                "state_default": 50,
                "events": {"m.room.topic": 0, "m.room.encrypted": 0, "m.room.name": 100},
            },
        }
    )
    assert view.state_level("m.room.topic") == 0
    assert view.state_level("m.room.name") == 100  # a moderator cannot set it
    assert view.state_level("m.room.avatar") == 50


async def test_finding_01_a_members_topic_supersedes_the_admins_where_the_room_allows() -> None:
    outbound, inbound = session_pair()
    crypto = OneSessionCrypto(
        inbound, {ADMIN: {("curve-admin", "sig")}, MEMBER: {("curve-admin", "sig")}}
    )
    tracker = Tracker(MemoryStore(), crypto, logging.getLogger("test"))
    room_view_events(
        tracker,
        {"users": {ADMIN: 100}, "state_default": 50, "events": {"m.room.topic": 0}},
    )
    await tracker.ingest(
        ROOM,
        [
            encrypted(outbound, "$secret", ADMIN, topic("secret"), "m.room.topic:"),
            encrypted(outbound, "$public", MEMBER, topic("public"), "m.room.topic:"),
        ],
    )
    ledger = tracker.ledgers[ROOM]
    assert ledger.events["$public"].status == Status.VALID, ledger.events["$public"].reason
    assert [r.event_id for r in ledger.current_state()] == ["$public"]
    assert ledger.facts(outbound.id).safe_index == 1  # "secret" at 0 is never exported


# 2 -----------------------------------------------------------------------------------------

DEEP = (
    '{"type": "m.room.message", "room_id": "'
    + ROOM
    + '", "content": {"x": '
    + "[" * 5000
    + "]" * 5000
    + "}}"
)


def test_finding_02_deeply_nested_json_is_invalid_not_an_exception() -> None:
    assert isinstance(protocol.load_payload(DEEP), protocol.Invalid)


async def test_finding_02_a_poison_message_is_evidence_not_a_crash() -> None:
    outbound, store, tracker = admin_tracker()
    await tracker.ingest(
        ROOM,
        [
            encrypted(
                outbound, "$name", ADMIN, {**topic("x"), "type": "m.room.name"}, "m.room.name:"
            ),
            encrypted(outbound, "$deep", ADMIN, DEEP, None),
        ],
    )
    assert tracker.ledgers[ROOM].facts(outbound.id).kind == SessionKind.MIXED
    assert store.messages["$deep"].status == MessageStatus.MESSAGE  # durable


async def test_finding_02_evidence_is_durable_before_the_room_shares_again() -> None:
    outbound, store, tracker = admin_tracker()
    name = {**topic("x"), "type": "m.room.name"}
    await tracker.ingest(ROOM, [encrypted(outbound, "$name", ADMIN, name, "m.room.name:")])
    store.fail = 1  # the database refuses the next write
    message = {"type": "m.room.message", "room_id": ROOM, "content": {"body": "hi"}}
    await tracker.ingest(ROOM, [encrypted(outbound, "$msg", ADMIN, message, None)], current=True)
    assert not tracker.complete(ROOM)  # the courier shares nothing from it meanwhile
    later = {"type": "m.room.message", "room_id": ROOM, "content": {"body": "later"}}
    store.fail = 1
    await tracker.ingest(ROOM, [encrypted(outbound, "$later", ADMIN, later, None)])
    assert "$later" not in store.messages  # nothing newer is written before the backlog
    await tracker.flush_all()
    assert tracker.complete(ROOM)
    assert store.messages["$msg"].status == MessageStatus.MESSAGE
    assert store.messages["$later"].status == MessageStatus.MESSAGE
    # What a restart would load says "mixed", as memory did all along.
    reloaded = RoomLedger(ROOM)
    for rec in store.states.values():
        reloaded.add_state(rec)
    for msg in store.messages.values():
        reloaded.add_message(msg)
    assert reloaded.facts(outbound.id).kind == SessionKind.MIXED


def test_finding_02_a_ciphertext_no_database_stores_is_refused_at_parsing() -> None:
    # Otherwise the write-ahead fails for good and the room never shares again (a jam).
    for bad in ("AwgA\ud800", "AwgA\x00", "Awg\u00e9"):
        raw = {
            "type": "m.room.encrypted",
            "event_id": "$e",
            "sender": ADMIN,
            "origin_server_ts": 1,
            "content": {
                "algorithm": protocol.MEGOLM_ALGORITHM,
                "session_id": "S",
                "ciphertext": bad,
            },
        }
        assert isinstance(protocol.parse_encrypted_message(raw, ROOM), protocol.Invalid), bad


async def test_finding_02_an_event_id_no_database_stores_cannot_jam_a_room() -> None:
    # The server's current state names its events; one the database refuses must not put the
    # room in the backlog for good (nothing would be shared from it again).
    outbound, store, tracker = admin_tracker()
    name = {**topic("x"), "type": "m.room.name"}
    raw = encrypted(outbound, "$name", ADMIN, name, "m.room.name:")
    redacted = {**raw, "event_id": "$odd\x00", "content": {}}
    await tracker.ingest(ROOM, [raw, redacted], current=True)
    assert tracker.complete(ROOM)
    assert [r.event_id for r in tracker.ledgers[ROOM].current_state()] == ["$name"]


def test_finding_02_indices_and_timestamps_fit_the_columns() -> None:
    import base64

    varint = bytes([0xFF, 0xFF, 0xFF, 0xFF, 0x0F])  # 2^32 - 1
    ciphertext = base64.b64encode(b"\x03\x08" + varint + bytes(40)).decode()
    assert protocol.message_index(ciphertext) == 2**32 - 1  # stored as BIGINT (migration v4)
    raw = {
        "type": "m.room.encrypted",
        "event_id": "$e",
        "sender": ADMIN,
        "origin_server_ts": 2**70,
        "state_key": "m.room.name:",
        "content": {"algorithm": protocol.MEGOLM_ALGORITHM, "session_id": "S", "ciphertext": "x"},
    }
    assert isinstance(protocol.parse_encrypted_state(raw, ROOM), protocol.Invalid)
    raw.update(origin_server_ts=1, state_key="m.room.name:\x00")
    assert isinstance(protocol.parse_encrypted_state(raw, ROOM), protocol.Invalid)


# 3 -----------------------------------------------------------------------------------------


def test_finding_03_a_ban_or_kick_beats_admission_through_an_allowed_room() -> None:
    ledger = RoomLedger(ROOM)
    ledger.add_state(state("$name", "S", 0))
    room = RoomFacts(room_id=ROOM, bot_level=50, users_default=0)
    held = HeldSession(0)
    banned = Requester(user_id=MEMBER, device_id="D", membership="ban", admitted_via="!a:x")
    kicked = Requester(
        user_id=MEMBER, device_id="D", membership="leave", admitted_via="!a:x", removed=True
    )
    left = Requester(user_id=MEMBER, device_id="D", membership="leave", admitted_via="!a:x")
    seal = SealFacts("m.room.name", preview=True, live=True)
    assert not isinstance(decide_seal(room, banned, seal), Share)
    assert not isinstance(decide_seal(room, kicked, seal), Share)
    assert isinstance(decide_seal(room, left, seal), Share)  # left by choice
    for who in (banned, kicked, left):  # nobody else's session, ever, to a non-member
        assert not isinstance(decide(room, who, ledger.facts("S"), held), Share)


def test_finding_03_a_leave_sent_by_someone_else_is_a_removal() -> None:
    kick = {"type": "m.room.member", "sender": ADMIN, "content": {"membership": "leave"}}
    assert _member_state(MEMBER, kick) == ("leave", True)
    left = {"type": "m.room.member", "sender": MEMBER, "content": {"membership": "leave"}}
    assert _member_state(MEMBER, left) == ("leave", False)
    # bare content (a server without format=event): what the user wrote cannot pose as an event
    spoof = {"membership": "leave", "content": {"membership": "join"}}
    assert _member_state(MEMBER, spoof) == ("leave", True)
    assert _member_state(MEMBER, {"membership": "ban"}) == ("ban", True)
    assert _member_state(MEMBER, {"membership": "leave"}) == ("leave", True)  # sender unknown


# 4 -----------------------------------------------------------------------------------------


async def test_finding_04_a_replayed_ciphertext_is_not_state() -> None:
    outbound, inbound = session_pair()
    crypto = OneSessionCrypto(
        inbound, {ADMIN: {("curve-admin", "sig")}, MOD: {("curve-mod", "sig-mod")}}
    )
    tracker = Tracker(MemoryStore(), crypto, logging.getLogger("test"))
    room_view_events(tracker, {"users": {ADMIN: 100, MOD: 50}})
    secret = encrypted(outbound, "$secret", ADMIN, topic("secret"), "m.room.topic:")
    name = {**topic("x"), "type": "m.room.name"}
    await tracker.ingest(
        ROOM,
        [
            secret,
            encrypted(outbound, "$name", ADMIN, name, "m.room.name:"),
            encrypted(outbound, "$public", ADMIN, topic("public"), "m.room.topic:"),
        ],
        current=True,
    )
    ledger = tracker.ledgers[ROOM]
    assert ledger.facts(outbound.id).safe_index == 1
    replay = {**secret, "event_id": "$replay", "sender": MOD, "origin_server_ts": 99999}
    await tracker.ingest(ROOM, [replay], current=True)
    assert ledger.events["$replay"].status == Status.INVALID
    assert "not made by a device of the sender" in ledger.events["$replay"].reason
    assert ledger.facts(outbound.id).safe_index == 1  # still never exported from 0


async def test_finding_04_a_device_claiming_the_owners_curve_key_is_not_the_owner() -> None:
    # A curve25519 key is public: a moderator can upload a device that claims the admin's,
    # with an ed25519 key of their own. The session's signing key must match too.
    outbound, inbound = session_pair()
    crypto = OneSessionCrypto(
        inbound, {ADMIN: {("curve-admin", "sig")}, MOD: {("curve-admin", "sig-mod")}}
    )
    tracker = Tracker(MemoryStore(), crypto, logging.getLogger("test"))
    room_view_events(tracker, {"users": {ADMIN: 100, MOD: 50}})
    secret = encrypted(outbound, "$secret", ADMIN, topic("secret"), "m.room.topic:")
    await tracker.ingest(ROOM, [secret], current=True)
    replay = {**secret, "event_id": "$replay", "sender": MOD}
    await tracker.ingest(ROOM, [replay], current=True)
    assert tracker.ledgers[ROOM].events["$replay"].status == Status.INVALID


# 9 -----------------------------------------------------------------------------------------


def test_finding_09_an_undecryptable_newer_value_supersedes_the_old_one() -> None:
    ledger = RoomLedger(ROOM)
    ledger.add_state(state("$old", "S1", 0, "m.room.topic", ts=1))
    ledger.add_state(state("$new", "S2", 0, "m.room.topic", ts=2, status=Status.PENDING))
    ledger.set_server_current("m.room.topic:", "$new")
    assert ledger.current_state() == []
    assert ledger.unreadable_current() == ["m.room.topic:"]
    room = RoomFacts(room_id=ROOM, bot_level=50, users_default=0)
    member = Requester(user_id=MEMBER, device_id="D", membership="join")
    assert not isinstance(decide(room, member, ledger.facts("S1"), HeldSession(0)), Share)
    # Once the bot can read it, the new value is current and shareable.
    ledger.update_state(state("$new", "S2", 0, "m.room.topic", ts=2))
    assert [r.event_id for r in ledger.current_state()] == ["$new"]
    assert isinstance(decide(room, member, ledger.facts("S2"), HeldSession(0)), Share)


def test_finding_09_the_servers_word_beats_a_newer_timestamp() -> None:
    ledger = RoomLedger(ROOM)
    ledger.add_state(state("$current", "S1", 0, "m.room.topic", ts=1))
    ledger.add_state(state("$pinned", "S2", 0, "m.room.topic", ts=10**15))  # old, far future
    ledger.set_server_current("m.room.topic:", "$current")
    assert [r.event_id for r in ledger.current_state()] == ["$current"]


# 10 ----------------------------------------------------------------------------------------


class _Courier:
    def __init__(self) -> None:
        self.items: list[OutboxItem] = []

    async def submit(self, items) -> None:
        self.items += list(items)


async def test_finding_10_requests_for_rooms_the_bot_is_not_in_never_queue() -> None:
    courier = _Courier()
    requests = KeyRequests(
        courier,
        store=None,
        gate=RequestGate(100, 10, 100, 10, 0),
        own_user="@bot:x",
        own_device="BOT",
        log=logging.getLogger("test"),
        links=SimpleNamespace(is_joined=lambda room_id: room_id == ROOM),
    )
    body = {"algorithm": protocol.MEGOLM_ALGORITHM, "session_id": "S"}
    events = [
        (
            MEMBER,
            {
                "action": "request",
                "requesting_device_id": "D",
                "request_id": f"r{n}",
                "body": {**body, "room_id": room},
            },
        )
        for n, room in enumerate([ROOM, "!junk1:x", "!junk2:x"])
    ]
    await requests.handle(events)
    assert [i.room_id for i in courier.items] == [ROOM]


def test_finding_10_queued_items_have_an_attempt_cap_and_an_age_limit() -> None:
    import time

    now = int(time.time() * 1000)
    fresh = OutboxItem(room_id=ROOM, user_id=MEMBER, trigger="request", enqueued=now)
    assert not expired(fresh)
    assert expired(fresh.__class__(**{**fresh.__dict__, "attempts": MAX_ATTEMPTS[True]}))
    old = OutboxItem(room_id=ROOM, user_id=MEMBER, trigger="request", enqueued=now - 25 * 86400000)
    assert expired(old)
    push = OutboxItem(room_id=ROOM, user_id=MEMBER, trigger="join", enqueued=now - 3600_000)
    assert not expired(push)
    # a push retried through an hour of trouble in its room (5 min apart at most) is kept
    assert not expired(push.__class__(**{**push.__dict__, "attempts": 20}))


# The policy over every field ----------------------------------------------------------------


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    membership=st.sampled_from(["join", "invite", "leave", "ban", "knock", None]),
    admitted_via=st.sampled_from([None, "!a:x"]),
    invited_by_bot=st.booleans(),
    device_known=st.booleans(),
    blacklisted=st.booleans(),
    cross_signed=st.booleans(),
    identity_changed=st.booleans(),
    removed=st.booleans(),
    bot_level=st.integers(-5, 100),
    users_default=st.integers(-5, 60),
    mode=st.sampled_from(list(Mode)),
    share_with_invited=st.booleans(),
    allow_mixed=st.booleans(),
    visibility=st.sampled_from(["shared", "joined", "invited", "world_readable", None]),
    shared_history=st.booleans(),
)
def test_no_ban_kick_off_policy_or_powerless_bot_ever_yields_a_share(
    membership,
    admitted_via,
    invited_by_bot,
    device_known,
    blacklisted,
    cross_signed,
    identity_changed,
    removed,
    bot_level,
    users_default,
    mode,
    share_with_invited,
    allow_mixed,
    visibility,
    shared_history,
) -> None:
    ledger = RoomLedger(ROOM)
    ledger.add_state(state("$name", "S", 0))
    room = RoomFacts(
        room_id=ROOM,
        bot_level=bot_level,
        users_default=users_default,
        history_visibility=visibility,
        policy=RoomPolicy(
            mode=mode,
            share_with_invited=share_with_invited,
            allow_mixed_shared_history=allow_mixed,
        ),
    )
    who = Requester(
        user_id=MEMBER,
        device_id="D",
        membership=membership,
        admitted_via=admitted_via,
        invited_by_bot=invited_by_bot,
        device_known=device_known,
        blacklisted=blacklisted,
        cross_signed=cross_signed,
        identity_changed=identity_changed,
        removed=removed,
    )
    decision = decide(room, who, ledger.facts("S"), HeldSession(0, shared_history))
    if isinstance(decision, Share):
        assert bot_level > users_default
        assert mode != Mode.OFF
        assert membership != "ban" and not removed
        assert device_known and not blacklisted
        assert mode != Mode.CROSS_SIGNED or cross_signed
        assert (
            membership == "join"
            or admitted_via
            or (membership == "invite" and (share_with_invited or invited_by_bot))
        )


def test_tracker_runs_without_an_event_loop_helper() -> None:
    # the helpers above use asyncio through pytest-asyncio; keep the module importable alone
    assert asyncio.iscoroutinefunction(Tracker.ingest)


# Trust threshold -----------------------------------------------------------------------------


async def test_cross_signed_means_trusted_on_first_use_and_a_changed_identity_is_named() -> None:
    from types import SimpleNamespace

    from mautrix.types import TrustState

    from encstate_bot.policy import IDENTITY_CHANGED, Withhold

    async def resolve(trust):
        return trust

    client = SimpleNamespace(crypto=SimpleNamespace(resolve_trust=None))
    identity = Identity(client, logging.getLogger("test"))
    device = SimpleNamespace(user_id=MEMBER, device_id="D")
    expected = {
        TrustState.UNVERIFIED: (False, False),
        TrustState.CROSS_SIGNED_UNTRUSTED: (False, True),  # a swapped-in identity
        TrustState.CROSS_SIGNED_TOFU: (True, False),
        TrustState.VERIFIED: (True, False),
    }
    for trust, result in expected.items():
        client.crypto.resolve_trust = lambda d, t=trust: resolve(t)
        assert await identity.trust(device) == result, trust
    room = RoomFacts(
        room_id=ROOM, bot_level=50, users_default=0, policy=RoomPolicy(mode=Mode.CROSS_SIGNED)
    )
    who = Requester(user_id=MEMBER, device_id="D", membership="join", identity_changed=True)
    ledger = RoomLedger(ROOM)
    ledger.add_state(state("$name", "S", 0))
    decision = decide(room, who, ledger.facts("S"), HeldSession(0))
    assert isinstance(decision, Withhold) and IDENTITY_CHANGED in decision.reason
