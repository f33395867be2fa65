"""Pod-local upstreams (fabric.streams.podlocal): which connects are made inside the
backend pod, which fall back to the VIP and why, and that a detached or re-attached
pod's old namespace gets no new connection and keeps no fd or socket of ours."""

from __future__ import annotations

import asyncio
import os
import socket
from concurrent.futures import Future

import pytest

from fabric.streams import podlocal as pl
from fabric.streams.podlocal import PodLocal, PodNs


class Fakes:
    """The two edges: opening a namespace (an fd) and making sockets in it."""

    def __init__(self) -> None:
        self.opened: list[tuple[str, tuple[int, int]]] = []
        self.refuse_open = False
        self.refuse_make = False
        self.made: list[socket.socket] = []
        self.batches: list[int] = []
        self.fds: list[int] = []

    def open(self, path: str, ident: tuple[int, int]) -> int:
        if self.refuse_open:
            raise OSError(f"{path} is not the namespace the pod was attached in")
        self.opened.append((path, ident))
        r, w = os.pipe()  # any real fd: PodNs.close() closes it
        os.close(w)
        self.fds.append(r)
        return r

    def make(self, pod: PodNs, n: int) -> Future[list[socket.socket]]:
        fut: Future[list[socket.socket]] = Future()
        self.batches.append(n)
        if self.refuse_make:
            fut.set_exception(OSError("EMFILE"))
            return fut
        socks = [socket.socket() for _ in range(n)]
        self.made += socks
        fut.set_result(socks)
        return fut


def _registry() -> tuple[PodLocal, Fakes]:
    f = Fakes()
    return PodLocal(f.open, f.make), f


def test_a_backend_that_is_not_an_attached_netns_pod_falls_back() -> None:
    reg, f = _registry()
    assert reg.socket("10.0.0.9") == (None, pl.NOT_LOCAL)
    assert not f.opened and not f.batches


def test_a_netns_pod_gets_sockets_from_its_own_namespace_opened_once() -> None:
    reg, f = _registry()
    reg.attach("db", "10.0.0.5", "/run/netns/db", (1, 2))
    got = [reg.socket("10.0.0.5") for _ in range(40)]
    assert all(s is not None and why == pl.CONNECTS for s, why in got)
    assert f.opened == [("/run/netns/db", (1, 2))]  # opened on first use, held
    socks = {id(s) for s, _ in got}
    assert len(socks) == 40 and socks <= {id(s) for s in f.made}
    for s, _ in got:
        assert s is not None
        s.close()
    reg.close()


def test_a_namespace_that_is_not_the_attached_one_is_never_entered() -> None:
    reg, f = _registry()
    reg.attach("db", "10.0.0.5", "/run/netns/db", (1, 2))
    f.refuse_open = True
    assert reg.socket("10.0.0.5") == (None, pl.NETNS)
    f.refuse_open = False
    assert reg.socket("10.0.0.5") == (None, pl.NETNS)  # until attached again
    assert not f.batches
    reg.attach("db", "10.0.0.5", "/run/netns/db", (1, 3))
    s, why = reg.socket("10.0.0.5")
    assert s is not None and why == pl.CONNECTS
    assert f.opened == [("/run/netns/db", (1, 3))]
    s.close()
    reg.close()


def test_a_namespace_the_fabric_must_not_hold_is_never_opened() -> None:
    """/proc/PID/ns/net with a moved TAP: holding it would keep it alive past its
    process, so it is not entered at all."""
    reg, f = _registry()
    reg.attach("vm", "10.0.0.6", "/proc/4242/ns/net", None)
    assert reg.socket("10.0.0.6") == (None, pl.NETNS)
    assert not f.opened and not f.batches
    reg.close()


def test_no_socket_in_the_pod_falls_back() -> None:
    reg, f = _registry()
    reg.attach("db", "10.0.0.5", "/run/netns/db", (1, 2))
    f.refuse_make = True
    assert reg.socket("10.0.0.5") == (None, pl.NO_SOCKET)
    reg.close()


def _closed(s: socket.socket) -> bool:
    return s.fileno() == -1


