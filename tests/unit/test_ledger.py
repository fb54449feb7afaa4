from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from encstate_bot.ledger import MessageStatus, RoomLedger, SessionKind, Status

from .helpers import ROOM, message, state


def ledger_with(*records) -> RoomLedger:
    ledger = RoomLedger(ROOM)
    for rec in records:
        if hasattr(rec, "outer_key"):
            ledger.add_state(rec)
        else:
            ledger.add_message(rec)
    return ledger


def test_superseded_value_below_the_safe_index_is_sealed() -> None:
    # topic "old" at 0, name at 1, topic "new" at 2: export from 1 hides the old topic
    ledger = ledger_with(
        state("$old", "S", 0, "m.room.topic", ts=1),
        state("$name", "S", 1, "m.room.name", ts=2),
        state("$new", "S", 2, "m.room.topic", ts=3),
    )
    facts = ledger.facts("S")
    assert facts.kind == SessionKind.STATE
    assert facts.safe_index == 1
    assert [r.event_id for r in facts.superseded] == ["$old"]
    assert facts.exposed == ()


def test_superseded_value_above_the_safe_index_is_reported() -> None:
    # name at 0, topic "old" at 1, topic "new" at 2: no index can hide the old topic
    ledger = ledger_with(
        state("$name", "S", 0, "m.room.name", ts=1),
        state("$old", "S", 1, "m.room.topic", ts=2),
        state("$new", "S", 2, "m.room.topic", ts=3),
    )
    facts = ledger.facts("S")
    assert facts.safe_index == 0
    assert [r.event_id for r in facts.exposed] == ["$old"]


def test_conflict_rule_newest_timestamp_then_event_id() -> None:
    ledger = ledger_with(
        state("$b", "S1", 0, "m.room.topic", ts=5),
        state("$a", "S2", 0, "m.room.topic", ts=9),
        state("$c", "S3", 0, "m.room.topic", ts=9),
    )
    assert [r.event_id for r in ledger.current_state()] == ["$c"]
    # a far-future timestamp pins the value
    ledger.add_state(state("$pin", "S4", 0, "m.room.topic", ts=10**15))
    ledger.add_state(state("$later", "S5", 0, "m.room.topic", ts=10_000))
    assert [r.event_id for r in ledger.current_state()] == ["$pin"]
    assert [r.event_id for r in ledger.far_future(now_ms=10_000)] == ["$pin"]


def test_a_decrypted_message_makes_the_session_mixed() -> None:
    ledger = ledger_with(state("$name", "S", 0), message("$m", "S", 1))
    assert ledger.facts("S").kind == SessionKind.MIXED
    assert ledger.facts("S").message_indices == {1}


def test_garbage_and_pending_claims_do_not_make_a_session_mixed() -> None:
    ledger = ledger_with(
        state("$name", "S", 0),
        message("$junk", "S", 7, MessageStatus.GARBAGE),
        message("$copy", "S", 0, MessageStatus.REPLAY),
    )
    facts = ledger.facts("S")
    assert facts.kind == SessionKind.STATE
    assert facts.gaps == ()


def test_a_message_not_decrypted_yet_in_a_held_state_session_is_a_gap() -> None:
    # The bot holds S (it decrypted the name), so a message of S still pending means its
    # processing failed: the bot cannot vouch for that index, and shares nothing past it.
    ledger = ledger_with(state("$name", "S", 0), message("$wait", "S", 3, MessageStatus.PENDING))
    facts = ledger.facts("S")
    assert facts.kind == SessionKind.STATE
    assert facts.gaps == (1, 2, 3)


def test_a_huge_claimed_index_is_never_enumerated() -> None:
    ledger = ledger_with(
        state("$name", "S", 0), message("$wait", "S", 2**32 - 1, MessageStatus.PENDING)
    )
    assert len(ledger.facts("S").gaps) == 64


