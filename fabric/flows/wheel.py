"""A timing wheel of one-second buckets for flow expiry.

Tens of thousands of flows each have a deadline that moves on every packet. Keeping
them exact would cost a heap operation per packet; instead each flow sits in the bucket
of the whole second its deadline had when it was scheduled, and activity since then only
makes the real deadline later. When a bucket is due its flows are looked at once: those
really due are handed back, the others move to the bucket of their new deadline. So a
packet costs nothing here, a call where nothing is due costs nothing, and a deadline is
met at most one second late (the resolution this trades for it).

A deadline that moves *earlier* (a connection closing gets a shorter timeout) must be
told with ``move_earlier()``; the bucket it leaves is cleaned up lazily.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Scheduled(Protocol):
    """What the wheel keeps: the bucket (a whole second) the item sits in, 0 if none."""

    bucket: int


T = TypeVar("T", bound=Scheduled)


class TimingWheel(Generic[T]):
    """Items by the whole second of their deadline; ``deadline(item)`` is the truth."""

    def __init__(self, deadline: Callable[[T], float]) -> None:
        self._deadline = deadline
        self._buckets: dict[int, dict[T, None]] = {}
        self._seconds: list[int] = []  # heap of the seconds that have a bucket, each once

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def schedule(self, item: T, due: float) -> None:
        k = math.ceil(due)
        bucket = self._buckets.get(k)
        if bucket is None:
            bucket = self._buckets[k] = {}
            heapq.heappush(self._seconds, k)
        bucket[item] = None
        item.bucket = k

    def move_earlier(self, item: T, due: float) -> None:
        """The item's deadline moved to `due`; only an earlier bucket needs a move."""
        if math.ceil(due) < item.bucket:
            self.discard(item)
            self.schedule(item, due)

    def holds(self, item: T) -> bool:
        """Whether the item sits in the bucket it says (for consistency checks)."""
        bucket = self._buckets.get(item.bucket)
        return bucket is not None and item in bucket

    def discard(self, item: T) -> None:
        bucket = self._buckets.get(item.bucket)
        if bucket is not None:
            bucket.pop(item, None)
        item.bucket = 0

    def expire(self, now: float) -> list[T]:
        """The items whose deadline has come, taken off the wheel; the others that were
        in due buckets are rescheduled."""
        due: list[T] = []
        seconds = self._seconds
        buckets = self._buckets
        deadline = self._deadline
        while seconds and seconds[0] <= now:
            bucket = buckets.pop(heapq.heappop(seconds), None)
            if not bucket:
                continue
            for item in bucket:
                d = deadline(item)
                if d <= now:
                    item.bucket = 0
                    due.append(item)
                else:
                    self.schedule(item, d)
        return due

    def next_deadline(self) -> float | None:
        """When ``expire`` may next have work (the earliest non-empty bucket's second)."""
        seconds = self._seconds
        buckets = self._buckets
        while seconds and not buckets.get(seconds[0]):
            buckets.pop(heapq.heappop(seconds), None)
        return float(seconds[0]) if seconds else None
