"""Readiness probes from the data-plane thread, against backends on 127.0.0.1 (no local
stack, no root): a refused probe keeps the backend out, a listening one lets it in and
releases what was held, a stuck one times out, and a stale failure changes nothing."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future

import pytest

from fabric.config.specs import PortSpec
from fabric.net import packets
from fabric.net.packets import TCP_SYN
from fabric.net.sockpool import SocketPool
from fabric.router.router import Router
from fabric.runtime.dataplane import DataPlane
from fabric.services.core import Service
from fabric.services.dispatch import ServiceDispatch
from fabric.services.probes import ProbeRunner

LOCAL = "127.0.0.1"


def loopback_sockets(n: int) -> Future[list[socket.socket]]:
    """What the local stack hands the pool, made here on the loopback address."""
    fut: Future[list[socket.socket]] = Future()
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((LOCAL, 0))
        socks.append(s)
    fut.set_result(socks)
    return fut


def free_port() -> int:
    """A free port below the ephemeral range: with probe and backend on one address, a
    probe from an ephemeral port equal to the target would connect to itself (a TCP
    self-connect) and look like a listening backend."""
    lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    for port in random.sample(range(10000, lo), 200):
        s = socket.socket()
        try:
            s.bind((LOCAL, port))
        except OSError:
            continue
        finally:
            s.close()
        return port
    raise RuntimeError("no free port below the ephemeral range")


def wait(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_probe_admits_a_backend_only_once_its_port_accepts() -> None:
    port = free_port()
    dp = DataPlane()
    dp.start()
    r = Router("shop", "10.10.0.0/24")
    dispatch = ServiceDispatch(r)
    runner = ProbeRunner(dispatch, dp, SocketPool(loopback_sockets, size=8))
    svc = Service("site", "10.10.0.100", (PortSpec(80, port, "tcp"),), probe_interval=0.05,
                  now=time.monotonic())
    listener = socket.socket()
    try:
        dp.add_owner(r)
        dp.call(r.attach_services, dispatch)
        dp.add_owner(runner, group=r)
        dp.call(dispatch.add, svc)
        dp.call(dispatch.set_backend, svc, "web", LOCAL, True, time.monotonic())
        # A client's SYN waits while the backend is not there (probes every ms then).
        syn = bytearray(14) + packets.tcp_packet(packets.ip_bytes("10.10.0.2"),
                                                 packets.ip_bytes("10.10.0.100"), 40000, 80,
                                                 1, 0, TCP_SYN)
        dp.call(svc.outbound, syn, 14, len(syn) - 14, time.monotonic(), False)
        assert wait(lambda: dp.call(lambda: runner.counters["failed"]) >= 3)
        assert not dp.call(lambda: svc.has_ready)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOCAL, port))
        listener.listen(16)
        t0 = time.monotonic()
        assert wait(lambda: dp.call(lambda: svc.has_ready), 2.0)
        took = time.monotonic() - t0
        assert took < 0.5, took  # probes run every millisecond while a client waits
        c = dp.call(lambda: dict(svc.counters))
        assert c["released"] == 1 and c["held"] == 1
        assert dp.call(lambda: runner.counters["succeeded"]) >= 1
    finally:
        dp.call(runner.close)
        dp.close()
        listener.close()


class FakeWatcher:
    def __init__(self) -> None:
        self.watched: dict[int, Callable[[], None]] = {}

    def watch_writable(self, fd: int, fn: Callable[[], None], name: str,
                       owner: object = None) -> None:
        self.watched[fd] = fn

    def unwatch(self, fd: int) -> None:
        self.watched.pop(fd, None)


def test_a_stuck_probe_times_out_and_a_stale_failure_says_nothing() -> None:
    port = free_port()
    listener = socket.socket()
    listener.bind((LOCAL, port))
    listener.listen(16)
    r = Router("shop", "10.10.0.0/24")
    dispatch = ServiceDispatch(r)
    w = FakeWatcher()
    runner = ProbeRunner(dispatch, w, SocketPool(loopback_sockets, size=8), timeout=1.0)
    svc = Service("site", "10.10.0.100", (PortSpec(80, port, "tcp"),), probe_interval=0.5)
    try:
        dispatch.add(svc)
        dispatch.set_backend(svc, "web", LOCAL, True, 10.0)
        assert runner.next_timer() == 10.0
        runner.handle_timer(10.0)  # starts a probe; its answer is never read
        assert len(w.watched) == 1 and runner.next_timer() == 10.5
        runner.handle_timer(10.5)  # a second one
        assert len(w.watched) == 2
        # The second probe's success arrives first (its fd is writable): the backend is in.
        first, second = sorted(w.watched)
        w.watched[second]()
        assert svc.has_ready and runner.counters["succeeded"] == 1
        # The first one, older, times out now: that says nothing about the backend.
        assert runner.next_timer() == 11.0
        runner.handle_timer(11.0)
        assert runner.counters["timed_out"] == 1 and svc.has_ready
        assert runner.next_timer() is None and not w.watched
        # Unready and ready again: probed afresh; a refusal keeps it out and retries.
        listener.close()
        dispatch.set_backend(svc, "web", LOCAL, False, 12.0)
        dispatch.set_backend(svc, "web", LOCAL, True, 12.0)
        runner.handle_timer(12.0)
        (fd,) = w.watched
        time.sleep(0.05)  # the refusal arrives
        w.watched[fd]()
        assert not svc.has_ready and runner.counters["failed"] == 2  # a time-out too
        retry = runner.next_timer()  # (the answer's time is the clock's, not the test's)
        assert retry is not None and retry > 12.0
    finally:
        runner.close()
        listener.close()


def test_without_a_local_stack_a_probe_succeeds_at_once() -> None:
    r = Router("shop", "10.10.0.0/24")
    dispatch = ServiceDispatch(r)
    runner = ProbeRunner(dispatch, FakeWatcher(), None)
    svc = Service("site", "10.10.0.100", (PortSpec(80, 8080, "tcp"),))
    dispatch.add(svc)
    dispatch.set_backend(svc, "web", "10.10.0.3", True, 1.0)
    runner.handle_timer(1.0)
    assert svc.has_ready


def test_a_probe_ends_on_the_backends_syn_ack_seen_by_the_router() -> None:
    """The router hands the probes the SYN-ACKs pods send to the gateway: one that
    answers a probe in flight (backend address, port, the probe's own port) admits the
    backend at once, without waiting for the socket; any other is ignored."""
    port = free_port()
    r = Router("shop", "10.10.0.0/24")
    dispatch = ServiceDispatch(r)
    w = FakeWatcher()
    runner = ProbeRunner(dispatch, w, SocketPool(loopback_sockets, size=8))
    svc = Service("site", "10.10.0.100", (PortSpec(80, port, "tcp"),))
    try:
        dispatch.add(svc)
        dispatch.set_backend(svc, "web", LOCAL, True, 10.0)
        runner.handle_timer(10.0)  # nothing listens: the probe's SYN gets no SYN-ACK
        ((fd, _),) = w.watched.items()
        ours = runner._tuple_of[fd][2]  # the probe socket's own port
        backend = socket.inet_aton(LOCAL)
        runner.synack(backend, port + 1, ours, 10.001)  # another port: not our probe
        runner.synack(socket.inet_aton("10.10.0.9"), port, ours, 10.001)  # another pod
        assert not svc.has_ready and runner.counters["synack_seen"] == 0
        runner.synack(backend, port, ours, 10.002)
        assert svc.has_ready and runner.counters["synack_seen"] == 1
        assert not w.watched and runner.counters["succeeded"] == 1
        runner.synack(backend, port, ours, 10.003)  # a retransmitted SYN-ACK: nothing more
        assert runner.counters["synack_seen"] == 1
    finally:
        runner.close()



def test_while_clients_wait_a_silent_probe_gives_up_soon() -> None:
    """A backend that drops SYNs (nobody reads its TAP) must not hold the probes in
    flight for a second each while clients wait: they give up after 0.1 s."""
    port = free_port()
    r = Router("shop", "10.10.0.0/24")
    dispatch = ServiceDispatch(r)
    w = FakeWatcher()
    runner = ProbeRunner(dispatch, w, SocketPool(loopback_sockets, size=8), timeout=1.0)
    svc = Service("site", "10.10.0.100", (PortSpec(80, port, "tcp"),))
    try:
        dispatch.add(svc)
        dispatch.set_backend(svc, "web", LOCAL, True, 10.0)
        runner.handle_timer(10.0)  # nobody waits: the full second
        assert runner.next_timer() == pytest.approx(10.2)  # (the next probe comes first)
        assert max(p[4] for p in runner._inflight.values()) == pytest.approx(11.0)
        svc.stream_need(80, 2, 10.05)  # a stream port needs the backend now
        runner.handle_timer(10.2)
        assert min(p[4] for p in runner._inflight.values()
                   if p[3] == 10.2) == pytest.approx(10.3)
        runner.handle_timer(10.3)
        assert runner.counters["timed_out"] == 1
    finally:
        runner.close()