def test_state_that_decrypts_to_a_message_is_evidence_of_messages() -> None:
    ledger = ledger_with(
        state("$name", "S", 0),
        state("$fake", "S", 1, status=Status.INVALID, message_payload=True),
    )
    assert ledger.facts("S").kind == SessionKind.MIXED


def test_messages_only_and_unknown_and_pending() -> None:
    ledger = ledger_with(
        message("$m", "M", 0),
        state("$p", "P", 0, status=Status.PENDING),
        state("$bad", "B", 0, status=Status.INVALID),
    )
    assert ledger.facts("M").kind == SessionKind.MESSAGE
    assert ledger.facts("P").kind == SessionKind.PENDING
    assert ledger.facts("B").kind == SessionKind.UNKNOWN
    assert ledger.facts("nothing").kind == SessionKind.UNKNOWN


def test_unseen_indices_after_the_safe_index_are_gaps() -> None:
    ledger = ledger_with(state("$name", "S", 0), state("$topic", "S", 3, "m.room.topic"))
    assert ledger.facts("S").gaps == (1, 2)


def test_only_superseded_state_has_no_safe_index() -> None:
    ledger = ledger_with(state("$old", "S", 0, ts=1), state("$new", "T", 0, ts=2))
    assert ledger.facts("S").safe_index is None
    assert ledger.state_sessions() == ["T"]


def test_updating_a_pending_record_recomputes_facts() -> None:
    pending = state("$name", "S", 0, status=Status.PENDING)
    ledger = ledger_with(pending)
    assert ledger.facts("S").kind == SessionKind.PENDING
    ledger.update_state(state("$name", "S", 0))
    assert ledger.facts("S").kind == SessionKind.STATE
    assert ledger.facts("S").safe_index == 0


def test_aesthetic_sessions_come_first() -> None:
    ledger = ledger_with(
        state("$member", "X", 0, "m.custom", "@u:x"),
        state("$topic", "T", 0, "m.room.topic"),
        state("$name", "N", 0, "m.room.name"),
    )
    assert ledger.state_sessions() == ["N", "T", "X"]


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["m.room.name", "m.room.topic", "m.room.avatar"]),
            st.integers(0, 20),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_safe_index_never_exposes_superseded_values_below_it(events) -> None:
    ledger = RoomLedger(ROOM)
    for i, (event_type, ts) in enumerate(events):
        ledger.add_state(state(f"$e{i:02d}", "S", i, event_type, ts=ts))
    facts = ledger.facts("S")
    assert facts.safe_index is not None
    assert facts.safe_index == min(r.msg_index for r in facts.current)
    for rec in facts.superseded:
        assert (rec in facts.exposed) == (rec.msg_index > facts.safe_index)


@settings(max_examples=300)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["add", "validate", "invalidate", "server"]),
            st.integers(0, 7),  # record
            st.sampled_from(["m.room.name", "m.room.topic"]),
            st.integers(0, 4),  # timestamp
        ),
        max_size=30,
    )
)
def test_the_current_value_kept_as_records_arrive_equals_one_computed_afresh(steps) -> None:
    """The ledger keeps each key's current value step by step; whatever the order of records,
    verdicts and the server's word, it is what a recomputation from all records gives."""
    ledger = RoomLedger(ROOM)
    for action, n, event_type, ts in steps:
        event_id = f"$e{n}"
        if action == "add":
            ledger.add_state(state(event_id, f"S{n}", 0, event_type, ts=ts, status=Status.PENDING))
        elif action in ("validate", "invalidate") and event_id in ledger.events:
            old = ledger.events[event_id]
            status = Status.VALID if action == "validate" else Status.INVALID
            kind = old.outer_key.rstrip(":")
            ledger.update_state(
                state(event_id, old.session_id, 0, kind, ts=old.origin_ts, status=status)
            )
        elif action == "server":
            ledger.set_server_current(f"{event_type}:", event_id)
    kept = {r.event_id for r in ledger.current_state()}
    for key in set(ledger._by_outer) | set(ledger.server_current):
        ledger._recompute_winner(key)
    assert kept == {r.event_id for r in ledger.current_state()}
