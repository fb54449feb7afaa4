from __future__ import annotations

from attr import evolve

from encstate_bot import protocol
from encstate_bot.ledger import RoomLedger
from encstate_bot.policy import (
    HeldSession,
    Ignore,
    Mode,
    Requester,
    RoomFacts,
    SealFacts,
    Share,
    Withhold,
    decide,
    decide_seal,
)
from encstate_bot.room_policy import RoomPolicy

from .helpers import ROOM, message, state

EMPOWERED = RoomFacts(room_id=ROOM, bot_level=50, users_default=0)
MEMBER = Requester(user_id="@new:x", device_id="D", membership="join")
HELD = HeldSession(first_known_index=0)


def facts_for(*records, session: str = "S"):
    ledger = RoomLedger(ROOM)
    for rec in records:
        (ledger.add_state if hasattr(rec, "outer_key") else ledger.add_message)(rec)
    return ledger.facts(session)


STATE_ONLY = facts_for(state("$name", "S", 0))


def test_shares_a_state_only_session_from_the_safe_index() -> None:
    facts = facts_for(
        state("$old", "S", 0, "m.room.topic", ts=1),
        state("$name", "S", 1, ts=2),
        state("$new", "S", 2, "m.room.topic", ts=3),
    )
    decision = decide(EMPOWERED, MEMBER, facts, HELD)
    assert isinstance(decision, Share) and decision.index == 1 and decision.exposed == ()


def test_reports_exposure_it_cannot_avoid() -> None:
    facts = facts_for(
        state("$name", "S", 0, ts=1),
        state("$old", "S", 1, "m.room.topic", ts=2),
        state("$new", "S", 2, "m.room.topic", ts=3),
    )
    decision = decide(EMPOWERED, MEMBER, facts, HELD)
    assert isinstance(decision, Share) and decision.index == 0
    assert decision.exposed == ("$old",)


def test_not_empowered_is_silent() -> None:
    room = RoomFacts(room_id=ROOM, bot_level=0, users_default=0)
    assert isinstance(decide(room, MEMBER, STATE_ONLY, HELD), Ignore)


def test_policy_off_is_silent() -> None:
    room = RoomFacts(room_id=ROOM, bot_level=50, users_default=0, policy=RoomPolicy(mode=Mode.OFF))
    assert isinstance(decide(room, MEMBER, STATE_ONLY, HELD), Ignore)


def test_non_members_are_unauthorised() -> None:
    for membership in (None, "leave", "ban", "knock", "invite"):
        who = Requester(user_id="@x:x", device_id="D", membership=membership)
        decision = decide(EMPOWERED, who, STATE_ONLY, HELD)
        assert isinstance(decision, Withhold) and decision.code == protocol.UNAUTHORISED


def test_invitees_get_seals_and_never_anyone_elses_session() -> None:
    room = RoomFacts(room_id=ROOM, bot_level=50, users_default=0)
    who = Requester(user_id="@x:x", device_id="D", membership="invite")
    name = SealFacts("m.room.name", preview=True, live=True)
    custom = SealFacts("org.example.rules", preview=False, live=True)
    assert isinstance(decide_seal(room, who, name), Share)
    assert decide_seal(room, who, custom).code == protocol.UNAUTHORISED
    assert decide(room, who, STATE_ONLY, HELD).code == protocol.UNAUTHORISED
    # invitees as members, or invited by the bot: every seal, still nobody else's session
    for room_, who_ in (
        (evolve(room, policy=RoomPolicy(share_with_invited=True)), who),
        (room, evolve(who, invited_by_bot=True)),
    ):
        assert isinstance(decide_seal(room_, who_, custom), Share)
        assert decide(room_, who_, STATE_ONLY, HELD).code == protocol.UNAUTHORISED
    # admitted through an allowed room: the preview seals only
    admitted = Requester(user_id="@x:x", device_id="D", membership=None, admitted_via="!a:x")
    assert isinstance(decide_seal(room, admitted, name), Share)
    assert decide_seal(room, admitted, custom).code == protocol.UNAUTHORISED
    assert decide(room, admitted, STATE_ONLY, HELD).code == protocol.UNAUTHORISED
    # a seal whose value was superseded opens nothing current
    gone = SealFacts("m.room.name", preview=True, live=False)
    assert decide_seal(room, MEMBER, gone).code == protocol.UNAUTHORISED
    assert decide_seal(room, MEMBER, custom) == Share(
        0, "seal of org.example.rules, the current value"
    )


