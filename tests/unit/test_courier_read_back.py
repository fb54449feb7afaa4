"""While a room's timeline is being read back, the courier forwards none of its sessions: a
queued item that would is retried later (what the read has not reached may hold messages of
that session). The bot's own seals never encrypt messages, so they go at once, and so does
anything from another room. (Review of 819e77f, R6: a request answered during a gap read was
decided on a ledger that showed the session state-only.)"""

from __future__ import annotations

from encstate_bot.audit import Outcome
from encstate_bot.policy import Share, Withhold
from encstate_bot.store import OutboxItem

from .test_courier_lanes import ROOM, USER, FakeClient, ReorderingServer, courier_for, seals

OTHER = "!other:example.org"


def outcome(item: OutboxItem, session_id: str, decision=None) -> Outcome:
    return Outcome(
        item=item, device_id="DEV", session_id=session_id, decision=decision or Share(0, "ok")
    )


def test_a_forwarded_session_waits_for_the_read_and_a_seal_does_not() -> None:
    book_seals = seals(1)
    courier = courier_for(FakeClient(ReorderingServer()))
    courier.seals.load(book_seals)
    courier.tracker.being_read = lambda room_id: room_id == ROOM  # type: ignore[method-assign]
    asked = OutboxItem(room_id=ROOM, user_id=USER, trigger="request", session_id="S", id=1)
    joined = OutboxItem(room_id=ROOM, user_id=USER, trigger="join", id=2)
    elsewhere = OutboxItem(room_id=OTHER, user_id=USER, trigger="request", session_id="S", id=3)
    command = OutboxItem(room_id=ROOM, user_id=USER, trigger="command")  # not queued: refused
    outcomes = [
        outcome(asked, "S"),
        outcome(joined, book_seals[0].session_id),  # the bot's seal: goes now
        outcome(elsewhere, "S"),
        outcome(command, "S"),
        outcome(joined, "T", Withhold("m.unavailable", "no")),
    ]
    kept, held = courier._hold_while_read(outcomes, {})
    assert held == [asked]
    assert [o.item for o in kept] == [joined, elsewhere, command, joined]
    refused = next(o for o in kept if o.item is command)  # (review 4, F2: it went out)
    assert isinstance(refused.decision, Withhold) and refused.decision.code == "m.unavailable"

    # a join that would also forward a session waits whole (its seal comes with the retry)
    both = [outcome(joined, book_seals[0].session_id), outcome(joined, "S")]
    kept, held = courier._hold_while_read(both, {})
    assert kept == [] and held == [joined]

    courier.tracker.being_read = lambda room_id: False  # type: ignore[method-assign]
    fresh = [outcome(asked, "S"), outcome(elsewhere, "S")]
    assert courier._hold_while_read(fresh, {}) == (fresh, [])
    # a read of the room began (and maybe ended) since the batch did: its decisions wait
    courier.tracker.reads_started = {ROOM: 1}
    kept, held = courier._hold_while_read(fresh, {ROOM: 0, OTHER: 0})
    assert held == [asked] and [o.item for o in kept] == [elsewhere]
