"""Receive-side coalescing: merged super-frames split back (software GSO) into exactly
the segments that came in; anything not mergeable passes through untouched."""

from __future__ import annotations

from fabric.net import packets
from fabric.net.coalesce import coalesce
from fabric.net.gso import segment
from fabric.net.packets import TCP_ACK, TCP_PSH, TCP_SYN
from fabric.net.vnet import GSO_TCPV4, VnetHdr

A = packets.ip_bytes("10.0.0.2")
B = packets.ip_bytes("10.0.0.3")
TS = b"\x01\x01\x08\x0a" + bytes(8)


def seg(seq: int, payload: bytes, flags: int = TCP_ACK, ident: int = 1,
        sport: int = 40000) -> bytes:
    return packets.tcp_packet(A, B, sport, 80, seq, 7, flags, payload, options=TS,
                              ident=ident)


def test_a_run_merges_and_splits_back_exactly() -> None:
    segs = [seg(1000 + i * 1368, bytes([i]) * 1368, ident=10 + i) for i in range(5)]
    segs.append(seg(1000 + 5 * 1368, b"z" * 100, TCP_ACK | TCP_PSH, ident=15))
    (pkt, hdr), = coalesce(segs)
    assert hdr is not None
    h = VnetHdr.parse(hdr)
    assert h.gso_type == GSO_TCPV4 and h.gso_size == 1368 and h.csum_start == 34
    eth = packets.eth_header(bytes(6), bytes(6), packets.ETH_P_IP)
    back = [f[14:] for f in segment(eth + pkt, h)]
    assert back == segs


def test_unmergeable_pass_through_in_order() -> None:
    a = seg(1000, b"a" * 100)
    gap = seg(5000, b"b" * 100)  # not contiguous
    syn = seg(1, b"", TCP_SYN)
    other = seg(1100, b"c" * 100, sport=40001)
    out = coalesce([a, gap, syn, other])
    assert [p for p, _ in out] == [a, gap, syn, other]
    assert all(h is None for _, h in out)


def test_psh_ends_a_run() -> None:
    s1 = seg(1000, b"a" * 100, TCP_ACK | TCP_PSH)
    s2 = seg(1100, b"b" * 100)
    out = coalesce([s1, s2])
    assert [p for p, _ in out] == [s1, s2]
