"""Fixtures for the scale benchmark, built with the homeserver's bulk paths: accounts registered
with the shared secret (one call gives the user and its first device), more devices by login,
device keys uploaded in parallel, rooms made whole by one ``createRoom`` with their encrypted
state in ``initial_state``. Everything runs with bounded concurrency over loopback."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from typing import Any, Awaitable, Callable, Iterable, TypeVar
import uuid

from harness.synapse import SHARED_SECRET

from .megolm import StateSession
from .population import Device, Population

T = TypeVar("T")
WIDE = 32  # concurrent calls while building fixtures

ENCRYPTION = {
    "type": "m.room.encryption",
    "state_key": "",
    "content": {
        "algorithm": "m.megolm.v1.aes-sha2",
        "io.element.msc4362.encrypt_state_events": True,
    },
}
# Five encrypted values per room: the three preview types and two more.
VALUES = (
    ("m.room.name", "", lambda i: {"name": f"Room {i}"}),
    ("m.room.topic", "", lambda i: {"topic": f"topic of room {i}"}),
    ("m.room.avatar", "", lambda i: {"url": f"mxc://bench/{i}"}),
    ("m.room.pinned_events", "", lambda i: {"pinned": []}),
    ("org.encstate.bench.note", "", lambda i: {"note": f"note {i}"}),
)


async def bounded(items: Iterable[T], work: Callable[[T], Awaitable[Any]], width: int = WIDE):
    """``work`` over every item, ``width`` at a time; results in order."""
    sem = asyncio.Semaphore(width)

    async def one(item: T) -> Any:
        async with sem:
            return await work(item)

    return list(await asyncio.gather(*(one(i) for i in items)))


class Bulk:
    def __init__(self, pop: Population) -> None:
        self.pop = pop
        self.synapse = pop.synapse
        self.http = pop.http
        self.tag = uuid.uuid4().hex[:4]

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self.http.post(f"{self.synapse.url}{path}", json=body) as resp:
            data = await resp.json()
            if resp.status >= 400:
                raise RuntimeError(f"POST {path}: {resp.status} {data}")
            return data

    async def register(self, localpart: str) -> Device:
        """A user and its first device, by the admin API's shared-secret registration."""
        async with self.http.get(f"{self.synapse.url}/_synapse/admin/v1/register") as resp:
            nonce = (await resp.json())["nonce"]
        mac = hmac.new(SHARED_SECRET.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join(p.encode() for p in (nonce, localpart, "password")))
        mac.update(b"\x00notadmin")
        body = {"nonce": nonce, "username": localpart, "password": "password"}
        made = await self._post("/_synapse/admin/v1/register", {**body, "mac": mac.hexdigest()})
        return Device(made["user_id"], made["device_id"], made["access_token"])

    async def login(self, user_id: str) -> Device:
        made = await self._post(
            "/_matrix/client/v3/login",
            {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": user_id},
                "password": "password",
            },
        )
        return Device(user_id, made["device_id"], made["access_token"])

    async def upload(self, device: Device, one_time_keys: int) -> Device:
        await self.pop._call(
            "POST",
            "/_matrix/client/v3/keys/upload",
            device.token,
            device.keys_upload(one_time_keys),
        )
        return device

    async def users(self, prefix: str, count: int, one_time_keys: int = 2) -> list[list[Device]]:
        """``count`` users with one device each, keys uploaded."""

        async def one(i: int) -> list[Device]:
            device = await self.register(f"{prefix}{i}-{self.tag}")
            return [await self.upload(device, one_time_keys)]

        return await bounded(range(count), one)

    async def more_devices(
        self, users: list[list[Device]], per_user: int, one_time_keys: int = 2
    ) -> None:
        """Log each user in ``per_user`` more times, each new device with its keys uploaded."""

        async def one(item: tuple[list[Device], int]) -> None:
            devices, _ = item
            devices.append(await self.upload(await self.login(devices[0].user_id), one_time_keys))

        await bounded([(u, k) for u in users for k in range(per_user)], one)

    async def join(self, room_id: str, users: Iterable[list[Device]]) -> None:
        async def one(devices: list[Device]) -> None:
            await self.pop._call(
                "POST", f"/_matrix/client/v3/join/{room_id}", devices[0].token, {}
            )

        await bounded(list(users), one)

    async def joins(self, pairs: Iterable[tuple[str, Device]]) -> None:
        """Each (room, user) joins, many rooms at once."""

        async def one(pair: tuple[str, Device]) -> None:
            room_id, device = pair
            await self.pop._call("POST", f"/_matrix/client/v3/join/{room_id}", device.token, {})

        await bounded(list(pairs), one)

    async def state_room(
        self,
        admin: Device,
        bot_user: str,
        index: int,
        values: int = 5,
        join_rule: dict[str, Any] | None = None,
        bot_level: int = 50,
        state_default: int = 50,
        name: str = "bench",
    ) -> tuple[str, list[StateSession]]:
        """A room made whole by one createRoom: encrypted state on, ``values`` encrypted values
        (each in its own state session of the admin's), the bot invited with ``bot_level``.
        The sessions are made for a room ID not known yet, so the values are sent after."""
        join_rule = join_rule or {"join_rule": "public"}
        initial_state = [ENCRYPTION]
        if join_rule:
            initial_state.append(
                {"type": "m.room.join_rules", "state_key": "", "content": join_rule}
            )
        made = await self.pop._call(
            "POST",
            "/_matrix/client/v3/createRoom",
            admin.token,
            {
                "preset": "private_chat",
                "initial_state": initial_state,
                "invite": [bot_user],
                "power_level_content_override": {
                    "users": {bot_user: bot_level},
                    "users_default": 0,
                    "state_default": state_default,
                    "invite": 0,
                },
            },
        )
        room_id = made["room_id"]
        sessions = []
        for event_type, state_key, content in VALUES[:values]:
            session = StateSession(admin, room_id)
            await self.pop._call(
                "PUT",
                f"/_matrix/client/v3/rooms/{room_id}/state/m.room.encrypted/"
                f"{event_type}:{state_key}",
                admin.token,
                session.encrypt(event_type, state_key, content(index)),
            )
            sessions.append(session)
        return room_id, sessions


class Stopwatch:
    """Wall time of fixture steps, for the report's notes."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float]] = []
        self._at = time.monotonic()

    def lap(self, what: str) -> float:
        now = time.monotonic()
        took = now - self._at
        self.steps.append((what, took))
        self._at = now
        return took

    def text(self) -> str:
        return ", ".join(f"{what} {s:.0f} s" for what, s in self.steps)
