"""Closing pod ports off the data-plane thread.

Closing a TAP unregisters its netdev, and the kernel then waits for RCU (about 20 ms on
a small VM) before close() returns. On the data-plane thread that stalled every
namespace's traffic for each detach and capped detaching at 50 pods/s. The data plane
still unregisters a port first (nothing reads it any more) and then hands the fd here:
a few threads close them, their waits overlap (4 threads close about 5 times as many),
and a new port in the same netns first waits for the old one's close (the interface
name is only free then).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("fabricd.closer")

THREADS = 4


class Closable(Protocol):
    def close(self) -> None: ...


class Closer:
    """A small pool that closes ports; `wait(key)` awaits the closes pending for a key."""

    def __init__(self, threads: int = THREADS) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(threads,
                                                           thread_name_prefix="fabric-close")
        self._lock = threading.Lock()
        self._pending: dict[str, concurrent.futures.Future[None]] = {}

    def close(self, io: Closable | None, key: str | None = None,
              after: Callable[[], None] | None = None) -> None:
        """Close `io` soon, then call `after` (a file to remove), in a pool thread (from
        any thread; inline once shut down)."""
        try:
            fut = self._pool.submit(_close, io, after)
        except RuntimeError:  # shut down: the fabric is closing
            _close(io, after)
            return
        if key is not None:
            with self._lock:
                self._pending[key] = fut
            fut.add_done_callback(lambda f, k=key: self._done(k, f))

    def _done(self, key: str, fut: concurrent.futures.Future[None]) -> None:
        with self._lock:
            if self._pending.get(key) is fut:
                del self._pending[key]

    async def wait(self, key: str | None) -> None:
        """Return once the last close submitted for `key` has finished."""
        if key is None:
            return
        with self._lock:
            fut = self._pending.get(key)
        if fut is not None:
            await asyncio.wrap_future(fut)

    def shutdown(self) -> None:
        """Finish every close submitted; later ones run inline."""
        self._pool.shutdown(wait=True)


def _close(io: Closable | None, after: Callable[[], None] | None) -> None:
    try:
        if io is not None:
            io.close()
    except Exception:
        log.exception("closing a port failed")
    try:
        if after is not None:
            after()
    except Exception:
        log.exception("cleaning up after a port failed")
