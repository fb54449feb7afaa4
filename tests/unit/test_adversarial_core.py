"""Property tests over the pure core with untrusted input: whatever the ledger holds, the policy
never shares what it must not; room state with odd values never breaks the bot."""

from __future__ import annotations

import asyncio
import json
import logging

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mautrix.crypto.sessions import InboundGroupSession
import olm

from encstate_bot import protocol
from encstate_bot.ledger import MessageRecord, MessageStatus, RoomLedger, SessionKind, Status
from encstate_bot.policy import HeldSession, Mode, Requester, RoomFacts, Share, decide
from encstate_bot.room_policy import RoomPolicy
from encstate_bot.rooms import RoomView
from encstate_bot.tracker import SessionSource, Tracker

from .helpers import ROOM, OneSessionCrypto, state

SESSIONS = ["S0", "S1", "S2"]
TYPES = ["m.room.name", "m.room.topic", "m.room.avatar", "org.example.thing"]

state_events = st.lists(
    st.tuples(
        st.sampled_from(SESSIONS),
        st.integers(0, 6),  # index
        st.sampled_from(TYPES),
        st.integers(0, 5),  # timestamp
        st.sampled_from(["valid", "invalid", "message-payload", "pending"]),
    ),
    max_size=12,
)
messages = st.lists(
    st.tuples(
        st.sampled_from(SESSIONS),
        st.integers(0, 6),
        st.sampled_from(list(MessageStatus)),
    ),
    max_size=8,
)


def build(events, msgs) -> RoomLedger:
    ledger = RoomLedger(ROOM)
    for n, (session, index, event_type, ts, kind) in enumerate(events):
        if kind == "valid":
            rec = state(f"$s{n:02d}", session, index, event_type, ts=ts)
        elif kind == "pending":
            rec = state(f"$s{n:02d}", session, index, event_type, ts=ts, status=Status.PENDING)
        else:
            rec = state(
                f"$s{n:02d}",
                session,
                index,
                event_type,
                ts=ts,
                status=Status.INVALID,
                message_payload=kind == "message-payload",
            )
        ledger.add_state(rec)
    for n, (session, index, status) in enumerate(msgs):
        ledger.add_message(MessageRecord(ROOM, f"$m{n:02d}", session, index, None, status))
    return ledger


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=state_events,
    msgs=messages,
    first_known=st.integers(0, 3),
    shared_history=st.booleans(),
    allow_mixed=st.booleans(),
    visibility=st.sampled_from(["shared", "joined", "invited", "world_readable", None]),
    membership=st.sampled_from(["join", "invite", "leave", "ban", None]),
    level=st.integers(-5, 100),
)
def test_the_policy_never_shares_what_it_must_not(
    events, msgs, first_known, shared_history, allow_mixed, visibility, membership, level
) -> None:
    ledger = build(events, msgs)
    room = RoomFacts(
        room_id=ROOM,
        bot_level=level,
        users_default=0,
        history_visibility=visibility,
        policy=RoomPolicy(allow_mixed_shared_history=allow_mixed),
    )
    who = Requester(user_id="@x:x", device_id="D", membership=membership)
    held = HeldSession(first_known_index=first_known, shared_history=shared_history)
    for session_id in SESSIONS:
        facts = ledger.facts(session_id)
        decision = decide(room, who, facts, held)
        if not isinstance(decision, Share):
            continue
        assert level > 0, "shared without power"
        assert membership == "join", "shared with a non-member"
        assert facts.safe_index is not None, "shared a session without current state"
        # never below the safe index, never below what the bot holds, and exactly there
        assert decision.index == max(facts.safe_index, first_known)
        if facts.message_indices:
            assert allow_mixed and shared_history and visibility in ("shared", "world_readable")
        else:
            assert facts.kind == SessionKind.STATE
        # every index from the export on is accounted for by something that decrypted
        assert not facts.gaps
        current_indices = {r.msg_index for r in facts.current}
        readable = {
            r.event_id
            for r in facts.superseded
            if r.msg_index is not None
            and r.msg_index >= decision.index
            and r.msg_index not in current_indices
        }
        assert set(decision.exposed) == readable


