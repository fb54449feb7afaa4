# ruff: noqa: F811  (the ``db`` fixture is imported)
"""Timeline reads cut short by backfill_limit are kept (``encstate_unread``, migration v10) and
resumed at the next start; until they are done the room's sessions are not forwarded, since a
message of any of them may lie in what was not read (a message at a session's highest index
leaves no gap in the ledger: the session would look state-only). The bot's own seals still go
out: they never encrypt messages. (The reads themselves: test_final_review_rescan_position.py
and test_session_review2_reads.py.)"""

from __future__ import annotations

from attr import evolve

from encstate_bot import protocol
from encstate_bot.policy import SealFacts, Share, Withhold, decide, decide_seal
from encstate_bot.store import UnreadHistory

from .test_policy import EMPOWERED, HELD, MEMBER, STATE_ONLY
from .test_rescan_rejoin_first_read import encrypted
from .test_rescan_scale import ROOM, Bot, Homeserver, db, settle_tasks  # noqa: F401


def test_a_room_with_unread_history_forwards_no_session_but_still_gives_its_seals() -> None:
    assert isinstance(decide(EMPOWERED, MEMBER, STATE_ONLY, HELD), Share)
    unread = evolve(EMPOWERED, history_unread=True)
    refused = decide(unread, MEMBER, STATE_ONLY, HELD)
    assert isinstance(refused, Withhold) and refused.code == protocol.UNAVAILABLE
    assert "not read yet" in refused.reason
    seal = SealFacts("m.room.name", preview=True, live=True)
    assert isinstance(decide_seal(unread, MEMBER, seal), Share)


async def test_the_store_keeps_each_cut_read_until_it_is_done(store) -> None:
    assert await store.unread() == []
    away = UnreadHistory("!a:x", "t10", None, True)
    bounded = UnreadHistory("!a:x", "t90", "s5", False)
    await store.put_unread(away)
    await store.put_unread(bounded)  # a second stretch of the same room's timeline
    await store.put_unread(UnreadHistory("!b:x", "t3", "s1", False))
    assert sorted(await store.unread(), key=lambda u: (u.room_id, u.from_token)) == [
        away,
        bounded,
        UnreadHistory("!b:x", "t3", "s1", False),
    ]
    # a resumed read cut again: one step further along the same stretch
    await store.put_unread(UnreadHistory("!a:x", "t40", "s5", False), replacing="t90")
    assert {u.from_token for u in await store.unread() if u.room_id == "!a:x"} == {"t10", "t40"}
    await store.drop_unread("!a:x", "t10")
    await store.drop_unread("!a:x", "t40")
    assert [u.room_id for u in await store.unread()] == ["!b:x"]


async def test_the_rest_of_a_first_read_is_read_in_the_background_and_pushes_no_joins(
    db,
) -> None:
    """(Review 4, F4: a first read cut by backfill_limit left older history unread, and a
    message there in a session whose values it read went unseen.)"""
    hs = Homeserver()
    hs.state_room(ROOM)
    hs.join(ROOM, "@old:example.org")  # long before the bot came
    hidden = encrypted(hs, ROOM)  # the name session's newest index, beyond the first read
    hs.plain(ROOM, 80)
    bot = Bot(hs, db)
    bot.intake.config["backfill_limit"] = 50
    await bot.start(settle=False)
    assert hidden["event_id"] not in bot.tracker.ledger(ROOM).messages
    assert bot.tracker.history_unread(ROOM)  # so the room's sessions are withheld meanwhile
    await settle_tasks(bot.intake)
    assert hidden["event_id"] in bot.tracker.ledger(ROOM).messages
    assert not bot.tracker.history_unread(ROOM)
    assert bot.pushes.members == []  # history from before the bot: nobody to push to
    await bot.stop()
