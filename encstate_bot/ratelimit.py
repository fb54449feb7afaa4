"""Rate limits and duplicate suppression for incoming key requests. Pure: time is passed in."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class TokenBuckets:
    """One token bucket per key, holding at most ``max_keys`` buckets (oldest dropped first, so
    a flood of fresh keys cannot grow memory without bound)."""

    def __init__(self, burst: float, per_second: float, max_keys: int = 100_000) -> None:
        self.burst = float(burst)
        self.per_second = float(per_second)
        self.max_keys = max_keys
        self._buckets: OrderedDict[object, tuple[float, float]] = OrderedDict()

    def tokens(self, key: object, now: float) -> float:
        """The tokens a key has now, taking none."""
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.per_second)

    def allow(self, key: object, now: float) -> bool:
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.per_second)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)


class RecentSet:
    """Remembers keys for ``window`` seconds; ``seen`` says whether a key is a repeat."""

    def __init__(self, window: float, max_keys: int = 100_000) -> None:
        self.window = window
        self.max_keys = max_keys
        self._seen: OrderedDict[object, float] = OrderedDict()

    def seen(self, key: object, now: float) -> bool:
        self._expire(now)
        if key in self._seen:
            return True
        self._seen[key] = now
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        return False

    def holds(self, key: object, now: float) -> bool:
        """Whether ``key`` was seen within the window, remembering nothing new."""
        self._expire(now)
        return key in self._seen

    def _expire(self, now: float) -> None:
        while self._seen:
            key, ts = next(iter(self._seen.items()))
            if now - ts < self.window:
                break
            self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)


class RequestGate:
    """Admits a key request at most once per request id and once per (device, session) in a
    window, within per-device and per-user rate limits."""

    def __init__(
        self,
        device_burst: float,
        device_rate: float,
        user_burst: float,
        user_rate: float,
        duplicate_window: float,
    ) -> None:
        self.per_device = TokenBuckets(device_burst, device_rate)
        self.per_user = TokenBuckets(user_burst, user_rate)
        self.request_ids = RecentSet(max(duplicate_window, 600))
        self.recent = RecentSet(duplicate_window)

    @classmethod
    def from_config(cls, config: Any) -> RequestGate:
        return cls(*cls._limits(config))

    def configure(self, config: Any) -> None:
        """Take new limits live: the buckets keep their state, capped at a lower burst."""
        device_burst, device_rate, user_burst, user_rate, window = self._limits(config)
        self.per_device.burst, self.per_device.per_second = float(device_burst), device_rate
        self.per_user.burst, self.per_user.per_second = float(user_burst), user_rate
        self.request_ids.window = max(window, 600)
        self.recent.window = window

    @staticmethod
    def _limits(config: Any) -> tuple[float, float, float, float, float]:
        return (
            config["rate_limits.per_device.burst"],
            config["rate_limits.per_device.per_second"],
            config["rate_limits.per_user.burst"],
            config["rate_limits.per_user.per_second"],
            config["duplicate_window_seconds"],
        )

    def admit(
        self, user_id: str, device_id: str, request_id: str, session_id: str, now: float
    ) -> str | None:
        """None if the request may proceed, else why not ("duplicate" or "rate limited")."""
        if self.request_ids.seen((user_id, device_id, request_id), now):
            return "duplicate request id"
        if self.recent.seen((user_id, device_id, session_id), now):
            return "duplicate request for the same session"
        if not self.per_device.allow((user_id, device_id), now):
            return "rate limited (device)"
        if not self.per_user.allow(user_id, now):
            return "rate limited (user)"
        return None
