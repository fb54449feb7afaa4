"""Sync intake: everything the homeserver tells the bot comes in here, and goes one way.

Raw sync (maubot's SYNC_SUCCESSFUL, the first sync after a start included) feeds the tracker
(plain and encrypted state, the timeline) and the links; member changes become pushes, knocks
go to the bundles, key requests to the request intake. Room keys arriving through mautrix's Olm
machine decrypt what waited for them. After each step the sessions that gained valid state
trigger their reactions: seal the room, answer the requests that waited, push to the members of
admitting rooms. At start the intake reads every joined room again and pages back through the
timeline of the state-encrypted ones: those that changed since the sync position it saved
last time (all of them when it has none), several rooms at once.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
import json
import logging
import time
from typing import Any, Awaitable, Iterable
import uuid

from mautrix.api import Method, Path
from mautrix.errors import MatrixConnectionError, MatrixRequestError
from mautrix.types import EventType, RoomID, SessionID, ToDeviceEvent

from . import glue, protocol
from .bundles import Bundles
from .courier import Courier
from .e2ee import Encryption
from .keyrequests import KeyRequests
from .links import RoomLinks
from .members import membership_changes
from .pushes import Pushes
from .sealer import Sealer
from .store import Store, UnreadHistory
from .tasks import stop_all
from .tracker import Tracker

PAGE = 100
# A catch-up's first page is small: most rooms stop in it (at the newest event the bot knows),
# and a homeserver's cost grows with the events a page holds.
FIRST_PAGE = 10
ORIGINS_KEPT = 5000
# Rooms read at once by the start-up rescan (their state, then their timelines).
RESCAN_CONCURRENCY = 8
# The sync position is written at most this often while syncs run (and at the end of the
# rescan and at stop): a start after a crash reads back at most this much more.
POSITION_SAVE_SECONDS = 10.0
# A read the limit cut short goes on this long after (backfill_limit events at a time).
RESUME_DELAY_SECONDS = 0.5
# A read that failed is tried again after this long, doubling up to RETRY_MAX_SECONDS.
RETRY_SECONDS = 5.0
RETRY_MAX_SECONDS = 600.0
# Pages in a row the homeserver filters out entirely before a read goes on later instead.
MAX_EMPTY_PAGES = 20


class Origins:
    """Which megolm session each encrypted timeline event came in, for the command gate
    (maubot hands command handlers a copy of the decrypted event that no longer says whether,
    or how, it was encrypted)."""

    def __init__(self) -> None:
        self.sessions: OrderedDict[str, str] = OrderedDict()

    def note(self, evt: Any) -> None:
        content = getattr(evt, "content", None)
        session_id = getattr(content, "session_id", None)
        if session_id:
            self.sessions[str(evt.event_id)] = str(session_id)
            while len(self.sessions) > ORIGINS_KEPT:
                self.sessions.popitem(last=False)

    def session_of(self, event_id: str) -> str | None:
        return self.sessions.get(str(event_id))


class RawRequestWarnings(logging.Filter):
    """Drops mautrix's warning for each key request it cannot deserialize (clients leave out
    ``sender_key``, which mautrix requires): the intake reads those requests raw and answers
    them, and logs the malformed ones itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith("Failed to deserialize")
            and "'type': 'm.room_key_request'" in message
            and " into ToDeviceEvent: " in message
        )


