"""The I/O shell of a stream port: the VIP:port listener in the local stack, the client
and upstream sockets, byte queues, back-pressure and splicing, on the data-plane thread
(or the asyncio loop, see below).

Every decision is the sans-IO ``StreamCore``'s (fabric.streams.core); this module reads
and writes sockets, carries out the core's commands and keeps the byte limits:

- per stream, at most ``stream_buffer`` bytes queued toward each side; above it the
  side that feeds the full queue is not read (the client for the upstream queue, both
  sides for the client queue), so a stalled peer stops the flow instead of growing
  memory; a guest that queues past four times the bound with nothing read has the
  stream closed (``buffer_overflow``);
- upstream connections leave from the VIP (sockets made on the local stack's thread,
  a pool of them kept ready) with a connect timeout; on a port with
  ``upstream: pod-local`` the socket is made in the backend pod's own namespace instead
  and connects to the pod's IP there (fabric.streams.podlocal), falling back to the VIP
  per connection when the backend is not a netns pod of this worker;
- spliced pairs move through the kernel (fabric.streams.relay).

The relayed sockets are not registered one by one: the front keeps an epoll set of
its own, registered with its thread's poller as one reader, and dispatches its events
itself. asyncio's per-event machinery (a handle run in a context per ready fd, a
selector key rebuilt per add/remove) was ~6 % of the loop's GIL-held samples per
PostgreSQL transaction (docs/performance.md, "Stream ports"); one poll per wakeup
serves every ready stream, spliced pairs' sockets included.

Where the front runs: on the data-plane thread (the default), or on the asyncio loop
(``$FABRICD_STREAM_THREAD=loop``, kept for A/B measurements). On the data plane the
front's epoll set and listener are handlers of the data plane's epoll and the front is
one of its timed owners (its own timer heap: the core's tick, connect timeouts, spliced
passes), so a send into the local stack and the router's read of the TUN frame it made
happen in the same wakeup of one thread, with no GIL handover and no wakeup of a second
thread per frame (docs/performance.md, "Stream ports"). Guest calls then run on the
thread that routes every pod: each is bounded by its fuel and epoch deadline
(ActivatorHost, 50 ms by default), and a wakeup of the front stops dispatching after
``TURN_BUDGET`` seconds, leaving the rest of its ready sockets (level-triggered) to the
next turn, after the other ports had theirs; a slow guest therefore delays routing per
turn by at most the budget, the call that overran it and the wakeup's closing call (the
deferred reads): two deadlines. Calls from the event loop (backends, reload, close,
status) are posted to the data plane; on the loop they run inline.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import itertools
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from fabric.streams import core as sc
from fabric.streams.core import StreamCore
from fabric.streams.podlocal import COUNTERS as POD_LOCAL_COUNTERS
from fabric.streams.podlocal import PodLocal
from fabric.streams.relay import Pipe
from fabric.streams.splicer import Splicer, shared_splicer

log = logging.getLogger("fabricd.streams")

ACCEPTS_PER_WAKEUP = 64
# Out of descriptors (EMFILE and kin), an accept fails and the connection stays in the
# backlog, so the listener stays readable: watched as before, it made the front spin
# (133,660 failed accepts in 2 s in the hostile campaign). A connection that cannot be
# accepted is shed instead: a spare descriptor is closed, the connection accepted on it
# and closed at once (its client sees the end, not a hang), the spare opened again
# (`accept_shed`). With no spare to give, the listener is not watched for ACCEPT_BACKOFF.
ACCEPT_BACKOFF = 0.1
_NO_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
EVENTS_PER_WAKEUP = 256
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_READ_EVENTS = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
READ_SIZE = 64 << 10
CONNECT_TIMEOUT = 5.0
SPLICE_BULK = 64 << 10  # bytes one spliced pass moved that make the next one wait...
SPLICE_BATCH = 0.001  # ... this long, instead of a wakeup per super-frame
_LOG_LEVELS = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)
# Seconds of work (socket handling and guest calls) one wakeup of the front may take
# before the rest of its ready sockets wait for the next turn (on the data plane: the
# other ports' turn comes first). One guest call may overrun it by its deadline.
TURN_BUDGET = 0.002
# Where stream fronts run: "dataplane" (default) or "loop" (the asyncio event loop).
THREADS = ("dataplane", "loop")
THREAD_ENV = "FABRICD_STREAM_THREAD"
T = TypeVar("T")


def default_thread() -> str:
    """The thread stream fronts run on: $FABRICD_STREAM_THREAD (an A/B switch for
    benchmarks), else the data plane."""
    v = os.environ.get(THREAD_ENV, "").strip().lower()
    return v if v in THREADS else "dataplane"


class DataPlaneHost(Protocol):
    """What the front needs of the data plane (fabric.runtime.dataplane.DataPlane)."""

    def post(self, fn: Callable[..., Any], *args: Any) -> None: ...

    async def acall(self, fn: Callable[..., T], *args: Any, timeout: float = ...) -> T: ...

    def add_owner(self, owner: Any, group: Any = None) -> None: ...

    def remove_owner(self, owner: Any) -> None: ...

    def add_handler(self, fd: int, fn: Callable[[], None], name: str,
                    owner: Any = None) -> None: ...

    def remove_handler(self, fd: int) -> None: ...


class _Timer:
    """A timer of the front's own heap; `cancel()` makes it a no-op."""

    __slots__ = ("when", "fn", "args", "cancelled")

    def __init__(self, when: float, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.when = when
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

SHELL_COUNTERS = ("buffer_overflow", "bytes_spliced", "accept_errors", "accept_shed",
                  "socket_errors", "connect_timeouts", "splices_handed")


def _spare_fd() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


class _Conn:
    """One socket of a stream and its queue toward it."""

    __slots__ = ("sock", "fd", "out", "eof", "closing", "closed", "reading", "writing",
                 "connected", "mask")

    def __init__(self, sock: socket.socket, connected: bool) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.out = bytearray()
        self.eof = False  # the peer finished sending
        self.closing = False  # close once `out` is flushed
        self.closed = False
        self.reading = False
        self.writing = False
        self.connected = connected
        self.mask = -1  # its interest in the front's epoll set; -1: not in it


class _Pair:
    __slots__ = ("sid", "client", "up", "guest_paused", "forgotten", "pipes",
                 "connect_timer", "splice_timer", "handed")

    def __init__(self, sid: int, client: _Conn) -> None:
        self.sid = sid
        self.client = client
        self.up: _Conn | None = None
        self.guest_paused = False
        self.forgotten = False
        self.pipes: tuple[Pipe, Pipe] | None = None
        self.connect_timer: _Timer | None = None
        self.splice_timer: _Timer | None = None
        self.handed = False  # a bulk pair the splicer thread owns (fabric.streams.splicer)


class StreamFront:
    """One service port's listener and connections (see module docstring)."""

    def __init__(self, core: StreamCore, listener: socket.socket,
                 upstream_socket: Callable[[], socket.socket | None],
                 on_need: Callable[[int], None], label: str,
                 dataplane: DataPlaneHost | None = None,
                 pod_local: PodLocal | None = None, bulk_thread: bool = True) -> None:
        """Made on the event loop; with `dataplane` it runs there once `start()` was
        awaited, else on this loop at once. With `pod_local` upstream sockets are made
        in the backend pod when it can be entered (`upstream: pod-local`). With
        `bulk_thread` bulk spliced pairs move to the splicer thread."""
        self.core = core
        self.listener = listener
        self._upstream_socket = upstream_socket
        self._on_need = on_need
        self.label = label
        self.name = label  # as a timed owner of the data plane
        self.dataplane = dataplane
        self.loop = asyncio.get_running_loop()
        self.pairs: dict[int, _Pair] = {}
        self.counters = dict.fromkeys(SHELL_COUNTERS, 0)
        self.pod_local = pod_local
        self.splicer: Splicer | None = shared_splicer() if bulk_thread else None
        if pod_local is not None:
            self.counters.update(dict.fromkeys(POD_LOCAL_COUNTERS, 0))
        self.limit = core.stream_buffer
        self._told_need = core.need
        # The front's timers (connect timeouts, spliced passes); the core's tick is
        # read from the core. On the loop one asyncio handle is armed at the earliest.
        self._timers: list[tuple[float, int, _Timer]] = []
        self._seq = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._handle_at: float | None = None
        self._closed = False
        self._started = False
        self._ep = select.epoll()
        self._fds: dict[int, tuple[_Pair, _Conn]] = {}
        self._spare = _spare_fd()  # given up to shed a connection when out of fds
        self._accept_paused = False
        self._warned_fds = 0.0
        listener.setblocking(False)
        if dataplane is None:
            self._started = True
            self.loop.add_reader(listener.fileno(), self._accept)
            self.loop.add_reader(self._ep.fileno(), self._events)

    async def start(self) -> None:
        """On the data plane: register the listener and the epoll set there."""
        if self.dataplane is not None and not self._started:
            await self.dataplane.acall(self._start_here)

    def _start_here(self) -> None:
        dp = self.dataplane
        assert dp is not None
        if self._closed or self._started:
            return
        self._started = True
        dp.add_owner(self)
        dp.add_handler(self.listener.fileno(), self._accept, f"{self.label}: accept", self)
        dp.add_handler(self._ep.fileno(), self._events, f"{self.label}: streams", self)

    # --- from outside ---------------------------------------------------------------------

    def _enter(self, fn: Callable[..., None], *args: Any) -> None:
        """Run fn on the front's thread: inline on the loop, posted to the data plane."""
        if self.dataplane is None:
            fn(*args)
        else:
            self.dataplane.post(fn, *args)

    def backends(self, ready: list[str]) -> None:
        """The service's ready backends changed (called on the loop)."""
        self._enter(self._backends, ready)

    def _backends(self, ready: list[str]) -> None:
        if self._closed:
            return
        self.core.backends(ready, time.monotonic())
        self._run()

    async def reload(self, guest: Any) -> int:
        """New streams go to `guest` from now on (live ones stay with their module):
        the new generation's number."""
        if self.dataplane is None:
            return self._reload(guest)
        return await self.dataplane.acall(self._reload, guest)

    def _reload(self, guest: Any) -> int:
        n = self.core.replace_guest(guest, time.monotonic())
        self._run()
        return n

    def close(self) -> None:
        """Stop listening and drop every stream (the service went away)."""
        self._enter(self._close)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        dp = self.dataplane
        for fd in (self.listener.fileno(), self._ep.fileno()):
            try:
                if dp is None:
                    self.loop.remove_reader(fd)
                elif self._started:
                    dp.remove_handler(fd)
            except (ValueError, OSError):
                pass
        if dp is not None and self._started:
            dp.remove_owner(self)
        self.listener.close()
        for pair in list(self.pairs.values()):
            self._drop(pair)
        if self._handle is not None:
            self._handle.cancel()
            self._handle = self._handle_at = None
        self._timers.clear()
        self._ep.close()
        self._fds.clear()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None

    async def astatus(self) -> dict[str, Any]:
        """`status()` read on the front's thread (from the event loop)."""
        if self.dataplane is None or not self._started or self._closed:
            return self.status()
        return await self.dataplane.acall(self.status)

    def status(self) -> dict[str, Any]:
        """On the front's thread (see astatus)."""
        row = self.core.status()
        row["counters"] = {**row["counters"], **self.counters}  # type: ignore[dict-item]
        row["queued_bytes"] = sum(len(p.client.out) + (len(p.up.out) if p.up else 0)
                                  for p in self.pairs.values())
        return row

    # --- accepting ------------------------------------------------------------------------

    def _accept(self) -> None:
        core = self.core
        if self._closed:
            return
        until = time.monotonic() + TURN_BUDGET
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.counters["accept_errors"] += 1
                if e.errno not in _NO_FDS:
                    log.warning("%s: accept failed: %s", self.label, e)
                    break
                now = time.monotonic()
                if now - self._warned_fds >= 1.0:  # once a second at most
                    self._warned_fds = now
                    log.warning("%s: accept failed: %s; shedding connections", self.label,
                                e)
                if self._shed():
                    continue
                self._pause_accept()
                break
            sid = core.accepted((addr[0], addr[1]), time.monotonic())
            if sid is None:
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(sid, _Conn(sock, True))
            self.pairs[sid] = pair
            self._update(pair)
            if time.monotonic() > until:  # the rest wait in the backlog for a turn
                break
        self._run()

    def _shed(self) -> bool:
        """Out of descriptors: accept one connection on the spare and close it (see
        ACCEPT_BACKOFF). False when there was no spare or nothing to accept."""
        if self._spare is None:
            self._spare = _spare_fd()
            return False
        os.close(self._spare)
        self._spare = None
        try:
            sock, _ = self.listener.accept()
        except OSError:
            self._spare = _spare_fd()
            return False
        sock.close()
        self._spare = _spare_fd()  # the descriptor just freed, in the common case
        self.counters["accept_shed"] += 1
        return True

    def _pause_accept(self) -> None:
        """Stop watching the listener for ACCEPT_BACKOFF (its backlog keeps the rest)."""
        if self._accept_paused or self._closed:
            return
        self._accept_paused = True
        fd = self.listener.fileno()
        try:
            if self.dataplane is None:
                self.loop.remove_reader(fd)
            else:
                self.dataplane.remove_handler(fd)
        except (ValueError, OSError):
            pass
        self._call_later(ACCEPT_BACKOFF, self._resume_accept)

    def _resume_accept(self) -> None:
        if not self._accept_paused or self._closed:
            return
        self._accept_paused = False
        fd = self.listener.fileno()
        if self.dataplane is None:
            self.loop.add_reader(fd, self._accept)
        else:
            self.dataplane.add_handler(fd, self._accept, f"{self.label}: accept", self)

    # --- commands -------------------------------------------------------------------------

    def _run(self) -> None:
        """Carry out what the core asked for, then its log lines, need and timer."""
        core = self.core
        while True:
            cmds = core.commands()
            if not cmds:
                break
            for kind, sid, arg in cmds:
                pair = self.pairs.get(sid)
                if pair is None:
                    continue
                if pair.handed:  # the core acts on it: the front's again (rarely: a FORGET)
                    self._take_back(pair)
                if kind == sc.SEND_CLIENT:
                    self._queue(pair, pair.client, arg)  # type: ignore[arg-type]
                elif kind == sc.SEND_UPSTREAM:
                    if pair.up is not None:
                        self._queue(pair, pair.up, arg)  # type: ignore[arg-type]
                elif kind == sc.CLOSE_CLIENT:
                    self._close_after_flush(pair, pair.client)
                elif kind == sc.CLOSE_UPSTREAM:
                    if pair.up is not None:
                        self._close_after_flush(pair, pair.up)
                elif kind == sc.CONNECT:
                    ip, port = arg  # type: ignore[misc]
                    self._connect(pair, ip, port)
                elif kind == sc.READ_CLIENT:
                    pair.guest_paused = not arg
                    self._update(pair)
                elif kind == sc.SPLICE:
                    self._splice(pair)
                elif kind == sc.FORGET:
                    pair.forgotten = True
                    for c in (pair.client, pair.up):
                        if c is not None and not c.closing:
                            self._close_now(pair, c)
                    self._maybe_done(pair)
        if core.retired:
            for guest in core.retired:  # a reloaded module whose last stream ended
                close = getattr(guest, "close", None)
                if close is not None:
                    close()
            core.retired.clear()
        if core.logs:
            for level, text in core.logs:
                log.log(_LOG_LEVELS[min(level, 3)], "%s: %s", self.label, text)
            core.logs.clear()
        if core.need != self._told_need:
            self._told_need = core.need
            self._on_need(core.need)
        self._arm_timer()

    # --- timers -----------------------------------------------------------------------

    def _call_later(self, delay: float, fn: Callable[..., None], *args: Any) -> _Timer:
        t = _Timer(time.monotonic() + delay, fn, args)
        heapq.heappush(self._timers, (t.when, next(self._seq), t))
        self._arm_timer()
        return t

    def next_timer(self) -> float | None:
        """The earliest of the front's timers and the core's (a timed owner's)."""
        heap = self._timers
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        t = heap[0][0] if heap else None
        c = self.core.next_timer()
        if c is not None and (t is None or c < t):
            return c
        return t

    def handle_timer(self, now: float) -> None:
        """Run what is due: the front's timers, then the core's."""
        if self._closed:
            return
        heap = self._timers
        while heap and heap[0][0] <= now:
            _, _, t = heapq.heappop(heap)
            if t.cancelled:
                continue
            t.cancelled = True
            try:
                t.fn(*t.args)
            except Exception:  # noqa: BLE001 - one stream's bug must not stop the rest
                log.exception("%s: a stream timer failed", self.label)
        c = self.core.next_timer()
        if c is not None and c <= now:
            self.core.handle_timer(now)
            self._run()

    def _arm_timer(self) -> None:
        """On the loop: one asyncio handle at the earliest deadline (the data plane
        reads next_timer() itself after every call into the front)."""
        if self.dataplane is not None or self._closed:
            return
        t = self.next_timer()
        if t is None:
            if self._handle is not None:
                self._handle.cancel()
                self._handle = self._handle_at = None
            return
        if self._handle_at is not None and self._handle_at <= t:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._handle_at = t
        self._handle = self.loop.call_at(t, self._on_timer)

    def _on_timer(self) -> None:
        self._handle = self._handle_at = None
        self.handle_timer(time.monotonic())
        self._arm_timer()

    # --- queues and back-pressure ---------------------------------------------------------

    def _queue(self, pair: _Pair, c: _Conn, data: bytes) -> None:
        if c.closed or c.closing:
            return
        if not c.out and c.connected:
            try:
                n = c.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self._failed(pair, c)
                return
            if n == len(data):
                return
            data = data[n:]
        c.out += data
        if len(c.out) > 4 * self.limit:
            self.counters["buffer_overflow"] += 1
            log.warning("%s: stream %d: %d bytes queued toward a peer that does not read; "
                        "closing it", self.label, pair.sid, len(c.out))
            self._abort(pair)
            return
        self._update(pair)

    def _update(self, pair: _Pair) -> None:
        """Watch what should be watched: reading stops when a queue it feeds is full."""
        if pair.pipes is not None:
            return
        client, up, limit = pair.client, pair.up, self.limit
        down_full = len(client.out) > limit
        up_full = up is not None and len(up.out) > limit
        self._watch(pair, client, not (pair.guest_paused or client.eof or client.closing
                                      or down_full or up_full),
                    bool(client.out))
        if up is not None and up.connected:
            self._watch(pair, up, not (up.eof or up.closing or down_full), bool(up.out))

    def _watch(self, pair: _Pair, c: _Conn, read: bool, write: bool) -> None:
        """Set `c`'s interest in the front's epoll set (out of it when neither: a
        registered fd reports hang-ups and errors whatever the mask)."""
        if c.closed or (read == c.reading and write == c.writing):
            return
        c.reading, c.writing = read, write
        mask = (_IN if read else 0) | (_OUT if write else 0)
        if c.mask < 0:
            self._ep.register(c.fd, mask)
            self._fds[c.fd] = (pair, c)
            c.mask = mask
        elif not mask:
            self._forget_fd(c)
        else:
            self._ep.modify(c.fd, mask)
            c.mask = mask

    def _forget_fd(self, c: _Conn) -> None:
        c.mask = -1
        self._fds.pop(c.fd, None)
        try:
            self._ep.unregister(c.fd)
        except (OSError, ValueError):
            pass

    def _events(self) -> None:
        """The front's epoll set is readable: dispatch every ready socket once. Entries
        are looked up before any callback runs, so a socket made meanwhile on a number
        just freed is not handed an event of its predecessor."""
        try:
            events = self._ep.poll(0, EVENTS_PER_WAKEUP)
        except (OSError, ValueError):
            return
        fds = self._fds
        ready = [(fds.get(fd), ev) for fd, ev in events]
        core = self.core
        core.defer = len(ready) > 1  # one guest call for the wakeup's reads
        mono = time.monotonic
        until = mono() + TURN_BUDGET
        stepped: set[int] | None = None  # spliced pairs already passed this wakeup
        try:
            for ent, ev in ready:
                if ent is None:
                    continue
                pair, c = ent
                try:
                    if pair.pipes is not None:
                        if stepped is None:
                            stepped = set()
                        elif pair.sid in stepped:
                            continue
                        stepped.add(pair.sid)
                        if c.reading or c.writing:
                            self._spliced_step(pair)
                        continue
                    if ev & _READ_EVENTS and c.reading and not c.closed:
                        self._readable(pair, c)
                    if ev & _WRITE_EVENTS and c.writing and not c.closed:
                        self._writable(pair, c)
                except Exception:  # noqa: BLE001 - one stream's bug must not stall the rest
                    log.exception("%s: stream %d: error handling its socket", self.label,
                                  pair.sid)
                if mono() > until:
                    # The rest stay ready (level-triggered) and come back next turn.
                    break
        finally:
            if core.defer:
                core.flush(mono())
                self._run()

    def _readable(self, pair: _Pair, c: _Conn) -> None:
        core = self.core
        now = time.monotonic()
        is_client = c is pair.client
        try:
            data = c.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            c.eof = True
            self._update(pair)
            if is_client:
                core.client_closed(pair.sid, now, reset=True)
            else:
                core.upstream_closed(pair.sid, now)
            self._run()
            return
        if not data:
            c.eof = True
            self._update(pair)
            if is_client:
                core.client_closed(pair.sid, now)
            else:
                core.upstream_closed(pair.sid, now)
        elif is_client:
            core.client_data(pair.sid, data, now)
        else:
            core.upstream_data(pair.sid, data, now)
        if not core.defer:  # else once, after the batch (_events)
            self._run()

    def _writable(self, pair: _Pair, c: _Conn) -> None:
        if not c.connected:
            self._connected(pair, c)
            return
        try:
            n = c.sock.send(c.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._failed(pair, c)
            self._run()
            return
        del c.out[:n]
        if not c.out and c.closing:
            self._close_now(pair, c)
            self._maybe_done(pair)
            return
        self._update(pair)

    # --- upstream connections -------------------------------------------------------------

    def _connect(self, pair: _Pair, ip: str, port: int) -> None:
        old = pair.up
        if old is not None and not old.closed:
            # A guest that reconnects (the backend closed, or it dropped an idle upstream)
            # is done with the old socket: closed now, so no event of it can be taken for
            # the new connection's, and no socket is left without its pair's interest.
            self._close_now(pair, old)
        sock = None
        if self.pod_local is not None:  # else (or failing that) from the VIP
            sock, counter = self.pod_local.socket(ip)
            self.counters[counter] += 1
        if sock is None:
            sock = self._upstream_socket()
        if sock is None:
            self.counters["socket_errors"] += 1
            self.core.upstream_result(pair.sid, False, time.monotonic())
            return
        sock.setblocking(False)
        err = sock.connect_ex((ip, port))
        if err not in (0, errno.EINPROGRESS, errno.EALREADY):
            sock.close()
            self.core.upstream_result(pair.sid, False, time.monotonic())
            return
        c = _Conn(sock, False)
        pair.up = c
        self._watch(pair, c, False, True)
        pair.connect_timer = self._call_later(CONNECT_TIMEOUT, self._connect_timeout, pair, c)

    def _connected(self, pair: _Pair, c: _Conn) -> None:
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if pair.connect_timer is not None:
            pair.connect_timer.cancel()
            pair.connect_timer = None
        self._watch(pair, c, False, False)
        now = time.monotonic()
        if err:
            self._close_now(pair, c)
            pair.up = None
            self.core.upstream_result(pair.sid, False, now)
        else:
            c.connected = True
            c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.core.upstream_result(pair.sid, True, now)
            self._update(pair)
        self._run()

    def _connect_timeout(self, pair: _Pair, c: _Conn) -> None:
        pair.connect_timer = None
        if c.connected or c.closed or pair.up is not c:
            return
        self.counters["connect_timeouts"] += 1
        self._close_now(pair, c)
        pair.up = None
        self.core.upstream_result(pair.sid, False, time.monotonic())
        self._run()

    # --- splicing -------------------------------------------------------------------------

    def _splice(self, pair: _Pair) -> None:
        up = pair.up
        if up is None or not up.connected:
            return
        for c in (pair.client, up):
            self._watch(pair, c, False, False)
        try:
            pair.pipes = (Pipe(pair.client.sock, up.sock), Pipe(up.sock, pair.client.sock))
        except OSError as e:
            log.warning("%s: stream %d: cannot splice (%s); closing it", self.label,
                        pair.sid, e)
            self._abort(pair)
            return
        self._spliced_step(pair)

    def _spliced_step(self, pair: _Pair) -> None:
        """Flush what was queued before the splice, then let the pipes move the rest.

        A pass that moved a bulk's worth (``SPLICE_BULK``) does not watch the sockets
        again but comes back after ``SPLICE_BATCH`` seconds: a download arrives as
        64 KiB super-frames, and waking the loop for each cost more than the splice
        (and the GIL handoffs slowed the data plane that forwards those frames). The
        pipes' bound still holds; smaller exchanges are watched as before, so an
        interactive stream is not delayed."""
        pipes = pair.pipes
        if pipes is None or pair.handed:
            return
        pair.splice_timer = None
        client, up = pair.client, pair.up
        assert up is not None
        for c in (client, up):
            if c.out:
                try:
                    n = c.sock.send(c.out)
                    del c.out[:n]
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self._splice_done(pair)
                    return
        p0, p1 = pipes
        before = p0.moved + p1.moved
        read_c = read_u = write_c = write_u = False
        try:
            if not up.out:
                read_c, write_u = p0.pump()
            else:
                write_u = True
            if not client.out:
                read_u, write_c = p1.pump()
            else:
                write_c = True
        except OSError:
            self._splice_done(pair)
            return
        if p1.moved and self.core.waking:
            self.core.first_byte(time.monotonic())
        if p0.eof and p1.eof:
            self._splice_done(pair)
            return
        if p0.moved + p1.moved - before >= SPLICE_BULK:
            if self._hand_over(pair):
                return
            read_c = read_u = write_c = write_u = False
            pair.splice_timer = self._call_later(SPLICE_BATCH, self._spliced_step, pair)
        self._watch(pair, client, read_c, write_c)
        self._watch(pair, up, read_u, write_u)

    def _hand_over(self, pair: _Pair) -> bool:
        """A bulk pair goes to the splicer thread, off the data plane (see
        fabric.streams.splicer); it comes back through `_handed_back` when it ends."""
        splicer = self.splicer
        up = pair.up
        if splicer is None or up is None or pair.client.out or up.out or pair.pipes is None:
            return False
        for c in (pair.client, up):
            self._watch(pair, c, False, False)
        pair.handed = True
        if splicer.adopt(pair, pair.client.sock, up.sock, pair.pipes,
                         lambda failed, pair=pair: self._back(pair)):
            self.counters["splices_handed"] += 1
            return True
        pair.handed = False
        return False

    def _take_back(self, pair: _Pair) -> None:
        """The pair is the front's again (its sockets watched on the next pass)."""
        assert self.splicer is not None
        self.splicer.reclaim(pair)
        pair.handed = False
        if pair.pipes is not None and pair.splice_timer is None:
            pair.splice_timer = self._call_later(0.0, self._spliced_step, pair)

    def _back(self, pair: _Pair) -> None:
        """(On the splicer's thread.) Its pair ended: the rest on the front's thread."""
        if self.dataplane is None:
            self.loop.call_soon_threadsafe(self._handed_back, pair)
        else:
            self.dataplane.post(self._handed_back, pair)

    def _handed_back(self, pair: _Pair) -> None:
        if not pair.handed or self.pairs.get(pair.sid) is not pair:
            return  # dropped meanwhile (reclaimed first)
        pair.handed = False
        self._splice_done(pair)

    def _splice_done(self, pair: _Pair) -> None:
        pipes = pair.pipes
        if pipes is not None:
            self.counters["bytes_spliced"] += pipes[0].moved + pipes[1].moved
            for p in pipes:
                p.close()
            pair.pipes = None
        self._drop(pair)
        self.core.splice_ended(pair.sid, time.monotonic())
        self._run()

    # --- endings --------------------------------------------------------------------------

    def _failed(self, pair: _Pair, c: _Conn) -> None:
        """A send failed: the peer is gone."""
        now = time.monotonic()
        self._close_now(pair, c)
        if c is pair.client:
            self.core.client_closed(pair.sid, now, reset=True)
        else:
            self.core.upstream_closed(pair.sid, now)

    def _close_after_flush(self, pair: _Pair, c: _Conn) -> None:
        if c.closed:
            return
        c.closing = True
        if not c.out or not c.connected:
            self._close_now(pair, c)
            self._maybe_done(pair)
        else:
            self._update(pair)

    def _close_now(self, pair: _Pair, c: _Conn) -> None:
        if c.closed:
            return
        if c.mask >= 0:
            self._forget_fd(c)
        c.closed = True
        c.reading = c.writing = False
        c.out.clear()
        try:
            c.sock.close()
        except OSError:
            pass

    def _abort(self, pair: _Pair) -> None:
        """Close both sides at once and tell the core the client is gone."""
        sid = pair.sid
        self._drop(pair)
        self.core.client_closed(sid, time.monotonic(), reset=True)

    def _drop(self, pair: _Pair) -> None:
        if pair.handed:  # the splicer lets go of its sockets and pipes first
            self._take_back(pair)
        if pair.connect_timer is not None:
            pair.connect_timer.cancel()
            pair.connect_timer = None
        if pair.splice_timer is not None:
            pair.splice_timer.cancel()
            pair.splice_timer = None
        if pair.pipes is not None:
            for p in pair.pipes:
                p.close()
            pair.pipes = None
        for c in (pair.client, pair.up):
            if c is not None:
                self._close_now(pair, c)
        self.pairs.pop(pair.sid, None)

    def _maybe_done(self, pair: _Pair) -> None:
        if pair.forgotten and pair.client.closed and (pair.up is None or pair.up.closed):
            self.pairs.pop(pair.sid, None)
