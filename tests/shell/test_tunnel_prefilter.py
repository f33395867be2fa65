"""The tunnel socket's kernel pre-filter on real sockets (127.0.0.0/8, no root): what each
program lets through, that the kernel counts what it drops, and that a handshake flood
from one address is shed in the kernel while a peer's handshakes and everyone's data
still arrive."""

from __future__ import annotations

import os
import socket
import time

import pytest

from tunnels import prefilter
from tunnels.core import TunnelCore
from tunnels.keys import generate_keypair
from tunnels.link import TunnelLink


def _sock(insns: list[prefilter.Insn] | None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    if insns is not None:
        prefilter.attach(s, insns)
    return s


def _sender(ip: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, 0))
    return s


def _received(s: socket.socket) -> list[bytes]:
    time.sleep(0.05)
    got = []
    while True:
        try:
            got.append(s.recv(65535))
        except BlockingIOError:
            return got


def msg(kind: int, size: int, reserved: bytes = bytes(3)) -> bytes:
    return bytes([kind]) + reserved + os.urandom(size - 4)


PASS = [msg(4, 32), msg(4, 1452), msg(1, 148), msg(2, 92), msg(3, 64)]
DROP = [b"", b"\x04", msg(4, 31), msg(1, 147), msg(1, 149), msg(2, 93), msg(3, 63),
        msg(1, 148, b"\x00\x01\x00"), msg(4, 64, b"\xff\x00\x00"), msg(5, 148),
        msg(0, 148), bytes(1400)]


def test_the_shape_filter_passes_only_what_can_be_a_tunnel_message() -> None:
    r = _sock(prefilter.program())
    s = _sender("127.0.0.1")
    try:
        base = prefilter.kernel_drops(r)
        for d in DROP + PASS:
            s.sendto(d, r.getsockname())
        assert _received(r) == PASS
        assert prefilter.kernel_drops(r) - base == len(DROP)  # type: ignore[operator]
    finally:
        r.close()
        s.close()


def test_the_shed_filter_keeps_peers_handshakes_and_everyones_data() -> None:
    r = _sock(prefilter.program(["127.0.0.2", "10.9.9.9"]))
    peer, other = _sender("127.0.0.2"), _sender("127.0.0.3")
    try:
        for s in (peer, other):
            for d in (msg(1, 148), msg(2, 92), msg(3, 64), msg(4, 80)):
                s.sendto(d, r.getsockname())
        got = _received(r)
        assert [d[0] for d in got] == [1, 2, 3, 4, 4]
        assert prefilter.kernel_drops(r) == 3
    finally:
        for x in (r, peer, other):
            x.close()


def test_no_exempt_address_sheds_every_handshake() -> None:
    r = _sock(prefilter.program([]))
    s = _sender("127.0.0.1")
    try:
        for d in (msg(1, 148), msg(4, 40)):
            s.sendto(d, r.getsockname())
        assert [d[0] for d in _received(r)] == [4]
    finally:
        r.close()
        s.close()


def test_programs_stay_within_the_kernels_limits() -> None:
    many = [f"10.{i >> 8}.{i & 255}.1" for i in range(prefilter.MAX_EXEMPT)]
    insns = prefilter.program(many)
    assert len(insns) <= 4096
    r = _sock(insns)  # the kernel takes it
    r.close()
    with pytest.raises(ValueError, match="at most"):
        prefilter.program([*many, "192.0.2.1"])


def test_a_handshake_flood_is_shed_in_the_kernel_and_looked_at_again() -> None:
    k, _ = generate_keypair()
    pk2 = generate_keypair()[1]
    core = TunnelCore(k, None, handshake_budget=50.0)
    link = TunnelLink(core, ("127.0.0.1", 0))
    link.open()
    assert link.sock is not None
    core.add_peer("p", pk2, ("127.0.0.2", 51820), None)
    target = link.sock.getsockname()
    flood, peer = _sender("127.0.0.3"), _sender("127.0.0.2")

    def read(now: float) -> None:
        time.sleep(0.05)
        for _ in link.readable(now):
            pass

    try:
        for _ in range(400):
            flood.sendto(msg(1, 148), target)
        read(10.0)
        assert core.over_budget() >= 200  # one read batch (256) minus the budget's burst
        read(10.1)  # the next read batch sees the flood and sheds
        assert link.shedding.until == pytest.approx(11.1)
        assert link.shedding.next_timer() == pytest.approx(11.1)
        assert link.next_timer() <= 11.1  # type: ignore[operator]
        before = link.counters["datagrams_in"]
        for _ in range(200):
            flood.sendto(msg(1, 148), target)
        peer.sendto(msg(1, 148), target)
        flood.sendto(msg(4, 48), target)
        read(10.2)
        assert link.counters["datagrams_in"] - before == 2  # the peer's and the data
        assert link.snapshot()["kernel_drops"] == 200
        assert link.counters["shed_episodes"] == 1
        link.handle_timer(11.1)  # lifted: the flood reaches the daemon again
        assert link.shedding.until is None
        for _ in range(10):
            flood.sendto(msg(1, 148), target)
        read(11.2)
        assert link.counters["datagrams_in"] - before == 12
    finally:
        link.close()
        flood.close()
        peer.close()