def test_a_policy_of_off_or_cross_signed_holds() -> None:
    ledger = build([("S0", 0, "m.room.name", 1, "valid")], [])
    member = Requester(user_id="@x:x", device_id="D", membership="join")
    for mode in (Mode.OFF, Mode.CROSS_SIGNED):
        room = RoomFacts(room_id=ROOM, bot_level=50, users_default=0, policy=RoomPolicy(mode=mode))
        assert not isinstance(decide(room, member, ledger.facts("S0"), HeldSession(0)), Share)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)


@settings(max_examples=300)
@given(
    power_levels=st.dictionaries(
        st.sampled_from(["users", "users_default", "events", "state_default", "ban"]),
        json_values,
    ),
    create=json_values,
)
def test_odd_power_levels_and_create_events_never_break_the_view(power_levels, create) -> None:
    view = RoomView(ROOM)
    view.apply({"type": "m.room.create", "state_key": "", "sender": "@c:x", "content": create})
    view.apply({"type": "m.room.power_levels", "state_key": "", "content": power_levels})
    for user in ("@c:x", "@bot:x"):
        assert isinstance(view.user_level(user), int)
        assert isinstance(view.empowered(user), bool)
    assert isinstance(view.state_level("m.room.name"), int)
    assert isinstance(view.users_default, int)
    view.empowered_users()


@settings(max_examples=200)
@given(content=json_values)
def test_encryption_events_with_odd_flags(content) -> None:
    view = RoomView(ROOM)
    view.apply({"type": "m.room.encryption", "state_key": "", "content": content})
    flag = view.state_flag
    if flag is not None:
        assert content.get(flag) is True and content.get("algorithm") == protocol.MEGOLM_ALGORITHM


payloads = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["m.room.name", "m.room.member", "m.space.child", "", 3]),
        "state_key": st.sampled_from(["", "@a:x", None, 5]),
        "content": st.sampled_from([{"name": "x"}, "text", None, []]),
        "room_id": st.sampled_from([ROOM, "!other:x", None]),
    },
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=payloads,
    outer=st.sampled_from(["m.room.name:", "m.room.name:@a:x", "m.room.member:", "junk", ""]),
    garbage=st.booleans(),
)
def test_encrypted_state_is_valid_only_when_every_check_passes(payload, outer, garbage) -> None:
    outbound = olm.OutboundGroupSession()
    inbound = InboundGroupSession(outbound.session_key, "sig", "curve", ROOM)
    ciphertext = outbound.encrypt(json.dumps(payload))
    if garbage:
        ciphertext = ciphertext[:-8] + "AAAAAAAA"
    tracker = Tracker(store=None, crypto=OneSessionCrypto(inbound), log=logging.getLogger("test"))
    tracker.view(ROOM).apply(
        {
            "type": "m.room.power_levels",
            "state_key": "",
            "content": {"users": {"@admin:example.org": 100}},
        }
    )
    rec = state("$e", outbound.id, 0, status=Status.PENDING)
    rec = rec.__class__(**{**rec.__dict__, "outer_key": outer, "ciphertext": ciphertext})
    settled = asyncio.run(tracker._settle_state(SessionSource(tracker.crypto), rec))
    expected = (
        not garbage
        and isinstance(payload.get("state_key"), str)
        and payload.get("type") == "m.room.name"
        and payload.get("room_id") == ROOM
        and isinstance(payload.get("content"), dict)
        and outer == f"m.room.name:{payload['state_key']}"
    )
    assert (settled.status == Status.VALID) == expected, (payload, outer, settled.reason)
    if settled.status == Status.INVALID:
        assert settled.reason


@settings(max_examples=300)
@given(data=st.binary(max_size=64))
def test_message_index_of_random_ciphertexts(data) -> None:
    import base64

    result = protocol.message_index(base64.b64encode(data).decode())
    assert result is None or 0 <= result < 2**32
