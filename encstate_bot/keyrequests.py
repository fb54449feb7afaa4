"""Incoming ``m.room_key_request``: parse the raw content, coalesce duplicates, rate-limit,
honour cancellations, and hand what is left to the courier.

Requests the bot could not serve because it did not hold the session yet wait in the database
(``encstate_key_wait``, written by the courier) and are answered again when the key arrives.
"""

from __future__ import annotations

from collections import OrderedDict
import logging
import time
from typing import Any

from . import protocol
from .courier import Courier
from .links import RoomLinks
from .ratelimit import RequestGate
from .store import AuditRow, OutboxItem, Store
from .triggers import Trigger

MAX_DEVICES_REMEMBERED = 10_000
DROP_AUDIT_SECONDS = 60


class KeyRequests:
    def __init__(
        self,
        courier: Courier,
        store: Store,
        gate: RequestGate,
        own_user: str,
        own_device: str | None,
        log: logging.Logger,
        links: RoomLinks | None = None,
    ) -> None:
        self.courier = courier
        self.store = store
        self.gate = gate
        self.own_user = own_user
        self.own_device = own_device
        self.log = log
        self.links = links
        self.dropped: dict[str, int] = {}
        self._last_drop_audit: OrderedDict[tuple[str, str], float] = OrderedDict()

    async def handle(self, events: list[tuple[Any, Any]]) -> None:
        """Take the (sender, content) of the key requests in one sync, in order: everything
        admitted goes to the courier in one submission."""
        now = time.monotonic()
        items: list[OutboxItem] = []
        drops: list[AuditRow] = []
        for sender, content in events:
            parsed = protocol.parse_key_request(sender, content)
            if isinstance(parsed, protocol.Invalid):
                self.log.info(
                    f"Ignoring malformed key request from {str(sender)[:80]}: {parsed.reason}"
                )
                self._count("malformed")
                continue
            if parsed.user_id == self.own_user:
                continue  # the bot's own devices: mautrix's own key sharing handles those
            if isinstance(parsed, protocol.KeyCancellation):
                key = (parsed.user_id, parsed.device_id, parsed.request_id)
                items = [i for i in items if (i.user_id, i.device_id, i.request_id) != key]
                await self.cancel(parsed)
                continue
            if self.links is not None and not self.links.is_joined(parsed.room_id):
                # Nothing to answer with, and an answer would need the room read first: junk
                # room ids must cost nothing and never wait in the queue.
                self._count("room the bot is not in")
                continue
            refusal = self.gate.admit(
                parsed.user_id, parsed.device_id, parsed.request_id, parsed.session_id, now
            )
            if refusal is not None:
                self._count(refusal)
                self.log.debug(
                    f"Dropping key request {parsed.request_id} from "
                    f"{parsed.user_id}/{parsed.device_id}: {refusal}"
                )
                drops += self._drop_row(parsed, refusal, now)
                continue
            self.log.debug(
                f"Key request {parsed.request_id} from {parsed.user_id}/{parsed.device_id} for "
                f"{parsed.session_id} in {parsed.room_id}"
            )
            items.append(
                self._item(
                    parsed.user_id,
                    parsed.device_id,
                    parsed.request_id,
                    parsed.room_id,
                    parsed.session_id,
                )
            )
        if items:
            await self.courier.submit(items)
        if drops:
            await self.store.add_audit(drops)

    @staticmethod
    def _item(
        user_id: str, device_id: str, request_id: str, room_id: str, session_id: str
    ) -> OutboxItem:
        return OutboxItem(
            room_id=room_id,
            user_id=user_id,
            device_id=device_id,
            session_id=session_id,
            trigger=Trigger.REQUEST,
            request_id=request_id,
        )

    async def cancel(self, cancel: protocol.KeyCancellation) -> None:
        removed = await self.courier.cancel(cancel.user_id, cancel.device_id, cancel.request_id)
        self.log.debug(
            f"Request {cancel.request_id} of {cancel.user_id}/{cancel.device_id} cancelled "
            f"({removed} queued answer(s) dropped)"
        )

    def _count(self, why: str) -> None:
        self.dropped[why] = self.dropped.get(why, 0) + 1

    def _drop_row(self, req: protocol.KeyRequest, why: str, now: float) -> list[AuditRow]:
        """An audit row for the first dropped request per device and minute (the rest are
        counted), so a flood cannot fill the database."""
        key = (req.user_id, req.device_id)
        last = self._last_drop_audit.pop(key, None)
        recent = last is not None and now - last < DROP_AUDIT_SECONDS
        self._last_drop_audit[key] = last if recent else now
        while len(self._last_drop_audit) > MAX_DEVICES_REMEMBERED:
            self._last_drop_audit.popitem(last=False)
        if recent:
            return []
        return [
            AuditRow(
                room_id=req.room_id,
                user_id=req.user_id,
                device_id=req.device_id,
                session_id=req.session_id,
                decision="ignore",
                reason=f"{why} (further drops from this device this minute are counted)",
                trigger=Trigger.REQUEST,
                request_id=req.request_id,
            )
        ]
