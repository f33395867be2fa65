"""Readiness probes of service backends: non-blocking TCP connects from the gateway
address, on the data-plane thread only.

A backend the controller marked ready takes new flows only once the fabric's own
connect to its target port succeeded (``readiness: probe``): that closes the "first
request fails right after ready" gap. The service cores say which backend is due when
(``Service.next_probe()``/``probes_due()``: every `probe_interval`, every millisecond
while clients wait); this runner is a ``Timed`` owner of the data plane, in the group of
its namespace's router, so those deadlines are exact and re-read after every frame that
could move them. A probe's SYN, the backend's SYN-ACK and the release of held packets
happen on this one thread, often in the same loop turn: a wake costs about a millisecond
beyond the backend's own start.

Sockets are made ahead of time in the namespace's local stack (they must be created in
its network namespace, on its thread) and kept in a small pool that refills itself in
the background (``SocketPool``); without a local stack a probe succeeds at once (nothing
could reach the backend from the gateway address anyway).
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable
from typing import Protocol

from fabric.net.sockpool import SocketPool
from fabric.services.core import Service
from fabric.services.dispatch import ServiceDispatch

log = logging.getLogger("fabricd.services")

MAX_PROBES_IN_FLIGHT = 4  # per backend
PROBE_TIMEOUT = 1.0
# While clients wait (held packets, a stream port that needs a backend) a probe gives up
# sooner: a backend that drops SYNs (a microVM between snapshot and restore has no one
# reading its TAP) must not hold the few probes in flight for a whole second each.
WAITING_PROBE_TIMEOUT = 0.1


class Watcher(Protocol):
    """The data plane's fd watching, used on its own thread."""

    def watch_writable(self, fd: int, fn: Callable[[], None], name: str,
                       owner: object = None) -> None: ...

    def unwatch(self, fd: int) -> None: ...


class ProbeRunner:
    """The probes of one namespace's services (see module docstring)."""

    name = "probes"

    def __init__(self, dispatch: ServiceDispatch, watcher: Watcher,
                 pool: SocketPool | None, timeout: float = PROBE_TIMEOUT) -> None:
        self.dispatch = dispatch
        self.watcher = watcher
        self.pool = pool
        self.timeout = timeout
        # fd -> (socket, service, backend, started, gives up at)
        self._inflight: dict[int, tuple[socket.socket, Service, str, float, float]] = {}
        self._per_backend: dict[tuple[Service, str], int] = {}
        self._last_ok: dict[tuple[Service, str], float] = {}
        # (backend address, port, our port) -> fd of the probe in flight: its SYN-ACK,
        # seen by the router, ends it (event-driven) before the local stack takes it.
        self._by_tuple: dict[tuple[bytes, int, int], int] = {}
        self._tuple_of: dict[int, tuple[bytes, int, int]] = {}
        # failed counts every unsuccessful probe, timed_out those of them that got no
        # answer at all; no_socket the probes that could not start (the pool was empty).
        self.counters = {"started": 0, "succeeded": 0, "failed": 0, "timed_out": 0,
                         "no_socket": 0, "synack_seen": 0}

    # --- Timed -------------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        t: float | None = None
        for svc in self.dispatch:
            p = svc.next_probe()
            if p is not None and (t is None or p < t):
                t = p
        for p in self._inflight.values():  # a few per backend at most
            if t is None or p[4] < t:
                t = p[4]
        return t

    def handle_timer(self, now: float) -> None:
        """Expire stuck probes, start the due ones."""
        for fd in [fd for fd, p in self._inflight.items() if p[4] <= now]:
            self.counters["timed_out"] += 1
            self._done(fd, False, now)
        for svc in self.dispatch:
            for backend, ip, port in svc.probes_due(now):
                self._start(svc, backend, ip, port, now)

    # --- probes -------------------------------------------------------------------------------

    def _start(self, svc: Service, backend: str, ip: str, port: int, now: float) -> None:
        key = (svc, backend)
        if self._per_backend.get(key, 0) >= MAX_PROBES_IN_FLIGHT:
            return
        if self.pool is None:
            self.dispatch.probe_result(svc, backend, True, now)
            return
        sock = self.pool.take()
        if sock is None:
            self.counters["no_socket"] += 1  # the pool refills; the core retries soon
            return
        self.counters["started"] += 1
        err = sock.connect_ex((ip, port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._record(svc, backend, False, now, now)
            return
        self._per_backend[key] = self._per_backend.get(key, 0) + 1
        fd = sock.fileno()
        timeout = min(self.timeout, WAITING_PROBE_TIMEOUT) if svc.clients_waiting \
            else self.timeout
        self._inflight[fd] = (sock, svc, backend, now, now + timeout)
        try:
            t = (socket.inet_aton(ip), port, sock.getsockname()[1])
        except OSError:
            t = None
        if t is not None:
            self._by_tuple[t] = fd
            self._tuple_of[fd] = t
        self.watcher.watch_writable(fd, lambda fd=fd: self._writable(fd), "probe", self)

    def _writable(self, fd: int) -> None:
        p = self._inflight.get(fd)
        if p is None:
            return
        err = p[0].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._done(fd, err == 0, time.monotonic())

    def synack(self, src: bytes, sport: int, dport: int, now: float) -> None:
        """A pod's SYN-ACK to the gateway (the router, on this thread): if it answers a
        probe in flight, the backend's port accepts now. The probe's socket is closed,
        so the local stack answers the SYN-ACK with a reset and the backend never sees
        an accepted connection it must read."""
        fd = self._by_tuple.get((src, sport, dport))
        if fd is not None and fd in self._inflight:
            self.counters["synack_seen"] += 1
            self._done(fd, True, now)

    def _done(self, fd: int, ok: bool, now: float) -> None:
        sock, svc, backend, started, _ = self._inflight.pop(fd)
        t = self._tuple_of.pop(fd, None)
        if t is not None:
            self._by_tuple.pop(t, None)
        self.watcher.unwatch(fd)
        sock.close()
        key = (svc, backend)
        left = self._per_backend.get(key, 1) - 1
        if left > 0:
            self._per_backend[key] = left
        else:
            self._per_backend.pop(key, None)
        self._record(svc, backend, ok, started, now)

    def _record(self, svc: Service, backend: str, ok: bool, started: float,
                now: float) -> None:
        key = (svc, backend)
        self.counters["succeeded" if ok else "failed"] += 1
        if ok:
            self._last_ok[key] = max(self._last_ok.get(key, 0.0), started)
        elif started <= self._last_ok.get(key, -1.0):
            return  # an older probe failing after a newer one succeeded says nothing
        if svc.vip.packed in self.dispatch.vips and self.dispatch.vips[svc.vip.packed] is svc:
            self.dispatch.probe_result(svc, backend, ok, now)

    def forget(self, svc: Service) -> None:
        """A service went away: its probes in flight are closed."""
        for fd, p in list(self._inflight.items()):
            if p[1] is svc:
                self._inflight.pop(fd)
                t = self._tuple_of.pop(fd, None)
                if t is not None:
                    self._by_tuple.pop(t, None)
                self.watcher.unwatch(fd)
                p[0].close()
        for key in [k for k in self._per_backend if k[0] is svc]:
            del self._per_backend[key]
        for key in [k for k in self._last_ok if k[0] is svc]:
            del self._last_ok[key]

    def close(self) -> None:
        for fd, p in list(self._inflight.items()):
            self.watcher.unwatch(fd)
            p[0].close()
        self._inflight.clear()
        self._by_tuple.clear()
        self._tuple_of.clear()
        self._per_backend.clear()
        if self.pool is not None:
            self.pool.close()
