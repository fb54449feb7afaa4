"""Seals, pure: which values need one, which seals are live, and the rule that stops two
encstate instances from resealing each other."""

from __future__ import annotations

from attr import evolve

from encstate_bot.ledger import RoomLedger, StateRecord, Status
from encstate_bot.seals import Seal, SealBook, content_hash, needs_seal

ROOM = "!room:example.org"


def value(event_id: str, session: str, ts: int, key: str = "m.room.name:") -> StateRecord:
    event_type = key.partition(":")[0]
    return StateRecord(
        room_id=ROOM,
        event_id=event_id,
        outer_key=key,
        session_id=session,
        sender="@admin:example.org",
        origin_ts=ts,
        msg_index=0,
        ciphertext="c",
        status=Status.VALID,
        inner_type=event_type,
        inner_key="",
    )


def seal_of(rec: StateRecord, session: str, content: dict, ts: int = 1) -> Seal:
    return Seal(
        room_id=ROOM,
        session_id=session,
        outer_key=rec.outer_key,
        inner_type=rec.inner_type or "",
        inner_key="",
        content_hash=content_hash(content),
        source_event_id=rec.event_id,
        session_key="key",
        created_ts=ts,
    )


def test_a_seal_is_live_from_its_value_until_a_newer_value() -> None:
    ledger, book = RoomLedger(ROOM), SealBook()
    admins = value("$admin", "A", 1)
    ledger.add_state(admins)
    assert needs_seal(book, ledger, admins, content_hash({"name": "N"}))
    seal = seal_of(admins, "S1", {"name": "N"})
    book.add(seal)  # written, but its event never went out (a crash): it counts for nothing
    assert book.live(ledger) == [] and needs_seal(book, ledger, admins, seal.content_hash)
    book.begin(seal)
    # while the sealer sends its key, before its event is back, it opens the value it seals
    assert [s.session_id for s in book.live(ledger)] == ["S1"]
    ledger.add_state(value("$seal", "S1", 2))
    book.finish(evolve(seal, event_id="$seal"))
    assert [s.session_id for s in book.live(ledger)] == ["S1"]
    assert not needs_seal(book, ledger, ledger.events["$seal"], "anything")  # its own seal
    # a newer value: the seal opens nothing current any more
    ledger.add_state(value("$newer", "A", 3))
    assert book.live(ledger) == []
    assert needs_seal(book, ledger, ledger.events["$newer"], content_hash({"name": "M"}))


def test_two_instances_stop_after_one_seal_each() -> None:
    """Bot 1 sees bot 2's seal carry the value bot 1 sealed: no new seal, and back."""
    content = {"name": "N"}
    ledger1, book1 = RoomLedger(ROOM), SealBook()
    ledger2, book2 = RoomLedger(ROOM), SealBook()
    admins = value("$admin", "A", 1)
    for ledger in (ledger1, ledger2):
        ledger.add_state(admins)
    book1.add(evolve(seal_of(admins, "S1", content), event_id="$s1"))
    book2.add(evolve(seal_of(admins, "S2", content), event_id="$s2"))
    first, second = value("$s1", "S1", 2), value("$s2", "S2", 3)
    for ledger in (ledger1, ledger2):
        ledger.add_state(first)
        ledger.add_state(second)
    current1 = ledger1.current_state()[0]
    assert current1.event_id == "$s2"  # bot 2's seal won
    assert not needs_seal(book1, ledger1, current1, content_hash(content))
    assert not needs_seal(book2, ledger2, ledger2.current_state()[0], content_hash(content))
    # a different value from anyone still gets a seal
    assert needs_seal(book1, ledger1, current1, content_hash({"name": "other"}))


def test_content_hash_ignores_key_order_only() -> None:
    assert content_hash({"a": 1, "b": 2}) == content_hash({"b": 2, "a": 1})
    assert content_hash({"a": 1}) != content_hash({"a": "1"})


def test_an_abandoned_seal_gives_way_to_the_previous_one() -> None:
    book = SealBook()
    old = value("$old", "A", 1)
    sent = evolve(seal_of(old, "S1", {"name": "old"}, ts=1), event_id="$e1")
    book.add(sent)
    newer = seal_of(value("$new", "A", 2), "S2", {"name": "new"}, ts=2)
    book.begin(newer)
    assert book.latest(ROOM, "m.room.name:") == newer
    book.finish(newer)  # its event never went out
    assert book.latest(ROOM, "m.room.name:") == sent
    assert book.in_flight == set()


def test_a_seal_opens_nothing_while_the_server_names_a_value_the_bot_cannot_read() -> None:
    """PROTOCOL.md rule 8 through seals: the homeserver's current event for the key wins; while
    the bot cannot read it, its older seal is not handed out."""
    ledger, book = RoomLedger(ROOM), SealBook()
    admins = value("$admin", "A", 1)
    ledger.add_state(admins)
    book.add(evolve(seal_of(admins, "S1", {"name": "N"}), event_id="$seal"))
    ledger.add_state(value("$seal", "S1", 2))
    assert [s.session_id for s in book.live(ledger)] == ["S1"]
    unreadable = evolve(value("$new", "X", 3), status=Status.PENDING)
    ledger.add_state(unreadable)
    ledger.set_server_current("m.room.name:", "$new")
    assert book.live(ledger) == [] and book.shareable(ledger) == ({}, [])
