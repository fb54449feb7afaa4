"""The planner: one decision per (device, session) for a batch of queued items.

The unit tests pin each batch rule (dedupe, dry run, never the bot's own account, which devices
and sessions an item stands for, what someone not joined hears unasked, ``approve`` and
``bundle``); the property tests check, over random rooms, users, devices, sessions, items and
past deliveries, that the planner adds no sharing the policy would refuse and that every
decision is the policy's own for that requester.
"""

from __future__ import annotations

from attr import evolve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import pytest

from encstate_bot import protocol
from encstate_bot.ledger import RoomLedger, SessionFacts, SessionKind, Status
from encstate_bot.planner import (
    Approval,
    DeviceFacts,
    Planned,
    RoomBatch,
    SessionInfo,
    UserFacts,
    approve,
    bundle,
    plan,
)
from encstate_bot.policy import (
    ALL,
    PREVIEW,
    Decision,
    HeldSession,
    Ignore,
    Mode,
    Requester,
    RoomFacts,
    SealFacts,
    Share,
    Withhold,
    admit_device,
    decide,
    decide_seal,
)
from encstate_bot.room_policy import RoomPolicy
from encstate_bot.store import OutboxItem
from encstate_bot.triggers import UNASKED, Trigger

from .helpers import ROOM, message, state

# A room the bot may act in, the policy's defaults.
EMPOWERED = RoomFacts(room_id=ROOM, bot_level=50, users_default=0)

BOT = "@bot:x"
ALICE = "@alice:x"  # joined, two devices and a deleted one
INVITEE = "@invitee:x"
LINKED = "@linked:x"  # never a member, admitted through a room the join rule allows
LEFT = "@left:x"
BANNED = "@banned:x"
KICKED = "@kicked:x"  # kicked by someone else, still a member of an admitting room
STRANGER = "@stranger:x"  # not in the batch at all

USERS = {
    BOT: UserFacts("join", devices=(DeviceFacts("BOTDEV"), DeviceFacts("OTHER"))),
    ALICE: UserFacts(
        "join",
        devices=(DeviceFacts("A1"), DeviceFacts("A2"), DeviceFacts("A_OLD", deleted=True)),
    ),
    INVITEE: UserFacts("invite", devices=(DeviceFacts("I1"),)),
    LINKED: UserFacts(None, admitted_via="!other:x", devices=(DeviceFacts("L1"),)),
    LEFT: UserFacts("leave", devices=(DeviceFacts("X1"),)),
    BANNED: UserFacts("ban", devices=(DeviceFacts("B1"),)),
    KICKED: UserFacts(
        "leave", removed=True, admitted_via="!other:x", devices=(DeviceFacts("K1"),)
    ),
}

# The bot's seals: a live preview one, a live one that is not a preview, a superseded one.
NAME = SealFacts("m.room.name", preview=True, live=True)
RULES = SealFacts("org.example.rules", preview=False, live=True)
STALE = SealFacts("m.room.topic", preview=True, live=False)


def _ledger() -> RoomLedger:
    ledger = RoomLedger(ROOM)
    ledger.add_state(state("$name", "STATE", 0))  # state only, safe from index 0
    ledger.add_state(state("$topic", "LATE", 2, "m.room.topic"))  # state only, from index 2
    ledger.add_message(message("$m", "MSGS", 0))  # messages only
    ledger.add_state(state("$p", "PENDING", 0, "m.room.avatar", status=Status.PENDING))
    return ledger


LEDGER = _ledger()
SESSIONS = {
    "NAME": SessionInfo("NAME", seal=NAME),
    "RULES": SessionInfo("RULES", seal=RULES),
    "STALE": SessionInfo("STALE", seal=STALE),
    "STATE": SessionInfo("STATE", facts=LEDGER.facts("STATE"), held=HeldSession(0)),
    "LATE": SessionInfo("LATE", facts=LEDGER.facts("LATE"), held=HeldSession(0)),
    "MSGS": SessionInfo("MSGS", facts=LEDGER.facts("MSGS"), held=HeldSession(0)),
    "PENDING": SessionInfo("PENDING", facts=LEDGER.facts("PENDING")),
}
# What an item naming no session stands for: the live seals, then the state sessions.
SHAREABLE = ("NAME", "RULES", "STATE", "LATE")
SEAL_IDS = ("NAME", "RULES", "STALE")


def make_batch(
    room: RoomFacts = EMPOWERED,
    users: dict[str, UserFacts] | None = None,
    sessions: dict[str, SessionInfo] | None = None,
    shareable: tuple[str, ...] = SHAREABLE,
) -> RoomBatch:
    return RoomBatch(
        room,
        USERS if users is None else users,
        SESSIONS if sessions is None else sessions,
        shareable,
    )


BATCH = make_batch()


def item(
    user_id: str, trigger: str, device_id: str | None = None, session_id: str | None = None
) -> OutboxItem:
    return OutboxItem(
        room_id=ROOM, user_id=user_id, trigger=trigger, device_id=device_id, session_id=session_id
    )


def by_key(planned: list[Planned]) -> dict[tuple[str, str, str], Decision]:
    """The decisions by (user, device, session); fails on a key decided twice."""
    keys = [(p.item.user_id, p.device_id, p.session_id) for p in planned]
    assert len(keys) == len(set(keys)), f"decided twice: {keys}"
    return {(p.item.user_id, p.device_id, p.session_id): p.decision for p in planned}


def pairs(planned: list[Planned]) -> list[tuple[str, str]]:
    return [(p.device_id, p.session_id) for p in planned]


def shares(planned: list[Planned]) -> dict[tuple[str, str, str], int]:
    return {
        (p.item.user_id, p.device_id, p.session_id): p.decision.index
        for p in planned
        if isinstance(p.decision, Share)
    }


# Dedupe ---------------------------------------------------------------------------------------


def test_one_decision_per_device_and_session_however_many_items_name_it() -> None:
    items = [
        item(ALICE, Trigger.JOIN),
        item(ALICE, Trigger.REQUEST, "A1", "STATE"),
        item(ALICE, Trigger.COMMAND, session_id="STATE"),
        item(ALICE, Trigger.SEAL, "A2", "NAME"),
        item(ALICE, Trigger.JOIN),
    ]
    planned = plan(BOT, BATCH, items, set())
    decided = by_key(planned)  # fails on a duplicate
    assert set(decided) == {(ALICE, d, s) for d in ("A1", "A2") for s in SHAREABLE}
    # in item order: the first item that stands for a (device, session) decides it
    assert all(p.item is items[0] for p in planned)
    assert shares(planned) == {
        (ALICE, d, s): {"LATE": 2}.get(s, 0) for d in ("A1", "A2") for s in SHAREABLE
    }


