"""The maubot plugin: lifecycle and wiring. Sync data goes to the tracker, key requests to the
request intake, joins to the courier; nothing here decides or sends keys itself."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
import time
from typing import Any, Awaitable, Callable

from maubot import Plugin
from mautrix.api import Method, Path
from mautrix.client import InternalEventType
from mautrix.errors import MatrixConnectionError, MatrixRequestError
from mautrix.types import (
    CrossSigner,
    EventType,
    IdentityKey,
    RoomID,
    SessionID,
    ToDeviceEvent,
    TrustState,
    UserID,
)
from mautrix.util.async_db import UpgradeTable
from mautrix.util.config import BaseProxyConfig

from . import protocol
from .bundles import Bundles
from .commands import Commands
from .config import Config
from .courier import Courier, RoomPolicy
from .keyrequests import KeyRequests
from .migrations import upgrade_table
from .policy import Mode
from .pushes import Pushes, membership_changes
from .ratelimit import RequestGate
from .render import Reply, short_id
from .sealer import Sealer
from .seals import SealBook
from .store import AuditRow, RoomRow, Store
from .tracker import Tracker

SELF_SUPPLY_TICK = 15
SUPPLY_ATTEMPTS = 6  # asks per missing session (the wait doubles each time), then it stops
PRUNE_EVERY_SECONDS = 3600
PAGE = 100


class EncStateBot(Plugin):
    config: Config
    store: Store
    tracker: Tracker
    courier: Courier
    requests: KeyRequests

    @classmethod
    def get_config_class(cls) -> type[BaseProxyConfig]:
        return Config

    @classmethod
    def get_db_upgrade_table(cls) -> UpgradeTable:
        return upgrade_table

    # Lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        self.config.load_and_update()
        self._tasks: list[asyncio.Task] = []
        self._patched: dict[str, Any] = {}
        self._supply_asked: dict[tuple[str, str], tuple[float, int]] = {}
        self._pruned_at = 0.0
        self._rooms_listed = False  # until the start-up rescan lists the joined rooms
        self._gained_at_start: dict[str, set[str]] = {}
        self._sync_seen = False
        self.ready = asyncio.Event()
        self.store = Store(self.database)
        self.tracker = Tracker(
            self.store, self.client.crypto, self.log, self._on_new_state, self.client.mxid
        )
        self.seals = SealBook()
        try:
            self.room_rows: dict[str, RoomRow] = {r.room_id: r for r in await self.store.rooms()}
            await self.tracker.load()
            self.seals.load(await self.store.seals())
        except (OSError, ConnectionError) as e:
            self.log.critical(f"encstate cannot read its database: {type(e).__name__}: {e}")
            raise
        self.courier = Courier(
            self.client,
            self.store,
            self.tracker,
            self.room_policy,
            self.log.getChild("courier"),
            on_shared=self._notify_audit_room,
            admitting_rooms=lambda room_id: self.pushes.admitting_rooms(room_id),
            seals=self.seals,
            preview_types=lambda: self.config.preview_types,
        )
        self.sealer = Sealer(
            self.client,
            self.store,
            self.tracker,
            self.courier,
            self.seals,
            self.room_policy,
            self.seal_on,
            lambda: self.config.preview_types,
            self.log.getChild("sealer"),
        )
        self.pushes = Pushes(
            self.client,
            self.store,
            self.tracker,
            self.courier,
            self.room_policy,
            lambda: self.config["push_on_join"],
            self.log.getChild("pushes"),
        )
        limits = self.config["rate_limits"]
        self.requests = KeyRequests(
            self.courier,
            self.store,
            RequestGate(
                limits["per_device"]["burst"],
                limits["per_device"]["per_second"],
                limits["per_user"]["burst"],
                limits["per_user"]["per_second"],
                self.config["duplicate_window_seconds"],
            ),
            self.client.mxid,
            self.client.device_id,
            self.log.getChild("requests"),
            joined=lambda room_id: room_id in self.pushes.joined or not self._rooms_listed,
        )
        if self.client.crypto is None:
            self.log.error(
                "encstate needs end-to-end encryption: give the client a device ID and "
                "install maubot[encryption]. Until then it only records what it sees."
            )
        else:
            self._install_crypto_hooks()
            self.courier.start()
            self.sealer.start()
        self.bundles = Bundles(self)
        self._origins: OrderedDict[str, str] = OrderedDict()  # event id -> megolm session
        self.register_handler_class(Commands(self))
        self.client.add_event_handler(
            InternalEventType.SYNC_SUCCESSFUL, self._on_sync, wait_sync=True
        )
        self._tasks.append(asyncio.create_task(self._startup(), name="encstate-startup"))

    async def stop(self) -> None:
        self.client.remove_event_handler(InternalEventType.SYNC_SUCCESSFUL, self._on_sync)
        self._remove_crypto_hooks()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        await self.sealer.stop()
        await self.courier.stop()

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)
        task.add_done_callback(self._tasks_done)

    def _tasks_done(self, task: asyncio.Task) -> None:
        if task in self._tasks:
            self._tasks.remove(task)
        if not task.cancelled() and task.exception():
            self.log.error(f"Task {task.get_name()} failed", exc_info=task.exception())

    # Hooks on the shared Olm machine (restored in stop) -------------------------------------

    def _install_crypto_hooks(self) -> None:
        crypto = self.client.crypto
        # Take key requests from other users over from mautrix; our intake reads them raw.
        self.client.add_event_middleware(EventType.ROOM_KEY_REQUEST, self._own_requests_only)
        # mautrix cannot decrypt MSC4362 state (it drops the inner state_key and fails); the
        # tracker decrypts it, so keep it away from mautrix's decryptor.
        self.client.add_event_middleware(EventType.ROOM_ENCRYPTED, self._not_encrypted_state)
        for name in ("_receive_room_key", "_receive_forwarded_room_key"):
            original = getattr(crypto, name, None)
            if original is None:
                self.log.warning(f"mautrix has no {name}; session arrival is polled instead")
                continue
            self._patched[name] = original
            setattr(crypto, name, self._wrap_key_receiver(original, name == "_receive_room_key"))

    def _remove_crypto_hooks(self) -> None:
        crypto = self.client.crypto
        if crypto is None:
            return
        self.client.remove_event_middleware(EventType.ROOM_KEY_REQUEST, self._own_requests_only)
        self.client.remove_event_middleware(EventType.ROOM_ENCRYPTED, self._not_encrypted_state)
        for name in self._patched:
            if name in vars(crypto):
                delattr(crypto, name)
        self._patched = {}

    def _note_encrypted(self, evt: Any) -> None:
        """Remember which megolm session each encrypted timeline event came in, for the
        command gate (maubot hands command handlers a copy of the decrypted event that no
        longer says whether, or how, it was encrypted)."""
        content = getattr(evt, "content", None)
        session_id = getattr(content, "session_id", None)
        if session_id:
            self._origins[str(evt.event_id)] = str(session_id)
            while len(self._origins) > 5000:
                self._origins.popitem(last=False)

    async def command_origin(self, room_id: str, event_id: str, sender: str) -> dict | None:
        """How a command's message arrived: None if not encrypted, else whether its session
        was forwarded and the trust of the device of ``sender`` that made it (UNKNOWN_DEVICE
        when no device of the sender has the session's key)."""
        session_id = self._origins.get(str(event_id))
        crypto = self.client.crypto
        if session_id is None or crypto is None:
            return None
        try:
            session = await crypto.crypto_store.get_group_session(
                RoomID(room_id), SessionID(session_id)
            )
        except Exception:
            session = None
        if session is None:
            return {"was_encrypted": True, "trust_state": TrustState.UNKNOWN_DEVICE}
        try:
            device = await crypto.get_or_fetch_device_by_key(
                UserID(sender), IdentityKey(session.sender_key)
            )
        except (MatrixRequestError, MatrixConnectionError):
            device = None
        if device is None or device.signing_key != session.signing_key:
            trust = TrustState.UNKNOWN_DEVICE
        else:
            trust = await crypto.resolve_trust(device)
        return {
            "was_encrypted": True,
            "trust_state": trust,
            "forwarded_keys": bool(session.forwarding_chain),
        }

    async def _own_requests_only(self, evt: Any) -> bool:
        return getattr(evt, "sender", None) == self.client.mxid

    async def _not_encrypted_state(self, evt: Any) -> bool:
        extra = getattr(evt, "unrecognized_", None) or {}
        if getattr(evt, "state_key", None) is None and "state_key" not in extra:
            self._note_encrypted(evt)
            return True
        return False

    def _wrap_key_receiver(self, original: Callable[[Any], Awaitable[None]], room_key: bool):
        """``room_key``: the receiver of ``m.room_key`` (a creator's own key), not of forwards."""

        async def receive(evt: Any) -> None:
            await original(evt)
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

        return receive

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

    # Sync ---------------------------------------------------------------------------------------

    async def _on_sync(self, evt: dict[str, Any]) -> None:
        data = evt.get("data") or {}
        meta = data.get("net.maunium.mautrix") or {}
        first_ignored = bool(meta.get("is_first")) and self.client.ignore_first_sync
        initial_ignored = bool(meta.get("is_initial")) and self.client.ignore_initial_sync
        rooms = data.get("rooms") or {}
        links_changed = False
        for room_id in rooms.get("leave", {}):
            if room_id in self.pushes.joined:
                self.pushes.on_own_membership(room_id, joined=False)
                links_changed = True
        for room_id, room in rooms.get("join", {}).items():
            if room_id not in self.pushes.joined:
                self.pushes.on_own_membership(room_id, joined=True)
                links_changed = True
            try:
                links_changed |= await self._on_room_sync(room_id, room, live=not initial_ignored)
            except Exception:
                self.log.exception(f"Failed to process sync for {room_id}")
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
                    self._spawn(
                        self.bundles.on_knock(room_id, user_id), f"encstate-knock-{user_id}"
                    )
        if not self.tracker.tracked(room_id):
            return links_changed
        await self.tracker.ingest(room_id, state + timeline, current=True)
        if not was_tracked or room_id not in self.tracker.backfilled:
            self._spawn(self._catch_up(room_id, None), f"encstate-backfill-{room_id}")
        elif timeline_data.get("limited") and timeline_data.get("prev_batch"):
            self._spawn(
                self._catch_up(room_id, timeline_data["prev_batch"]), f"encstate-gap-{room_id}"
            )
        return links_changed

    async def _apply_plain_state(self, room_id: str, events: list[dict[str, Any]]) -> bool:
        links_changed = False
        for raw in events:
            changed = await self.tracker.apply_plain_state(room_id, raw)
            if changed and raw.get("type") == "m.room.join_rules":
                self.pushes.update_join_rule(room_id)
                links_changed = True
            elif changed and raw.get("type") in ("m.room.power_levels", "m.room.create"):
                links_changed = True
                if self.ready.is_set():
                    self.sealer.mark(room_id)  # the bot may have gained the power to seal
        return links_changed

    # Start-up rescan, backfill and gap filling -----------------------------------------------

    async def _startup(self) -> None:
        if self.client.crypto is not None:
            try:
                await self.setup_cross_signing()
                await self.courier.bulk.refresh_own_device_keys()
            except Exception:
                self.log.exception("Could not set up cross-signing")
        try:
            await self.rescan()
        except Exception:
            self.log.exception("Start-up rescan failed")
        self.ready.set()
        while True:
            try:
                await self.maintain()
            except Exception:
                self.log.exception("Maintenance round failed")
            await asyncio.sleep(SELF_SUPPLY_TICK)

    async def maintain(self) -> None:
        """The periodic chores: write what could not be written, drop old audit rows and queue
        items past their limits, ask for missing sessions."""
        await self.tracker.flush_all()
        now = time.time()
        if now - self._pruned_at > PRUNE_EVERY_SECONDS:
            self._pruned_at = now
            days = self.config["audit_retention_days"]
            if days:
                removed = await self.store.prune_audit(int((now - days * 86400) * 1000))
                if removed:
                    self.log.info(f"Dropped {removed} audit row(s) older than {days} day(s)")
        if self.client.crypto is not None and self.config["self_supply.enabled"]:
            await self.self_supply()

    async def setup_cross_signing(self) -> None:
        """Make the bot's device cross-signed: Element takes room key bundles only from such
        devices."""
        crypto = self.client.crypto
        if not crypto.account.shared:
            await crypto.share_keys()
        recovery_key = self.config["cross_signing.recovery_key"]
        if recovery_key:
            await crypto.verify_with_recovery_key(recovery_key.strip())
            self.log.info("Signed this device with the configured cross-signing recovery key")
            return
        if await crypto.get_own_cross_signing_public_keys() is not None:
            if await self._device_cross_signed():
                self.log.info("This device is cross-signed")
            else:
                self.log.warning(
                    "The account has a cross-signing identity but this device is not signed: "
                    "set cross_signing.recovery_key so the bot can sign it (Element users will "
                    "not accept its room key bundles until then)"
                )
            return
        if not self.config["cross_signing.bootstrap"]:
            self.log.info(
                "The account has no cross-signing identity; set cross_signing.bootstrap to "
                "create one (needed to reach Element users with room key bundles)"
            )
            return
        recovery_key = await crypto.generate_recovery_key()
        self.log.warning(
            "Created a cross-signing identity for the bot and signed this device. Store this "
            f"recovery key and put it in the config as cross_signing.recovery_key: {recovery_key}"
        )

    async def _device_cross_signed(self) -> bool:
        crypto = self.client.crypto
        keys = await crypto.get_own_cross_signing_public_keys()
        if keys is None or not keys.self_signing_key:
            return False
        return await crypto.crypto_store.is_key_signed_by(
            target=CrossSigner(self.client.mxid, crypto.account.signing_key),
            signer=CrossSigner(self.client.mxid, keys.self_signing_key),
        )

    async def rescan(self) -> None:
        """Read every joined room's current state again (maubot ignores the first sync after a
        start), then catch up on each state-encrypted room's timeline."""
        started = time.monotonic()
        rooms = await self.client.get_joined_rooms()
        self.pushes.joined = set(rooms)
        self._rooms_listed = True
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
                await self._catch_up(room_id, None)
        await self.tracker.settle_pending()
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

    async def _catch_up(self, room_id: str, from_token: str | None) -> None:
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
        if live_members:
            await self.pushes.on_members(room_id, live_members)
        if first_time:
            self.tracker.backfilled.add(room_id)
            await self.store.set_backfilled(room_id)
            self.log.info(f"Read back {seen} timeline event(s) of {room_id}")

    # Self-supply --------------------------------------------------------------------------------

    async def self_supply(self) -> None:
        """Ask for the sessions of state the bot cannot decrypt, from their senders and the
        room's other empowered members."""
        crypto = self.client.crypto
        retry = self.config["self_supply.retry_seconds"]
        now = time.monotonic()
        missing = self.tracker.missing_sessions()
        if missing:
            rooms = {room for room, _ in missing}
            self.log.info(
                f"Missing {len(missing)} state session(s) in {len(rooms)} room(s); asking for them"
            )
        for (room_id, session_id), rec in missing.items():
            last, asked = self._supply_asked.get((room_id, session_id), (None, 0))
            if asked >= SUPPLY_ATTEMPTS:
                continue  # a session nobody answers for (garbage, or its owner is gone)
            if last is not None and now - last < retry * 2 ** (asked - 1):
                continue
            self._supply_asked[(room_id, session_id)] = (now, asked + 1)
            if asked + 1 == SUPPLY_ATTEMPTS:
                self.log.info(
                    f"Asked {SUPPLY_ATTEMPTS} times for session {session_id} in {room_id}; "
                    "not asking again until a restart"
                )
            users = {rec.sender} | set(self.tracker.view(room_id).empowered_users())
            from_devices: dict[str, list[str]] = {}
            sender_key = rec.sender_key
            for user_id in users:
                devices = await crypto.crypto_store.get_devices(user_id)
                if devices is None:
                    devices = (await crypto._fetch_keys([user_id], include_untracked=True)).get(
                        user_id, {}
                    )
                ids = [
                    d
                    for d in devices
                    if not (user_id == self.client.mxid and d == self.client.device_id)
                ]
                if ids:
                    from_devices[user_id] = ids
                if user_id == rec.sender and rec.device_id in devices and not sender_key:
                    sender_key = devices[rec.device_id].identity_key
            if not from_devices:
                continue
            try:
                await crypto.request_room_key(
                    room_id, sender_key or "", session_id, from_devices, timeout=0
                )
            except (MatrixRequestError, MatrixConnectionError) as e:
                self.log.warning(f"Could not ask for session {session_id}: {e}")

    # Policy in force ----------------------------------------------------------------------------

    def room_policy(self, room_id: str) -> RoomPolicy:
        row = self.room_rows.get(room_id)
        mode = self.config.default_mode
        if row is not None and row.mode:
            try:
                mode = Mode.parse(row.mode)
            except ValueError:
                pass
        return RoomPolicy(
            mode=mode,
            share_with_invited=(
                row.share_invited
                if row is not None and row.share_invited is not None
                else self.config["share_with_invited"]
            ),
            allow_mixed_shared_history=self.config["allow_mixed_shared_history"],
            dry_run=(
                row.dry_run
                if row is not None and row.dry_run is not None
                else self.config["dry_run"]
            ),
        )

    def seal_on(self, room_id: str) -> bool:
        row = self.room_rows.get(room_id)
        if row is not None and row.seal is not None:
            return row.seal
        return bool(self.config["seal.enabled"])

    async def _on_new_state(self, room_id: str, session_ids: set[str]) -> None:
        if self.ready.is_set():
            self.sealer.mark(room_id)
        await self.requests.session_arrived(room_id, session_ids)
        if self.ready.is_set():
            await self.pushes.on_new_state(room_id, session_ids)
        else:  # pushed once the start-up rescan knows the links
            self._gained_at_start.setdefault(room_id, set()).update(session_ids)

    async def _notify_audit_room(self, rows: list[AuditRow]) -> None:
        room = self.config["audit_room"]
        if not room:
            return
        reply = Reply(f"encstate shared {len(rows)} key(s)")
        reply.table(
            ["room", "user", "device", "session", "from", "trigger"],
            [
                (r.room_id, r.user_id, r.device_id, short_id(r.session_id), r.msg_index, r.trigger)
                for r in rows[:50]
            ],
        )
        if len(rows) > 50:
            reply.line(f"… and {len(rows) - 50} more")
        try:
            await self.client.send_message(room, reply.content())
        except (MatrixRequestError, MatrixConnectionError) as e:
            self.log.warning(f"Could not post to the audit room {room}: {e}")
