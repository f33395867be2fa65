"""Handshake admission under load: a load meter and a per-source token bucket.

Both only matter when handshakes arrive faster than we choose to process them; the
data path never touches this module.
"""

from __future__ import annotations

import math

UNDER_LOAD_HOLD = 1.0  # once under load, stay so for this long (WireGuard's UnderLoadAfterTime)


class LoadMeter:
    """Handshake messages per second over a sliding second (two buckets, interpolated)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._start = float("-inf")
        self._cur = 0
        self._prev = 0
        self._until = float("-inf")

    def record(self, now: float) -> bool:
        """Count one handshake message at ``now``; True while we are under load."""
        start = math.floor(now) if math.isfinite(now) else 0.0
        if start > self._start:
            self._prev = self._cur if start - self._start == 1 else 0
            self._cur = 0
            self._start = start
        self._cur += 1
        rate = self._prev * max(0.0, 1.0 - (now - start)) + self._cur
        if rate > self.threshold:
            self._until = now + UNDER_LOAD_HOLD
        return now < self._until

    def rate(self, now: float) -> float:
        """The current estimate, for stats."""
        start = math.floor(now) if math.isfinite(now) else 0.0
        if start == self._start:
            return self._prev * max(0.0, 1.0 - (now - start)) + self._cur
        if start - self._start == 1:
            return self._cur * max(0.0, 1.0 - (now - start))
        return 0.0


class RateLimiter:
    """A token bucket per source IP (``rate``/s, ``burst`` deep), in a bounded table."""

    def __init__(self, rate: float = 20.0, burst: float = 5.0, max_entries: int = 4096) -> None:
        self.rate = rate
        self.burst = burst
        self.max_entries = max_entries
        self._buckets: dict[str, list[float]] = {}
        self.table_full = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str, now: float) -> bool:
        """Take one token for ``key``; False if it has none (or the table is full of others)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_entries:
                self._collect(now)
                if len(self._buckets) >= self.max_entries:
                    self.table_full += 1
                    return False
            self._buckets[key] = [self.burst - 1.0, now]
            return True
        elapsed = now - bucket[1]
        tokens = bucket[0] + (elapsed * self.rate if elapsed > 0 else 0.0)
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = max(now, bucket[1])
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return True
        bucket[0] = tokens
        return False

    def _collect(self, now: float) -> None:
        """Forget sources whose bucket has refilled: they are indistinguishable from new."""
        full = [
            k
            for k, (tokens, last) in self._buckets.items()
            if tokens + max(0.0, now - last) * self.rate >= self.burst
        ]
        for k in full:
            del self._buckets[k]


class TokenBucket:
    """One token bucket (``rate``/s, ``burst`` deep): a bound on work per second that a
    flood cannot raise, checked before the work is done."""

    __slots__ = ("rate", "burst", "_tokens", "_last")

    def __init__(self, rate: float, burst: float) -> None:
        if not rate > 0 or not burst >= 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = float("-inf")

    def take(self, now: float) -> bool:
        """Take one token at ``now``; False if there is none (a clock going backwards
        refills nothing)."""
        elapsed = now - self._last
        if elapsed > 0:
            tokens = self._tokens + elapsed * self.rate
            self._tokens = tokens if tokens < self.burst else self.burst
            self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
