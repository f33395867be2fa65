"""The I/O shell of the packet path: a dedicated thread that reads frames from port fds,
hands them to their namespace's router, writes what comes back, and keeps every core's
timers.

Why a thread of its own: an asyncio callback per readiness event costs more than the
router itself, and keeping the loop off the control plane's event loop lets the
control API stay responsive under load. Everything that touches routers, service
dispatch, probes, the tunnel link or port fds runs on this thread: the control side
submits changes with `acall()` (awaited, so the event loop never blocks on it),
`call()` (other threads) or `post()` (fire and forget); they run between frames, in
order, so a port is never closed under a read. A call its caller gave up on (timeout,
cancellation) before it started never runs.

One preallocated buffer serves every read (a frame is routed to completion before the
next read), each wakeup drains a port until EAGAIN or a batch limit (fairness), and
router outputs are flushed right after the frame that made them, so order is kept.
Outputs for a tunnel attachment (a peer worker) go through the tunnel link, runs of one
peer's packets in one batch (one GSO send). Packets the tunnel link decrypts go to the
router of their namespace id; packets from the egress uplink to the router whose egress
address they are for.

Timers, one discipline (aioquic's ``transmit()``/``get_timer()``): every owner of
timers is ``Timed`` (``next_timer()``/``handle_timer(now)``); right after any call into
an owner (a batch of its frames, a handler, its timer, a control-side call) the data
plane re-reads the deadlines of the owner and of its group (a namespace's router and
its probe runner are one group: what one does moves the other's deadline) and keeps
them in one heap. The earliest deadline arms a timerfd at its absolute time, so timers
fire to the microsecond, not on a polling tick; lateness is only what the thread is
busy with when a deadline comes.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import io
import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar, cast

from fabric.errors import FabricError
from fabric.net import gso
from fabric.net.coalesce import UdpRun
from fabric.net.packets import Malformed
from fabric.net.vnet import GSO_UDP_L4, VNET_HDR_LEN, ZERO_HDR, VnetHdr
from fabric.router.droplog import HEAD_BYTES
from fabric.router.model import DROP_TX_ERROR, DROP_TX_FULL, KIND_TUNNEL, L3_OFF, Port
from fabric.runtime.spin import EARLY, FOUND, SpinWindow
from fabric.runtime.timerfd import TimerFd

log = logging.getLogger("fabricd.dataplane")

BATCH = 256
# Ports whose frames may leave as UDP GSO super-frames (fabric.net.coalesce.UdpRun): the
# fabric's own TAPs, whose reader is the pod's kernel. (An interface port's far end may
# be a VMM that did not negotiate UDP segmentation; socketpair ports have no kernel.)
UDP_RUN_KINDS = frozenset(("netns",))
# Where a gatherable frame's IP protocol byte is: virtio-net header (10), Ethernet (14),
# byte 9 of the IPv4 header.
UDP_PROTO_AT = VNET_HDR_LEN + 14 + 9
# CPU the tunnel socket may take per loop turn while it stays readable: a flood of
# handshakes (each a MAC check, a cookie) must leave the pods their turn; the surplus
# waits in the socket's buffer and, when that is full, the kernel drops it.
TUNNEL_BUDGET = 0.0005
BUF_SIZE = 256 * 1024
MAX_WAIT = 1.0  # poll at least this often (a safety net; timers do not rely on it)
CALL_TIMEOUT = 30.0
T = TypeVar("T")

Receive = Callable[[Port, bytearray, int, float], "Port | None"]


class Timed(Protocol):
    """What has timers: cores and shells the data plane drives."""

    name: str

    def next_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...


class Owner(Timed, Protocol):
    """What reads ports and queues frames: a namespace's router."""

    outputs: list[tuple[Port, bytes]]
    # Set by the router when a call may have moved its deadline (see Router.touched).
    touched: bool

    def receive(self, port: Port, buf: bytearray, n: int, now: float) -> Port | None: ...

    def receive_l3(self, port: Port, buf: bytearray, n: int, now: float) -> Port | None: ...

    def receive_remote(self, worker: str, packet: bytes, now: float,
                       vnet_hdr: bytes | None = None) -> None: ...

    def receive_egress(self, port: Port, buf: bytearray, n: int,
                       now: float) -> Port | None: ...


class TunnelLink(Timed, Protocol):
    """The tunnel's UDP link (tunnels.link.TunnelLink) as the data plane drives it."""

    def fileno(self) -> int: ...

    def readable(self, now: float) -> Iterator[list[tuple[str, int, bytes, bytes | None]]]: ...

    def send_many(self, peer: str, ns_id: int, packets: list[bytes], now: float) -> None: ...


