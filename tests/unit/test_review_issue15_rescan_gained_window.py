"""Review of 39fd529: sessions that gain valid state while the start-up rescan saves the sync
position are never pushed to the admitting rooms' members.

The rescan drains ``_gained_at_start`` (pushes to admitting rooms) and only then awaits
``_advance(probe, force=True)`` (a database write: it yields to the event loop) before
``rescanned`` is set. A sync processed meanwhile still sees ``live`` False, so ``_react`` files
its sessions in ``_gained_at_start``, which nothing reads again: their ``on_new_state`` push is
lost until the next start. Before, nothing awaited between draining it and ``ready``."""

from __future__ import annotations

import time
from typing import Any

from .test_rescan_scale import POSITION_TABLE, ROOM, Bot, Pushes, busy_world, db  # noqa: F401


class RecordingPushes(Pushes):
    def __init__(self) -> None:
        super().__init__()
        self.new_state: list[tuple[str, set[str]]] = []

    async def on_new_state(self, room_id: str, session_ids: set[str], *_: Any, **__: Any) -> None:
        self.new_state.append((room_id, set(session_ids)))


async def test_review_issue15_rescan_state_gained_while_the_position_is_saved_is_pushed(
    db,  # noqa: F811
) -> None:
    await db.execute(POSITION_TABLE)
    hs = busy_world()
    bot = Bot(hs, db)
    pushes = bot.pushes = bot.intake.pushes = RecordingPushes()
    intake = bot.intake
    real_put = bot.store.put_sync_position
    synced = []

    async def put(next_batch: str) -> None:
        if not synced:
            # a live sync processed while the position is written: a seal of ROOM (a preview
            # seal) came back and its session gained valid state (what on_sync does next)
            synced.append(intake.live)
            bot.tracker.gained.setdefault(ROOM, {})["SEALSESSION"] = time.monotonic()
            await intake.react()
        await real_put(next_batch)

    bot.store.put_sync_position = put  # type: ignore[method-assign]
    await bot.start()
    await intake.react()  # any later reaction pass
    assert synced == [False]  # the sync came before the rescan said it was done
    assert any("SEALSESSION" in s for r, s in pushes.new_state if r == ROOM), (
        f"never pushed to the admitting rooms; left in {intake._gained_at_start}"
    )