def test_the_same_item_twice_is_decided_once() -> None:
    ask = item(ALICE, Trigger.REQUEST, "A1", "STATE")
    planned = plan(BOT, BATCH, [ask, ask, evolve(ask)], set())
    assert pairs(planned) == [("A1", "STATE")] and planned[0].item is ask


def test_dedupe_is_per_user_device_and_session() -> None:
    # the same device id for two users, two sessions for one device: all distinct keys
    users = {
        ALICE: UserFacts("join", devices=(DeviceFacts("D"),)),
        "@bob:x": UserFacts("join", devices=(DeviceFacts("D"),)),
    }
    items = [
        item(ALICE, Trigger.REQUEST, "D", "STATE"),
        item("@bob:x", Trigger.REQUEST, "D", "STATE"),
        item(ALICE, Trigger.REQUEST, "D", "LATE"),
    ]
    planned = plan(BOT, make_batch(users=users), items, set())
    assert set(by_key(planned)) == {
        (ALICE, "D", "STATE"),
        ("@bob:x", "D", "STATE"),
        (ALICE, "D", "LATE"),
    }


@pytest.mark.parametrize("trigger", sorted(UNASKED))
def test_an_unasked_push_never_repeats_a_delivered_key(trigger: Trigger) -> None:
    delivered = {(ALICE, "A1", "STATE", 0), (ALICE, "A1", "NAME", 0), (ALICE, "A2", "LATE", 2)}
    planned = plan(BOT, BATCH, [item(ALICE, trigger)], delivered)
    decided = by_key(planned)
    for user, device, session, _ in delivered:
        assert (user, device, session) not in decided, (trigger, device, session)
    # everything else is still pushed: the other device, the other sessions
    assert set(decided) == {(ALICE, d, s) for d in ("A1", "A2") for s in SHAREABLE} - {
        (u, d, s) for u, d, s, _ in delivered
    }
    assert all(isinstance(d, Share) for d in decided.values())


def test_a_delivery_from_another_index_or_to_another_key_does_not_count() -> None:
    delivered = {
        (ALICE, "A1", "LATE", 0),  # the push would be from index 2
        (ALICE, "A2", "STATE", 1),  # the push would be from index 0
        (ALICE, "A_OLD", "STATE", 0),  # another device
        (INVITEE, "A1", "STATE", 0),  # another user
        (ALICE, "A1", "MSGS", 0),  # another session
    }
    planned = plan(BOT, BATCH, [item(ALICE, Trigger.JOIN)], delivered)
    assert shares(planned) == {
        (ALICE, d, s): {"LATE": 2}.get(s, 0) for d in ("A1", "A2") for s in SHAREABLE
    }


def test_a_delivered_key_is_not_dropped_when_the_decision_is_not_a_share() -> None:
    # only a repeated *share* is dropped: a withhold for a delivered key still stands
    delivered = {(ALICE, "A1", "STALE", 0), (ALICE, "A1", "MSGS", 0)}
    items = [item(ALICE, Trigger.SEAL, "A1", "STALE"), item(ALICE, Trigger.JOIN, "A1", "MSGS")]
    decided = by_key(plan(BOT, BATCH, items, delivered))
    assert decided[(ALICE, "A1", "STALE")].code == protocol.UNAUTHORISED
    assert decided[(ALICE, "A1", "MSGS")].code == protocol.UNAUTHORISED


@pytest.mark.parametrize("trigger", [Trigger.REQUEST, Trigger.COMMAND, "request", "command"])
def test_asked_items_are_answered_even_when_delivered(trigger: str) -> None:
    delivered = {(ALICE, "A1", "STATE", 0), (ALICE, "A1", "NAME", 0), (ALICE, "A2", "LATE", 2)}
    planned = plan(BOT, BATCH, [item(ALICE, trigger)], delivered)
    assert shares(planned) == {
        (ALICE, d, s): {"LATE": 2}.get(s, 0) for d in ("A1", "A2") for s in SHAREABLE
    }
    one = plan(BOT, BATCH, [item(ALICE, trigger, "A1", "STATE")], delivered)
    assert shares(one) == {(ALICE, "A1", "STATE"): 0}


def test_delivered_triggers_come_as_stored_strings_too() -> None:
    # items read back from the database carry the trigger as a plain string
    delivered = {(ALICE, "A1", "STATE", 0)}
    for value in ("join", "seal", "bot-invite"):
        decided = by_key(plan(BOT, BATCH, [item(ALICE, value, "A1", "STATE")], delivered))
        assert decided == {}, value


@pytest.mark.parametrize(
    "first, delivered, expected",
    [
        # a join push repeating a delivered key is dropped; the request after it is answered
        (item(ALICE, Trigger.JOIN), {(ALICE, "A1", "STATE", 0)}, Share),
        # an invite push says nothing about other sessions; the invitee's request after it
        # still gets its m.unauthorised answer
        (item(INVITEE, Trigger.INVITE), set(), Withhold),
    ],
    ids=["delivered-share", "invitee-refusal"],
)
def test_an_asked_item_is_answered_after_an_unasked_one_for_the_same_key(
    first: OutboxItem, delivered: set, expected: type
) -> None:
    device = USERS[first.user_id].devices[0].device_id
    ask = item(first.user_id, Trigger.REQUEST, device, "STATE")
    for order in ([ask, first], [first, ask]):  # the order of a batch never silences it
        planned = plan(BOT, BATCH, order, delivered)
        decided = [p for p in planned if (p.device_id, p.session_id) == (device, "STATE")]
        assert len(decided) == 1 and decided[0].item is ask
        assert isinstance(decided[0].decision, expected)


def test_an_unasked_item_skipped_for_a_key_leaves_it_to_a_later_one() -> None:
    # an invite push tells the invitee of the preview seal only; a bot-invite push after it
    # reaches every seal, so the non-preview one is decided by that later item
    items = [item(INVITEE, Trigger.INVITE), item(INVITEE, Trigger.BOT_INVITE)]
    planned = plan(BOT, BATCH, items, set())
    assert [(p.session_id, p.item.trigger) for p in planned] == [
        ("NAME", Trigger.INVITE),
        ("RULES", Trigger.BOT_INVITE),
    ]
    assert all(isinstance(p.decision, Share) for p in planned)


