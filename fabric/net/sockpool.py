"""A pool of unconnected TCP sockets made ahead in another network namespace.

Sockets belong to the namespace of the thread that made them, and the data-plane thread
never changes namespace: the health probes (made in the local stack), the stream fronts'
VIP upstreams (the local stack) and pod-local upstreams (a backend pod's own namespace)
all take sockets that a thread of that namespace made ahead, so a connect costs no
thread hop. `make(count)` returns a future of `count` new sockets, made off the taking
thread; the pool asks for more when it runs below half, one request at a time. The
future's callback only appends under a lock that `close` takes too, so nothing of the
taking thread's state is touched from the other and what arrives after `close` is
closed, not kept.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

log = logging.getLogger("fabricd.sockpool")

POOL_SIZE = 32


class SocketPool:
    """Sockets of one namespace, taken one at a time (see module docstring)."""

    def __init__(self, make: Callable[[int], Future[list[socket.socket]]],
                 size: int = POOL_SIZE, what: str = "probes") -> None:
        self._make = make
        self.size = size
        self.what = what  # for the log line: whose sockets could not be made
        self.failures = 0
        self._ready: deque[socket.socket] = deque()
        self._asked = False
        self._closed = False
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ready)

    def take(self) -> socket.socket | None:
        if len(self._ready) < self.size // 2:
            self.refill()
        try:
            return self._ready.popleft()
        except IndexError:
            return None

    def add(self, socks: list[socket.socket]) -> None:
        """Sockets made elsewhere (a burst that emptied the pool made a batch)."""
        with self._lock:
            if not self._closed:
                for s in socks:
                    s.setblocking(False)
                self._ready.extend(socks)
                return
        for s in socks:
            s.close()

    def refill(self) -> None:
        if self._asked or self._closed:
            return
        self._asked = True
        try:
            fut = self._make(self.size - len(self._ready))
        except Exception as e:  # noqa: BLE001 - asked again on the next take
            self._asked = False
            self.failures += 1
            log.warning("no sockets for %s: %s", self.what, e)
            return
        fut.add_done_callback(self._arrived)

    def _arrived(self, fut: Future[list[socket.socket]]) -> None:
        try:
            socks = fut.result()
        except Exception as e:  # noqa: BLE001 - the namespace is gone or out of fds: later
            self.failures += 1
            log.warning("no sockets for %s: %s", self.what, e)
            socks = []
        self.add(socks)
        self._asked = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks, self._ready = list(self._ready), deque()
        for s in socks:
            s.close()
