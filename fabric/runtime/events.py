"""Events a controller must know about, fanned out to subscribers with bounded queues.

A slow subscriber never blocks the data plane: its queue keeps the newest events, and
the next thing it reads says how many it lost.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

QUEUE_LIMIT = 4096
HISTORY = 512  # recent events kept for `fabricd describe` (and /v1/events/recent)


@dataclass(frozen=True)
class Event:
    kind: str
    namespace: str | None = None
    pod: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"ts": round(self.ts, 6), "kind": self.kind}
        if self.namespace is not None:
            d["namespace"] = self.namespace
        if self.pod is not None:
            d["pod"] = self.pod
        d.update(self.fields)
        return d


class Subscription:
    """An async iterator over events; close it when done."""

    def __init__(self, bus: EventBus, limit: int) -> None:
        self._bus = bus
        self._queue: deque[Event] = deque()
        self._limit = limit
        self._wake = asyncio.Event()
        self.lost = 0
        self._unreported = 0
        self.closed = False

    def push(self, event: Event) -> None:
        if len(self._queue) >= self._limit:
            self._queue.popleft()
            self.lost += 1
            self._unreported += 1
        self._queue.append(event)
        self._wake.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while not self._queue:
            if self.closed:
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()
        if self._unreported:
            n, self._unreported = self._unreported, 0
            return Event("events_lost", fields={"count": n})
        return self._queue.popleft()

    def get_nowait(self) -> Event | None:
        return self._queue.popleft() if self._queue else None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._wake.set()
            self._bus._subs.discard(self)


class EventBus:
    def __init__(self, history: int = HISTORY) -> None:
        self._subs: set[Subscription] = set()
        self.published = 0
        self.history: deque[Event] = deque(maxlen=history)

    def publish(self, event: Event) -> None:
        self.published += 1
        self.history.append(event)
        for s in list(self._subs):
            s.push(event)

    def emit(self, kind: str, namespace: str | None = None, pod: str | None = None,
             **fields: Any) -> None:
        self.publish(Event(kind, namespace, pod, fields))

    def recent(self, namespace: str | None = None, pod: str | None = None,
               service: str | None = None, limit: int = HISTORY) -> list[dict[str, Any]]:
        """The last events (oldest first) about a namespace, a pod or a service."""
        out = []
        for e in self.history:
            if namespace is not None and e.namespace != namespace:
                continue
            if pod is not None and e.pod != pod:
                continue
            if service is not None and e.fields.get("service") != service:
                continue
            out.append(e.to_dict())
        return out[-limit:]

    def subscribe(self, limit: int = QUEUE_LIMIT) -> Subscription:
        s = Subscription(self, limit)
        self._subs.add(s)
        return s

    def lost(self) -> int:
        return sum(s.lost for s in self._subs)

    def close(self) -> None:
        for s in list(self._subs):
            s.close()
