"""Bulk spliced pairs, moved on a thread of their own.

A spliced pair needs no guest and no Python per byte, but its ``splice`` calls still
cost CPU: the client socket's TCP transmit and the local stack's queueing run inside
them. On the data-plane thread that is time taken from routing every pod's frames,
and for a download the data plane is the bottleneck (docs/performance.md, "Spliced
streams"). So a pair whose pass moved a bulk's worth is handed here: this thread owns
its two sockets' readiness and its pipes until both directions have ended (or a side
failed), then hands it back for the bookkeeping (counters, the core's
``splice_ended``), which stays on the front's thread. ``os.splice`` releases the GIL,
and a bulk pair is passed over at most once a millisecond, so the GIL is taken about a
thousand times a second per pair.

Ownership is exclusive: while a pair is here the front neither watches nor touches its
sockets and pipes; to close it early (the service goes away) the front calls
``reclaim``, which returns once this thread has let go of it, so no fd is closed under
a running ``splice``.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from fabric.streams.relay import Pipe

log = logging.getLogger("fabricd.streams")

_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
BULK = 64 << 10  # bytes a pass moved that make the next pass wait BATCH ...
BATCH = 0.001  # ... seconds, instead of a wakeup per super-frame
RECLAIM_TIMEOUT = 2.0  # seconds a reclaim waits for the thread (it never blocks)


class _Owned:
    __slots__ = ("key", "client", "up", "pipes", "done", "bulk", "masks")

    def __init__(self, key: Any, client: Any, up: Any, pipes: tuple[Pipe, Pipe],
                 done: Callable[[bool], None]) -> None:
        self.key = key
        self.client = client  # the sockets, for their fds (still owned by the front)
        self.up = up
        self.pipes = pipes
        self.done = done  # called on this thread with failed=True|False once it let go
        self.bulk = False
        self.masks = [-1, -1]  # the client's and upstream's interest; -1: not registered


class Splicer:
    """One thread for every bulk spliced pair of the process (see module docstring)."""

    def __init__(self, name: str = "fabric-splicer") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._cmds: collections.deque[tuple[str, Any, Any]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._ep: Any = None
        self._wake_r = self._wake_w = -1
        self._owned: dict[Any, _Owned] = {}  # by key (the front's pair)
        self._fds: dict[int, tuple[_Owned, int]] = {}
        self.adopted = 0
        self.passes = 0

    # --- from the fronts' threads ---------------------------------------------------------

    def adopt(self, key: Any, client: Any, up: Any, pipes: tuple[Pipe, Pipe],
              done: Callable[[bool], None]) -> bool:
        """Take a spliced pair (its front no longer watches its sockets); `done` is
        called on this thread once the pair is let go. False: not taken (keep it)."""
        with self._lock:
            if not self._start():
                return False
            self._cmds.append(("adopt", key, _Owned(key, client, up, pipes, done)))
        self._wake()
        return True

    def reclaim(self, key: Any) -> None:
        """Return once the thread no longer touches `key`'s pair (its `done` is then not
        called): the caller may close its sockets and pipes."""
        ev = threading.Event()
        with self._lock:
            if self._thread is None:
                return
            self._cmds.append(("reclaim", key, ev))
        self._wake()
        if not ev.wait(RECLAIM_TIMEOUT):
            log.error("%s: a reclaim got no answer in %.0f s", self.name, RECLAIM_TIMEOUT)

    def owned(self) -> int:
        return len(self._owned)

    # --- the thread ----------------------------------------------------------------------

    def _start(self) -> bool:
        if self._thread is not None:
            return True
        try:
            self._ep = select.epoll()
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._ep.register(self._wake_r, _IN)
        except OSError as e:
            log.warning("%s: cannot start (%s); spliced pairs stay on their fronts",
                        self.name, e)
            return False
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return True

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # already awake

    def _run(self) -> None:
        while True:
            try:
                self._loop()
            except Exception:  # the thread must outlive any one bad turn
                log.exception("%s: unexpected error; going on", self.name)
                time.sleep(0.01)

    def _loop(self) -> None:
        ep = self._ep
        bulk_at = 0.0  # when bulk pairs get their next pass
        while True:
            timeout = -1.0
            if any(o.bulk for o in self._owned.values()):
                timeout = max(0.0, bulk_at - time.monotonic())
            try:
                events = ep.poll(timeout)
            except InterruptedError:
                continue
            due: dict[Any, _Owned] = {}
            for fd, _ev in events:
                if fd == self._wake_r:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except (BlockingIOError, InterruptedError):
                        pass
                    continue
                got = self._fds.get(fd)
                if got is not None:
                    due[got[0].key] = got[0]
            self._commands(due)
            now = time.monotonic()
            if timeout >= 0 and now >= bulk_at:  # every bulk pair gets its pass
                bulk_at = now + BATCH
                for o in self._owned.values():
                    if o.bulk:
                        due[o.key] = o
            for o in due.values():
                if self._owned.get(o.key) is o:
                    try:
                        self._pass(o)
                    except Exception:  # never let one pair stop the others
                        log.exception("%s: a spliced pair failed; closing it", self.name)
                        self._release(o, failed=True)

    def _commands(self, due: dict[Any, _Owned]) -> None:
        while True:
            with self._lock:
                if not self._cmds:
                    return
                kind, key, arg = self._cmds.popleft()
            if kind == "adopt":
                self._owned[key] = arg
                self.adopted += 1
                due[key] = arg  # a first pass at once: bytes may be waiting
            else:  # reclaim
                o = self._owned.get(key)
                if o is not None:
                    self._forget(o)
                arg.set()

    def _pass(self, o: _Owned) -> None:
        """One pass over both directions, as the front's spliced step does."""
        self.passes += 1
        p0, p1 = o.pipes
        before = p0.moved + p1.moved
        try:
            read_c, write_u = p0.pump()
            read_u, write_c = p1.pump()
        except OSError:
            self._release(o, failed=True)
            return
        if p0.eof and p1.eof:
            self._release(o, failed=False)
            return
        if p0.moved + p1.moved - before >= BULK:
            o.bulk = True  # come back in BATCH, watching nothing meanwhile
            read_c = read_u = write_c = write_u = False
        else:
            o.bulk = False
        self._interest(o, 0, o.client, (_IN if read_c else 0) | (_OUT if write_c else 0))
        self._interest(o, 1, o.up, (_IN if read_u else 0) | (_OUT if write_u else 0))

    def _interest(self, o: _Owned, i: int, sock: Any, mask: int) -> None:
        if o.masks[i] == mask:
            return
        fd = sock.fileno()
        if o.masks[i] < 0:
            self._ep.register(fd, mask)  # mask 0 still reports hang-ups and errors
            self._fds[fd] = (o, i)
        else:
            self._ep.modify(fd, mask)
        o.masks[i] = mask

    def _forget(self, o: _Owned) -> None:
        for i, sock in ((0, o.client), (1, o.up)):
            if o.masks[i] >= 0:
                fd = sock.fileno()
                try:
                    self._ep.unregister(fd)
                except (OSError, ValueError):
                    pass
                self._fds.pop(fd, None)
                o.masks[i] = -1
        self._owned.pop(o.key, None)

    def _release(self, o: _Owned, *, failed: bool) -> None:
        self._forget(o)
        try:
            o.done(failed)
        except Exception:
            log.exception("%s: handing a spliced pair back failed", self.name)


_shared: Splicer | None = None
_shared_lock = threading.Lock()


def shared_splicer() -> Splicer:
    """The process's splicer (made on first use; its thread starts with the first pair)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Splicer()
        return _shared
