"""Sync intake: everything the homeserver tells the bot comes in here, and goes one way.

Raw sync (maubot's SYNC_SUCCESSFUL, the first sync after a start included) feeds the tracker
(plain and encrypted state, the timeline) and the links; member changes become pushes, knocks
go to the bundles, key requests to the request intake. Room keys arriving through mautrix's Olm
machine decrypt what waited for them. After each step the sessions that gained valid state
trigger their reactions: seal the room, answer the requests that waited, push to the members of
admitting rooms. At start the intake reads every joined room again and pages back through the
timeline of the state-encrypted ones.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
import logging
import time
from typing import Any, Awaitable

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
from .store import Store
from .tasks import stop_all
from .tracker import Tracker

PAGE = 100
ORIGINS_KEPT = 5000


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
        self.ready = asyncio.Event()
        self._sync_seen = False
        self._gained_at_start: dict[str, set[str]] = {}
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
        await stop_all(self._tasks)

    def spawn(self, coro: Awaitable[Any], name: str) -> None:
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

    async def _react(self, room_id: str, sessions: dict[str, float]) -> None:
        """Seal, push to admitting rooms, and deliver what waited for these sessions' keys
        (requests and pushes to members who joined before the bot held them; kept in the
        database, so across a restart too)."""
        session_ids = set(sessions)
        if self.ready.is_set():
            self.sealer.mark(room_id)
            await self.pushes.on_new_state(room_id, session_ids)
        else:
            self._gained_at_start.setdefault(room_id, set()).update(session_ids)
        await self.courier.release(room_id, session_ids)

    # Sync ---------------------------------------------------------------------------------------

    async def on_sync(self, evt: dict[str, Any]) -> None:
        if self.encryption is not None and self.encryption.check():
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
        for room_id, room in rooms.get("join", {}).items():
            if room_id not in self.links.joined:
                self.links.on_own_membership(room_id, joined=True)
                links_changed = True
            try:
                links_changed |= await self._on_room_sync(room_id, room, live=not initial_ignored)
            except Exception:
                self.log.exception(f"Failed to process sync for {room_id}")
        await self.react()
        if links_changed and self.ready.is_set():
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

    async def _on_room_sync(self, room_id: str, room: dict[str, Any], live: bool) -> bool:
        """Process one joined room's sync; True if a restricted-room link may have changed."""
        state = [e for e in (room.get("state") or {}).get("events", []) if isinstance(e, dict)]
        timeline_data = room.get("timeline") or {}
        timeline = [e for e in timeline_data.get("events", []) if isinstance(e, dict)]
        was_tracked = self.tracker.tracked(room_id)
        links_changed = await self._apply_plain_state(
            room_id, state + [e for e in timeline if "state_key" in e]
        )
        if live:
            await self.pushes.on_members(room_id, timeline)
            for user_id, membership in membership_changes(timeline):
                if membership == "knock":
                    self.spawn(
                        self.bundles.on_knock(room_id, user_id), f"encstate-knock-{user_id}"
                    )
        if not self.tracker.tracked(room_id):
            return links_changed
        await self.tracker.ingest(room_id, state + timeline, current=True)
        if not was_tracked or room_id not in self.tracker.backfilled:
            self.spawn(self.catch_up(room_id, None), f"encstate-backfill-{room_id}")
        elif timeline_data.get("limited") and timeline_data.get("prev_batch"):
            self.spawn(
                self.catch_up(room_id, timeline_data["prev_batch"]), f"encstate-gap-{room_id}"
            )
        return links_changed

    async def _apply_plain_state(self, room_id: str, events: list[dict[str, Any]]) -> bool:
        links_changed = False
        for raw in events:
            changed = await self.tracker.apply_plain_state(room_id, raw)
            if changed and raw.get("type") == "m.room.join_rules":
                self.links.update_join_rule(room_id)
                links_changed = True
            elif changed and raw.get("type") in ("m.room.power_levels", "m.room.create"):
                links_changed = True
                if self.ready.is_set():
                    self.sealer.mark(room_id)  # the bot may have gained the power to seal
        return links_changed

    # Start-up rescan, backfill and gap filling -----------------------------------------------

    async def rescan(self) -> None:
        """Read every joined room's current state again (maubot ignores the first sync after a
        start), then catch up on each state-encrypted room's timeline."""
        started = time.monotonic()
        rooms = await self.client.get_joined_rooms()
        self.links.set_joined(rooms)
        for room_id in rooms:
            try:
                state = await self.client.api.request(Method.GET, Path.v3.rooms[room_id].state)
            except (MatrixRequestError, MatrixConnectionError) as e:
                self.log.warning(f"Could not read the state of {room_id}: {e}")
                continue
            state = [e for e in state if isinstance(e, dict)]
            await self._apply_plain_state(room_id, state)
            if self.tracker.tracked(room_id):
                await self.tracker.ingest(room_id, state, current=True)
        for room_id in list(self.tracker.ledgers):
            if room_id in rooms:
                await self.catch_up(room_id, None)
        await self.tracker.settle_pending()
        await self.react()
        pushed = await self.pushes.refresh_links()
        for room_id, session_ids in self._gained_at_start.items():
            await self.pushes.on_new_state(room_id, session_ids, skip=pushed)
        await self.pushes.reconcile(skip=pushed)
        self._gained_at_start = {}
        for room_id in self.tracker.ledgers:
            if room_id in rooms:
                self.sealer.mark(room_id)  # what changed while the bot was away
        tracked = [r for r in rooms if self.tracker.tracked(r)]
        self.log.info(
            f"Rescanned {len(rooms)} room(s) in {time.monotonic() - started:.2f} s; "
            f"{len(tracked)} encrypt their state"
        )

    async def catch_up(self, room_id: str, from_token: str | None) -> None:
        """Page back through the timeline until an event the ledger knows, or the limit."""
        ledger = self.tracker.ledger(room_id)
        first_time = room_id not in self.tracker.backfilled
        limit = self.config["backfill_limit"]
        token = from_token
        seen = 0
        live_members: list[dict[str, Any]] = []
        while seen < limit:
            query: dict[str, Any] = {"dir": "b", "limit": min(PAGE, limit - seen)}
            if token:
                query["from"] = token
            try:
                resp = await self.client.api.request(
                    Method.GET, Path.v3.rooms[room_id].messages, query_params=query
                )
            except (MatrixRequestError, MatrixConnectionError) as e:
                self.log.warning(f"Could not read the timeline of {room_id}: {e}")
                return
            chunk = [e for e in resp.get("chunk", []) if isinstance(e, dict)]
            if not chunk:
                break
            seen += len(chunk)
            # Events newer than the newest one the ledger knows happened while the bot was
            # away: their joins still deserve a push. Older ones were handled before.
            newer: list[dict[str, Any]] = []
            for event in chunk:
                if event.get("event_id") in ledger.events or event.get("event_id") in (
                    ledger.messages
                ):
                    break
                newer.append(event)
            known = len(newer) < len(chunk)
            chunk.reverse()
            await self.tracker.ingest(room_id, chunk)
            if not first_time:
                live_members = list(reversed(newer)) + live_members
            token = resp.get("end")
            if known or not token:
                break
        await self.react()
        if live_members:
            await self.pushes.on_members(room_id, live_members)
        if first_time:
            self.tracker.backfilled.add(room_id)
            await self.store.set_backfilled(room_id)
            self.log.info(f"Read back {seen} timeline event(s) of {room_id}")
