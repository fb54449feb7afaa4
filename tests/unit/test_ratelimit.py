from __future__ import annotations

from encstate_bot.ratelimit import RecentSet, RequestGate, TokenBuckets
from encstate_bot.transport import MAX_PER_CALL, rounds


def test_token_bucket_refills() -> None:
    buckets = TokenBuckets(burst=3, per_second=1)
    assert [buckets.allow("k", 0.0) for _ in range(4)] == [True, True, True, False]
    assert buckets.allow("k", 1.0)
    assert not buckets.allow("k", 1.0)


def test_buckets_are_bounded() -> None:
    buckets = TokenBuckets(burst=1, per_second=0, max_keys=10)
    for i in range(1000):
        buckets.allow(i, 0.0)
    assert len(buckets) == 10


def test_recent_set_window() -> None:
    recent = RecentSet(window=5)
    assert not recent.seen("a", 0)
    assert recent.seen("a", 4)
    assert not recent.seen("a", 10)


def test_gate_coalesces_and_limits() -> None:
    gate = RequestGate(
        device_burst=3, device_rate=0, user_burst=5, user_rate=0, duplicate_window=5
    )
    assert gate.admit("@u", "D", "r1", "s1", 0) is None
    assert gate.admit("@u", "D", "r1", "s2", 0) == "duplicate request id"
    assert gate.admit("@u", "D", "r2", "s1", 1) == "duplicate request for the same session"
    assert gate.admit("@u", "D", "r3", "s2", 1) is None
    assert gate.admit("@u", "D", "r4", "s3", 1) is None
    assert gate.admit("@u", "D", "r5", "s4", 1) == "rate limited (device)"
    assert gate.admit("@u", "E", "r6", "s5", 1) is None
    assert gate.admit("@u", "E", "r7", "s6", 1) is None
    assert gate.admit("@u", "F", "r8", "s7", 1) == "rate limited (user)"


def test_rounds_never_repeat_a_device_in_one_call() -> None:
    messages = [(f"@u{i % 300}", "D", i) for i in range(900)]
    chunks = rounds(messages)
    assert sum(len(c) for c in chunks) == 900
    for chunk in chunks:
        assert len(chunk) <= MAX_PER_CALL
        keys = [(m[0], m[1]) for m in chunk]
        assert len(keys) == len(set(keys))
    assert len(chunks) == 6  # 3 rounds of 300 devices, 2 calls each