def test_detach_and_reattach_close_the_old_namespace_and_its_pool() -> None:
    reg, f = _registry()
    reg.attach("db", "10.0.0.5", "/run/netns/db", (1, 2))
    s, _ = reg.socket("10.0.0.5")
    assert s is not None
    old = reg.pods["10.0.0.5"]
    pooled = [x for x in f.made if x is not s]
    reg.attach("db", "10.0.0.5", "/run/netns/db", (7, 8))  # a new netns, same name
    assert old.fd == -1 and all(_closed(x) for x in pooled)
    assert not _closed(s)  # a live stream keeps its socket
    s2, why = reg.socket("10.0.0.5")
    assert why == pl.CONNECTS and f.opened[-1] == ("/run/netns/db", (7, 8))
    # A stale detach (of a pod by another name on that IP) leaves the new one alone.
    reg.detach("other", "10.0.0.5")
    assert "10.0.0.5" in reg.pods
    reg.detach("db", "10.0.0.5")
    assert reg.socket("10.0.0.5") == (None, pl.NOT_LOCAL)
    assert all(_closed(x) for x in f.made if x is not s and x is not s2)
    for fd in f.fds:  # every namespace fd we were handed is closed again
        with pytest.raises(OSError):
            os.fstat(fd)
    for x in (s, s2):
        assert x is not None
        x.close()


def test_sockets_made_for_a_pod_detached_meanwhile_are_closed() -> None:
    pending: list[Future[list[socket.socket]]] = []

    def make(pod: PodNs, n: int) -> Future[list[socket.socket]]:
        fut: Future[list[socket.socket]] = Future()
        pending.append(fut)
        return fut

    reg = PodLocal(lambda p, i: os.dup(0), make)
    reg.attach("db", "10.0.0.5", "/run/netns/db", (1, 2))
    pl_batch, pl.BATCH_TIMEOUT = pl.BATCH_TIMEOUT, 0.0
    try:
        assert reg.socket("10.0.0.5") == (None, pl.NO_SOCKET)  # the batch is late
    finally:
        pl.BATCH_TIMEOUT = pl_batch
    reg.detach("db", "10.0.0.5")
    late = [socket.socket() for _ in range(3)]
    for fut in pending:
        fut.set_result(list(late))
    assert all(_closed(x) for x in late)


def test_the_sockets_thread_refuses_a_detached_pod() -> None:
    from fabric.ports.podsockets import sockets_in

    pod = PodNs("db", "10.0.0.5", "/run/netns/db", (1, 2))
    fut = sockets_in(pod, 2)  # fd -1: detached before the thread ran
    with pytest.raises(OSError, match="detached"):
        fut.result(5)


class _Guest:
    """Connects every stream upstream and splices it."""

    def process(self, port: int, events: list, streams: int = 0) -> list:
        from fabric.activator import abi

        out: list = []
        for e in events:
            if isinstance(e, abi.StreamOpen):
                out.append(abi.UpstreamConnect(e.stream_id, 0))
            elif isinstance(e, abi.UpstreamConnectResult) and e.ok:
                out.append(abi.Splice(e.stream_id))
        return out


@pytest.mark.parametrize("local", [True, False])
def test_the_front_counts_pod_local_connects_and_fallbacks(local: bool) -> None:
    """A front with pod-local upstreams takes its socket from the registry when the
    backend is in it and from the VIP's pool otherwise; both relay the same bytes."""
    from fabric.streams.core import StreamCore
    from fabric.streams.front import StreamFront

    backend = socket.socket()
    backend.bind(("127.0.0.1", 0))
    backend.listen(4)
    vip_socks: list[socket.socket] = []

    def vip_socket() -> socket.socket:
        s = socket.socket()
        vip_socks.append(s)
        return s

    reg, f = _registry()
    if local:
        reg.attach("db", "127.0.0.1", "/run/netns/db", (1, 2))

    def exchange(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            conn, _ = backend.accept()
            with conn:
                conn.sendall(b"hello")
                return c.recv(5)

    async def main() -> tuple[bytes, dict[str, int]]:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        core = StreamCore(_Guest(), 80, backend.getsockname()[1])
        front = StreamFront(core, listener, vip_socket, lambda need: None, "test", None, reg)
        try:
            front.backends(["127.0.0.1"])
            got = await asyncio.to_thread(exchange, listener.getsockname()[1])
            return got, dict(front.counters)
        finally:
            front.close()

    got, counters = asyncio.run(main())
    backend.close()
    reg.close()
    assert got == b"hello"
    if local:
        assert counters[pl.CONNECTS] == 1 and counters[pl.NOT_LOCAL] == 0
        assert not vip_socks
    else:
        assert counters[pl.CONNECTS] == 0 and counters[pl.NOT_LOCAL] == 1
        assert len(vip_socks) == 1
