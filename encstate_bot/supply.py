"""Self-supply: the bot asks for the sessions of state it cannot decrypt, from their senders and
the room's other empowered members (the bot must hold a session before it can hand it out)."""

from __future__ import annotations

import logging
import time
from typing import Any

from mautrix.errors import MatrixConnectionError, MatrixRequestError

from . import glue
from .tracker import Tracker

SUPPLY_ATTEMPTS = 6  # asks per missing session (the wait doubles each time), then it stops


class SelfSupply:
    def __init__(self, client: Any, tracker: Tracker, config: Any, log: logging.Logger) -> None:
        self.client = client
        self.tracker = tracker
        self.config = config
        self.log = log
        self.asked: dict[tuple[str, str], tuple[float, int]] = {}

    async def ask(self) -> None:
        """Ask for every missing state session that is due another ask."""
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
            last, asked = self.asked.get((room_id, session_id), (None, 0))
            if asked >= SUPPLY_ATTEMPTS:
                continue  # a session nobody answers for (garbage, or its owner is gone)
            if last is not None and now - last < retry * 2 ** (asked - 1):
                continue
            self.asked[(room_id, session_id)] = (now, asked + 1)
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
                    devices = (await glue.fetch_keys(crypto, [user_id])).get(user_id, {})
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
