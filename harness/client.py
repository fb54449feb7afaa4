"""E2EE test users on mautrix-python: they create MSC4362 rooms, encrypt state with packed keys,
send messages, ask for keys, accept forwarded keys, and decrypt and validate encrypted state.

mautrix accepts ``m.forwarded_room_key`` from anyone, which is how MSC3414 intends a newcomer to
receive state keys from an empowered member; these users record every key and withheld notice
they get so tests can assert on them.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Awaitable, Callable, Iterable
import uuid

from aiohttp import ClientSession
from mautrix.api import Method, Path
from mautrix.client import Client, InternalEventType
from mautrix.client.state_store.memory import MemoryStateStore
from mautrix.crypto import OlmMachine
from mautrix.crypto.store import StateStore as CryptoStateStore
from mautrix.crypto.store.memory import MemoryCryptoStore
from mautrix.types import (
    EncryptionAlgorithm,
    EventType,
    ForwardedRoomKeyEventContent,
    Membership,
    RoomID,
    SessionID,
    UserID,
)
import olm

from .synapse import Synapse

MEGOLM = "m.megolm.v1.aes-sha2"
MSC4362_FLAG = "io.element.msc4362.encrypt_state_events"


class _StateStore(MemoryStateStore, CryptoStateStore):
    async def find_shared_rooms(self, user_id: UserID) -> list[RoomID]:
        return [
            room_id
            for room_id, members in self.members.items()
            if user_id in members
            and members[user_id].membership == Membership.JOIN
            and self.encryption.get(room_id) is not None
        ]


async def _not_encrypted_state(evt: Any) -> bool:
    extra = getattr(evt, "unrecognized_", None) or {}
    return getattr(evt, "state_key", None) is None and "state_key" not in extra


class SentEvent:
    def __init__(self, event_id: str, session_id: str, index: int, ciphertext: str) -> None:
        self.event_id = event_id
        self.session_id = session_id
        self.index = index
        self.ciphertext = ciphertext

    def __repr__(self) -> str:
        return f"SentEvent({self.event_id}, session={self.session_id[:8]}…, index={self.index})"


class ReadState:
    """Encrypted state as a test user decrypts it."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], dict[str, Any]] = {}
        self.undecryptable: list[str] = []  # outer state keys
        self.invalid: list[str] = []

    def get(self, event_type: str, state_key: str = "") -> dict[str, Any] | None:
        return self.values.get((event_type, state_key))


async def all_hold(users: Iterable[Any], room_id: str, session_ids: Iterable[str]) -> bool:
    """Whether every one of these clients holds every one of these megolm sessions."""
    session_ids = list(session_ids)
    for user in users:
        for session_id in session_ids:
            if not await user.has_session(room_id, session_id):
                return False
    return True