class Uplink(Protocol):
    """The worker's egress TUN (gateway.uplink.Uplink) as the data plane drives it."""

    name: str

    def route(self, port: Port, buf: bytearray, n: int) -> Owner | None: ...


class ErrorLog:
    """Exceptions the data plane survives, counted by where they happened and logged
    with their traceback once, then at most once per `every` seconds with the count:
    a flood of bad input must never turn into a flood of log lines."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.counts: dict[str, int] = {}
        self._logged: dict[str, tuple[float, int]] = {}  # key -> (when, count then)

    def exception(self, key: str, msg: str, *args: Any) -> None:
        n = self.counts[key] = self.counts.get(key, 0) + 1
        now = time.monotonic()
        last = self._logged.get(key)
        if last is None:
            log.exception(msg, *args)
        elif now - last[0] >= self.every:
            log.error(msg + " (%d more since the last report; traceback above)", *args,
                      n - last[1])
        else:
            return
        self._logged[key] = (now, n)


# Errors that mean a port's device is gone (its netns deleted, a VMM's TAP recreated):
# the control side is told (PortTrouble) and decides. ENETDOWN is one only for AF_PACKET
# ports (their interface may have been replaced); the control side checks.
GONE_ERRNOS = frozenset((errno.EBADF, errno.EBADFD, errno.ENODEV, errno.ENXIO))
TROUBLE_ERRNOS = GONE_ERRNOS | {errno.ENETDOWN}


class PortTrouble:
    """Ports the data plane found broken, on their way to the event loop: each reported
    once until the control side took it (`take()`), waking it through an eventfd."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ports: dict[Port, int] = {}  # port -> errno, in the order they broke
        self._told: set[Port] = set()
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def report(self, port: Port, err: int) -> None:
        with self._lock:
            if port in self._told:
                return
            self._told.add(port)
            wake = not self._ports
            self._ports[port] = err
        if wake:
            os.eventfd_write(self.fd, 1)

    def take(self) -> list[tuple[Port, int]]:
        try:
            os.eventfd_read(self.fd)
        except (BlockingIOError, OSError):
            pass
        with self._lock:
            out = list(self._ports.items())
            self._ports.clear()
        return out

    def forget(self, port: Port) -> None:
        """The port was dealt with (replaced or found healthy): report it again if it
        breaks again."""
        with self._lock:
            self._told.discard(port)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DataPlaneBusy(FabricError):
    """The data plane did not take a call in time; the call will never run."""

    status = 503
    code = "busy"


# The life of a call: queued, then run by the data plane or abandoned by its caller (it
# timed out or was cancelled first); an abandoned call is skipped, never run late.
_QUEUED, _RUNNING, _DONE, _ABANDONED = range(4)


class _Call:
    __slots__ = ("fn", "args", "state", "done", "result", "error", "loop", "future")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.state = _QUEUED
        self.done: threading.Event | None = None  # a blocking caller waits on it
        self.result: Any = None
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # an awaiting caller's
        self.future: asyncio.Future[Any] | None = None