class Intake:
    def __init__(
        self,
        client: Any,
        config: Any,
        store: Store,
        tracker: Tracker,
        links: RoomLinks,
        pushes: Pushes,
        sealer: Sealer,
        requests: KeyRequests,
        courier: Courier,
        bundles: Bundles,
        origins: Origins,
        log: logging.Logger,
        encryption: Encryption | None = None,
    ) -> None:
        self.client = client
        self.config = config
        self.store = store
        self.tracker = tracker
        self.links = links
        self.pushes = pushes
        self.sealer = sealer
        self.requests = requests
        self.courier = courier
        self.bundles = bundles
        self.origins = origins
        self.log = log
        self.encryption = encryption
        self.last_sync: float | None = None  # time.time() of the last sync processed
        # Set by the plugin once the bot is ready (bot.py ``_startup``): rescanned, seals current.
        self.ready = asyncio.Event()
        # The start-up rescan is done: reactions (seal, push) run at once from now on.
        self.rescanned = False
        self.to_seal: list[str] = []  # the rooms the rescan read, to seal before ready
        # A sync token up to which every event of every state-encrypted room was processed
        # (None: not known). Saved, a restart catches up only on the rooms changed since.
        self.position: str | None = None
        self._saved_position: str | None = None
        self._saved_at = 0.0
        self._last_batch: str | None = None  # next_batch of the last sync processed
        self._caught_up = False  # the start-up catch-up finished and left no room behind
        # Rooms whose events since the position are not all processed: gaps being filled,
        # or lost (a failed catch-up or room sync; until the next start). While any exists
        # the position stays where it is.
        self._filling: dict[str, int] = {}
        self._lost: set[str] = set()
        self._first_reads: set[str] = set()  # rooms whose first read-back is running
        self._resuming: set[tuple[str, str]] = set()  # kept reads on their way (room, token)
        self._first_retries: set[str] = set()  # rooms whose failed first read is retried
        self._stopping = False
        self._sync_seen = False
        # room -> session -> when it gained: gains while the rescan runs, for its pass
        self._gained_at_start: dict[str, dict[str, float]] = {}
        self._restore_receivers: Any = None
        self._raw_requests = RawRequestWarnings()
        self._tasks: list[asyncio.Task] = []

    # Hooks on the shared Olm machine (removed in stop) ----------------------------------------

    def install(self) -> None:
        crypto = self.client.crypto
        # Take key requests from other users over from mautrix; the intake reads them raw.
        self.client.add_event_middleware(EventType.ROOM_KEY_REQUEST, self._own_requests_only)
        # mautrix cannot decrypt MSC4362 state (it drops the inner state_key and fails); the
        # tracker decrypts it, so keep it away from mautrix's decryptor.
        self.client.add_event_middleware(EventType.ROOM_ENCRYPTED, self._not_encrypted_state)
        self._restore_receivers = glue.patch_key_receivers(crypto, self.on_key, self.log)
        self.client.log.addFilter(self._raw_requests)
        self.log.info(
            "Key requests are read raw from the sync: mautrix's warnings about requests it "
            "cannot parse (most lack sender_key) are silenced; encstate answers them"
        )

    async def stop(self) -> None:
        # (also when maubot took the crypto machine away from this client: the log filter and
        # middlewares are on this client either way)
        await self._save_position(force=True)
        if self._restore_receivers is not None:
            self.client.remove_event_middleware(
                EventType.ROOM_KEY_REQUEST, self._own_requests_only
            )
            self.client.remove_event_middleware(
                EventType.ROOM_ENCRYPTED, self._not_encrypted_state
            )
            self._restore_receivers()
            self._restore_receivers = None
            self.client.log.removeFilter(self._raw_requests)
        self._stopping = True
        while self._tasks:  # (a task being stopped may have started another)
            await stop_all(list(self._tasks))

    def spawn(self, coro: Awaitable[Any], name: str) -> None:
        if self._stopping:
            if asyncio.iscoroutine(coro):
                coro.close()
            return
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.append(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        if task in self._tasks:
            self._tasks.remove(task)
        if not task.cancelled() and task.exception():
            self.log.error(f"Task {task.get_name()} failed", exc_info=task.exception())

    async def _own_requests_only(self, evt: Any) -> bool:
        return getattr(evt, "sender", None) == self.client.mxid

    async def _not_encrypted_state(self, evt: Any) -> bool:
        extra = getattr(evt, "unrecognized_", None) or {}
        if getattr(evt, "state_key", None) is None and "state_key" not in extra:
            self.origins.note(evt)
            return True
        return False

    # Room keys ----------------------------------------------------------------------------------

    async def on_key(self, evt: Any, room_key: bool) -> None:
        """A room key mautrix's Olm machine handled. ``room_key``: an ``m.room_key`` (a
        creator's own key), not a forward."""
        try:
            content = evt.content
            room_id, session_id = str(content.room_id), str(content.session_id)
            raw = content.serialize()
        except Exception:
            return
        if not self.tracker.tracked(room_id):
            return
        from_creator = room_key and await self._stored_from_creator(evt, room_id, session_id)
        await self.tracker.note_session(
            room_id,
            session_id,
            from_creator and protocol.shared_history_flag(raw),
            f"{evt.sender}/{getattr(evt, 'sender_device', None)}",
            from_creator,
        )
        await self.tracker.session_received(room_id, session_id)
        await self.react()

    async def _stored_from_creator(self, evt: Any, room_id: str, session_id: str) -> bool:
        """Whether this to-device key is an ``m.room_key`` that the session's creator sent and
        mautrix stored: only then may its ``shared_history`` flag count. A forwarded key, or
        one mautrix refused (a session it already had, a mismatched id), says nothing."""
        try:
            stored = await self.client.crypto.crypto_store.get_group_session(
                RoomID(room_id), SessionID(session_id)
            )
        except Exception:
            return False
        return (
            stored is not None
            and not stored.forwarding_chain
            and stored.sender_key == getattr(evt, "sender_key", None)
            and stored.first_known_index == 0
        )

    # Reactions ----------------------------------------------------------------------------------

    async def react(self) -> None:
        """Act on the sessions that gained valid state: seal the room again, push them to the
        members of admitting rooms (once the start-up rescan knows the links), answer the
        requests that waited for them. A room whose reactions fail is retried by the next
        call; the others go on (the pushes are idempotent: nothing is pushed twice unasked)."""
        for room_id, sessions in self.tracker.take_gained().items():
            try:
                await self._react(room_id, sessions)
            except asyncio.CancelledError:
                self.tracker.give_back(room_id, sessions)
                raise
            except Exception:
                self.log.exception(f"Reacting to new state in {room_id} failed; retrying later")
                self.tracker.give_back(room_id, sessions)

    @property
    def live(self) -> bool:
        """Reactions run at once (after the start-up rescan); before, they wait for it."""
        return self.rescanned or self.ready.is_set()

    async def _react(self, room_id: str, sessions: dict[str, float]) -> None:
        """Seal, push to admitting rooms, and deliver what waited for these sessions' keys
        (requests and pushes to members who joined before the bot held them; kept in the
        database, so across a restart too)."""
        session_ids = set(sessions)
        if self.live:
            self.sealer.mark(room_id)
            await self.pushes.on_new_state(room_id, session_ids)
        else:
            self._gained_at_start.setdefault(room_id, {}).update(sessions)
        await self.courier.release(room_id, session_ids)

    # Sync ---------------------------------------------------------------------------------------

    async def on_sync(self, evt: dict[str, Any]) -> None:
        if self.encryption is not None and self.encryption.check():
            self._lost.add("")  # this sync's events are not processed: the position stays
            return  # maubot swapped the client: this instance is being restarted
        self.last_sync = time.time()
        data = evt.get("data") or {}
        meta = data.get("net.maunium.mautrix") or {}
        first_ignored = bool(meta.get("is_first")) and self.client.ignore_first_sync
        initial_ignored = bool(meta.get("is_initial")) and self.client.ignore_initial_sync
        rooms = data.get("rooms") or {}
        links_changed = False
        for room_id in rooms.get("leave", {}):
            if room_id in self.links.joined:
                self.links.on_own_membership(room_id, joined=False)
                links_changed = True
        rejoined: set[str] = set()
        for room_id, room in rooms.get("join", {}).items():
            if room_id not in self.links.joined:
                if self.links.listed:
                    rejoined.add(room_id)
                self.links.on_own_membership(room_id, joined=True)
                links_changed = True
            try:
                links_changed |= await self._on_room_sync(
                    room_id, room, live=not initial_ignored, rejoined=room_id in rejoined
                )
            except Exception:
                self._lost.add(room_id)
                self.log.exception(f"Failed to process sync for {room_id}")
        await self.react()
        if links_changed and self.live:
            await self.pushes.refresh_links()
        requests = []
        for raw in (data.get("to_device") or {}).get("events", []):
            if not isinstance(raw, dict):
                continue
            if raw.get("type") == "m.room_key_request":
                requests.append((raw.get("sender"), raw.get("content")))
            elif first_ignored and raw.get("type") == "m.room.encrypted":
                # maubot drops the first sync after a start: keep the room keys it carried.
                await self._decrypt_skipped_to_device(raw)
        if requests:
            await self.requests.handle(requests)
        next_batch = data.get("next_batch")
        if isinstance(next_batch, str):
            self._last_batch = next_batch
            await self._advance(next_batch)
        if not self._sync_seen:
            self._sync_seen = True
            skipped = "maubot skipped it" if first_ignored else "it was not the first"
            self.log.info(f"Sync running: processed the first sync encstate saw ({skipped})")
            if not first_ignored and self.client.ignore_first_sync:
                self.log.info(
                    "maubot started the plugin after its client's first sync, which it skips: "
                    "if the bot just started, room keys sent to it while it was down came in "
                    "that sync and are lost (standalone: set ignore_first_sync: false); encstate "
                    "asks for the sessions it cannot read (self_supply)"
                )

    async def _decrypt_skipped_to_device(self, raw: dict[str, Any]) -> None:
        if self.client.crypto is None:
            return
        try:
            await self.client.crypto.handle_to_device_event(ToDeviceEvent.deserialize(raw))
        except Exception as e:
            self.log.debug(f"Could not decrypt a to-device event from the first sync: {e}")

    async def _on_room_sync(
        self, room_id: str, room: dict[str, Any], live: bool, rejoined: bool = False
    ) -> bool:
        """Process one joined room's sync (``rejoined``: the bot was not in it at the last
        sync); True if a restricted-room link may have changed."""
        state = [e for e in (room.get("state") or {}).get("events", []) if isinstance(e, dict)]
        timeline_data = room.get("timeline") or {}
        timeline = [e for e in timeline_data.get("events", []) if isinstance(e, dict)]
        was_tracked = self.tracker.tracked(room_id)
        links_changed = await self._apply_plain_state(
            room_id, state + [e for e in timeline if "state_key" in e]
        )
        if live:
            # a limited sync's gap can hide a leave or ban: its state section shows it
            self.pushes.departed(room_id, state)
            await self.pushes.on_members(room_id, timeline)
            for user_id, membership in membership_changes(timeline):
                if membership == "knock":
                    self.spawn(
                        self.bundles.on_knock(room_id, user_id), f"encstate-knock-{user_id}"
                    )
        if not self.tracker.tracked(room_id):
            return links_changed
        await self.tracker.ingest(room_id, state + timeline, current=True)
        first = not was_tracked or room_id not in self.tracker.backfilled
        if first and room_id not in self._first_reads:
            self.spawn(self.catch_up(room_id, None), f"encstate-backfill-{room_id}")
        elif rejoined:
            # Back in a room it had left (also while its first read runs, which began before
            # the bot left). What was sent since the last sync is read as a gap; what was sent
            # while the bot was away before it, from the last sync back to the bot's own leave,
            # is kept as a read to do (so the position may move on meanwhile).
            self._filling[room_id] = self._filling.get(room_id, 0) + 1
            prev_batch = timeline_data.get("prev_batch")
            if self._last_batch is None:
                read = self._fill_gap(room_id, prev_batch, None, away=True)
            else:
                read = self._read_away(room_id, self._last_batch, prev_batch)
            self.spawn(read, f"encstate-rejoin-{room_id}")
        elif timeline_data.get("limited") and timeline_data.get("prev_batch"):
            # The gap lies between the last sync processed (when there was one) and this one.
            self._filling[room_id] = self._filling.get(room_id, 0) + 1
            self.spawn(
                self._fill_gap(room_id, timeline_data["prev_batch"], self._last_batch),
                f"encstate-gap-{room_id}",
            )
        return links_changed

    async def _fill_gap(
        self, room_id: str, prev_batch: str | None, to: str | None, away: bool = False
    ) -> None:
        done = False
        try:
            done = await self.catch_up(room_id, prev_batch, to=to, away=away)
        finally:
            left = self._filling.get(room_id, 1) - 1
            if left > 0:
                self._filling[room_id] = left
            else:
                self._filling.pop(room_id, None)
            if not done:
                self._lost.add(room_id)

    async def _apply_plain_state(self, room_id: str, events: list[dict[str, Any]]) -> bool:
        links_changed = False
        for raw in events:
            changed = await self.tracker.apply_plain_state(room_id, raw)
            if changed and raw.get("type") == "m.room.join_rules":
                self.links.update_join_rule(room_id)
                links_changed = True
            elif changed and raw.get("type") in ("m.room.power_levels", "m.room.create"):
                links_changed = True
                if self.live:
                    self.sealer.mark(room_id)  # the bot may have gained the power to seal
        return links_changed

    # Start-up rescan, backfill and gap filling -----------------------------------------------

    async def rescan(self) -> None:
        """Read every joined room's current state again (maubot ignores the first sync after a
        start), then catch up on the timelines of the state-encrypted rooms: those that changed
        since the saved sync position (one sync request tells which), or, without one, each
        back to an event it knew before this start. Several rooms at once, every room's state
        before any timeline (a catch-up's pushes depend on other rooms' join rules and power
        levels); within a room, state before its timeline, as before."""
        started = time.monotonic()
        rooms: set[str] = set()
        read_since: str | None = None
        catch_ups: list[Awaitable[bool]] = []
        unchanged = 0
        try:
            rooms = set(await self.client.get_joined_rooms())
            self.links.set_joined(rooms)
            since = await self._load_position()
            unread = await self._load_unread()
            probe = await self._probe(since)
            await self._bounded(self._rescan_state(room_id) for room_id in rooms)
            read_since = since if probe is not None and probe[1] is not None else None
            changed = probe[1] if probe is not None and probe[1] is not None else set()
            for room_id in list(self.tracker.ledgers):
                if room_id not in rooms:
                    continue
                if room_id not in self.tracker.backfilled:
                    catch_ups.append(self._start_catch_up(room_id))
                elif read_since is None:
                    catch_ups.append(self._start_catch_up(room_id, before_start=True))
                elif room_id in changed:
                    catch_ups.append(self._start_catch_up(room_id, to=read_since))
                else:
                    unchanged += 1  # no event since the position: nothing to read
            done = await self._bounded(catch_ups)
            self._caught_up = all(done)
            # reads kept to do (cut short, or the time away from a room) go on in the
            # background: their rooms' sessions are not forwarded until they are done
            for later in unread:
                if later.room_id in rooms and self.tracker.tracked(later.room_id):
                    self._resume_soon(later, 0)
            await self.tracker.settle_pending()
            await self.react()
            pushed = await self.pushes.refresh_links()
            members: dict[str, list[str]] = {}  # each room's members, read once in this pass
            parked, self._gained_at_start = self._gained_at_start, {}
            for room_id, sessions in parked.items():
                await self.pushes.on_new_state(room_id, set(sessions), pushed, members)
            await self.pushes.reconcile(skip=pushed, members=members)
            # What changed while the bot was away: the plugin seals these before it is ready.
            self.to_seal = [room_id for room_id in self.tracker.ledgers if room_id in rooms]
            if probe is not None:
                if self._last_batch is None:  # the next sync's gap ends here at the latest
                    self._last_batch = probe[0]
                await self._advance(probe[0], force=True)
        finally:
            self.rescanned = True
            self.tracker.fresh = None
            # Gains parked since the pass above took them (a sync processed while it awaited),
            # or all of them if the rescan failed: the next reaction pass runs them, now live.
            for room_id, sessions in self._gained_at_start.items():
                self.tracker.give_back(room_id, sessions)
            self._gained_at_start = {}
        tracked = sum(1 for r in rooms if self.tracker.tracked(r))
        read = (
            f"read back {len(catch_ups)} timeline(s), {unchanged} unchanged since the last "
            "sync position"
            if read_since is not None
            else f"read back {len(catch_ups)} timeline(s) (no sync position saved)"
        )
        self.log.info(
            f"Rescanned {len(rooms)} room(s) in {time.monotonic() - started:.2f} s; "
            f"{tracked} encrypt their state; {read}"
        )

    async def _bounded(self, jobs: Iterable[Awaitable[Any]]) -> list[Any]:
        """Run ``jobs`` at most RESCAN_CONCURRENCY at a time; their results in order."""
        gate = asyncio.Semaphore(RESCAN_CONCURRENCY)

        async def one(job: Awaitable[Any]) -> Any:
            async with gate:
                return await job

        return await asyncio.gather(*(one(job) for job in jobs))

    async def _rescan_state(self, room_id: str) -> None:
        try:
            state = await self.client.api.request(Method.GET, Path.v3.rooms[room_id].state)
        except (MatrixRequestError, MatrixConnectionError) as e:
            self.log.warning(f"Could not read the state of {room_id}: {e}")
            return
        try:
            state = [e for e in state if isinstance(e, dict)]
            await self._apply_plain_state(room_id, state)
            if self.tracker.tracked(room_id):
                await self.tracker.ingest(room_id, state, current=True)
        except Exception:
            self._lost.add(room_id)
            self.log.exception(f"Could not rescan the state of {room_id}")

    async def _start_catch_up(
        self, room_id: str, to: str | None = None, before_start: bool = False
    ) -> bool:
        try:
            if await self.catch_up(room_id, None, to=to, before_start=before_start):
                return True
        except Exception:
            self.log.exception(f"Could not catch up on {room_id}")
        self._lost.add(room_id)
        return False

    async def catch_up(
        self,
        room_id: str,
        from_token: str | None,
        to: str | None = None,
        before_start: bool = False,
        away: bool = False,
        resumed: UnreadHistory | None = None,
    ) -> bool:
        """Page back through the timeline until an event the ledger knows (``before_start``:
        knew before this start), the sync token ``to`` (the homeserver stops there, and every
        event before it is known), the bot's own leave or ban (``away``: the time the bot was
        out of a room it joined again), or the limit.

        The first read of a room (not read back before; from its newest event) goes on to the
        limit or the room's start: what the ledger knows then came from /state or a sync, and
        older values of those sessions lie behind them. One runs per room at a time: a second
        call returns at once, since the syncs since the first began are ingested as they come
        (their gaps and rejoins are read by their own calls).

        While any read of a room runs, the courier forwards none of the room's sessions (part
        of its timeline is not read yet; ``Courier._hold_while_read``). A later read the limit
        cuts short is kept in the database (``Store.unread``) and goes on in the background
        where it stopped (``resumed``: that read), and so does one a failed page stopped
        (retried later); the room's sessions are withheld until it is done (the policy's
        ``history_unread``; until a room's first read has finished, the courier holds them
        back, ``Tracker.being_read``).
        A read bounded by ``to`` that shows the bot out of the room at ``to`` (the oldest own
        membership event it met was a join to a room it was not in) keeps the time away
        before ``to`` as a read to do. False if a page
        could not be read, or what is left to read could not be kept."""
        first_time = (
            room_id not in self.tracker.backfilled and from_token is None and not to and not away
        )
        if first_time and room_id in self._first_reads:
            return True
        if first_time:
            self._first_reads.add(room_id)
        self.tracker.reading[room_id] = self.tracker.reading.get(room_id, 0) + 1
        self.tracker.reads_started[room_id] = self.tracker.reads_started.get(room_id, 0) + 1
        done = False
        try:
            done = await self._catch_up(
                room_id, from_token, to, before_start, away, first_time, resumed
            )
            return done
        finally:
            left = self.tracker.reading.pop(room_id) - 1
            if left:
                self.tracker.reading[room_id] = left
            if first_time:
                self._first_reads.discard(room_id)
                if not done and room_id not in self._first_retries and not self._stopping:
                    # the room stays withheld (not read back yet) until a retry gets through
                    self._first_retries.add(room_id)
                    self.spawn(self._retry_first_read(room_id), f"encstate-first-{room_id}")

    async def _catch_up(
        self,
        room_id: str,
        from_token: str | None,
        to: str | None,
        before_start: bool,
        away: bool,
        first_time: bool,
        resumed: UnreadHistory | None,
    ) -> bool:
        ledger = self.tracker.ledger(room_id)
        resuming = resumed.from_token if resumed is not None else None
        # history from before the bot came: the rest of a first read
        before_bot = first_time or (resumed is not None and resumed.before_bot)
        fresh = (self.tracker.fresh or ()) if before_start else ()
        limit = self.config["backfill_limit"]
        token = from_token
        seen = empty = 0
        live_members: list[dict[str, Any]] = []
        oldest_own: dict[str, Any] | None = None  # the oldest own membership event met
        cut = failed = False
        while seen < limit:
            query: dict[str, Any] = {
                "dir": "b",
                "limit": min(PAGE if token else FIRST_PAGE, limit - seen),
            }
            if token:
                query["from"] = token
            if to:
                query["to"] = to
            try:
                resp = await self.client.api.request(
                    Method.GET, Path.v3.rooms[room_id].messages, query_params=query
                )
            except (MatrixRequestError, MatrixConnectionError) as e:
                self.log.warning(f"Could not read the timeline of {room_id}: {e}")
                if token is None or token == resuming:
                    return False  # nothing read: the caller (or the next start) tries again
                failed = True  # what it read stays; the rest is kept, to go on with shortly
                break
            chunk = [e for e in resp.get("chunk", []) if isinstance(e, dict)]
            end = resp.get("end")
            if not chunk:
                # a page the homeserver filtered out entirely still goes on (its ``end``)
                empty += 1
                if not isinstance(end, str) or not end or end == token:
                    break
                token = end
                if empty >= MAX_EMPTY_PAGES:
                    break
                continue
            empty = 0
            seen += len(chunk)
            # Events newer than the newest one the ledger knows happened while the bot was
            # away: their joins still deserve a push. Older ones were handled before.
            newer: list[dict[str, Any]] = []
            for event in chunk:
                event_id = event.get("event_id")
                own = self._own_membership(event)
                if own is not None:
                    oldest_own = event
                if away:
                    if own in ("leave", "ban"):
                        break
                elif (
                    not to
                    and not first_time
                    and self._known(ledger, event_id, fresh, resumed=resuming is not None)
                ):
                    break
                newer.append(event)
            known = len(newer) < len(chunk)
            chunk.reverse()
            await self.tracker.ingest(room_id, chunk)
            if not before_bot:  # (history from before the bot: nobody to push to)
                live_members = list(reversed(newer)) + live_members
            token = end
            if known or not token:
                break
        else:
            # stopped by backfill_limit with more to read: kept, to go on with in the
            # background (the position may then move past them); a first read too, since an
            # older message may use a session whose values it read
            cut = bool(token)
        if empty >= MAX_EMPTY_PAGES and token:
            cut = True  # a homeserver paging through nothing: go on later
        await self.react()
        if live_members:
            await self.pushes.on_members(room_id, live_members)
        if first_time:
            self.tracker.backfilled.add(room_id)
            await self.store.set_backfilled(room_id)
            self.log.info(f"Read back {seen} timeline event(s) of {room_id}")
        if to and oldest_own is not None and not await self._away_at(room_id, to, oldest_own):
            return False
        if to and not cut and not failed and to in self.tracker.unread.get(room_id, ()):
            # the read reached ``to`` and the bot was out of the room then: read that time now
            self._resume_soon(UnreadHistory(room_id, to, None, True), RESUME_DELAY_SECONDS)
        if cut or failed:
            if resuming is not None and resuming not in self.tracker.unread.get(room_id, ()):
                return True  # dropped meanwhile (the bot was in the room after all)
            if failed:
                return await self._keep_unread(
                    UnreadHistory(room_id, str(token), to, away, before_bot),
                    resuming,
                    RETRY_SECONDS,
                    f"Could not read all of {room_id}'s timeline",
                )
            if token == resuming:
                self.log.warning(
                    f"The homeserver gave no further page of {room_id}'s timeline: reading on "
                    "at the next start"
                )
                return False
            # a read that met only empty pages goes on at the next start, not at once (a
            # homeserver handing out ever new tokens and no events would keep it busy)
            return await self._keep_unread(
                UnreadHistory(room_id, str(token), to, away, before_bot),
                resuming,
                RESUME_DELAY_SECONDS if seen > 0 else None,
                f"Read back {seen} timeline event(s) of {room_id}, the backfill_limit, and "
                "more remain"
                if seen > 0
                else f"The homeserver gave only empty pages of {room_id}'s timeline",
            )
        if resuming is not None:
            await self.store.drop_unread(room_id, resuming)
            self._unread_done(room_id, resuming)
            self.log.info(f"Read the rest of {room_id}'s timeline that was left to read")
        return True

    @staticmethod
    def _known(ledger: Any, event_id: Any, fresh: Any, resumed: bool) -> bool:
        """Whether a read back stops at this event: one the ledger recorded (before this
        start, with ``fresh``). A resumed read stops only at a message or a superseded value:
        a current value may have come from /state, which says nothing of what came before."""
        if event_id in fresh:
            return False
        if event_id in ledger.messages:
            return True
        record = ledger.events.get(event_id)
        return record is not None and not (resumed and ledger.is_current(record))

    async def _away_at(self, room_id: str, to: str, oldest_own: dict[str, Any]) -> bool:
        """A read bounded by the sync token ``to`` met the bot's own membership events: the
        oldest one's previous membership says whether the bot was in the room at ``to``. If
        not, the time away before ``to`` (back to its own leave) is kept as a read to do,
        begun once the read reaches ``to`` (an older part of it may still show the bot was
        in the room then); if it was, such a read kept by a newer part is dropped."""
        unsigned = oldest_own.get("unsigned")
        prev = unsigned.get("prev_content") if isinstance(unsigned, dict) else None
        joined = isinstance(prev, dict) and prev.get("membership") == "join"
        if joined:
            if to in self.tracker.unread.get(room_id, ()):
                await self.store.drop_unread(room_id, to)
                self._unread_done(room_id, to)
            return True
        if to in self.tracker.unread.get(room_id, ()):
            return True
        return await self._keep_unread(
            UnreadHistory(room_id, to, None, True),
            None,
            None,
            f"The bot was out of {room_id} at the sync position: reading back over that time",
        )

    async def _read_away(self, room_id: str, since: str, prev_batch: str | None) -> None:
        """The bot joined a room again: the time away (from the last sync, when it was out of
        the room, back to its own leave) is kept as a read to do and begun, and the gap since
        the last sync is read."""
        kept = UnreadHistory(room_id, since, None, True)
        why = f"The bot joined {room_id} again: reading back over the time it was away"
        if not await self._keep_unread(kept, None, RESUME_DELAY_SECONDS, why):
            self._lost.add(room_id)
        # reads kept from before (a start that found the bot out of the room skipped them);
        # the table is read only when the room has some
        if self.tracker.unread.get(room_id, set()) - {since}:
            for earlier in await self._load_unread():
                if earlier.room_id == room_id and earlier.from_token != since:
                    self._resume_soon(earlier, RESUME_DELAY_SECONDS)
        await self._fill_gap(room_id, prev_batch, since)

    async def _keep_unread(
        self,
        unread: UnreadHistory,
        resuming: str | None,
        delay: float | None,
        why: str | None,
    ) -> bool:
        """Keep what is left to read of a room's timeline, and go on with it in the
        background after ``delay`` seconds (None: not now; the read that reaches its start
        begins it, or the next start does); the room's sessions are not forwarded
        meanwhile. ``why`` is logged with what that means."""
        room_id = unread.room_id
        self.tracker.unread.setdefault(room_id, set()).add(unread.from_token)
        try:
            await self.store.put_unread(unread, replacing=resuming)
        except Exception as e:
            self.log.warning(
                f"Could not keep what is left to read of {room_id}'s timeline ({e}): the sync "
                "position stays"
            )
            return False
        if resuming is not None:
            self._unread_done(room_id, resuming)
        if why is not None:
            self.log.warning(
                f"{why}: reading on in the background; until then none of {room_id}'s "
                "sessions is forwarded (its seals still go out)"
            )
        if delay is not None:
            self._resume_soon(unread, delay)
        return True

    async def _retry_first_read(self, room_id: str) -> None:
        """Try a room's first read again until it gets through, less and less often."""
        delay = RETRY_SECONDS
        try:
            while room_id not in self.tracker.backfilled:
                await asyncio.sleep(delay)
                if room_id not in self._first_reads and await self.catch_up(room_id, None):
                    return
                delay = min(2 * delay, RETRY_MAX_SECONDS)
        finally:
            self._first_retries.discard(room_id)

    def _unread_done(self, room_id: str, from_token: str) -> None:
        tokens = self.tracker.unread.get(room_id, set())
        tokens.discard(from_token)
        if not tokens:
            self.tracker.unread.pop(room_id, None)

    def _resume_soon(self, unread: UnreadHistory, delay: float) -> None:
        """Go on with a kept read after ``delay`` seconds (not if it is already on its way)."""
        key = (unread.room_id, unread.from_token)
        if key in self._resuming:
            return
        self._resuming.add(key)
        self.spawn(self._resume(unread, delay), f"encstate-unread-{unread.room_id}")

    async def _resume(self, unread: UnreadHistory, delay: float) -> None:
        """Go on with a read kept to do (its token, its bound), after ``delay`` seconds,
        unless it was dropped meanwhile; one that fails is tried again, less and less often
        (up to every RETRY_MAX_SECONDS)."""
        key = (unread.room_id, unread.from_token)
        done = False
        try:
            await asyncio.sleep(delay)
            if unread.from_token not in self.tracker.unread.get(unread.room_id, ()):
                return
            try:
                done = await self.catch_up(
                    unread.room_id,
                    unread.from_token,
                    to=unread.to_token,
                    away=unread.away,
                    resumed=unread,
                )
            except Exception:
                self.log.exception(f"Could not read on in {unread.room_id}'s timeline")
        finally:
            self._resuming.discard(key)
        if not done and not self._stopping:
            self._resume_soon(unread, min(max(2 * delay, RETRY_SECONDS), RETRY_MAX_SECONDS))

    def _own_membership(self, event: dict[str, Any]) -> str | None:
        """The bot's own membership this event sets, if it is one of its member events."""
        if event.get("type") != "m.room.member" or event.get("state_key") != self.client.mxid:
            return None
        content = event.get("content") if isinstance(event.get("content"), dict) else {}
        membership = content.get("membership")
        return membership if isinstance(membership, str) else ""

    # The sync position -------------------------------------------------------------------------

    async def _load_unread(self) -> list[UnreadHistory]:
        try:
            return await self.store.unread()
        except Exception as e:
            self.log.warning(f"Could not read where cut timeline reads resume: {e}")
            return []

    async def _load_position(self) -> str | None:
        try:
            return await self.store.sync_position()
        except Exception as e:
            self.log.warning(f"Could not read the saved sync position: {e}")
            return None

    async def _probe(self, since: str | None) -> tuple[str, set[str] | None] | None:
        """One sync request: the homeserver's position now and, from ``since``, the rooms with
        timeline events since then (None without ``since``). Its filter leaves out all else
        (no state, presence or account data; no room at all without ``since``) and names a
        type no event has, so the homeserver's sync cache cannot answer it from an older
        request. None if it failed."""
        room_filter: dict[str, Any] = {
            "timeline": {"limit": 1, "not_types": [f"org.encstate.probe.{uuid.uuid4().hex}"]},
            "state": {"types": []},
            "ephemeral": {"types": []},
            "account_data": {"types": []},
        }
        if since is None:
            room_filter["rooms"] = []
        query = {
            "filter": json.dumps(
                {"room": room_filter, "presence": {"types": []}, "account_data": {"types": []}},
                separators=(",", ":"),
            ),
            "timeout": "0",
            "set_presence": "offline",  # leaves the bot's presence alone
        }
        if since is not None:
            query["since"] = since
        try:
            resp = await self.client.api.request(Method.GET, Path.v3.sync, query_params=query)
        except (MatrixRequestError, MatrixConnectionError) as e:
            self.log.warning(f"Could not read the sync position: {e}; reading every timeline")
            return None
        next_batch = resp.get("next_batch") if isinstance(resp, dict) else None
        if not isinstance(next_batch, str):
            return None
        if since is None:
            return next_batch, None
        joined = (resp.get("rooms") or {}).get("join") or {}
        return next_batch, {str(room_id) for room_id in joined}

    async def _advance(self, token: str, force: bool = False) -> None:
        """Every event up to ``token`` was processed (the token of a sync just processed, or
        of the start-up probe once the catch-up is done): move the position there, unless a
        room is behind."""
        if not self._caught_up or self._filling or self._lost:
            return
        if self.tracker.backlog or self.tracker.overflowed:
            return  # events held in memory only, or dropped: read again at the next start
        self.position = token
        await self._save_position(force)

    async def _save_position(self, force: bool = False) -> None:
        if self.position is None or self.position == self._saved_position:
            return
        if not force and time.monotonic() - self._saved_at < POSITION_SAVE_SECONDS:
            return
        try:
            await self.store.put_sync_position(self.position)
        except Exception as e:
            self.log.warning(f"Could not save the sync position: {e}")
            return
        self._saved_position = self.position
        self._saved_at = time.monotonic()