async def eventually(
    check: Callable[[], Awaitable[Any] | Any], timeout: float = 20, interval: float = 0.1
) -> Any:
    """Poll ``check`` until it returns something truthy; raise TimeoutError with the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s (last value: {last!r})")
        await asyncio.sleep(interval)


class TestUser:
    __test__ = False  # not a pytest test class
    """One user with one E2EE device, syncing in the background."""

    def __init__(self, synapse: Synapse, localpart: str, http: ClientSession) -> None:
        self.synapse = synapse
        self.localpart = localpart
        self.http = http
        self.user_id = ""
        self.device_id = ""
        self.client: Client = None  # type: ignore[assignment]
        self.crypto: OlmMachine = None  # type: ignore[assignment]
        self.messages: list[Any] = []  # decrypted m.room.message events, in arrival order
        self.forwarded: list[dict[str, Any]] = []  # forwarded keys received
        self.withheld: list[dict[str, Any]] = []  # m.room_key.withheld received
        self.to_device_types: list[str] = []
        self._sync_at = 0.0

    @classmethod
    async def create(
        cls, synapse: Synapse, localpart: str, http: ClientSession, register: bool = True
    ) -> TestUser:
        user = cls(synapse, localpart, http)
        await user.start(register)
        return user

    async def start(self, register: bool = True) -> None:
        loop = asyncio.get_running_loop()
        if register:
            self.user_id = await loop.run_in_executor(None, self.synapse.register, self.localpart)
        else:
            self.user_id = f"@{self.localpart}:{self.synapse.server_name}"
        token, self.device_id = await loop.run_in_executor(None, self.synapse.login, self.user_id)
        state_store = _StateStore()
        crypto_store = MemoryCryptoStore(self.user_id, "test")
        self.client = Client(
            mxid=UserID(self.user_id),
            device_id=self.device_id,
            base_url=self.synapse.url,
            token=token,
            client_session=self.http,
            state_store=state_store,
            sync_store=crypto_store,
        )
        self.crypto = OlmMachine(self.client, crypto_store, state_store)
        await self.crypto.load()
        self.client.crypto = self.crypto
        await self.crypto.share_keys()
        original = self.crypto._receive_forwarded_room_key

        async def receive_forwarded(evt: Any) -> None:
            # "at": when the sync that carried it came back, before this client's own work
            self.forwarded.append(
                {"sender": evt.sender, "session_id": evt.content.session_id, "at": self._sync_at}
            )
            await original(evt)

        self.crypto._receive_forwarded_room_key = receive_forwarded
        # Every Olm plaintext this device decrypts, as JSON, to check what senders put in it.
        self.olm_plaintexts: list[dict[str, Any]] = []
        decrypt_ciphertext = self.crypto._decrypt_olm_ciphertext

        async def record_plaintext(sender: Any, sender_key: Any, message: Any) -> str:
            plaintext = await decrypt_ciphertext(sender, sender_key, message)
            self.olm_plaintexts.append({**json.loads(plaintext), "_sender_key": sender_key})
            return plaintext

        self.crypto._decrypt_olm_ciphertext = record_plaintext
        self.client.add_event_handler(
            InternalEventType.SYNC_SUCCESSFUL, self._record_to_device, wait_sync=True
        )
        self.client.add_event_handler(EventType.ROOM_MESSAGE, self._record_message)
        # mautrix cannot decrypt MSC4362 state; read_state() does that. Keep it away.
        self.client.add_event_middleware(EventType.ROOM_ENCRYPTED, _not_encrypted_state)
        self._first_sync = asyncio.Event()
        self.client.add_event_handler(InternalEventType.SYNC_SUCCESSFUL, self._synced)
        self.client.start(None)
        await asyncio.wait_for(self._first_sync.wait(), 30)

    async def _synced(self, _: Any) -> None:
        self._first_sync.set()

    async def _record_to_device(self, evt: dict[str, Any]) -> None:
        self._sync_at = time.time()
        for raw in (evt["data"].get("to_device") or {}).get("events", []):
            self.to_device_types.append(raw.get("type"))
            if raw.get("type") in ("m.room_key.withheld", "org.matrix.room_key.withheld"):
                if raw.get("type") == "m.room_key.withheld":
                    self.withheld.append({"sender": raw.get("sender"), **raw.get("content", {})})

    async def _record_message(self, evt: Any) -> None:
        self.messages.append(evt)

    async def stop(self) -> None:
        self.client.stop()

    async def cross_sign(self) -> str:
        """Give the account a cross-signing identity that signs this device; returns the
        recovery key. mautrix's MemoryCryptoStore cannot store a cross-signing key it has seen
        before (it assigns to a NamedTuple), which breaks this client's next key query of its
        own user: this device's store gets a working put_cross_signing_key first."""
        from mautrix.types import TOFUSigningKey

        store = self.crypto.crypto_store

        async def put_cross_signing_key(user_id: Any, usage: Any, key: Any) -> None:
            keys = store._cross_signing_keys.setdefault(user_id, {})
            current = keys.get(usage)
            first = key if current is None else current.first
            keys[usage] = TOFUSigningKey(key=key, first=first)

        store.put_cross_signing_key = put_cross_signing_key
        return await self.crypto.generate_recovery_key()

    # Talking to the bot ------------------------------------------------------------------------

    async def command(self, room_id: str, text: str, bot_user: str, timeout: float = 60) -> str:
        """Send ``text`` (encrypted, in its own megolm session) and return the bot's answer:
        the newest version of its first message after ours, once it stops changing."""
        await self.new_session(room_id)
        since = len(self.messages)
        await self.client.send_text(RoomID(room_id), text)
        await self.new_session(room_id)

        def answer() -> Any:
            for evt in self.messages[since:]:
                if evt.sender == bot_user and evt.room_id == room_id:
                    return evt
            return None

        first = await eventually(answer, timeout=timeout)
        return self.latest_text(first)

    def latest_text(self, evt: Any) -> str:
        """The body of a message, or of its newest edit."""
        body = evt.content.body
        for later in self.messages:
            relates = getattr(later.content, "relates_to", None)
            if (
                relates is not None
                and getattr(relates, "rel_type", None) is not None
                and relates.rel_type.value == "m.replace"
                and relates.event_id == evt.event_id
            ):
                new = getattr(later.content, "new_content", None)
                body = new.body if new is not None else later.content.body
        return body

    async def wait_for_edit(self, bot_user: str, room_id: str, contains: str, timeout=60) -> str:
        """Wait until one of the bot's messages here reads ``contains`` (edits included)."""

        def found() -> str | None:
            for evt in self.messages:
                if evt.sender == bot_user and evt.room_id == room_id:
                    text = self.latest_text(evt)
                    if contains in text:
                        return text
            return None

        return await eventually(found, timeout=timeout)

    # Rooms --------------------------------------------------------------------------------------

    async def create_room(
        self,
        invite: list[str] = (),
        power: dict[str, int] | None = None,
        flag: str | None = MSC4362_FLAG,
        history_visibility: str = "shared",
        join_rule: dict[str, Any] | None = None,
        name: str | None = None,
        encrypted: bool = True,
    ) -> str:
        """Create a room: encrypted, with state encryption on (``flag``) unless flag is None."""
        encryption: dict[str, Any] = {"algorithm": MEGOLM}
        if flag:
            encryption[flag] = True
        initial_state = [
            {
                "type": "m.room.history_visibility",
                "state_key": "",
                "content": {"history_visibility": history_visibility},
            },
        ]
        if encrypted:
            initial_state.append(
                {"type": "m.room.encryption", "state_key": "", "content": encryption}
            )
        if join_rule:
            initial_state.append(
                {"type": "m.room.join_rules", "state_key": "", "content": join_rule}
            )
        body: dict[str, Any] = {
            "preset": "private_chat",
            "invite": list(invite),
            "initial_state": initial_state,
            "power_level_content_override": {"users": dict(power or {}), "users_default": 0},
        }
        if name:
            body["name"] = name
        resp = await self.client.api.request(Method.POST, Path.v3.createRoom, body)
        room_id = resp["room_id"]
        if encrypted:
            await eventually(lambda: self.crypto.state_store.is_encrypted(room_id), timeout=20)
        return room_id

    async def join(self, room_id: str) -> None:
        await self.client.join_room_by_id(RoomID(room_id))

    async def leave(self, room_id: str) -> None:
        await self.client.leave_room(RoomID(room_id))

    async def invite(self, room_id: str, user_id: str) -> None:
        await self.client.invite_user(RoomID(room_id), UserID(user_id))

    async def set_power(self, room_id: str, users: dict[str, int]) -> None:
        content = await self.client.api.request(
            Method.GET, Path.v3.rooms[room_id].state["m.room.power_levels"][""]
        )
        content.setdefault("users", {}).update(users)
        await self.put_state(room_id, "m.room.power_levels", "", content)

    async def put_state(self, room_id: str, event_type: str, state_key: str, content: Any) -> str:
        resp = await self.client.api.request(
            Method.PUT, Path.v3.rooms[room_id].state[event_type][state_key], content
        )
        return resp["event_id"]

    async def joined_members(self, room_id: str) -> list[str]:
        resp = await self.client.api.request(Method.GET, Path.v3.rooms[room_id].joined_members)
        return list(resp["joined"])

    # Megolm ------------------------------------------------------------------------------------

    async def new_session(self, room_id: str) -> None:
        """Start a fresh megolm session for what this user sends next in the room."""
        await self.crypto.crypto_store.remove_outbound_group_session(RoomID(room_id))

    async def share_flagged_session(
        self, room_id: str, shared_history: bool = True, recipients: list[str] | None = None
    ) -> str:
        """Start a fresh megolm session and send its m.room_key to every member device (or to
        ``recipients`` only: [] keeps it private) with the MSC3061 shared-history flag (mautrix
        does not set it); returns its ID."""
        from mautrix.crypto.sessions import OutboundGroupSession

        store = self.crypto.crypto_store
        session = OutboundGroupSession(RoomID(room_id))
        await self.crypto._create_group_session(
            self.crypto.account.identity_key,
            self.crypto.account.signing_key,
            RoomID(room_id),
            SessionID(session.id),
            session.session_key,
            max_age=session.max_age,
            max_messages=session.max_messages,
        )
        content = {
            "algorithm": MEGOLM,
            "room_id": room_id,
            "session_id": session.id,
            "session_key": session.session_key,
            "shared_history": shared_history,
        }
        users = await self.joined_members(room_id) if recipients is None else recipients
        for user_id in users:
            devices = await self.crypto._fetch_keys([UserID(user_id)], include_untracked=True)
            for device in devices.get(user_id, {}).values():
                if device.device_id != self.device_id:
                    await self.crypto.send_encrypted_to_device(device, EventType.ROOM_KEY, content)
        session.shared = True
        await store.add_outbound_group_session(session)
        return session.id

    async def _outbound(self, room_id: str) -> Any:
        store = self.crypto.crypto_store
        session = await store.get_outbound_group_session(RoomID(room_id))
        if session is None or not session.shared or session.expired:
            members = await self.joined_members(room_id)
            await self.crypto.share_group_session(RoomID(room_id), [UserID(m) for m in members])
            session = await store.get_outbound_group_session(RoomID(room_id))
        return session

    async def _encrypt(self, room_id: str, payload: dict[str, Any]) -> tuple[dict, str, int, str]:
        return await self._encrypt_raw(room_id, json.dumps(payload))

    async def _encrypt_raw(self, room_id: str, plaintext: str) -> tuple[dict, str, int, str]:
        session = await self._outbound(room_id)
        index = session.message_index
        ciphertext = session.encrypt(plaintext)
        await self.crypto.crypto_store.update_outbound_group_session(session)
        content = {
            "algorithm": MEGOLM,
            "sender_key": self.crypto.account.identity_key,
            "device_id": self.device_id,
            "session_id": session.id,
            "ciphertext": ciphertext,
        }
        return content, session.id, index, ciphertext

    async def send_state(
        self,
        room_id: str,
        event_type: str,
        state_key: str,
        content: dict[str, Any],
        outer_key: str | None = None,
        payload: dict[str, Any] | None = None,
    ) -> SentEvent:
        """Encrypt a state event (MSC4362: packed outer key) and send it."""
        if payload is None:
            payload = {
                "type": event_type,
                "state_key": state_key,
                "content": content,
                "room_id": room_id,
            }
        wire, session_id, index, ciphertext = await self._encrypt(room_id, payload)
        event_id = await self.put_state(
            room_id, "m.room.encrypted", outer_key or f"{event_type}:{state_key}", wire
        )
        return SentEvent(event_id, session_id, index, ciphertext)

    async def send_message(
        self, room_id: str, body: str, payload: dict[str, Any] | None = None
    ) -> SentEvent:
        """Encrypt a timeline message with the current outbound session and send it."""
        if payload is None:
            payload = {
                "type": "m.room.message",
                "content": {"msgtype": "m.text", "body": body},
                "room_id": room_id,
            }
        wire, session_id, index, ciphertext = await self._encrypt(room_id, payload)
        event_id = await self.send_raw_message(room_id, wire)
        return SentEvent(event_id, session_id, index, ciphertext)

    async def send_raw_plaintext(self, room_id: str, plaintext: str) -> SentEvent:
        """Megolm-encrypt ``plaintext`` exactly as given (JSON or not, any shape) with the
        current outbound session and send it as a timeline m.room.encrypted event."""
        wire, session_id, index, ciphertext = await self._encrypt_raw(room_id, plaintext)
        event_id = await self.send_raw_message(room_id, wire)
        return SentEvent(event_id, session_id, index, ciphertext)

    async def send_raw_message(self, room_id: str, content: dict[str, Any]) -> str:
        resp = await self.client.api.request(
            Method.PUT,
            Path.v3.rooms[room_id].send["m.room.encrypted"][str(uuid.uuid4())],
            content,
        )
        return resp["event_id"]

    async def send_text(self, room_id: str, body: str) -> str:
        resp = await self.client.api.request(
            Method.PUT,
            Path.v3.rooms[room_id].send["m.room.message"][str(uuid.uuid4())],
            {"msgtype": "m.text", "body": body},
        )
        return resp["event_id"]

    # Keys --------------------------------------------------------------------------------------

    async def request_key(
        self,
        room_id: str,
        session_id: str,
        from_user: str,
        from_devices: list[str],
        sender_key: str | None = None,
        request_id: str | None = None,
    ) -> str:
        """Send a raw m.room_key_request (optionally without sender_key); returns its id."""
        request_id = request_id or str(uuid.uuid4())
        body: dict[str, Any] = {"algorithm": MEGOLM, "room_id": room_id, "session_id": session_id}
        if sender_key:
            body["sender_key"] = sender_key
        content = {
            "action": "request",
            "requesting_device_id": self.device_id,
            "request_id": request_id,
            "body": body,
        }
        await self.send_to_device(
            "m.room_key_request", {from_user: {d: content for d in from_devices}}
        )
        return request_id

    async def cancel_request(self, request_id: str, to_user: str, devices: list[str]) -> None:
        content = {
            "action": "request_cancellation",
            "requesting_device_id": self.device_id,
            "request_id": request_id,
        }
        await self.send_to_device("m.room_key_request", {to_user: {d: content for d in devices}})

    async def send_to_device(self, event_type: str, messages: dict[str, Any]) -> None:
        await self.client.api.request(
            Method.PUT,
            Path.v3.sendToDevice[event_type][str(uuid.uuid4())],
            {"messages": messages},
        )

    def answer_key_requests(self) -> None:
        """Act as MSC3414 asks of an empowered member: forward keys to any device of a user
        who is joined to the room (mautrix's default answers only the user's own devices)."""

        async def allow(device: Any, request: Any) -> bool:
            return await self.crypto.state_store.is_joined(request.room_id, device.user_id)

        self.crypto.allow_key_share = allow
        self.answered_requests = True

    async def forward_key_to(
        self, room_id: str, session_id: str, user_id: str, device_id: str
    ) -> None:
        """Forward a megolm session this user holds to one device, unasked."""
        session = await self.crypto.crypto_store.get_group_session(RoomID(room_id), session_id)
        device = await self.crypto.get_or_fetch_device(UserID(user_id), device_id)
        content = ForwardedRoomKeyEventContent(
            algorithm=EncryptionAlgorithm.MEGOLM_V1,
            room_id=RoomID(room_id),
            session_id=SessionID(session_id),
            session_key=session.export_session(session.first_known_index),
            sender_key=session.sender_key,
            signing_key=session.signing_key,
            forwarding_key_chain=list(session.forwarding_chain),
        )
        await self.crypto.send_encrypted_to_device(device, EventType.FORWARDED_ROOM_KEY, content)

    async def has_session(self, room_id: str, session_id: str) -> bool:
        return await self.crypto.crypto_store.has_group_session(RoomID(room_id), session_id)

    def sessions_from(self, room_id: str, sender_key: str) -> set[str]:
        """The megolm sessions of this room this device holds that the device with this
        curve25519 ``sender_key`` created (e.g. the bot's own seals)."""
        held = self.crypto.crypto_store._inbound_sessions  # MemoryCryptoStore
        return {
            str(session_id)
            for (held_room, session_id), session in held.items()
            if held_room == room_id and session.sender_key == sender_key
        }

    async def session_first_index(self, room_id: str, session_id: str) -> int | None:
        session = await self.crypto.crypto_store.get_group_session(RoomID(room_id), session_id)
        return None if session is None else session.first_known_index

    def withheld_for(self, session_id: str) -> list[dict[str, Any]]:
        return [w for w in self.withheld if w.get("session_id") == session_id]

    def room_keys_for(self, session_id: str) -> list[dict[str, Any]]:
        """The ``m.room_key`` contents this device received for a session (a seal's key)."""
        return [
            p["content"]
            for p in self.olm_plaintexts
            if p.get("type") == "m.room_key"
            and p.get("content", {}).get("session_id") == session_id
        ]

    async def event(self, room_id: str, event_id: str) -> dict[str, Any]:
        return await self.client.api.request(Method.GET, Path.v3.rooms[room_id].event[event_id])

    async def open_event(
        self, room_id: str, event_id: str, fetcher: TestUser | None = None
    ) -> dict | None:
        """Decrypt one encrypted event of the room with the sessions this device holds
        (``fetcher`` reads the event, for a device that cannot see the room yet)."""
        content = (await (fetcher or self).event(room_id, event_id))["content"]
        return await self.try_decrypt(room_id, content["session_id"], content["ciphertext"])

    def forwarded_for(self, session_id: str) -> list[dict[str, Any]]:
        return [f for f in self.forwarded if f["session_id"] == session_id]

    # Reading encrypted state -------------------------------------------------------------------

    async def try_decrypt(self, room_id: str, session_id: str, ciphertext: str) -> dict | None:
        """Decrypt one megolm ciphertext; None when this user cannot."""
        session = await self.crypto.crypto_store.get_group_session(RoomID(room_id), session_id)
        if session is None:
            return None
        try:
            plaintext, _ = session.decrypt(ciphertext)
        except olm.OlmGroupSessionError:
            return None
        return json.loads(plaintext)

    async def read_state(self, room_id: str) -> ReadState:
        """Decrypt and validate the room's current encrypted state (MSC4362 rules)."""
        state = await self.client.api.request(Method.GET, Path.v3.rooms[room_id].state)
        result = ReadState()
        for evt in state:
            if evt.get("type") != "m.room.encrypted" or "state_key" not in evt:
                continue
            content = evt["content"]
            payload = await self.try_decrypt(room_id, content["session_id"], content["ciphertext"])
            if payload is None:
                result.undecryptable.append(evt["state_key"])
                continue
            event_type, _, state_key = evt["state_key"].partition(":")
            if (
                payload.get("room_id") != room_id
                or payload.get("type") != event_type
                or payload.get("state_key") != state_key
            ):
                result.invalid.append(evt["state_key"])
                continue
            result.values[(event_type, state_key)] = payload["content"]
        return result
