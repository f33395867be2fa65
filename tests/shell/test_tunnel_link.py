"""The tunnel's UDP link on 127.0.0.1, against hostile datagrams from the underlay: empty,
truncated and junk datagrams are counted, never raise, and never stop the datagrams
behind them; and a data plane survives a handler that raises without flooding its log."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from fabric.runtime.dataplane import DataPlane
from tests.support.tunnel_net import ipv4_packet
from tunnels.core import TunnelCore
from tunnels.keys import generate_keypair
from tunnels.link import TunnelLink


def pair(prefilter: bool = True) -> tuple[TunnelLink, TunnelLink]:
    k1, p1 = generate_keypair()
    k2, p2 = generate_keypair()
    a = TunnelLink(TunnelCore(k1, None), ("127.0.0.1", 0), kernel_filter=prefilter)
    b = TunnelLink(TunnelCore(k2, None), ("127.0.0.1", 0), kernel_filter=prefilter)
    a.open()
    b.open()
    assert a.sock is not None and b.sock is not None
    a.core.add_peer("b", p2, b.sock.getsockname(), None)
    b.core.add_peer("a", p1, a.sock.getsockname(), None)
    return a, b


def drain(link: TunnelLink, now: float) -> list[tuple[str, int, bytes, bytes | None]]:
    out = []
    for batch in link.readable(now):
        out += batch
    return out


@pytest.mark.parametrize("prefilter", [True, False], ids=["kernel-filter", "no-filter"])
def test_empty_and_junk_datagrams_are_counted_and_the_next_one_still_goes(
        caplog: pytest.LogCaptureFixture, prefilter: bool) -> None:
    """With the kernel filter they never reach the daemon; without it (a kernel that
    refuses the filter) the daemon counts and drops them itself."""
    a, b = pair(prefilter)
    try:
        assert b.sock is not None and a.sock is not None
        # A handshake, so that data can flow a -> b.
        a.send("b", 7, ipv4_packet(60, 1), 1.0)
        time.sleep(0.05)
        drain(b, 1.0)
        time.sleep(0.05)
        drain(a, 1.0)
        time.sleep(0.05)
        got = drain(b, 1.0)
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        target = b.sock.getsockname()
        caplog.set_level(logging.DEBUG)
        for junk in (b"", b"", b"\x01" + bytes(10), b"\x04" + bytes(40), bytes(1)):
            raw.sendto(junk, target)
        a.send("b", 7, ipv4_packet(60, 2), 2.0)
        time.sleep(0.05)
        got += drain(b, 2.0)
        assert [p[2] for p in got] == [ipv4_packet(60, 1), ipv4_packet(60, 2)]
        if prefilter:
            # A data message for no session has a valid shape: only the core can tell.
            assert b.snapshot()["kernel_drops"] == 4
            assert b.counters["empty"] == 0 and b.core.counters["malformed"] == 0
            assert b.core.counters["unknown_index"] + b.core.counters["unknown_session"] == 1
        else:
            assert b.counters["empty"] == 2
            assert b.core.counters["malformed"] >= 3  # empty twice, short; 0x04: no session
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        raw.close()
    finally:
        a.close()
        b.close()


def test_an_empty_datagram_flood_costs_the_data_plane_little(
        caplog: pytest.LogCaptureFixture) -> None:
    """The daemon's own path, the filter off: 5,000 empty datagrams are read and counted."""
    _, b = pair(prefilter=False)
    dp = DataPlane()
    dp.start()
    try:
        dp.attach_tunnel(b)
        assert b.sock is not None
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        target = b.sock.getsockname()
        caplog.set_level(logging.WARNING)
        t0 = time.monotonic()
        for _ in range(5000):
            raw.sendto(b"", target)
        deadline = time.monotonic() + 10
        while dp.call(lambda: b.counters["empty"]) < 5000 and time.monotonic() < deadline:
            time.sleep(0.01)
        took = time.monotonic() - t0
        assert dp.call(lambda: b.counters["empty"]) == 5000
        assert took < 5.0, took
        assert dp.errors.counts == {}
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        raw.close()
    finally:
        dp.close()
        b.close()


def test_a_raising_handler_is_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    dp = DataPlane()
    dp.start()
    r, w = socket.socketpair()
    r.setblocking(False)

    def bad() -> None:
        r.recv(1)
        raise ValueError("a bug")

    try:
        caplog.set_level(logging.ERROR)
        dp.add_handler(r.fileno(), bad, "bad")
        for _ in range(100):
            w.send(b"x")
            time.sleep(0.001)
        deadline = time.monotonic() + 5
        while dp.call(lambda: dp.errors.counts.get("handler:bad", 0)) < 100 and \
                time.monotonic() < deadline:
            time.sleep(0.01)
        assert dp.errors.counts["handler:bad"] == 100
        assert len([rec for rec in caplog.records if "handler failed" in rec.getMessage()]) == 1
        assert dp.call(lambda x: x + 1, 1) == 2  # still running
    finally:
        dp.remove_handler(r.fileno())
        dp.close()
        r.close()
        w.close()


class _Sock:
    """The link's socket at the edge of the unit: what the kernel answers is scripted."""

    def __init__(self, gso_error: int, plain_error: int | None) -> None:
        self.gso_error = gso_error
        self.plain_error = plain_error
        self.sent: list[bytes] = []

    def sendmsg(self, buffers: list[bytes], anc: object, flags: int, addr: object) -> int:
        raise OSError(self.gso_error, "scripted")

    def sendto(self, data: bytes, addr: object) -> int:
        if self.plain_error is not None:
            raise OSError(self.plain_error, "scripted")
        self.sent.append(data)
        return len(data)


def test_gso_is_given_up_only_when_plain_sends_work(caplog: pytest.LogCaptureFixture) -> None:
    """EINVAL from a GSO send is also what an oversized datagram gets: the link turns
    GSO off only if the same datagram goes out without it; otherwise it keeps GSO, counts
    the datagrams as too big and says once what to fix."""
    import errno

    k, _ = generate_keypair()
    addr = ("127.0.0.1", 9)
    batch = [(addr, bytes(1000)) for _ in range(4)]
    link = TunnelLink(TunnelCore(k, None), ("127.0.0.1", 0))
    link.sock = _Sock(errno.EINVAL, None)  # type: ignore[assignment]
    link._sendall(batch)
    assert link.gso is False and len(link.sock.sent) == 4  # type: ignore[union-attr]
    assert link.counters["datagrams_out"] == 4 and link.counters["send_errors"] == 0
    link = TunnelLink(TunnelCore(k, None), ("127.0.0.1", 0))
    link.sock = _Sock(errno.EINVAL, errno.EMSGSIZE)  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING):
        link._sendall(batch)
        link._sendall(batch)
    assert link.gso is True
    assert link.counters["send_too_big"] == 8 and link.counters["send_errors"] == 8
    assert sum("too big" in r.getMessage() for r in caplog.records) == 1