def test_a_refusal_is_the_answer_to_a_request_for_the_same_key() -> None:
    room = evolve(EMPOWERED, policy=RoomPolicy(mode=Mode.CROSS_SIGNED))  # A1 is not signed
    ask = item(ALICE, Trigger.REQUEST, "A1", "STATE")
    planned = plan(BOT, make_batch(room), [item(ALICE, Trigger.JOIN), ask], set())
    decided = [p for p in planned if (p.device_id, p.session_id) == ("A1", "STATE")]
    assert len(decided) == 1 and decided[0].decision.code == protocol.UNVERIFIED
    assert decided[0].item.trigger == Trigger.REQUEST


# Dry run --------------------------------------------------------------------------------------

EVERYONE = [
    item(ALICE, Trigger.JOIN),
    item(ALICE, Trigger.REQUEST, "A1", "STALE"),
    item(ALICE, Trigger.REQUEST, "A2", "MSGS"),
    item(ALICE, Trigger.REQUEST, "A2", "UNSEEN"),
    item(ALICE, Trigger.REQUEST, "NEW", "STATE"),
    item(INVITEE, Trigger.INVITE),
    item(INVITEE, Trigger.REQUEST, "I1", "STATE"),
    item(LINKED, Trigger.LINK),
    item(BANNED, Trigger.REQUEST),
]


def dry_variants() -> list[tuple[RoomBatch, bool]]:
    return [
        (BATCH, True),
        (make_batch(room=evolve(EMPOWERED, policy=RoomPolicy(dry_run=True))), False),
        (make_batch(room=evolve(EMPOWERED, policy=RoomPolicy(dry_run=True))), True),
    ]


@pytest.mark.parametrize("batch, dry_run", dry_variants(), ids=["argument", "policy", "both"])
def test_a_dry_run_turns_every_share_into_an_ignore(batch: RoomBatch, dry_run: bool) -> None:
    live = plan(BOT, BATCH, EVERYONE, set())
    dry = plan(BOT, batch, EVERYONE, set(), dry_run=dry_run)
    assert any(isinstance(p.decision, Share) for p in live)
    assert any(isinstance(p.decision, Withhold) for p in live)
    assert not any(isinstance(p.decision, Share) for p in dry)
    # the same (device, session)s, in the same order, for the same items
    assert [(p.item, p.device_id, p.session_id) for p in dry] == [
        (p.item, p.device_id, p.session_id) for p in live
    ]
    for was, now in zip(live, dry, strict=True):
        if isinstance(was.decision, Share):
            assert isinstance(now.decision, Ignore)
            prefix = f"dry run: would share from index {was.decision.index}"
            assert now.decision.reason.startswith(prefix), now.decision.reason
            assert was.decision.reason in now.decision.reason
        else:
            assert now.decision == was.decision  # withholds and ignores stay as they are
    late = by_key(dry)[(ALICE, "A1", "LATE")]
    assert late.reason.startswith("dry run: would share from index 2 (")


def test_a_dry_run_still_skips_what_it_would_not_push() -> None:
    delivered = {(ALICE, "A1", "STATE", 0)}
    decided = by_key(plan(BOT, BATCH, [item(ALICE, Trigger.JOIN)], delivered, dry_run=True))
    assert (ALICE, "A1", "STATE") not in decided and (ALICE, "A2", "STATE") in decided


# The bot's own account ------------------------------------------------------------------------


@pytest.mark.parametrize("trigger", list(Trigger))
def test_nothing_for_the_bots_own_account(trigger: Trigger) -> None:
    own = [
        item(BOT, trigger),
        item(BOT, trigger, "BOTDEV"),
        item(BOT, trigger, "OTHER", "STATE"),
        item(BOT, trigger, session_id="NAME"),
        item(BOT, trigger, "UNKNOWN", "UNSEEN"),
    ]
    assert plan(BOT, BATCH, own, set()) == []
    assert plan(BOT, BATCH, own, set(), dry_run=True) == []
    # mixed with someone else's items, only theirs are decided
    planned = plan(BOT, BATCH, [*own, item(ALICE, trigger, "A1", "STATE"), *own], set())
    assert pairs(planned) == [("A1", "STATE")]


def test_own_user_is_whoever_the_bot_is() -> None:
    planned = plan(ALICE, BATCH, [item(ALICE, Trigger.REQUEST), item(BOT, Trigger.REQUEST)], set())
    assert {p.item.user_id for p in planned} == {BOT}


# Devices --------------------------------------------------------------------------------------


def test_an_item_naming_a_device_stands_for_that_device_only() -> None:
    planned = plan(BOT, BATCH, [item(ALICE, Trigger.REQUEST, "A2")], set())
    assert pairs(planned) == [("A2", s) for s in SHAREABLE]


def test_a_device_unknown_to_the_homeserver_is_ignored() -> None:
    planned = plan(BOT, BATCH, [item(ALICE, Trigger.REQUEST, "GHOST", "STATE")], set())
    assert pairs(planned) == [("GHOST", "STATE")]
    decision = planned[0].decision
    assert isinstance(decision, Ignore) and "unknown to the homeserver" in decision.reason
    # the membership is checked first: a stranger's unknown device is simply not a member
    planned = plan(BOT, BATCH, [item(STRANGER, Trigger.REQUEST, "GHOST", "STATE")], set())
    assert planned[0].decision.code == protocol.UNAUTHORISED


def test_an_item_naming_no_device_stands_for_every_device_not_deleted() -> None:
    planned = plan(BOT, BATCH, [item(ALICE, Trigger.REQUEST, session_id="STATE")], set())
    assert pairs(planned) == [("A1", "STATE"), ("A2", "STATE")]
    for trigger in Trigger:
        planned = plan(BOT, BATCH, [item(ALICE, trigger)], set())
        assert "A_OLD" not in {p.device_id for p in planned}, trigger


def test_an_item_naming_a_deleted_device_stands_for_it() -> None:
    # only implicit targeting leaves deleted devices out; a named one is the policy's to judge
    planned = plan(BOT, BATCH, [item(ALICE, Trigger.REQUEST, "A_OLD", "STATE")], set())
    assert pairs(planned) == [("A_OLD", "STATE")]


def test_a_user_without_devices_or_unknown_gets_nothing_implicitly() -> None:
    users = {**USERS, "@gone:x": UserFacts("join", devices=(DeviceFacts("G", deleted=True),))}
    items = [item("@gone:x", Trigger.REQUEST), item(STRANGER, Trigger.REQUEST)]
    assert plan(BOT, make_batch(users=users), items, set()) == []


