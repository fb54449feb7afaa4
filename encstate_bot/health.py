"""Health and metrics for operators, on maubot's plugin web app
(``/_matrix/maubot/plugin/<instance>/health`` and ``.../metrics``).

``health`` answers 200 with a small JSON when the bot can do its job, 503 (same JSON, with the
problems named) when it cannot: no end-to-end encryption, a sync that stopped, the start-up
not done yet, answers stuck in the queue. ``metrics`` is the Prometheus text format,
written with ``prometheus_client`` (which maubot's own image does not ship: without it the
endpoint says to install it, and ``health`` still works).

The counters are kept here as plain numbers as the bot works (from the audit rows the store
writes and the transport's calls), so counting needs nothing from prometheus_client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import hmac
import json
import logging
import time
from typing import Any, Callable, Iterable

from aiohttp import web
from maubot.handlers import web as routes

from .e2ee import Encryption
from .links import RoomLinks
from .store import AuditRow, Store
from .tracker import Tracker
from .transport import Transport
from .triggers import Trigger

# A sync long-polls for 30 s: none processed in this long means the sync loop is stuck.
SYNC_STALE_SECONDS = 120
# The oldest answer or newcomer's push waiting this long means the fast lane is stuck.
FAST_LANE_STUCK_SECONDS = 120
# Answer time buckets (seconds), request received to answer recorded.
ANSWER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WITHOUT_TOKEN = "(set web_token to see the message here; it is in the log)"
PROMETHEUS_MISSING = (
    "encstate's metrics need prometheus_client, which this maubot lacks: "
    "pip install 'prometheus-client>=0.17,<1' into maubot's environment and restart maubot\n"
)


@dataclass
class Counts:
    """What the bot did since it started, by audit row and transport call."""

    decisions: dict[tuple[str, str], int] = field(default_factory=dict)  # (decision, trigger)
    answer_buckets: list[int] = field(default_factory=lambda: [0] * len(ANSWER_BUCKETS))
    answers: int = 0
    answer_seconds: float = 0.0

    def audited(self, rows: Iterable[AuditRow]) -> None:
        for row in rows:
            key = (row.decision, str(row.trigger))
            self.decisions[key] = self.decisions.get(key, 0) + 1
            if str(row.trigger) == Trigger.REQUEST and row.waited_ms is not None:
                seconds = max(row.waited_ms, 0) / 1000
                self.answers += 1
                self.answer_seconds += seconds
                for i, bound in enumerate(ANSWER_BUCKETS):
                    if seconds <= bound:
                        self.answer_buckets[i] += 1


class LastError(logging.Handler):
    """The newest error the plugin logged, for ``health``."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.message: str | None = None
        self.at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.message = record.getMessage()[:500]
        except Exception:
            self.message = str(record.msg)[:500]
        self.at = time.time()


