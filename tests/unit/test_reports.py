"""The audit report's verdicts on superseded values and its words for mixed sessions
(``reports.py``): a value is called sealed only when no key the bot gave or would give opens
it, and a value above the safe index of a shared session is readable, never sealed."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encstate_bot import reports
from encstate_bot.ledger import RoomLedger
from encstate_bot.policy import HeldSession, Requester, RoomFacts, Share, Withhold, decide
from encstate_bot.reports import Verdict
from encstate_bot.room_policy import RoomPolicy
from encstate_bot.seals import Seal, SealBook
from encstate_bot.store import AuditRow

from .helpers import ROOM, message, state
from .test_adversarial_core import SESSIONS, build, messages, state_events

NEVER = RoomPolicy()
AS_HISTORY = RoomPolicy(allow_mixed_shared_history=True)


def verdicts(
    ledger: RoomLedger,
    book: SealBook | None = None,
    given_from: dict[str, int] | None = None,
    policy: RoomPolicy = NEVER,
    visibility: str | None = "shared",
    flagged: frozenset[str] = frozenset(),
) -> dict[str, tuple[Verdict, str]]:
    book = book or SealBook()
    decisions = {
        s: reports.session_decision(ledger.facts(s), policy, visibility, s in flagged)
        for s in ledger.sessions()
        if reports.is_state(ledger.facts(s)) and not book.is_seal(ROOM, s)
    }
    values = reports.superseded_values(ledger, book, decisions, given_from or {})
    return {v.record.event_id: (v.verdict, v.why) for v in values}


def test_above_the_safe_index_is_readable_never_sealed() -> None:
    """README's example turned round: name@0, topic "old"@1, topic "new"@2. The bot shares from
    0, so the old topic is readable (exposed)."""
    ledger = RoomLedger(ROOM)
    ledger.add_state(state("$name", "S", 0, "m.room.name", ts=1))
    ledger.add_state(state("$old", "S", 1, "m.room.topic", ts=2))
    ledger.add_state(state("$new", "S", 2, "m.room.topic", ts=3))
    verdict, why = verdicts(ledger)["$old"]
    assert verdict == Verdict.READABLE
    assert why == "above the safe index 0, which the bot shares from"


def test_below_the_safe_index_is_sealed() -> None:
    """README's example: topic "old"@0, name@1, topic "new"@2: the bot exports from 1 and the
    old topic stays sealed."""
    ledger = RoomLedger(ROOM)
    ledger.add_state(state("$old", "S", 0, "m.room.topic", ts=1))
    ledger.add_state(state("$name", "S", 1, "m.room.name", ts=2))
    ledger.add_state(state("$new", "S", 2, "m.room.topic", ts=3))
    assert verdicts(ledger) == {"$old": (Verdict.SEALED, "below the safe index 1")}


def test_below_the_safe_index_but_given_from_below_is_not_sealed() -> None:
    ledger = RoomLedger(ROOM)
    ledger.add_state(state("$old", "S", 0, "m.room.topic", ts=1))
    ledger.add_state(state("$name", "S", 1, "m.room.name", ts=2))
    ledger.add_state(state("$new", "S", 2, "m.room.topic", ts=3))
    verdict, why = verdicts(ledger, given_from={"S": 0})["$old"]
    assert verdict == Verdict.GIVEN
    assert why == "a key the bot gave from index 0 opens it; below the safe index 1"
    # a key given from above the value does not open it: still sealed
    assert verdicts(ledger, given_from={"S": 1})["$old"][0] == Verdict.SEALED


def test_a_session_without_current_value_is_never_shared_so_its_values_are_sealed() -> None:
    """The current value lives in the bot's seal: the old session holds only superseded
    values, which the policy never shares."""
    ledger = RoomLedger(ROOM)
    ledger.add_state(state("$name", "OLD", 0, "m.room.name", ts=1))
    ledger.add_state(state("$topic", "OLD", 1, "m.room.topic", ts=1))
    ledger.add_state(state("$sealed-name", "SEAL", 0, "m.room.name", ts=2))
    ledger.add_state(state("$new-topic", "OTHER", 0, "m.room.topic", ts=2))
    book = SealBook()
    book.add(Seal(ROOM, "SEAL", "m.room.name:", "m.room.name", "", "h", "$name", "k", 1, "$s"))
    found = verdicts(ledger, book)
    assert found["$name"] == (
        Verdict.SEALED,
        "its session holds no current value, so it is never shared; the current value is sealed",
    )
    assert found["$topic"] == (
        Verdict.SEALED,
        "its session holds no current value, so it is never shared; the current value is in "
        "another session",
    )
    # the policy agrees: the session goes to nobody
    facts = ledger.facts("OLD")
    assert isinstance(reports.session_decision(facts, NEVER, "shared", False), Withhold)


def test_above_the_safe_index_of_a_mixed_session_is_withheld_not_sealed() -> None:
    ledger = RoomLedger(ROOM)
    ledger.add_state(state("$avatar", "M", 0, "m.room.avatar", ts=1))
    ledger.add_message(message("$chat", "M", 1))
    ledger.add_state(state("$old", "M", 2, "m.room.topic", ts=1))
    ledger.add_state(state("$new", "S", 0, "m.room.topic", ts=2))
    assert verdicts(ledger)["$old"] == (Verdict.WITHHELD, "its session is mixed, not shared")
    # flagged shared history, history visible, the room shares mixed sessions as history:
    # the policy shares it from the safe index, so the old topic is readable
    shared = verdicts(ledger, policy=AS_HISTORY, flagged=frozenset({"M"}))
    assert shared["$old"][0] == Verdict.READABLE
    # the same with history hidden from newcomers: withheld again
    hidden = verdicts(ledger, policy=AS_HISTORY, flagged=frozenset({"M"}), visibility="joined")
    assert hidden["$old"][0] == Verdict.WITHHELD
    # a key the bot gave before the session turned out mixed still opens it
    assert verdicts(ledger, given_from={"M": 0})["$old"][0] == Verdict.GIVEN


def test_a_gap_withholds_without_sealing() -> None:
    ledger = RoomLedger(ROOM)
    ledger.add_state(state("$name", "S", 0, "m.room.name", ts=1))
    ledger.add_state(state("$old", "S", 1, "m.room.topic", ts=1))
    ledger.add_state(state("$new", "S", 3, "m.room.topic", ts=2))  # index 2 never seen
    verdict, why = verdicts(ledger)["$old"]
    assert verdict == Verdict.WITHHELD
    assert why.startswith("its session is not shared now: indices 2 of this session")


def test_replays_and_the_bots_own_seals_are_neither_readable_nor_sealed() -> None:
    ledger = RoomLedger(ROOM)
    ledger.add_state(state("$name", "S", 0, "m.room.name", ts=2))
    ledger.add_state(state("$replay", "S", 0, "m.room.name", ts=1))
    ledger.add_state(state("$seal1", "SEAL1", 0, "m.room.topic", ts=1))
    ledger.add_state(state("$seal2", "SEAL2", 0, "m.room.topic", ts=2))
    book = SealBook()
    for n, session in enumerate(("SEAL1", "SEAL2"), start=1):
        book.add(
            Seal(ROOM, session, "m.room.topic:", "m.room.topic", "", "h", "$x", "k", n, f"$e{n}")
        )
    found = verdicts(ledger, book)
    assert found["$replay"][0] == Verdict.REPLAY
    assert found["$seal1"][0] == Verdict.OWN_SEAL


def test_lowest_given_counts_only_keys_that_may_have_gone_out() -> None:
    def row(session: str | None, decision: str, index: int | None) -> AuditRow:
        return AuditRow(ROOM, "@u:x", "D", session, decision, "r", "join", msg_index=index)

    rows = [
        row("A", "share", 3),
        row("A", "share", 1),
        row("A", "withhold", 0),
        row("B", "failed", 2),  # the call failed, but the server may have taken it
        row("C", "ignore", 0),  # dry run: nothing went out
        row(None, "share", None),  # a bundle: no session named
    ]
    assert reports.lowest_given(rows) == {"A": 1, "B": 2}


def test_mixed_sharing_says_what_the_policy_does() -> None:
    ledger = RoomLedger(ROOM)
    ledger.add_state(state("$avatar", "M", 2, "m.room.avatar", ts=1))
    ledger.add_message(message("$chat", "M", 3))
    ledger.add_state(state("$before", "M", 1, "m.room.name", ts=1))
    ledger.add_message(message("$chat0", "M", 0))
    ledger.add_state(state("$name", "S", 0, "m.room.name", ts=2))
    facts = ledger.facts("M")

    def words(policy: RoomPolicy, visibility: str | None, flagged: bool) -> str:
        decision = reports.session_decision(facts, policy, visibility, flagged)
        return reports.mixed_sharing(decision, policy, visibility, flagged)

    assert words(NEVER, "shared", True) == "never shared: this room never shares mixed sessions"
    assert words(AS_HISTORY, "shared", False) == (
        "never shared: its creator did not flag it shared history"
    )
    assert words(AS_HISTORY, None, True) == (
        "never shared: history visibility unknown hides history from newcomers"
    )
    assert words(AS_HISTORY, "world_readable", True) == (
        "shared from the safe index 2, as shared history"
    )
    # and the superseded name at index 1, below that safe index, is sealed either way
    found = verdicts(ledger, policy=AS_HISTORY, flagged=frozenset({"M"}))
    assert found["$before"] == (Verdict.SEALED, "below the safe index 2")
    assert reports.mixed_policy(NEVER) == "mixed sessions never shared"
    assert reports.mixed_policy(AS_HISTORY).startswith("mixed sessions shared as history")


def test_lowest_of_takes_the_lowest_index_per_session() -> None:
    assert reports.lowest_of({"A": 3, "B": 1}, {"A": 0, "C": 5}, {}) == {"A": 0, "B": 1, "C": 5}


MEMBER = Requester(user_id="@x:x", device_id="D", membership="join")


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=state_events,
    msgs=messages,
    given_from=st.dictionaries(st.sampled_from(SESSIONS), st.integers(0, 6), max_size=3),
    allow_mixed=st.booleans(),
    flagged=st.booleans(),
    visibility=st.sampled_from(["shared", "joined", None]),
)
def test_sealed_means_no_key_the_bot_gave_or_would_give_opens_it(
    events, msgs, given_from, allow_mixed, flagged, visibility
) -> None:
    """Against the policy itself: whatever the room's settings, however much of the session
    the bot holds, no share of a sealed value's session starts at or below it, and no key
    given earlier did; every value a share lists as exposed is never called sealed."""
    ledger = build(events, msgs)
    policy = RoomPolicy(allow_mixed_shared_history=allow_mixed)
    flags = frozenset(SESSIONS) if flagged else frozenset()
    found = reports.superseded_values(
        ledger,
        SealBook(),
        {
            s: reports.session_decision(ledger.facts(s), policy, visibility, s in flags)
            for s in SESSIONS
            if reports.is_state(ledger.facts(s))
        },
        given_from,
    )
    superseded = {r.event_id for s in SESSIONS for r in ledger.facts(s).superseded}
    assert {v.record.event_id for v in found} == superseded
    assert len(found) == ledger.counts()["superseded"]
    sealed = [v for v in found if v.verdict == Verdict.SEALED]
    exposed_anywhere: set[str] = set()
    for session_id in SESSIONS:
        facts = ledger.facts(session_id)
        for any_allow in (False, True):
            for any_visibility in ("shared", "joined"):
                for any_flag in (False, True):
                    room = RoomFacts(
                        room_id=ROOM,
                        bot_level=50,
                        users_default=0,
                        history_visibility=any_visibility,
                        policy=RoomPolicy(allow_mixed_shared_history=any_allow),
                    )
                    for first_known in range(4):
                        held = HeldSession(first_known_index=first_known, shared_history=any_flag)
                        decision = decide(room, MEMBER, facts, held)
                        if not isinstance(decision, Share):
                            continue
                        exposed_anywhere |= set(decision.exposed)
                        for value in sealed:
                            if value.record.session_id == session_id:
                                assert value.record.msg_index is not None
                                assert decision.index > value.record.msg_index
    for value in sealed:
        low = given_from.get(value.record.session_id)
        assert low is None or (value.record.msg_index is not None and low > value.record.msg_index)
        assert value.record.event_id not in exposed_anywhere
    # what the room's own settings expose is called readable
    for value in found:
        if value.verdict == Verdict.READABLE:
            assert value.record.msg_index is not None
            assert value.record.msg_index > (value.safe_index or 0)
    room = RoomFacts(
        room_id=ROOM, bot_level=50, users_default=0, history_visibility=visibility, policy=policy
    )
    verdict_of = {v.record.event_id: v.verdict for v in found}
    for session_id in SESSIONS:
        held = HeldSession(first_known_index=0, shared_history=session_id in flags)
        decision = decide(room, MEMBER, ledger.facts(session_id), held)
        if isinstance(decision, Share):
            for event_id in decision.exposed:
                assert verdict_of[event_id] in (Verdict.READABLE,), event_id