def test_device_flags_reach_the_policy() -> None:
    users = {
        ALICE: UserFacts(
            "join",
            devices=(
                DeviceFacts("BLACK", blacklisted=True),
                DeviceFacts("SIGNED", cross_signed=True),
                DeviceFacts("PLAIN"),
                DeviceFacts("CHANGED", identity_changed=True),
            ),
        )
    }
    room = evolve(EMPOWERED, policy=RoomPolicy(mode=Mode.CROSS_SIGNED))
    decided = by_key(
        plan(BOT, make_batch(room, users), [item(ALICE, Trigger.REQUEST, None, "STATE")], set())
    )
    assert decided[(ALICE, "BLACK", "STATE")].code == protocol.BLACKLISTED
    assert isinstance(decided[(ALICE, "SIGNED", "STATE")], Share)
    assert decided[(ALICE, "PLAIN", "STATE")].code == protocol.UNVERIFIED
    assert "identity changed" in decided[(ALICE, "CHANGED", "STATE")].reason


# Sessions -------------------------------------------------------------------------------------


def test_an_item_naming_a_session_stands_for_that_session_only() -> None:
    planned = plan(BOT, BATCH, [item(ALICE, Trigger.REQUEST, session_id="LATE")], set())
    assert pairs(planned) == [("A1", "LATE"), ("A2", "LATE")]
    assert {p.decision.index for p in planned} == {2}


def test_a_session_not_in_the_batch_is_unknown() -> None:
    planned = plan(BOT, BATCH, [item(ALICE, Trigger.REQUEST, "A1", "UNSEEN")], set())
    assert pairs(planned) == [("A1", "UNSEEN")]
    assert planned[0].decision.code == protocol.UNAVAILABLE
    # so is one in the batch without facts
    sessions = {**SESSIONS, "BARE": SessionInfo("BARE", held=HeldSession(0))}
    planned = plan(
        BOT, make_batch(sessions=sessions), [item(ALICE, Trigger.REQUEST, "A1", "BARE")], set()
    )
    assert planned[0].decision.code == protocol.UNAVAILABLE


def test_an_item_naming_no_session_stands_for_every_shareable_one_in_order() -> None:
    planned = plan(BOT, BATCH, [item(ALICE, Trigger.REQUEST, "A1")], set())
    assert [p.session_id for p in planned] == list(SHAREABLE)
    # the order is the batch's, and sessions outside it (held, but not shareable) stay out
    shareable = ("LATE", "MSGS", "NAME")
    planned = plan(BOT, make_batch(shareable=shareable), [item(ALICE, Trigger.REQUEST)], set())
    assert pairs(planned) == [(d, s) for s in shareable for d in ("A1", "A2")]
    assert plan(BOT, make_batch(shareable=()), [item(ALICE, Trigger.JOIN)], set()) == []


def test_other_sessions_are_the_policys_decision() -> None:
    items = [item(ALICE, Trigger.REQUEST, "A1", s) for s in ("STATE", "MSGS", "PENDING")]
    decided = by_key(plan(BOT, BATCH, items, set()))
    assert isinstance(decided[(ALICE, "A1", "STATE")], Share)
    assert decided[(ALICE, "A1", "MSGS")].code == protocol.UNAUTHORISED
    assert decided[(ALICE, "A1", "PENDING")].code == protocol.UNAVAILABLE


# Seals ----------------------------------------------------------------------------------------


def test_unasked_an_invitee_gets_the_preview_seals_and_hears_nothing_else() -> None:
    for trigger in (Trigger.INVITE, Trigger.JOIN, Trigger.SEAL, Trigger.LINK):
        planned = plan(BOT, BATCH, [item(INVITEE, trigger)], set())
        assert shares(planned) == {(INVITEE, "I1", "NAME"): 0}, trigger
        assert pairs(planned) == [("I1", "NAME")], trigger
    # named one by one: a superseded preview seal is refused, the rest are not mentioned
    items = [item(INVITEE, Trigger.INVITE, "I1", s) for s in SESSIONS] + [
        item(INVITEE, Trigger.INVITE, "I1", "UNSEEN")
    ]
    decided = by_key(plan(BOT, BATCH, items, set()))
    assert set(decided) == {(INVITEE, "I1", "NAME"), (INVITEE, "I1", "STALE")}
    assert decided[(INVITEE, "I1", "STALE")].code == protocol.UNAUTHORISED


@pytest.mark.parametrize(
    "room, trigger",
    [
        (evolve(EMPOWERED, policy=RoomPolicy(share_with_invited=True)), Trigger.INVITE),
        (EMPOWERED, Trigger.BOT_INVITE),
        (EMPOWERED, "bot-invite"),
    ],
    ids=["share-with-invited", "bot-invite", "bot-invite-stored"],
)
def test_unasked_an_invitee_within_reach_gets_every_seal_and_nothing_else(
    room: RoomFacts, trigger: str
) -> None:
    items = [item(INVITEE, trigger)] + [item(INVITEE, trigger, "I1", s) for s in SESSIONS]
    decided = by_key(plan(BOT, make_batch(room), items, set()))
    assert set(decided) == {(INVITEE, "I1", s) for s in SEAL_IDS}
    assert isinstance(decided[(INVITEE, "I1", "NAME")], Share)
    assert isinstance(decided[(INVITEE, "I1", "RULES")], Share)
    assert decided[(INVITEE, "I1", "STALE")].code == protocol.UNAUTHORISED


def test_unasked_the_others_not_joined_get_preview_seals_at_most() -> None:
    for user, device, shared in ((LINKED, "L1", True), (LEFT, "X1", False)):
        for trigger in (Trigger.LINK, Trigger.JOIN, Trigger.BOT_INVITE):
            items = [item(user, trigger)] + [item(user, trigger, device, s) for s in SESSIONS]
            decided = by_key(plan(BOT, BATCH, items, set()))
            assert set(decided) <= {(user, device, "NAME"), (user, device, "STALE")}, trigger
            assert isinstance(decided[(user, device, "NAME")], Share) is shared
    # banned, or kicked and admitted elsewhere: never a share, whoever pushes
    for user in (BANNED, KICKED):
        for trigger in Trigger:
            planned = plan(BOT, BATCH, [item(user, trigger)], set())
            assert shares(planned) == {}, (user, trigger)
            assert {s for _, s in pairs(planned)} <= (
                {"NAME"} if trigger in UNASKED else set(SHAREABLE)
            )