class Health:
    """The web handlers (registered by the plugin when maubot gives it a web app)."""

    def __init__(
        self,
        store: Store,
        tracker: Tracker,
        links: RoomLinks,
        transport: Transport,
        encryption: Encryption,
        counts: Counts,
        last_error: LastError,
        identity_status: Callable[[], Any],
        ready: Callable[[], bool],
        last_sync: Callable[[], float | None],
        sending: Callable[[], bool],
        token: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.store = store
        self.tracker = tracker
        self.links = links
        self.transport = transport
        self.encryption = encryption
        self.counts = counts
        self.last_error = last_error
        self.identity_status = identity_status
        self.ready = ready
        self.last_sync = last_sync
        self.sending = sending
        self.token = token
        self.started = time.time()

    # What the endpoints report ------------------------------------------------------------------

    async def report(self, private: bool = False) -> tuple[bool, dict[str, Any]]:
        """The verdict and the JSON. ``private``: the caller showed the web token, so the last
        error's text (it may name rooms and users) is included."""
        now = time.time()
        problems: list[str] = []
        if problem := self.encryption.problem():
            problems.append(problem)
        elif not self.sending():
            problems.append("keys are not sent: see the log at start (mautrix version)")
        last = self.last_sync()
        since = now - (last if last is not None else self.started)
        alive = since < SYNC_STALE_SECONDS
        if not alive:
            problems.append(f"no sync processed for {since:.0f} s")
        ready = self.ready()
        if not ready:
            problems.append(
                "starting: the start-up rescan, the pushes it owes and the first sealing pass "
                "are not done yet"
            )
        queue = await self.store.queue_stats()
        lanes = {
            lane: {
                "depth": depth,
                "oldest_seconds": None if oldest is None else round(now - oldest / 1000, 1),
            }
            for lane, (depth, oldest) in queue.items()
        }
        stuck = lanes["fast"]["oldest_seconds"]
        if stuck is not None and stuck > FAST_LANE_STUCK_SECONDS:
            problems.append(f"the oldest answer has waited {stuck:.0f} s in the queue")
        error = None
        if self.last_error.message is not None and self.last_error.at is not None:
            error = {
                "message": self.last_error.message if private else WITHOUT_TOKEN,
                "seconds_ago": round(now - self.last_error.at, 1),
            }
        body = {
            "status": "ok" if not problems else "unhealthy",
            "problems": problems,
            "ready": ready,
            "sync": {
                "alive": alive,
                "seconds_since_last": None if last is None else round(now - last, 1),
            },
            "e2ee": self.encryption.on,
            "cross_signing": await self.identity_status(),
            "queue": lanes,
            "waiting_for_keys": await self.store.waits_count(),
            "last_error": error,
        }
        return not problems, body

    def rooms(self) -> tuple[int, int]:
        """State-encrypted rooms the bot is in: (empowered, not empowered)."""
        rooms = [r for r in self.links.joined if self.tracker.tracked(r)]
        empowered = sum(1 for r in rooms if self.links.empowered(r))
        return empowered, len(rooms) - empowered

    async def exposition(self) -> bytes | None:
        """The metrics in Prometheus text format; None without prometheus_client."""
        try:
            from prometheus_client import CollectorRegistry, generate_latest
            from prometheus_client.core import (
                CounterMetricFamily,
                GaugeMetricFamily,
                HistogramMetricFamily,
            )
        except ImportError:
            return None
        queue = await self.store.queue_stats()
        waits = await self.store.waits_count()
        seals = await self.store.seal_count()
        empowered, powerless = self.rooms()
        counts = self.counts
        now = time.time()

        class Snapshot:
            def collect(self) -> Iterable[Any]:
                keys = CounterMetricFamily(
                    "encstate_keys",
                    "Decisions per (device, session): share, withhold or ignore, by trigger",
                    labels=["decision", "trigger"],
                )
                for (decision, trigger), n in sorted(counts.decisions.items()):
                    keys.add_metric([decision, trigger], n)
                yield keys
                calls = CounterMetricFamily(
                    "encstate_to_device_calls",
                    "sendToDevice calls that carried keys, by outcome",
                    labels=["outcome"],
                )
                calls.add_metric(["sent"], transport.sent_calls)
                calls.add_metric(["failed"], transport.failed_calls)
                yield calls
                # counts.answer_buckets are cumulative already (each answer counts in every
                # bucket whose bound it is within)
                buckets = [
                    (str(bound), n)
                    for bound, n in zip(ANSWER_BUCKETS, counts.answer_buckets, strict=True)
                ] + [("+Inf", counts.answers)]
                yield HistogramMetricFamily(
                    "encstate_answer_seconds",
                    "Key requests: time from the request's arrival to its answer",
                    buckets=buckets,
                    sum_value=counts.answer_seconds,
                )
                depth = GaugeMetricFamily(
                    "encstate_queue_depth", "Queued deliveries, by lane", labels=["lane"]
                )
                oldest = GaugeMetricFamily(
                    "encstate_queue_oldest_seconds",
                    "Age of the oldest queued delivery, by lane (0 when empty)",
                    labels=["lane"],
                )
                for lane, (n, first) in sorted(queue.items()):
                    depth.add_metric([lane], n)
                    oldest.add_metric([lane], 0 if first is None else max(now - first / 1000, 0))
                yield depth
                yield oldest
                yield GaugeMetricFamily(
                    "encstate_waiting_for_keys",
                    "Deliveries waiting for a key the bot does not hold yet",
                    value=waits,
                )
                yield GaugeMetricFamily(
                    "encstate_seals", "Seals the bot made (one-value sessions)", value=seals
                )
                rooms = GaugeMetricFamily(
                    "encstate_rooms",
                    "State-encrypted rooms the bot is in, by whether its power level lets it act",
                    labels=["empowered"],
                )
                rooms.add_metric(["true"], empowered)
                rooms.add_metric(["false"], powerless)
                yield rooms
                yield GaugeMetricFamily(
                    "encstate_e2ee", "1 when end-to-end encryption works", value=int(e2ee)
                )

        transport = self.transport
        e2ee = self.encryption.on
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Snapshot())
        return generate_latest(registry)

    # Web handlers -------------------------------------------------------------------------------

    def refused(self, request: web.Request) -> web.Response | None:
        """With ``web_token`` set, the endpoints want ``Authorization: Bearer <token>``."""
        token = self.token()
        if not token:
            return None
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return None
        return web.Response(status=401, text="encstate: a bearer token is required\n")

    @routes.get("/health")
    async def health(self, request: web.Request) -> web.Response:
        if refused := self.refused(request):
            return refused
        healthy, body = await self.report(private=bool(self.token()))
        return web.Response(
            status=200 if healthy else 503,
            text=json.dumps(body, indent=2) + "\n",
            content_type="application/json",
        )

    @routes.get("/metrics")
    async def metrics(self, request: web.Request) -> web.Response:
        if refused := self.refused(request):
            return refused
        text = await self.exposition()
        if text is None:
            return web.Response(status=501, text=PROMETHEUS_MISSING)
        return web.Response(body=text, headers={"Content-Type": "text/plain; version=0.0.4"})
