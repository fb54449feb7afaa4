"""Review of c8d6333 and a4f9bd5: a seal's later waves read afresh the users a sync showed
leave or be banned while the seal went out (``Members.departed``). Two leaves never get there:

D1: a leave that comes in the *state* section of a limited sync (the leave fell in the gap;
Synapse sends the room's state changes there): the intake hands ``Pushes.on_members`` only the
timeline, so the later waves still approve the member from the seal's one listing.
D2: a leave that a sync shows while the seal's member listing is being read (the homeserver
answered before the leave, the sync was processed before the answer): the room is not yet
``reusing`` a listing, so ``departed`` drops it, and every wave approves the member.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

from encstate_bot import sealer as sealer_module
from encstate_bot.intake import Intake, Origins
from encstate_bot.links import RoomLinks
from encstate_bot.pushes import Pushes

from .test_huge_seal import JudgingCourier
from .test_sealer import ADMIN, BOT, PREVIEW, ROOM, World, _Policies

LOG = logging.getLogger("test.session_review_departed")


def leave_event(user_id: str) -> dict[str, Any]:
    return {
        "type": "m.room.member",
        "state_key": user_id,
        "sender": ADMIN,
        "event_id": f"$leave-{user_id}",
        "room_id": ROOM,
        "content": {"membership": "leave"},
        "unsigned": {"prev_content": {"membership": "join"}},
    }


def world_with_pushes(monkeypatch: Any, joined: list[str]) -> tuple[World, JudgingCourier, Pushes]:
    monkeypatch.setattr(sealer_module, "SEAL_WAVE_USERS", 2, raising=False)
    world = World()
    world.server.members.update({u: "join" for u in joined})
    courier = JudgingCourier(world.server, world.sealer.members, [])
    world.sealer.courier = courier
    links = RoomLinks(world.tracker, BOT, LOG)
    pushes = Pushes(
        BOT,
        world.store,
        world.tracker,
        courier,
        _Policies(),
        links,
        world.sealer.members,
        world.book,
        SimpleNamespace(preview_types=PREVIEW.preview_types, push_on_join=True),
        LOG,
    )
    return world, courier, pushes


async def _nothing(*_: Any) -> None:
    pass


def intake_for(world: World, pushes: Pushes, gap_read: asyncio.Event) -> Intake:
    """The intake on the world's tracker and these pushes; its reads of the timeline (the
    gap fill of a limited sync) wait for ``gap_read``: the homeserver is slow to answer."""
    request = world.server.request

    async def api(method, path, *args, **kwargs):
        if str(path).endswith("/messages"):
            await gap_read.wait()
            return {"chunk": []}
        return await request(method, path, *args, **kwargs)

    world.tracker.backfilled.add(ROOM)
    client = SimpleNamespace(
        mxid=BOT,
        device_id="BOTDEVICE",
        crypto=None,
        api=SimpleNamespace(request=api),
        ignore_first_sync=False,
        ignore_initial_sync=False,
    )
    return Intake(
        client,
        {"backfill_limit": 2000},
        world.store,  # type: ignore[arg-type]
        world.tracker,
        pushes.links,
        pushes,
        world.sealer,
        None,  # type: ignore[arg-type]
        SimpleNamespace(release=_nothing),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        Origins(),
        LOG,
    )


async def test_a_leave_in_a_limited_syncs_state_section_stops_the_later_waves(
    monkeypatch,
) -> None:
    joined = [f"@m{i}:example.org" for i in range(5)]
    kicked = joined[-1]  # waves: [admin, bot], [member, m0], [m1, m2], [m3, m4]
    world, courier, pushes = world_with_pushes(monkeypatch, joined)
    intake = intake_for(world, pushes, asyncio.Event())

    async def kick() -> None:
        for _ in range(5):  # the next wave's devices are decided while these keys go out
            await asyncio.sleep(0)
        world.server.members[kicked] = "leave"
        chat = {
            "type": "m.reaction",
            "event_id": "$r",
            "room_id": ROOM,
            "sender": ADMIN,
            "content": {},
        }
        room = {
            "state": {"events": [leave_event(kicked)]},  # the leave fell in the gap
            "timeline": {"events": [chat], "limited": True, "prev_batch": "t0"},
        }
        await intake.on_sync({"data": {"next_batch": "s9", "rooms": {"join": {ROOM: room}}}})

    courier.during_keys = kick
    await world.admin_sets_topic("$t1", "Nightingale")
    try:
        report = await world.sealer.seal_room(ROOM)
    finally:
        await intake.stop()  # (the gap fill is still waiting for its page)

    assert len(report.sealed) == 1
    got = {user for user, _ in courier.sent}
    # fails: the intake gave on_members only the timeline, so the listing still answered
    assert kicked not in got, "a later wave approved a member the sync's state showed gone"


async def test_a_leave_synced_while_the_listing_is_read_stops_the_waves(monkeypatch) -> None:
    joined = [f"@m{i}:example.org" for i in range(5)]
    kicked = joined[-1]
    world, courier, pushes = world_with_pushes(monkeypatch, joined)
    request = world.server.request

    async def listing_then_sync(method, path, *args, **kwargs):
        answer = await request(method, path, *args, **kwargs)
        if str(path).endswith("/members") and world.server.members[kicked] == "join":
            # the homeserver answered; the kick, and the sync showing it, come before the
            # answer is read
            world.server.members[kicked] = "leave"
            await pushes.on_members(ROOM, [leave_event(kicked)])
        return answer

    world.server.request = listing_then_sync
    await world.admin_sets_topic("$t1", "Nightingale")
    report = await world.sealer.seal_room(ROOM)

    assert len(report.sealed) == 1
    got = {user for user, _ in courier.sent}
    # fails: ``departed`` dropped the leave (no listing was reused yet), the listing named them
    assert kicked not in got, "the waves approved a member a sync showed gone during the seal"