def test_asked_someone_not_joined_hears_why_not() -> None:
    items = [item(INVITEE, Trigger.REQUEST, "I1", s) for s in ("RULES", "STATE", "UNSEEN")]
    decided = by_key(plan(BOT, BATCH, items, set()))
    assert set(decided) == {(INVITEE, "I1", s) for s in ("RULES", "STATE", "UNSEEN")}
    assert all(d.code == protocol.UNAUTHORISED for d in decided.values())
    # an admin's share is an asked item too: every shareable session gets an answer
    decided = by_key(plan(BOT, BATCH, [item(LEFT, Trigger.COMMAND)], set()))
    assert set(decided) == {(LEFT, "X1", s) for s in SHAREABLE}
    assert all(d.code == protocol.UNAUTHORISED for d in decided.values())


def test_joined_members_get_seals_through_decide_seal() -> None:
    items = [item(ALICE, Trigger.SEAL, "A1", s) for s in SEAL_IDS]
    decided = by_key(plan(BOT, BATCH, items, set()))
    assert decided[(ALICE, "A1", "NAME")] == Share(0, "seal of m.room.name, the current value")
    assert decided[(ALICE, "A1", "RULES")] == Share(
        0, "seal of org.example.rules, the current value"
    )
    assert decided[(ALICE, "A1", "STALE")] == Withhold(
        protocol.UNAUTHORISED, "this seal's value is no longer current"
    )


def test_nothing_is_shared_without_power_or_with_the_policy_off() -> None:
    rooms = [
        evolve(EMPOWERED, bot_level=0),
        evolve(EMPOWERED, bot_level=-5, users_default=-5),
        evolve(EMPOWERED, policy=RoomPolicy(mode=Mode.OFF)),
    ]
    for room in rooms:
        planned = plan(BOT, make_batch(room), EVERYONE, set())
        assert planned and not shares(planned)
        assert all(isinstance(p.decision, Ignore) for p in planned)


# approve --------------------------------------------------------------------------------------

OWN = (BOT, "BOTDEV")


def test_approve_skips_the_bots_own_device_and_deleted_ones() -> None:
    approvals = approve(OWN, EMPOWERED, USERS, [BOT, ALICE, ALICE, STRANGER])
    assert [(a.user_id, a.device_id) for a in approvals] == [
        (BOT, "OTHER"),  # only the bot's own device never needs its keys
        (ALICE, "A1"),
        (ALICE, "A2"),
    ]
    assert all(a.decision is None and a.reach == ALL for a in approvals)
    assert all(a.membership == "join" for a in approvals)


def test_approve_reach_and_refusals() -> None:
    users = {
        **USERS,
        ALICE: UserFacts(
            "join",
            devices=(
                DeviceFacts("A1"),
                DeviceFacts("BLACK", blacklisted=True),
                DeviceFacts("GONE", known=False),
            ),
        ),
    }
    order = [ALICE, INVITEE, LINKED, LEFT, BANNED, KICKED]
    approvals = {(a.user_id, a.device_id): a for a in approve(OWN, EMPOWERED, users, order)}
    assert approvals[(ALICE, "A1")] == Approval(ALICE, "A1", None, ALL, "join")
    assert approvals[(INVITEE, "I1")] == Approval(INVITEE, "I1", None, PREVIEW, "invite")
    assert approvals[(LINKED, "L1")] == Approval(LINKED, "L1", None, PREVIEW, "")
    assert approvals[(ALICE, "BLACK")].decision.code == protocol.BLACKLISTED
    assert isinstance(approvals[(ALICE, "GONE")].decision, Ignore)
    for user, device in ((LEFT, "X1"), (BANNED, "B1"), (KICKED, "K1")):
        refused = approvals[(user, device)]
        assert refused.decision.code == protocol.UNAUTHORISED and refused.reach == PREVIEW
    # every refusal is the policy's own
    for a in approvals.values():
        user = users[a.user_id]
        device = next(d for d in user.devices if d.device_id == a.device_id)
        assert a.decision == admit_device(EMPOWERED, oracle_requester(a.user_id, user, device))
    # where invitees count as members, they may hold every seal
    counted = evolve(EMPOWERED, policy=RoomPolicy(share_with_invited=True))
    assert [a.reach for a in approve(OWN, counted, users, [INVITEE])] == [ALL]


def test_approve_refuses_everyone_without_power_or_with_the_policy_off() -> None:
    for room in (evolve(EMPOWERED, bot_level=0), evolve(EMPOWERED, policy=RoomPolicy(Mode.OFF))):
        approvals = approve(OWN, room, USERS, list(USERS))
        assert approvals and all(isinstance(a.decision, Ignore) for a in approvals)


# bundle ---------------------------------------------------------------------------------------


def test_a_bundle_for_an_invitee_carries_seals_only() -> None:
    shareable = (*SHAREABLE, "STALE", "MSGS", "UNSEEN")
    decided = bundle(make_batch(shareable=shareable), INVITEE)
    assert [s for s, _ in decided] == list(shareable)
    got = dict(decided)
    assert isinstance(got["NAME"], Share) and isinstance(got["RULES"], Share)  # invited by bot
    for session_id in ("STATE", "LATE", "MSGS", "UNSEEN", "STALE"):
        assert got[session_id].code == protocol.UNAUTHORISED, session_id


def test_a_bundle_for_a_joined_member_carries_their_sessions() -> None:
    got = dict(bundle(BATCH, ALICE))
    assert {s: d.index for s, d in got.items()} == {"NAME": 0, "RULES": 0, "STATE": 0, "LATE": 2}
    # a bundle goes to cross-signed devices only, so a cross-signed room shares too
    room = evolve(EMPOWERED, policy=RoomPolicy(mode=Mode.CROSS_SIGNED))
    assert all(isinstance(d, Share) for _, d in bundle(make_batch(room), ALICE))


def test_a_bundle_for_someone_removed_or_unknown_carries_nothing() -> None:
    for user in (BANNED, KICKED, LEFT, STRANGER):
        assert not any(isinstance(d, Share) for _, d in bundle(BATCH, user)), user
    assert dict(bundle(BATCH, LINKED))["NAME"] == Share(
        0, "seal of m.room.name, the current value"
    )
    assert dict(bundle(BATCH, LINKED))["RULES"].code == protocol.UNAUTHORISED


def test_a_dry_run_bundle_carries_no_keys() -> None:
    dry = make_batch(room=evolve(EMPOWERED, policy=RoomPolicy(dry_run=True)))
    for user in (ALICE, INVITEE):
        live = bundle(BATCH, user)
        assert any(isinstance(d, Share) for _, d in live)
        for (session_id, was), (same, now) in zip(live, bundle(dry, user), strict=True):
            assert session_id == same
            if isinstance(was, Share):
                assert now == Withhold(
                    protocol.UNAUTHORISED, f"dry run: would share from index {was.index}"
                )
            else:
                assert now == was


# Properties -----------------------------------------------------------------------------------

