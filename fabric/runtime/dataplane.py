"""The I/O shell of the packet path: a dedicated thread that reads frames from port
fds, hands them to their namespace's router and writes what it returns.

Why a thread of its own: an asyncio callback per readiness event costs more than the
router itself, and keeping the loop off the control plane's event loop lets the
control API stay responsive under load. Everything that touches routers or port fds
runs on this thread: the control side submits changes with `call()`, which runs them
between frames and waits for the result, so a port is never closed under a read.

One preallocated buffer serves every read (a frame is routed to completion before the
next read), each wakeup drains a port until EAGAIN or a batch limit (fairness), and
router outputs are flushed right after the frame that made them, so order is kept.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from fabric.router.router import DROP_TX_ERROR, DROP_TX_FULL, L3_OFF, Port, Router

log = logging.getLogger("fabricd.dataplane")

BATCH = 256
BUF_SIZE = 256 * 1024
TICK = 0.1
FAST_TICK = 0.0005
T = TypeVar("T")

Receive = Callable[[Port, bytearray, int, float], "Port | None"]


class Owner(Protocol):
    """What reads a port: a namespace's router, or the uplink's demultiplexer."""

    name: str
    outputs: list[tuple[Port, bytes]]


class _Call:
    __slots__ = ("fn", "args", "done", "result", "error")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class DataPlane:
    def __init__(self) -> None:
        self.buf = bytearray(BUF_SIZE)
        self.mv = memoryview(self.buf)
        self.routers: dict[Router, None] = {}
        # fd -> (owner, port, receive function, read offset)
        self.ports: dict[int, tuple[Owner, Port, Receive, int]] = {}
        self.handlers: dict[int, tuple[Callable[[], None], str]] = {}
        # Called every loop turn with `now`; any returning True makes the loop turn at
        # least every FAST_TICK (service probes while clients wait).
        self.fast_tickers: list[Callable[[float], bool]] = []
        self.rx_errors = 0
        self.wakeups = 0
        self.frames = 0
        self._ep = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake_fd, select.EPOLLIN)
        self._calls: deque[_Call] = deque()
        self._stop = False
        self._thread: threading.Thread | None = None

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fabric-dataplane",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._stop = True
            os.eventfd_write(self._wake_fd, 1)
            self._thread.join(10)
            self._thread = None
        self._ep.close()
        os.close(self._wake_fd)

    # --- control side --------------------------------------------------------------------

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the data-plane thread between frames and return its result
        (or raise its exception). Runs inline before start() or on the thread itself."""
        if self._thread is None or threading.current_thread() is self._thread:
            return fn(*args)
        c = _Call(fn, args)
        self._calls.append(c)
        os.eventfd_write(self._wake_fd, 1)
        if not c.done.wait(30):
            raise RuntimeError("the data plane did not answer within 30 s")
        if c.error is not None:
            raise c.error
        return c.result  # type: ignore[no-any-return]

    def add_router(self, router: Router) -> None:
        self.call(self.routers.__setitem__, router, None)

    def remove_router(self, router: Router) -> None:
        self.call(self.routers.pop, router, None)

    def add_port(self, router: Router, port: Port) -> None:
        """Start reading `port` (call from the control side, or inside `call`)."""
        if port.l3:
            self.call(self._add_port, router, port, router.receive_l3, L3_OFF)
        else:
            self.call(self._add_port, router, port, router.receive, 0)

    def add_reader(self, owner: Owner, port: Port, receive: Receive, offset: int) -> None:
        """Read `port` with a receive function of another owner (the uplink)."""
        self.call(self._add_port, owner, port, receive, offset)

    def remove_port(self, port: Port) -> None:
        """Stop reading `port`; once this returns the fd may be closed."""
        self.call(self._remove_port, port)

    def add_handler(self, fd: int, fn: Callable[[], None], name: str) -> None:
        """Call fn() on the data-plane thread whenever `fd` is readable (it reads itself:
        for sockets that need the sender's address, like the tunnel's UDP socket)."""
        self.call(self._add_handler, fd, fn, name)

    def remove_handler(self, fd: int) -> None:
        self.call(self._remove_fd, fd)

    def _add_handler(self, fd: int, fn: Callable[[], None], name: str,
                     mask: int = select.EPOLLIN) -> None:
        self.handlers[fd] = (fn, name)
        self._ep.register(fd, mask)

    def add_writer_here(self, fd: int, fn: Callable[[], None], name: str) -> None:
        """On the data-plane thread: call fn() once `fd` is writable (a connect done);
        the caller removes it with remove_fd_here()."""
        self._add_handler(fd, fn, name, select.EPOLLOUT)

    def remove_fd_here(self, fd: int) -> None:
        self._remove_fd(fd)

    def _remove_fd(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def _add_port(self, owner: Owner, port: Port, receive: Receive, offset: int) -> None:
        self.ports[port.fd] = (owner, port, receive, offset)
        self._ep.register(port.fd, select.EPOLLIN)
        if owner.outputs:
            self.flush(owner)

    def _remove_port(self, port: Port) -> None:
        entry = self.ports.get(port.fd)
        if entry is not None and entry[1] is port:
            del self.ports[port.fd]
            try:
                self._ep.unregister(port.fd)
            except (OSError, ValueError):
                pass

    # --- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        poll = self._ep.poll
        ports = self.ports
        handlers = self.handlers
        wake = self._wake_fd
        readable = self._readable
        next_tick = time.monotonic() + TICK
        next_fast = 0.0
        fast = False
        while not self._stop:
            try:
                events = poll(FAST_TICK if fast else TICK)
            except InterruptedError:
                continue
            for fd, _ in events:
                entry = ports.get(fd)
                if entry is not None:
                    readable(*entry)
                elif fd in handlers:
                    fn, name = handlers[fd]
                    try:
                        fn()
                    except Exception:
                        log.exception("%s: handler failed", name)
                elif fd == wake:
                    try:
                        os.eventfd_read(wake)
                    except BlockingIOError:
                        pass
            if self._calls:
                self._run_calls()
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK
                self._timers(now)
            if now >= next_fast and self.fast_tickers:
                # At most every FAST_TICK, however busy the ports: the packet path pays
                # nothing per frame for probes.
                next_fast = now + FAST_TICK
                fast = False
                for tick in self.fast_tickers:
                    try:
                        fast = tick(now) or fast
                    except Exception:
                        log.exception("a fast ticker failed")
        while self._calls:
            self._run_calls()

    def _run_calls(self) -> None:
        while self._calls:
            c = self._calls.popleft()
            try:
                c.result = c.fn(*c.args)
            except BaseException as e:  # handed back to the caller
                c.error = e
            c.done.set()

    def _readable(self, owner: Owner, port: Port, receive: Receive, offset: int) -> None:
        buf = self.buf
        mv = self.mv
        bufs = [mv[offset:]] if offset else [buf]
        readv = os.readv
        write = os.write
        fd = port.fd
        now = time.monotonic()
        k = 0
        self.wakeups += 1
        try:
            for k in range(BATCH):  # noqa: B007 (k counts frames)
                try:
                    n = readv(fd, bufs)
                except BlockingIOError:
                    break
                except OSError as e:
                    # ENETDOWN and friends are transient on a port whose link flapped;
                    # a vanished device stops being read.
                    self.rx_errors += 1
                    if e.errno in (errno.EBADF, errno.EBADFD, errno.ENODEV):
                        self._remove_port(port)
                    break
                if n <= 0:
                    break
                n += offset
                out = receive(port, buf, n, now)
                if out is not None:
                    try:
                        write(out.fd, mv[L3_OFF:n] if out.l3 else mv[:n])
                    except BlockingIOError:
                        out.drop(DROP_TX_FULL)
                    except OSError as e:
                        out.drop(DROP_TX_FULL if e.errno == errno.ENOBUFS else DROP_TX_ERROR)
                if owner.outputs:
                    self.flush(owner)
        except Exception:
            # A router bug must cost one frame, never the data plane.
            log.exception("%s: dropping a frame that raised", owner.name)
            owner.outputs.clear()
        self.frames += k

    def flush(self, owner: Owner) -> None:
        outputs = owner.outputs
        write = os.write
        for out, frame in outputs:
            if out.fd < 0:
                continue
            try:
                write(out.fd, frame)
            except BlockingIOError:
                out.drop(DROP_TX_FULL)
            except OSError as e:
                out.drop(DROP_TX_FULL if e.errno == errno.ENOBUFS else DROP_TX_ERROR)
        outputs.clear()

    def _timers(self, now: float) -> None:
        for r in self.routers:
            try:
                t = r.next_timer()
                if t is not None and t <= now:
                    r.handle_timer(now)
                    if r.outputs:
                        self.flush(r)
            except Exception:
                log.exception("namespace %s: router timer failed", r.name)
                r.outputs.clear()
