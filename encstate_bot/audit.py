"""The audit: every decision becomes a row (and a log line), and shares can be announced in an
audit room."""

from __future__ import annotations

import logging
import time
from typing import Any

from attr import dataclass
from mautrix.errors import MatrixConnectionError, MatrixRequestError
from mautrix.types import DeviceIdentity

from .policy import Decision, Share, Withhold
from .render import Reply, short_id
from .store import AuditRow, OutboxItem
from .triggers import Trigger

WITHHELD_PER_DEVICE = 10
MAX_BACKOFF_MS = 5 * 60 * 1000
# A queued item is dropped (and audited) after this many failed tries or this age: nothing a
# user can queue lives forever.
MAX_ATTEMPTS = {True: 8, False: 300}  # requests; pushes (at most 5 min apart: about a day)
MAX_AGE_MS = {True: 15 * 60 * 1000, False: 24 * 3600 * 1000}  # requests, pushes
NOTICE_ROWS = 50


@dataclass
class Outcome:
    """What one (device, session) came to."""

    item: OutboxItem
    device_id: str
    session_id: str
    decision: Decision
    device: DeviceIdentity | None = None
    sender_key: str | None = None
    notified: bool = True  # for a withhold: whether the device was sent a withheld notice
    failed: bool = False  # for a share: the sendToDevice call carrying it failed


def backoff_ms(attempts: int) -> int:
    return min(1000 * 2 ** min(attempts, 16), MAX_BACKOFF_MS)


def waited(item: OutboxItem) -> int | None:
    """How long an item has waited, in ms (clamped: a clock jump cannot overflow a column)."""
    if not item.enqueued:
        return None
    return max(0, min(int(time.time() * 1000) - item.enqueued, 2**53))


def expired(item: OutboxItem) -> bool:
    """A queued item that failed too often or waited too long: dropped, never retried."""
    age = int(time.time() * 1000) - item.enqueued if item.enqueued else 0
    requests = item.trigger == Trigger.REQUEST
    return item.attempts + 1 >= MAX_ATTEMPTS[requests] or age > MAX_AGE_MS[requests]


def row(o: Outcome) -> AuditRow:
    d = o.decision
    common = dict(
        room_id=o.item.room_id,
        user_id=o.item.user_id,
        device_id=o.device_id,
        session_id=o.session_id,
        trigger=str(o.item.trigger),
        request_id=o.item.request_id,
        waited_ms=waited(o.item),
    )
    if o.failed:
        return AuditRow(
            decision="failed",
            reason=f"not delivered (sendToDevice failed): {d.reason}",
            msg_index=getattr(d, "index", None),
            **common,
        )
    if isinstance(d, Share):
        return AuditRow(
            decision="share", reason=d.reason, msg_index=d.index, exposed=d.exposed, **common
        )
    if isinstance(d, Withhold):
        reason = d.reason
        if not o.notified:
            reason += f" (no notice sent: over {WITHHELD_PER_DEVICE} for this device at once)"
        return AuditRow(decision="withhold", code=d.code, reason=reason, **common)
    return AuditRow(decision="ignore", reason=d.reason, **common)


def delivery(o: Outcome) -> tuple[str, str, str, int, str]:
    assert isinstance(o.decision, Share)
    return o.item.user_id, o.device_id, o.session_id, o.decision.index, o.item.room_id


class Audit:
    def __init__(self, client: Any, config: Any, log: logging.Logger) -> None:
        self.client = client
        self.config = config
        self.log = log

    def gave_up(self, item: OutboxItem) -> AuditRow:
        why = f"gave up after {item.attempts + 1} tries over {waited(item) or 0} ms"
        self.log.warning(
            f"Dropping the {item.trigger} for {item.user_id} in {item.room_id}: {why}"
        )
        return AuditRow(
            room_id=item.room_id,
            user_id=item.user_id,
            device_id=item.device_id,
            session_id=item.session_id,
            decision="ignore",
            reason=why,
            trigger=str(item.trigger),
            request_id=item.request_id,
            waited_ms=waited(item),
        )

    def log_outcome(self, o: Outcome) -> None:
        d = o.decision
        who = f"{o.item.user_id}/{o.device_id} in {o.item.room_id}, session {o.session_id}"
        if isinstance(d, Share):
            self.log.info(f"Shared {who} from index {d.index} ({o.item.trigger}): {d.reason}")
        elif isinstance(d, Withhold):
            self.log.info(f"Withheld {who} with {d.code} ({o.item.trigger}): {d.reason}")
        else:
            self.log.info(f"Ignored {who} ({o.item.trigger}): {d.reason}")

    async def announce(self, rows: list[AuditRow]) -> None:
        """Post what was shared to the configured audit room, if any."""
        room = self.config["audit_room"]
        if not room or not rows:
            return
        reply = Reply(f"encstate shared {len(rows)} key(s)")
        reply.table(
            ["room", "user", "device", "session", "from", "trigger"],
            [
                (r.room_id, r.user_id, r.device_id, short_id(r.session_id), r.msg_index, r.trigger)
                for r in rows[:NOTICE_ROWS]
            ],
        )
        if len(rows) > NOTICE_ROWS:
            reply.line(f"… and {len(rows) - NOTICE_ROWS} more")
        try:
            await self.client.send_message(room, reply.content())
        except (MatrixRequestError, MatrixConnectionError) as e:
            self.log.warning(f"Could not post to the audit room {room}: {e}")