P_USERS = [BOT, "@a:x", "@b:x", "@c:x"]
P_ITEM_USERS = [*P_USERS, STRANGER]
P_DEVICES = ["D1", "D2", "D3"]
P_SEALS = ["K0", "K1", "K2"]
P_LEDGER = ["S0", "S1", "S2"]
P_DIRECT = ["F0", "F1"]
P_SESSIONS = [*P_SEALS, *P_LEDGER, *P_DIRECT, "X"]  # "X" is never in batch.sessions
MEMBERSHIPS = ["join", "invite", "leave", "ban", "knock", None]


def mostly(usual, *rare) -> st.SearchStrategy:
    """The usual value four times in five: a share needs every fact to allow it. The rare values
    go in the middle of the list (hypothesis favours its ends)."""
    return st.sampled_from([usual, usual, *rare, *[usual] * (4 * len(rare) - 2)])


def room_facts(level: int, mode: Mode, invited: bool, dry: bool, mixed: bool, visibility):
    return RoomFacts(
        room_id=ROOM,
        bot_level=level,
        users_default=0,
        history_visibility=visibility,
        policy=RoomPolicy(
            mode=mode, share_with_invited=invited, allow_mixed_shared_history=mixed, dry_run=dry
        ),
    )


VISIBILITIES = st.sampled_from(["shared", "joined", "world_readable", None])
rooms = st.builds(
    room_facts,
    mostly(50, 0, -1, 100),
    mostly(Mode.MEMBERS, Mode.CROSS_SIGNED, Mode.OFF),
    st.booleans(),
    mostly(False, True),
    st.booleans(),
    VISIBILITIES,
)
# where the bot may share: the rules about members, devices and sessions decide
healthy_rooms = st.builds(
    room_facts,
    st.just(50),
    st.just(Mode.MEMBERS),
    st.booleans(),
    st.just(False),
    st.booleans(),
    VISIBILITIES,
)

# A device's flags: (known, deleted, blacklisted, cross_signed, identity_changed).
FLAGS = mostly(
    (True, False, False, False, False),
    (True, False, False, True, False),  # cross-signed
    (False, False, False, False, False),  # unknown to the homeserver
    (True, True, False, False, False),  # deleted
    (True, False, True, True, False),  # blacklisted
    (True, False, False, False, True),  # its owner's identity changed
    (True, True, False, True, False),  # deleted, cross-signed
)


@st.composite
def device_lists(draw) -> tuple[DeviceFacts, ...]:
    owned = draw(st.lists(st.sampled_from(P_DEVICES), min_size=1, max_size=3, unique=True))
    return tuple(DeviceFacts(device_id, *draw(FLAGS)) for device_id in owned)


def user_facts(membership: st.SearchStrategy, admitted_via: st.SearchStrategy):
    return st.builds(
        UserFacts,
        membership=membership,
        removed=mostly(False, True),
        admitted_via=admitted_via,
        devices=device_lists(),
    )


# the bot; a joined member, mostly; an invitee or someone admitted through another room,
# mostly; anyone
user_maps = st.fixed_dictionaries(
    {
        BOT: user_facts(st.sampled_from(MEMBERSHIPS), st.none()),
        "@a:x": user_facts(mostly("join", *MEMBERSHIPS[1:]), mostly(None, "!via:x")),
        "@b:x": user_facts(mostly("invite", None, "join", "leave"), mostly("!via:x", None)),
        "@c:x": user_facts(st.sampled_from(MEMBERSHIPS), st.sampled_from([None, "!via:x"])),
    }
)
seals = st.sampled_from(
    [
        SealFacts(event_type, preview, live)
        for event_type, preview in (("m.room.name", True), ("org.example.rules", False))
        for live in (True, True, True, False)
    ]
)
helds = mostly(
    HeldSession(0),
    HeldSession(1),
    HeldSession(3),
    HeldSession(0, shared_history=True),
    None,
)


def _ledger_facts() -> list[SessionFacts]:
    """What a real ledger says of sessions of every kind (all named "L")."""
    shapes = [
        [state("$a", "L", 0)],  # state only
        [state("$a", "L", 0), state("$b", "L", 1, "m.room.topic")],
        [state("$a", "L", 2, "m.room.topic")],  # state only, from index 2
        [state("$a", "L", 0), state("$b", "L", 2, "m.room.topic")],  # a gap at index 1
        [state("$a", "L", 0), message("$m", "L", 1)],  # mixed
        [state("$a", "L", 1), message("$m", "L", 0)],  # mixed, messages below the state
        [message("$m", "L", 0)],  # messages only
        [state("$a", "L", 0, status=Status.PENDING)],  # not decrypted yet
        [state("$a", "L", 0, ts=1), state("$b", "OTHER", 0, ts=2)],  # only superseded state
        [  # a superseded value above the safe index stays readable
            state("$a", "L", 0, ts=1),
            state("$b", "L", 1, "m.room.topic", ts=1),
            state("$c", "L", 2, "m.room.topic", ts=2),
        ],
        [],  # no event names it
    ]
    found = []
    for shape in shapes:
        ledger = RoomLedger(ROOM)
        for record in shape:
            (ledger.add_state if hasattr(record, "outer_key") else ledger.add_message)(record)
        found.append(ledger.facts("L"))
    return found


LEDGER_FACTS = _ledger_facts()
assert {f.kind for f in LEDGER_FACTS} == set(SessionKind)
ledger_facts = st.sampled_from(LEDGER_FACTS)
# facts built directly, as no ledger would: the policy must judge them all the same way
direct_facts = st.sampled_from(
    [
        None,  # the batch holds nothing about it: unknown
        *(SessionFacts("F", kind) for kind in SessionKind),
        *(SessionFacts("F", kind, safe_index=0) for kind in SessionKind),
        SessionFacts("F", SessionKind.STATE, safe_index=2),
        SessionFacts("F", SessionKind.STATE, safe_index=0, gaps=(1,)),
        SessionFacts("F", SessionKind.MIXED, message_indices=frozenset({3}), safe_index=1),
    ]
)
triggers = st.sampled_from([*Trigger, *(t.value for t in Trigger)])


