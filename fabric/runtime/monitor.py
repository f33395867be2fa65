"""`fabricd monitor`: a live, bounded feed of dropped frames from namespaces' drop logs.

A subscription puts one sink (filter + rate limit, fabric.router.droplog) into each
namespace's drop log; the data-plane thread pushes decoded drops into a bounded queue and
wakes the event loop at most once per batch. With no subscriber the logs have no sinks and
nobody pays for this. What the rate limit or a full queue holds back is counted and
reported on the next event (`suppressed`, `lost`), so a reader knows the feed is sampled.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from fabric.router.droplog import DropLog, Sink
from fabric.runtime.wakeup import Wakeup

QUEUE_LIMIT = 4096


class MonitorSubscription:
    def __init__(self, logs: list[DropLog], pod: str | None, reason: str | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = Wakeup(loop)
        self.offset = time.time() - time.monotonic()
        self.lost = 0
        self._lost_reported = 0
        self.closed = False
        now = time.monotonic()
        self._sinks: list[tuple[DropLog, Sink]] = []
        for log in logs:
            sink = Sink(self.push, pod, reason, now)
            # Rebinding (not appending) lets the data plane iterate the old list safely.
            log.sinks = [*log.sinks, sink]
            self._sinks.append((log, sink))

    def push(self, event: dict[str, Any]) -> None:
        """On the data-plane thread."""
        if len(self._queue) >= QUEUE_LIMIT:
            self.lost += 1
            return
        self._queue.append(event)
        self._wake.notify()

    def __aiter__(self) -> MonitorSubscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while not self._queue:
            if self.closed:
                raise StopAsyncIteration
            await self._wake.wait()
        event = dict(self._queue.popleft())
        event["ts"] = round(event["ts"] + self.offset, 6)
        lost = self.lost - self._lost_reported
        if lost:
            self._lost_reported += lost
            event["lost"] = lost
        return event

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._wake.set()
        for log, sink in self._sinks:
            log.sinks = [s for s in log.sinks if s is not sink]
        self._sinks.clear()
