"""/health's verdict and /metrics' numbers, from fakes of what they read."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from encstate_bot.health import WITHOUT_TOKEN, Counts, Health, LastError
from encstate_bot.store import AuditRow


class Store:
    def __init__(self, oldest_fast_s: float | None = None) -> None:
        now = time.time() * 1000
        oldest = None if oldest_fast_s is None else now - oldest_fast_s * 1000
        self.stats = {"fast": (0 if oldest is None else 1, oldest), "bulk": (0, None)}

    async def queue_stats(self):
        return self.stats

    async def waits_count(self) -> int:
        return 2

    async def seal_count(self) -> int:
        return 3


class Encryption:
    def __init__(self, problem: str | None = None) -> None:
        self._problem = problem
        self.on = problem is None

    def problem(self) -> str | None:
        return self._problem


async def cross_signed() -> str:
    return "cross-signed"


def health(
    store=None, encryption=None, last_sync=0.0, ready=True, sending=True, counts=None, error=None
) -> Health:
    links = SimpleNamespace(joined={"!a", "!b", "!c"}, empowered=lambda r: r != "!b")
    tracker = SimpleNamespace(tracked=lambda r: r != "!c")
    return Health(
        store or Store(),
        tracker,
        links,
        SimpleNamespace(sent_calls=5, failed_calls=1),
        encryption or Encryption(),
        counts or Counts(),
        error or LastError(),
        cross_signed,
        lambda: ready,
        lambda: None if last_sync is None else time.time() - last_sync,
        lambda: sending,
    )


async def test_healthy() -> None:
    ok, body = await health().report()
    assert ok and body["status"] == "ok" and body["problems"] == []
    assert body["cross_signing"] == "cross-signed"
    assert body["queue"] == {
        "fast": {"depth": 0, "oldest_seconds": None},
        "bulk": {"depth": 0, "oldest_seconds": None},
    }
    assert body["waiting_for_keys"] == 2 and body["last_error"] is None


async def test_each_problem_makes_it_unhealthy_and_is_named() -> None:
    cases = [
        (health(encryption=Encryption("no device ID")), "no device ID"),
        (health(sending=False), "keys are not sent"),
        (health(last_sync=500), "no sync processed for 500 s"),
        (health(ready=False), "the first sealing pass are not done yet"),
        (health(store=Store(oldest_fast_s=300)), "the oldest answer has waited 300 s"),
    ]
    for checked, words in cases:
        ok, body = await checked.report()
        assert not ok and body["status"] == "unhealthy"
        assert any(words in p for p in body["problems"]), (words, body["problems"])


async def test_a_bulk_backlog_or_an_old_error_alone_is_not_unhealthy() -> None:
    error = LastError()
    log = logging.getLogger("test.health")
    log.addHandler(error)
    try:
        log.error("Reacting to new state in !a failed; retrying later")
    finally:
        log.removeHandler(error)
    store = Store()
    store.stats["bulk"] = (5000, time.time() * 1000 - 600_000)
    ok, body = await health(store=store, error=error).report()
    assert ok
    # the text may name rooms and users: only behind the web token
    assert body["last_error"]["message"] == WITHOUT_TOKEN
    _, body = await health(store=store, error=error).report(private=True)
    assert body["last_error"]["message"] == "Reacting to new state in !a failed; retrying later"
    assert body["queue"]["bulk"]["depth"] == 5000


async def test_metrics() -> None:
    counts = Counts()
    counts.audited(
        [
            AuditRow("!a", "@u:x", "D", "S", "share", reason="r", trigger="request", waited_ms=30),
            AuditRow(
                "!a", "@u:x", "D", "S", "share", reason="r", trigger="request", waited_ms=3000
            ),
            AuditRow(
                "!a", "@v:x", "E", "S", "withhold", reason="r", trigger="request", waited_ms=40
            ),
            AuditRow("!a", "@w:x", "F", "S", "share", reason="r", trigger="join"),
        ]
    )
    text = (await health(counts=counts).exposition()).decode()
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert got[("encstate_keys_total", (("decision", "share"), ("trigger", "request")))] == 2
    assert got[("encstate_keys_total", (("decision", "withhold"), ("trigger", "request")))] == 1
    assert got[("encstate_keys_total", (("decision", "share"), ("trigger", "join")))] == 1
    assert got[("encstate_answer_seconds_bucket", (("le", "0.05"),))] == 2
    assert got[("encstate_answer_seconds_bucket", (("le", "5.0"),))] == 3
    assert got[("encstate_answer_seconds_count", ())] == 3
    assert abs(got[("encstate_answer_seconds_sum", ())] - 3.07) < 1e-9
    assert got[("encstate_to_device_calls_total", (("outcome", "failed"),))] == 1
    assert got[("encstate_rooms", (("empowered", "true"),))] == 1  # !a (!c is not tracked)
    assert got[("encstate_rooms", (("empowered", "false"),))] == 1  # !b
    assert got[("encstate_waiting_for_keys", ())] == 2
    assert got[("encstate_seals", ())] == 3


async def test_with_a_web_token_the_endpoints_want_it() -> None:
    from aiohttp.test_utils import make_mocked_request

    checked = health()
    checked.token = lambda: "s3cret-s3cret-s3cret"
    for handler in (checked.health, checked.metrics):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            resp = await handler(make_mocked_request("GET", "/health", headers=headers))
            assert resp.status == 401
        good = {"Authorization": "Bearer s3cret-s3cret-s3cret"}
        resp = await handler(make_mocked_request("GET", "/health", headers=good))
        assert resp.status == 200
    checked.token = lambda: None
    assert (await checked.health(make_mocked_request("GET", "/health"))).status == 200