@st.composite
def batches(draw) -> RoomBatch:
    present = mostly(True, False)  # in batch.sessions
    sessions: dict[str, SessionInfo] = {}
    for session_id in P_SEALS:
        if draw(present):
            sessions[session_id] = SessionInfo(session_id, seal=draw(seals))
    for ids, kinds in ((P_LEDGER, ledger_facts), (P_DIRECT, direct_facts)):
        for session_id in ids:
            if draw(present):
                facts = draw(kinds)
                if facts is not None:
                    facts = evolve(facts, session_id=session_id)
                sessions[session_id] = SessionInfo(session_id, facts=facts, held=draw(helds))
    # mostly sessions the batch knows; "X" stands for one it does not
    shareable = draw(
        st.lists(st.sampled_from([*sessions, "X"]), unique=True, min_size=1, max_size=6)
    )
    room = draw(st.one_of(healthy_rooms, rooms))
    return RoomBatch(room, draw(user_maps), sessions, tuple(shareable))


@st.composite
def scenarios(draw) -> tuple[RoomBatch, list[OutboxItem]]:
    """A batch and items for it: mostly naming its users, their devices and its sessions."""
    batch = draw(batches())
    queued = []
    for _ in range(draw(st.integers(1, 6))):
        user_id = draw(st.sampled_from(["@a:x", "@b:x", BOT, STRANGER, "@c:x", "@a:x", "@b:x"]))
        owned = [d.device_id for d in batch.users.get(user_id, UserFacts(None)).devices]
        device_id = draw(st.sampled_from([None, None, *owned, "DX"]))
        session_id = draw(st.sampled_from([None, None, *batch.sessions, "X"]))
        queued.append(item(user_id, draw(triggers), device_id, session_id))
    return batch, queued


deliveries = st.sets(
    st.tuples(
        st.sampled_from(P_ITEM_USERS),
        st.sampled_from([*P_DEVICES, "DX"]),
        st.sampled_from(P_SESSIONS),
        st.integers(0, 3),
    ),
    max_size=6,
)

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def oracle_requester(
    user_id: str, user: UserFacts, device: DeviceFacts, bot_invited: bool = False
) -> Requester:
    return Requester(
        user_id=user_id,
        device_id=device.device_id,
        membership=user.membership,
        admitted_via=user.admitted_via,
        invited_by_bot=bot_invited,
        device_known=device.known,
        blacklisted=device.blacklisted,
        cross_signed=device.cross_signed,
        identity_changed=device.identity_changed,
        removed=user.removed,
    )


def stands_for(batch: RoomBatch, it: OutboxItem) -> list[tuple[DeviceFacts, str]]:
    """The (device, session)s an item names, per the planner's contract."""
    user = batch.users.get(it.user_id, UserFacts(None))
    if it.device_id:
        named = [d for d in user.devices if d.device_id == it.device_id]
        targets = named or [DeviceFacts(it.device_id, known=False)]
    else:
        targets = [d for d in user.devices if not d.deleted]
    sessions = [it.session_id] if it.session_id else list(batch.shareable)
    return [(d, s) for s in sessions for d in targets]


def policy_says(batch: RoomBatch, it: OutboxItem, device: DeviceFacts, session_id: str):
    """What the policy alone decides for this item's requester and session."""
    user = batch.users.get(it.user_id, UserFacts(None))
    who = oracle_requester(it.user_id, user, device, str(it.trigger) == "bot-invite")
    info = batch.sessions.get(session_id)
    if info is not None and info.seal is not None:
        return decide_seal(batch.room, who, info.seal)
    facts = info.facts if info is not None and info.facts is not None else None
    facts = facts or SessionFacts(session_id, SessionKind.UNKNOWN)
    return decide(batch.room, who, facts, info.held if info is not None else None)


def seal_in_reach(batch: RoomBatch, it: OutboxItem, seal: SealFacts | None) -> bool:
    """Whether an unasked push may tell someone not joined about this session."""
    if seal is None:
        return False
    membership = batch.users.get(it.user_id, UserFacts(None)).membership
    counted = batch.room.policy.share_with_invited or str(it.trigger) == "bot-invite"
    return seal.preview or (membership == "invite" and counted)


def assert_share_is_safe(
    batch: RoomBatch, it: OutboxItem, device: DeviceFacts, session_id: str, share: Share
) -> None:
    """A share, from first principles rather than through the policy's code."""
    room, policy = batch.room, batch.room.policy
    user = batch.users[it.user_id]
    assert it.user_id != BOT
    assert room.bot_level > room.users_default, "shared without power"
    assert policy.mode != Mode.OFF, "shared with the policy off"
    assert user.membership != "ban" and not user.removed, "shared with someone removed"
    assert device.known and not device.blacklisted
    assert it.device_id or not device.deleted, "pushed to a deleted device"
    if policy.mode == Mode.CROSS_SIGNED:
        assert device.cross_signed
    info = batch.sessions[session_id]
    if info.seal is not None:
        assert info.seal.live and share.index == 0
        if user.membership != "join":
            invited = user.membership == "invite"
            assert invited or user.admitted_via
            counted = policy.share_with_invited or str(it.trigger) == "bot-invite"
            assert info.seal.preview or (invited and counted), "non-preview seal out of reach"
        return
    # a session the bot did not create: joined members only, and only if it is safe
    assert user.membership == "join", "someone else's session to someone not joined"
    facts, held = info.facts, info.held
    assert facts is not None and held is not None
    assert facts.kind in (SessionKind.STATE, SessionKind.MIXED)
    if facts.kind == SessionKind.MIXED:
        assert policy.allow_mixed_shared_history and held.shared_history
        assert room.history_visibility in ("shared", "world_readable")
    assert facts.safe_index is not None and not facts.gaps
    assert share.index == max(facts.safe_index, held.first_known_index)


def dry(decision: Decision) -> Decision:
    if isinstance(decision, Share):
        return Ignore(f"dry run: would share from index {decision.index} ({decision.reason})")
    return decision


