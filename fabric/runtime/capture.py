"""Live capture of a pod's port: frames copied into bounded per-subscriber queues.

The router calls the hub (on the data-plane thread) only while someone captures, so an
idle port pays one attribute check per frame. Readers run on the event loop; a push
wakes them through call_soon_threadsafe at most once per wakeup.
"""

from __future__ import annotations

import asyncio
from collections import deque

from fabric.router.model import Port
from fabric.runtime.wakeup import Wakeup

QUEUE_LIMIT = 8192
# Bytes too: 8192 TSO super-frames would be 512 MiB for one slow `fabricd capture`.
QUEUE_BYTES = 16 * 1024 * 1024


class CaptureSubscription:
    def __init__(self, hub: CaptureHub, max_frames: int | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._hub = hub
        self._queue: deque[tuple[float, bytes]] = deque()
        self._wake = Wakeup(loop)
        self.remaining = max_frames
        # Written by one thread each (the data plane pushes, the loop pops): no lock needed.
        self._pushed_bytes = 0
        self._popped_bytes = 0
        self.dropped = 0
        self.closed = False

    def push(self, ts: float, frame: bytes) -> None:
        if self.remaining is not None:
            if self.remaining <= 0:
                return
            self.remaining -= 1
        if len(self._queue) >= QUEUE_LIMIT or self.queued_bytes + len(frame) > QUEUE_BYTES:
            self.dropped += 1
            return
        self._pushed_bytes += len(frame)
        self._queue.append((ts, frame))
        self._wake.notify()

    @property
    def queued_bytes(self) -> int:
        return self._pushed_bytes - self._popped_bytes

    def __aiter__(self) -> CaptureSubscription:
        return self

    async def __anext__(self) -> tuple[float, bytes]:
        while not self._queue:
            if self.closed or self.remaining == 0:
                raise StopAsyncIteration
            await self._wake.wait()
        item = self._queue.popleft()
        self._popped_bytes += len(item[1])
        return item

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._wake.set()
            self._hub.remove(self)


class CaptureHub:
    """Fans one port's frames out to its capture subscribers, stamped with wall time."""

    def __init__(self, port: Port, clock_offset: float) -> None:
        self.port = port
        self.offset = clock_offset  # wall time minus monotonic time
        self.subs: set[CaptureSubscription] = set()

    def feed(self, now: float, frame: bytes, outgoing: bool) -> None:
        ts = now + self.offset
        for s in list(self.subs):
            s.push(ts, frame)

    def add(self, max_frames: int | None) -> CaptureSubscription:
        s = CaptureSubscription(self, max_frames, asyncio.get_running_loop())
        self.subs.add(s)
        self.port.capture = self.feed
        return s

    def remove(self, sub: CaptureSubscription) -> None:
        self.subs.discard(sub)
        if not self.subs:
            self.port.capture = None

    def close(self) -> None:
        for s in list(self.subs):
            s.close()