def _log_orphan(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("a data-plane call whose caller was cancelled failed: %s", fut.exception())


def _settle(c: _Call) -> None:
    """On the caller's loop: hand the outcome to its future (unless it gave up)."""
    fut = c.future
    if fut is None or fut.done():
        return
    if c.error is not None:
        fut.set_exception(c.error)
    else:
        fut.set_result(c.result)


class _NoOutputs:
    """The owner of readers whose frames go to other owners (the uplink)."""

    name = "uplink"
    outputs: list[tuple[Port, bytes]] = []
    touched = False


class DataPlane:
    def __init__(self, busy_poll: float = 0.0, adaptive: bool = False) -> None:
        # After a loop turn that read frames, keep polling (epoll_wait with no timeout)
        # for a while before sleeping again, and (adaptive) wake by the timerfd to poll
        # just before a periodic frame is due: a frame that comes while the thread polls
        # is taken without waking it, which on a VM costs tens of µs when the sender runs
        # on another vCPU (docs/performance.md, "ping"). When and how long:
        # fabric.runtime.spin (fixed, or adaptive up to busy_poll). Replaced whole on a
        # reload (set_busy_poll); the thread reads it every turn.
        self.spin = SpinWindow(busy_poll, adaptive)
        self.busy_polls = 0  # polls made without sleeping because of busy_poll
        self.spins_found = 0  # spins that ended with frames
        self.spins_empty = 0  # spins whose window passed with none
        self.spins_ahead = 0  # spins started by a wake ahead of predicted frames
        self.spins_early = 0  # frames that came while the thread slept towards one
        self.buf = bytearray(BUF_SIZE)
        self.mv = memoryview(self.buf)
        # Timed owner -> its group (itself first).
        self._groups: dict[Timed, tuple[Timed, ...]] = {}
        # fd -> (owner, port, receive function, read offset)
        self.ports: dict[int, tuple[Any, Port, Receive, int]] = {}
        # fd -> the readinto of an io.FileIO over it (not owning it): one read(2) per
        # frame, like os.readv, but without building an iovec list per call, and None at
        # EAGAIN instead of an exception (~150 ns less per frame, docs/performance.md).
        self._readers: dict[int, Callable[[Any], int | None]] = {}
        # fd -> (callback, name, owner whose group it touches)
        self.handlers: dict[int, tuple[Callable[[], None], str, Timed | None]] = {}
        self.tunnel: TunnelLink | None = None
        self.by_ns_id: dict[int, Owner] = {}
        self.uplink: Uplink | None = None
        self.errors = ErrorLog()
        self.trouble = PortTrouble()
        self.rx_errors = 0
        self.wakeups = 0
        self.frames = 0
        self.timer_fires = 0
        self.tunnel_unknown_namespace = 0
        self.tunnel_yields = 0  # reads of the tunnel socket cut short by TUNNEL_BUDGET
        # Forwarded small UDP datagrams of one flow to one TAP, gathered in a wakeup and
        # written as one super-frame (see _readable); ports whose kernel refused one.
        self._udp = UdpRun()
        self._udp_owner: Any = None
        self._udp_refused: set[Port] = set()
        self.udp_runs = 0  # super-frames written
        self.udp_run_datagrams = 0  # datagrams they carried
        # The deadline heap: (when, seq, owner); an entry is current while it equals the
        # owner's armed deadline, else it is skipped when it comes up.
        self._heap: list[tuple[float, int, Timed]] = []
        self._armed: dict[Timed, float | None] = {}
        self._seq = itertools.count()
        self._dirty: dict[Timed, None] = {}
        self._ep = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake_fd, select.EPOLLIN)
        self._timer: TimerFd | None
        try:
            self._timer = TimerFd()
            self._ep.register(self._timer.fd, select.EPOLLIN)
        except OSError as e:
            log.warning("no timerfd (%s): timers fall back to epoll timeouts (1 ms)", e)
            self._timer = None
        self._calls: deque[_Call] = deque()
        self._call_lock = threading.Lock()
        self.calls = 0
        self.calls_abandoned = 0
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
            if self._thread.is_alive():  # stuck: leave it its fds rather than pull them
                log.error("the data-plane thread did not stop within 10 s")
                return
            self._thread = None
        self._ep.close()
        os.close(self._wake_fd)
        if self._timer is not None:
            self._timer.close()
        self.trouble.close()

    def set_busy_poll(self, seconds: float, adaptive: bool = False) -> None:
        """A new busy-poll window (a reload): fixed `seconds`, or adaptive up to them;
        0 turns polling off. Safe from any thread: the data-plane thread picks the new
        window up on its next turn (an adaptive one starts from nothing again)."""
        self.spin = SpinWindow(seconds, adaptive)

    @property
    def alive(self) -> bool:
        """Whether the data-plane thread runs (False before start and after a crash)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def on_thread(self) -> bool:
        """Whether the caller runs as the data plane (its thread, or inline before start)."""
        return self._thread is None or threading.current_thread() is self._thread

    # --- control side --------------------------------------------------------------------

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = CALL_TIMEOUT) -> T:
        """Run fn(*args) on the data-plane thread between frames and return its result
        (or raise its exception), blocking the caller: for threads other than an event
        loop's (the event loop uses `acall`). Runs inline before start() or on the
        thread itself. Afterwards every owner's outputs are flushed and every deadline
        re-read. Not taken within `timeout`: DataPlaneBusy, and the call never runs."""
        if self.on_thread:
            return self._inline(fn, args)
        c = _Call(fn, args)
        c.done = threading.Event()
        self._submit(c)
        if not c.done.wait(timeout) and self._abandon(c):
            raise DataPlaneBusy(f"the data plane did not take a call within {timeout:g} s")
        c.done.wait()  # it started: it finishes
        if c.error is not None:
            raise c.error
        return cast(T, c.result)

    async def acall(self, fn: Callable[..., T], *args: Any,
                    timeout: float = CALL_TIMEOUT) -> T:
        """`call` for the event loop: awaits the data plane instead of blocking the loop.
        A call not taken within `timeout`, or whose caller is cancelled first, never
        runs (DataPlaneBusy, or the cancellation)."""
        if self.on_thread:
            return self._inline(fn, args)
        c = _Call(fn, args)
        c.loop = asyncio.get_running_loop()
        c.future = fut = c.loop.create_future()
        self._submit(c)
        try:
            return cast(T, await asyncio.wait_for(asyncio.shield(fut), timeout))
        except TimeoutError:
            if self._abandon(c):
                raise DataPlaneBusy(
                    f"the data plane did not take a call within {timeout:g} s") from None
            return cast(T, await fut)  # it started: it finishes
        except asyncio.CancelledError:
            if not self._abandon(c):
                # Started already: the caller is gone but the outcome must not be lost.
                fut.add_done_callback(_log_orphan)
            raise

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue fn(*args) for the data plane and return at once: for changes whose result
        nobody waits for (readiness). Calls run in the order they were queued; an error
        is logged (once, then counted) by the data plane."""
        if self.on_thread:
            self._inline(fn, args)
            return
        self._submit(_Call(fn, args))

    def _inline(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            return fn(*args)
        finally:
            if self._thread is None:
                self._after_calls()

    def _submit(self, c: _Call) -> None:
        with self._call_lock:
            self._calls.append(c)
        os.eventfd_write(self._wake_fd, 1)

    def _abandon(self, c: _Call) -> bool:
        """Give up on a queued call: True if it will never run, False if it has started."""
        with self._call_lock:
            if c.state == _QUEUED:
                c.state = _ABANDONED
                return True
            return False

    def add_owner(self, owner: Timed, group: Timed | None = None) -> None:
        """Keep `owner`'s timers; with `group`, it joins that owner's group (both are
        re-read after a call into either). Routers are owners of their ports."""
        self.call(self._add_owner, owner, group)

    def remove_owner(self, owner: Timed) -> None:
        self.call(self._remove_owner, owner)

    def add_port(self, router: Owner, port: Port, receive: Receive | None = None) -> None:
        """Start reading `port` for `router` (its receive, or receive_l3 for L3 ports)."""
        if receive is None:
            receive = router.receive_l3 if port.l3 else router.receive
        self.call(self._add_port, router, port, receive, L3_OFF if port.l3 else 0)

    def remove_port(self, port: Port) -> None:
        """Stop reading `port`; once this returns the fd may be closed."""
        self.call(self._remove_port, port)

    def add_handler(self, fd: int, fn: Callable[[], None], name: str,
                    owner: Timed | None = None) -> None:
        """Call fn() on the data-plane thread whenever `fd` is readable (it reads itself);
        `owner`'s group is flushed and re-read afterwards."""
        self.call(self._add_handler, fd, fn, name, owner, select.EPOLLIN)

    def remove_handler(self, fd: int) -> None:
        self.call(self._remove_fd, fd)

    def attach_tunnel(self, link: TunnelLink | None) -> None:
        """Send tunnel attachments' packets through `link`, route what it decrypts."""
        self.call(self._attach_tunnel, link)

    def route_tunnel(self, ns_id: int, router: Owner | None) -> None:
        """Packets from the tunnel with this namespace id go to `router` (None: nowhere)."""
        self.call(self._route_tunnel, ns_id, router)

    def attach_uplink(self, uplink: Uplink | None, port: Port | None) -> None:
        """Read the worker's egress TUN; its packets go to the router uplink.route names."""
        self.call(self._attach_uplink, uplink, port)

    # --- on the data-plane thread ----------------------------------------------------------

    def watch_writable(self, fd: int, fn: Callable[[], None], name: str,
                       owner: Timed | None = None) -> None:
        """On the data-plane thread: call fn() once `fd` is writable (a connect done);
        the caller stops it with unwatch()."""
        self._add_handler(fd, fn, name, owner, select.EPOLLOUT)

    def unwatch(self, fd: int) -> None:
        """On the data-plane thread: forget a handler (see watch_writable)."""
        self._remove_fd(fd)

    def _add_owner(self, owner: Timed, group: Timed | None) -> None:
        if group is None:
            self._groups[owner] = (owner,)
        else:
            members = tuple(m for m in self._groups.get(group, (group,)) if m is not owner)
            members += (owner,)
            for m in members:
                self._groups[m] = (m,) + tuple(x for x in members if x is not m)
        self._dirty[owner] = None

    def _remove_owner(self, owner: Timed) -> None:
        group = self._groups.pop(owner, ())
        for m in group[1:]:
            rest = self._groups.get(m)
            if rest is not None:
                self._groups[m] = tuple(x for x in rest if x is not owner)
        self._armed.pop(owner, None)
        self._dirty.pop(owner, None)
        for k, r in list(self.by_ns_id.items()):
            if r is owner:
                del self.by_ns_id[k]

    def _add_handler(self, fd: int, fn: Callable[[], None], name: str, owner: Timed | None,
                     mask: int) -> None:
        self.handlers[fd] = (fn, name, owner)
        self._ep.register(fd, mask)

    def _remove_fd(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def _add_port(self, owner: Any, port: Port, receive: Receive, offset: int) -> None:
        os.set_blocking(port.fd, False)  # a blocking read would stall every namespace
        self.ports[port.fd] = (owner, port, receive, offset)
        self._readers[port.fd] = io.FileIO(port.fd, "rb", closefd=False).readinto
        self._ep.register(port.fd, select.EPOLLIN)
        gso_ports = getattr(owner, "gso_ports", None)
        if gso_ports is not None and port.kind in UDP_RUN_KINDS and port.hlen \
                and port not in self._udp_refused:
            gso_ports.add(port)  # its DNS replies are gathered per read batch

    def _remove_port(self, port: Port) -> None:
        entry = self.ports.get(port.fd)
        if entry is not None and entry[1] is port:
            del self.ports[port.fd]
            self._readers.pop(port.fd, None)
            gso_ports = getattr(entry[0], "gso_ports", None)
            if gso_ports is not None:
                gso_ports.discard(port)
            try:
                self._ep.unregister(port.fd)
            except (OSError, ValueError):
                pass

    def _attach_tunnel(self, link: TunnelLink | None) -> None:
        old = self.tunnel
        if old is not None:
            self._remove_fd(old.fileno())
            self._remove_owner(old)
        self.tunnel = link
        if link is not None:
            self._add_handler(link.fileno(), self._tunnel_readable, "tunnel", link,
                              select.EPOLLIN)
            self._add_owner(link, None)

    def _route_tunnel(self, ns_id: int, router: Owner | None) -> None:
        if router is None:
            self.by_ns_id.pop(ns_id, None)
        else:
            self.by_ns_id[ns_id] = router

    def _attach_uplink(self, uplink: Uplink | None, port: Port | None) -> None:
        if self.uplink is not None:
            for entry in list(self.ports.values()):
                if entry[0] is _NO_OUTPUTS:
                    self._remove_port(entry[1])
        self.uplink = uplink
        if uplink is not None and port is not None:
            self._add_port(_NO_OUTPUTS, port, self._from_uplink, L3_OFF)

    # --- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        poll = self._ep.poll
        ports = self.ports
        handlers = self.handlers
        wake = self._wake_fd
        timer = self._timer
        timer_fd = timer.fd if timer is not None else -1
        readable = self._readable
        mono = time.monotonic
        seen = self.frames
        spin = self.spin
        spin_until = 0.0  # spinning until then (0: not spinning)
        wake_at = 0.0  # sleeping towards a spin ahead that starts then (0: none)
        ahead = False  # about to sleep: ask for a spin ahead first (adaptive)
        start = 0.0
        while not self._stop:
            if self.spin is not spin:  # a reload: the new window starts afresh
                spin = self.spin
                spin_until = wake_at = 0.0
                ahead = False
            try:
                if spin_until:
                    timeout = self._wait()
                    events = self._spin(spin_until if timer is not None
                                        else min(spin_until, mono() + timeout))
                    if not events and mono() >= spin_until:
                        self.spins_empty += spin.ended_empty()
                        spin_until = 0.0
                        ahead = spin.adaptive
                elif ahead:
                    # Frames may be waiting already (a reply made inside our write): take
                    # them before the prediction and the timerfd's re-arming, which would
                    # only delay them; if none, plan the spin ahead and sleep.
                    events = poll(0)
                    if not events:
                        ahead = False
                        wake_at = spin.wake_at()
                        events = poll(self._wait(wake_at))
                else:
                    events = poll(self._wait(wake_at))
            except InterruptedError:
                continue
            if spin.on:
                start = mono()
            for fd, _ in events:
                entry = ports.get(fd)
                if entry is not None:
                    readable(*entry)
                elif fd in handlers:
                    self._handler(fd)
                elif fd == timer_fd:
                    assert timer is not None
                    timer.clear()
                elif fd == wake:
                    try:
                        os.eventfd_read(wake)
                    except BlockingIOError:
                        pass
            if self._calls:
                self._run_calls()
            self._due(time.monotonic())
            if self._dirty:
                self._rearm()
            if self.frames != seen:
                seen = self.frames
                if spin.on and self.spin is spin:
                    said = spin.frames(start, mono())
                    if said == FOUND:
                        self.spins_found += 1
                    elif said == EARLY:
                        self.spins_early += 1
                    spin_until = spin.until()
                    wake_at = 0.0
                    ahead = spin.adaptive and not spin_until
            elif wake_at and start >= wake_at:  # the timer's wake for the spin ahead
                spin_until = spin.woke(start)
                wake_at = 0.0
                if spin_until:
                    self.spins_ahead += 1
        while self._calls:
            self._run_calls()

    def _spin(self, until: float) -> list[tuple[int, int]]:
        """Poll without sleeping until something is ready or `until` passes (what is
        ready, or []). Between polls the thread yields its CPU (`sched_yield`, with the
        GIL let go): another thread of ours waiting for the GIL takes it as soon as it
        would if the thread slept, and any other task runnable on this CPU runs first,
        so a spin delays neither the event loop nor the pods (with polls alone, another
        thread waited twice as long for the GIL: docs/performance.md, "ping")."""
        poll = self._ep.poll
        mono = time.monotonic
        yield_cpu = os.sched_yield
        events: list[tuple[int, int]] = []
        while not self._stop:
            events = poll(0)
            self.busy_polls += 1
            if events or mono() >= until:
                break
            yield_cpu()
        return events

    def _wait(self, wake_at: float = 0.0) -> float:
        """Arm the timerfd at the earliest deadline (or `wake_at`, a spin ahead, if
        earlier); the poll timeout to use."""
        when = self._earliest()
        if wake_at and (when is None or wake_at < when):
            when = wake_at
        timer = self._timer
        if timer is not None:
            timer.arm(when)
            return MAX_WAIT
        if when is None:
            return MAX_WAIT
        return min(MAX_WAIT, max(0.0, when - time.monotonic()))

    def _earliest(self) -> float | None:
        heap = self._heap
        armed = self._armed
        while heap:
            when, _, owner = heap[0]
            if armed.get(owner) == when:
                return when
            heapq.heappop(heap)  # stale: the owner's deadline moved since
        return None

    def _due(self, now: float) -> None:
        """Handle every deadline that has come, in order."""
        heap = self._heap
        armed = self._armed
        while heap and heap[0][0] <= now:
            when, _, owner = heapq.heappop(heap)
            if armed.get(owner) != when:
                continue
            armed[owner] = None
            self.timer_fires += 1
            try:
                owner.handle_timer(now)
            except Exception:
                self.errors.exception(f"timer:{owner.name}", "%s: timer failed", owner.name)
            self._after(owner)

    def _rearm(self) -> None:
        armed = self._armed
        heap = self._heap
        dirty = self._dirty
        self._dirty = {}
        for owner in dirty:
            if owner not in self._groups:
                continue
            if getattr(owner, "touched", False):
                cast(Owner, owner).touched = False  # a router: its deadline is read now
            try:
                t = owner.next_timer()
            except Exception:
                self.errors.exception(f"next_timer:{owner.name}", "%s: next_timer failed",
                                      owner.name)
                t = None
            if t != armed.get(owner):
                armed[owner] = t
                if t is not None:
                    heapq.heappush(heap, (t, next(self._seq), owner))

    def _after(self, owner: Timed | None) -> None:
        """After a call into `owner`: flush its group's outputs, re-read their deadlines."""
        if owner is None:
            return
        for m in self._groups.get(owner, (owner,)):
            if getattr(m, "outputs", None):
                self.flush(cast(Owner, m))
            self._dirty[m] = None

    def _after_calls(self) -> None:
        for owner in list(self._groups):
            if getattr(owner, "outputs", None):
                self.flush(cast(Owner, owner))
            self._dirty[owner] = None
        if self._thread is None:
            self._rearm()

    def _run_calls(self) -> None:
        lock = self._call_lock
        while self._calls:
            with lock:
                c = self._calls.popleft()
                if c.state == _ABANDONED:
                    self.calls_abandoned += 1
                    continue
                c.state = _RUNNING
            try:
                c.result = c.fn(*c.args)
            except BaseException as e:  # handed back to the caller
                c.error = e
                if c.done is None and c.loop is None:  # posted: nobody to hand it to
                    self.errors.exception("call", "data plane: posted call %s failed",
                                          getattr(c.fn, "__qualname__", c.fn))
            c.state = _DONE
            if c.done is not None:
                c.done.set()
            elif c.loop is not None:
                try:
                    c.loop.call_soon_threadsafe(_settle, c)
                except RuntimeError:  # the caller's loop is closed: nobody is waiting
                    pass
            self.calls += 1
        self._after_calls()

    def _handler(self, fd: int) -> None:
        fn, name, owner = self.handlers[fd]
        try:
            fn()
        except Exception:
            self.errors.exception(f"handler:{name}", "%s: handler failed", name)
        self._after(owner)

    def _readable(self, owner: Any, port: Port, receive: Receive, offset: int) -> None:
        buf = self.buf
        mv = self.mv
        into = mv[offset:] if offset else buf
        write = os.write
        fd = port.fd
        readinto = self._readers.get(fd)
        if readinto is None:  # (a port read without add_port: tests, embedders)
            readinto = io.FileIO(fd, "rb", closefd=False).readinto
        now = time.monotonic()
        k = 0
        run = self._udp
        runs_kinds = UDP_RUN_KINDS
        refused = self._udp_refused
        self.wakeups += 1
        try:
            for k in range(BATCH):  # noqa: B007 (k counts frames)
                try:
                    n = readinto(into)
                except BlockingIOError:  # (FileIO returns None instead; kept for safety)
                    break
                except OSError as e:
                    # A vanished device stops being read and the control side is told;
                    # other errors (a link that flapped) are counted and passed over.
                    self.rx_errors += 1
                    if e.errno in GONE_ERRNOS:
                        self._remove_port(port)
                    if e.errno in TROUBLE_ERRNOS:
                        self.trouble.report(port, e.errno or 0)
                    break
                if not n:  # None: EAGAIN, drained; 0: end of file
                    break
                n += offset
                d0 = port.ndrops
                out = receive(port, buf, n, now)
                if port.ndrops != d0:
                    self._dropped(owner, port, buf, n, now)
                if out is not None:
                    # A TAP's UDP datagram joins the run of its flow (written as one frame
                    # when the run ends), or starts one; anything else is written now,
                    # after the run. buf[UDP_PROTO_AT] is the IP protocol of a gatherable
                    # frame: a first filter that keeps TCP (super-frames, ACKs) off the
                    # run's checks, which decide (they read the whole header).
                    if buf[UDP_PROTO_AT] == 17 and out.kind in runs_kinds \
                            and out not in refused:
                        if run.count and not (run.port is out and run.extend(buf, n)):
                            self._write_run()
                        if run.count or run.start(out, buf, n):
                            if self._udp_owner is not owner:
                                self._udp_owner = owner
                            out = None
                    elif run.count:
                        self._write_run()
                    if out is not None:
                        try:
                            write(out.fd, mv[L3_OFF:n] if out.l3 else mv[:n])
                        except BlockingIOError:
                            out.drop(DROP_TX_FULL)
                            self._dropped(owner, out, buf, n, now)
                        except OSError as e:
                            self._tx_error(out, e)
                if owner.outputs:
                    self.flush(owner)
            else:  # the batch ran out, not the port: all BATCH frames were read
                k = BATCH
        except Exception:
            # A router bug must cost one frame, never the data plane.
            self.errors.exception(f"frame:{owner.name}", "%s: dropping a frame that raised",
                                  owner.name)
            owner.outputs.clear()
        if getattr(owner, "replies", None):  # gathered DNS replies: one write per client
            try:
                owner.end_batch()
                self.flush(owner)
            except Exception:
                self.errors.exception(f"replies:{owner.name}", "%s: gathered replies failed",
                                      owner.name)
                owner.replies.clear()
                owner.outputs.clear()
        if run.count:  # the frames gathered before were forwarded: they leave
            try:
                self._write_run()
            except Exception:
                self.errors.exception(f"udp-run:{owner.name}", "%s: a UDP run failed",
                                      owner.name)
                run.take()
        self.frames += k
        if owner.touched:  # only what left the fast path can have moved a deadline
            owner.touched = False
            self._after(owner)

    @staticmethod
    def _dropped(owner: Any, port: Port, buf: bytearray, n: int, now: float) -> None:
        """The frame in buf[:n] was just dropped on `port`: its headers to the drop log."""
        log = getattr(owner, "droplog", None)
        if log is None:
            return
        start = L3_OFF if port.l3 else port.hlen
        pod = port.pod
        log.record(pod.name if pod is not None else port.kind, port.last_drop,
                   bytes(buf[start:min(n, start + HEAD_BYTES)]), port.l3, now)

    def _from_uplink(self, port: Port, buf: bytearray, n: int, now: float) -> Port | None:
        """A packet from the egress TUN: to the router of the namespace it is for."""
        uplink = self.uplink
        router = uplink.route(port, buf, n) if uplink is not None else None
        if router is None:
            return None
        out = router.receive_egress(port, buf, n, now)
        if router.outputs:
            self.flush(router)
        self._dirty[router] = None
        return out

    def _tunnel_readable(self) -> None:
        """Datagrams on the tunnel socket: decrypted packets to their namespaces."""
        link = self.tunnel
        if link is None:
            return
        now = time.monotonic()
        by_id = self.by_ns_id
        until = now + TUNNEL_BUDGET
        reads = link.readable(now)
        for batch in reads:
            for peer, ns_id, packet, hdr in batch:
                router = by_id.get(ns_id)
                if router is None:
                    self.tunnel_unknown_namespace += 1
                    continue
                try:
                    router.receive_remote(peer, packet, now, hdr)
                except Exception:
                    self.errors.exception(f"tunnel:{router.name}",
                                          "%s: dropping a tunnel packet that raised",
                                          router.name)
                    router.outputs.clear()
                if router.outputs:
                    self.flush(router)
                self._dirty[router] = None
            if time.monotonic() > until:
                # The socket stays readable (level-triggered): the rest waits for the
                # next turn, after every other ready port had its share.
                reads.close()
                self.tunnel_yields += 1
                break

    def flush(self, owner: Owner) -> None:
        """Write an owner's queued frames in order; a run of packets for one tunnel
        attachment leaves as one batch through the tunnel link."""
        if self._udp.count:  # forwarded before these outputs were made: they go first
            self._write_run()
        outputs = owner.outputs
        write = os.write
        i = 0
        n = len(outputs)
        while i < n:
            out, frame = outputs[i]
            i += 1
            if out.fd >= 0:
                try:
                    write(out.fd, frame)
                except BlockingIOError:
                    out.drop(DROP_TX_FULL)
                except OSError as e:
                    if (e.errno == errno.EINVAL and out.hlen and frame[1] == GSO_UDP_L4
                            and out.kind in UDP_RUN_KINDS):
                        self._refuse_udp_gso(out, frame)
                    else:
                        self._tx_error(out, e)
            elif out.kind == KIND_TUNNEL:
                batch = [frame]
                while i < n and outputs[i][0] is out:
                    batch.append(outputs[i][1])
                    i += 1
                self._send_tunnel(out, batch)
        outputs.clear()

    def _write_run(self) -> None:
        """Write the gathered run of UDP datagrams (one frame, or one super-frame that
        the pod's kernel cuts back into them). A kernel that refuses the super-frame
        (EINVAL: no UDP segmentation on TAP writes) gets them one by one, now and for
        that port from then on."""
        run = self._udp
        out = cast(Port, run.port)
        count = run.count
        frame = run.take()
        try:
            os.write(out.fd, frame)
        except BlockingIOError:
            for _ in range(count):
                out.drop(DROP_TX_FULL)
            self._dropped(self._udp_owner, out, frame, len(frame), time.monotonic())
            return
        except OSError as e:
            if e.errno == errno.EINVAL and count > 1:
                self._refuse_udp_gso(out, frame)
                return
            for _ in range(count - 1):
                out.drop(DROP_TX_ERROR)
            self._tx_error(out, e)
            return
        if count > 1:
            self.udp_runs += 1
            self.udp_run_datagrams += count

    def _refuse_udp_gso(self, out: Port, frame: bytes | bytearray) -> None:
        """The kernel refused a UDP GSO super-frame on `out`: its datagrams one by one,
        now and for that port from then on (forwarded runs and gathered DNS replies)."""
        log.warning("port %d: the kernel refused a UDP GSO frame; writing its "
                    "datagrams one by one from now on", out.fd)
        self._udp_refused.add(out)
        entry = self.ports.get(out.fd)
        gso_ports = getattr(entry[0], "gso_ports", None) if entry is not None else None
        if gso_ports is not None:
            gso_ports.discard(out)
        self._write_segments(out, frame)

    def _write_segments(self, out: Port, frame: bytes | bytearray) -> None:
        mv = memoryview(frame)
        try:
            segments = gso.segment(mv[VNET_HDR_LEN:], VnetHdr.parse(mv))
        except (Malformed, ValueError):  # cannot happen for a frame UdpRun built
            out.drop(DROP_TX_ERROR)
            return
        for seg in segments:
            try:
                os.write(out.fd, ZERO_HDR + seg)
            except BlockingIOError:
                out.drop(DROP_TX_FULL)
            except OSError as e:
                self._tx_error(out, e)

    def _tx_error(self, out: Port, e: OSError) -> None:
        out.drop(DROP_TX_FULL if e.errno == errno.ENOBUFS else DROP_TX_ERROR)
        if e.errno in TROUBLE_ERRNOS:
            self.trouble.report(out, e.errno or 0)

    def _send_tunnel(self, out: Port, batch: list[bytes]) -> None:
        link = self.tunnel
        if link is None or out.peer is None:
            out.drop(DROP_TX_ERROR)
            return
        try:
            link.send_many(out.peer, out.ns_id, batch, time.monotonic())
        except Exception:
            self.errors.exception("tunnel:send", "tunnel: sending to %s failed", out.peer)
            out.drop(DROP_TX_ERROR)
        self._dirty[link] = None


_NO_OUTPUTS = _NoOutputs()