@PROPERTY
@given(scenario=scenarios(), delivered=deliveries, dry_run=st.booleans(), data=st.data())
def test_the_planner_adds_no_sharing_the_policy_would_refuse(
    scenario: tuple[RoomBatch, list[OutboxItem]], delivered: set, dry_run: bool, data
) -> None:
    batch, queued = scenario
    # some past deliveries the batch would repeat, so the dedupe rule is exercised
    would = sorted({(*k, i) for k, i in shares(plan(BOT, batch, queued, set())).items()})
    if would:
        delivered = delivered | data.draw(st.sets(st.sampled_from(would)))
    planned = plan(BOT, batch, queued, delivered, dry_run)
    no_shares = dry_run or batch.room.policy.dry_run

    # The rules, item by item: a (user, device, session) goes to the first item that is not
    # silent about it; unasked, silence is for someone not joined (but for the seals within
    # their reach) and for a share already delivered from that index. A refusal an unasked
    # item decided is taken over, in its place, by the first asked item for the same key (only
    # a request is told why).
    reference: list = []
    decided_by: dict[tuple[str, str, str], tuple[int, bool]] = {}
    replaced: set[tuple[str, str, str]] = set()

    def taken_over(p: Planned) -> bool:
        return (p.item.user_id, p.device_id, p.session_id) in replaced

    for it in queued:
        if it.user_id == BOT:
            continue
        unasked = it.trigger in UNASKED
        joined = batch.users.get(it.user_id, UserFacts(None)).membership == "join"
        for device, session_id in stands_for(batch, it):
            key = (it.user_id, device.device_id, session_id)
            place, takeover = decided_by.get(key, (None, False))
            if place is not None and (unasked or not takeover):
                continue
            info = batch.sessions.get(session_id)
            if unasked and not joined and not seal_in_reach(batch, it, info and info.seal):
                continue
            expected = policy_says(batch, it, device, session_id)
            if unasked and isinstance(expected, Share) and (*key, expected.index) in delivered:
                continue
            entry = (it, device, session_id, dry(expected) if no_shares else expected)
            if place is not None:
                reference[place] = entry
                decided_by[key] = (place, False)
                replaced.add(key)
                continue
            decided_by[key] = (len(reference), unasked and not isinstance(expected, Share))
            reference.append(entry)

    assert [(p.item, p.device_id, p.session_id, p.decision) for p in planned] == [
        (it, device.device_id, session_id, decision)
        for it, device, session_id, decision in reference
    ]
    keys = [(p.item.user_id, p.device_id, p.session_id) for p in planned]
    assert len(keys) == len(set(keys)), "a (user, device, session) decided twice"
    # in item order (a decision taken over by a request keeps its place)
    kept = [p for p in planned if p.item.trigger in UNASKED or not taken_over(p)]
    positions = [next(n for n, it in enumerate(queued) if it is p.item) for p in kept]
    assert positions == sorted(positions), "not in item order"
    for p, key, (it, device, _, _) in zip(planned, keys, reference, strict=True):
        assert p.item is it
        assert p.item.user_id != BOT, "a decision about the bot's own account"
        if isinstance(p.decision, Share):
            assert not no_shares, "shared in a dry run"
            assert not (it.trigger in UNASKED and (*key, p.decision.index) in delivered)
            assert_share_is_safe(batch, it, device, p.session_id, p.decision)
    # asked ones are always answered
    for it in queued:
        if it.user_id != BOT and it.trigger not in UNASKED:
            for device, session_id in stands_for(batch, it):
                assert (it.user_id, device.device_id, session_id) in decided_by, "unanswered"


@PROPERTY
@given(scenario=scenarios(), delivered=deliveries, via_policy=st.booleans())
def test_a_dry_run_decides_the_same_keys_and_shares_nothing(
    scenario: tuple[RoomBatch, list[OutboxItem]], delivered: set, via_policy: bool
) -> None:
    batch, queued = scenario

    def with_dry_run(on: bool) -> RoomBatch:
        return evolve(batch, room=evolve(batch.room, policy=evolve(batch.room.policy, dry_run=on)))

    live = plan(BOT, with_dry_run(False), queued, delivered)
    if via_policy:
        dry_plan = plan(BOT, with_dry_run(True), queued, delivered)
    else:
        dry_plan = plan(BOT, with_dry_run(False), queued, delivered, dry_run=True)
    # the same (device, session)s decided, for the same items, in the same order
    assert [(p.item, p.device_id, p.session_id) for p in dry_plan] == [
        (p.item, p.device_id, p.session_id) for p in live
    ]
    assert not any(isinstance(p.decision, Share) for p in dry_plan)
    # the would-be shares are exactly the shares, from the same index
    would = {
        (p.item.user_id, p.device_id, p.session_id): int(p.decision.reason.split()[6])
        for p in dry_plan
        if isinstance(p.decision, Ignore)
        and p.decision.reason.startswith("dry run: would share from index ")
    }
    assert would == shares(live)
    for was, now in zip(live, dry_plan, strict=True):
        assert now.decision == dry(was.decision)


@PROPERTY
@given(
    room=rooms,
    people=user_maps,
    asked=st.lists(st.sampled_from(P_ITEM_USERS), max_size=6),
    own_device=st.sampled_from(P_DEVICES),
)
def test_approve_is_the_policys_room_and_device_checks(
    room: RoomFacts, people: dict[str, UserFacts], asked: list[str], own_device: str
) -> None:
    approvals = approve((BOT, own_device), room, people, asked)
    expected = [
        (u, d.device_id)
        for u in dict.fromkeys(asked)
        for d in people.get(u, UserFacts(None)).devices
        if not d.deleted and (u, d.device_id) != (BOT, own_device)
    ]
    assert [(a.user_id, a.device_id) for a in approvals] == expected
    for a in approvals:
        user = people[a.user_id]
        device = next(d for d in user.devices if d.device_id == a.device_id)
        assert a.decision == admit_device(room, oracle_requester(a.user_id, user, device))
        assert a.membership == (user.membership or "")
        if a.decision is not None:
            assert a.reach == PREVIEW
            continue
        assert room.bot_level > room.users_default and room.policy.mode != Mode.OFF
        assert user.membership != "ban" and not user.removed
        assert user.membership in ("join", "invite") or user.admitted_via
        assert device.known and not device.blacklisted
        counted = user.membership == "join" or (
            user.membership == "invite" and room.policy.share_with_invited
        )
        assert a.reach == (ALL if counted else PREVIEW)


@PROPERTY
@given(batch=batches(), user_id=st.sampled_from(P_ITEM_USERS[1:]))  # the bot invites others
def test_a_bundle_never_carries_someone_elses_session_to_someone_not_joined(
    batch: RoomBatch, user_id: str
) -> None:
    decided = bundle(batch, user_id)
    assert [s for s, _ in decided] == list(batch.shareable)
    user = batch.users.get(user_id, UserFacts(None))
    device = DeviceFacts("", cross_signed=True)
    for session_id, decision in decided:
        info = batch.sessions.get(session_id)
        invited = item(user_id, Trigger.BOT_INVITE, "", session_id)
        expected = policy_says(batch, invited, device, session_id)
        if isinstance(expected, Share) and batch.room.policy.dry_run:
            expected = Withhold(
                protocol.UNAUTHORISED, f"dry run: would share from index {expected.index}"
            )
        assert decision == expected
        if isinstance(decision, Share):
            assert not batch.room.policy.dry_run
            assert info is not None
            if info.seal is None:
                assert user.membership == "join", "someone else's session in a bundle"
            assert_share_is_safe(batch, invited, device, session_id, decision)
