"""Recipients for the benchmark: real accounts and devices with python-olm keys uploaded
(device keys and one-time keys), joined to rooms, created concurrently over loopback."""

from __future__ import annotations

import asyncio
import json
from typing import Any
import uuid

from aiohttp import ClientSession
import olm

from harness.synapse import Synapse

CONCURRENCY = 16


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class Device:
    """One recipient device: its Olm account lives here, so the benchmark can decrypt what
    the bot sent it."""

    def __init__(self, user_id: str, device_id: str, token: str) -> None:
        self.user_id = user_id
        self.device_id = device_id
        self.token = token
        self.account = olm.Account()
        self.next_batch: str | None = None

    @property
    def curve25519(self) -> str:
        return self.account.identity_keys["curve25519"]

    def signed(self, obj: dict[str, Any]) -> dict[str, Any]:
        signature = self.account.sign(canonical(obj))
        return {
            **obj,
            "signatures": {self.user_id: {f"ed25519:{self.device_id}": signature}},
        }

    def keys_upload(self, one_time_keys: int) -> dict[str, Any]:
        identity = self.account.identity_keys
        device_keys = self.signed(
            {
                "user_id": self.user_id,
                "device_id": self.device_id,
                "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
                "keys": {
                    f"curve25519:{self.device_id}": identity["curve25519"],
                    f"ed25519:{self.device_id}": identity["ed25519"],
                },
            }
        )
        self.account.generate_one_time_keys(one_time_keys)
        otks = {
            f"signed_curve25519:{key_id}": self.signed({"key": key})
            for key_id, key in self.account.one_time_keys["curve25519"].items()
        }
        self.account.mark_keys_as_published()
        return {"device_keys": device_keys, "one_time_keys": otks}


class Population:
    def __init__(self, synapse: Synapse, http: ClientSession) -> None:
        self.synapse = synapse
        self.http = http
        self.sem = asyncio.Semaphore(CONCURRENCY)

    async def _call(
        self, method: str, path: str, token: str, body: Any = None, params: Any = None
    ) -> Any:
        async with self.http.request(
            method,
            f"{self.synapse.url}{path}",
            json=body,
            params=params,
            headers={"Authorization": f"Bearer {token}"},
        ) as resp:
            data = await resp.json()
            if resp.status >= 400:
                raise RuntimeError(f"{method} {path}: {resp.status} {data}")
            return data

    async def user_with_devices(
        self, localpart: str, devices: int, one_time_keys: int
    ) -> list[Device]:
        loop = asyncio.get_running_loop()
        async with self.sem:
            user_id = await loop.run_in_executor(None, self.synapse.register, localpart)
            made = []
            for _ in range(devices):
                token, device_id = await loop.run_in_executor(None, self.synapse.login, user_id)
                device = Device(user_id, device_id, token)
                await self._call(
                    "POST",
                    "/_matrix/client/v3/keys/upload",
                    token,
                    device.keys_upload(one_time_keys),
                )
                made.append(device)
            return made

    async def users(
        self, prefix: str, count: int, devices: int = 2, one_time_keys: int = 10
    ) -> list[list[Device]]:
        tag = uuid.uuid4().hex[:4]
        return list(
            await asyncio.gather(
                *(
                    self.user_with_devices(f"{prefix}{i}-{tag}", devices, one_time_keys)
                    for i in range(count)
                )
            )
        )

    async def join(self, room_id: str, users: list[list[Device]]) -> None:
        async def one(devices: list[Device]) -> None:
            async with self.sem:
                await self._call(
                    "POST", f"/_matrix/client/v3/join/{room_id}", devices[0].token, {}
                )

        await asyncio.gather(*(one(u) for u in users))

    async def to_device(self, device: Device) -> list[dict[str, Any]]:
        """What arrived in a device's to-device inbox since the last look. Each sync names
        its position; the next one, from there, acknowledges what was handed out."""
        events: list[dict[str, Any]] = []
        while True:
            params = {"timeout": "0"}
            if device.next_batch:
                params["since"] = device.next_batch
            data = await self._call("GET", "/_matrix/client/v3/sync", device.token, params=params)
            device.next_batch = data["next_batch"]
            batch = data.get("to_device", {}).get("events", [])
            events += batch
            if not batch:
                return events