def test_devices() -> None:
    unknown = Requester(user_id="@x:x", device_id="D", membership="join", device_known=False)
    assert isinstance(decide(EMPOWERED, unknown, STATE_ONLY, HELD), Ignore)
    black = Requester(user_id="@x:x", device_id="D", membership="join", blacklisted=True)
    assert decide(EMPOWERED, black, STATE_ONLY, HELD).code == protocol.BLACKLISTED
    room = RoomFacts(
        room_id=ROOM, bot_level=50, users_default=0, policy=RoomPolicy(mode=Mode.CROSS_SIGNED)
    )
    assert decide(room, MEMBER, STATE_ONLY, HELD).code == protocol.UNVERIFIED
    signed = Requester(user_id="@x:x", device_id="D", membership="join", cross_signed=True)
    assert isinstance(decide(room, signed, STATE_ONLY, HELD), Share)


def test_sessions_the_bot_cannot_vouch_for() -> None:
    unknown = facts_for(session="nothing")
    assert decide(EMPOWERED, MEMBER, unknown, HELD).code == protocol.UNAVAILABLE
    messages = facts_for(message("$m", "S", 0))
    assert decide(EMPOWERED, MEMBER, messages, HELD).code == protocol.UNAUTHORISED
    assert decide(EMPOWERED, MEMBER, STATE_ONLY, None).code == protocol.UNAVAILABLE
    gappy = facts_for(state("$a", "S", 0), state("$b", "S", 2, "m.room.topic"))
    decision = decide(EMPOWERED, MEMBER, gappy, HELD)
    assert decision.code == protocol.UNAUTHORISED and "never seen" in decision.reason


def test_mixed_sessions_need_shared_history_and_visibility() -> None:
    mixed = facts_for(state("$name", "S", 0), message("$m", "S", 1))
    assert decide(EMPOWERED, MEMBER, mixed, HELD).code == protocol.UNAUTHORISED
    flagged = HeldSession(first_known_index=0, shared_history=True)
    assert decide(EMPOWERED, MEMBER, mixed, flagged).code == protocol.UNAUTHORISED
    allowed = RoomFacts(
        room_id=ROOM,
        bot_level=50,
        users_default=0,
        policy=RoomPolicy(allow_mixed_shared_history=True),
        history_visibility="shared",
    )
    assert decide(allowed, MEMBER, mixed, HELD).code == protocol.UNAUTHORISED
    assert isinstance(decide(allowed, MEMBER, mixed, flagged), Share)
    joined_only = RoomFacts(
        room_id=ROOM,
        bot_level=50,
        users_default=0,
        policy=RoomPolicy(allow_mixed_shared_history=True),
        history_visibility="joined",
    )
    assert decide(joined_only, MEMBER, mixed, flagged).code == protocol.UNAUTHORISED


def test_only_superseded_state_is_not_shared() -> None:
    ledger = RoomLedger(ROOM)
    ledger.add_state(state("$old", "S", 0, ts=1))
    ledger.add_state(state("$new", "T", 0, ts=2))
    assert decide(EMPOWERED, MEMBER, ledger.facts("S"), HELD).code == protocol.UNAUTHORISED


def test_never_exports_below_what_the_bot_holds() -> None:
    decision = decide(EMPOWERED, MEMBER, STATE_ONLY, HeldSession(first_known_index=3))
    assert isinstance(decision, Share) and decision.index == 3
