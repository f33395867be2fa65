"""The router's per-packet path keeps two copies inline for speed: the TTL decrement
(fabric.router.l3.decrement_ttl) and the tail of Router.deliver. These tests hold each
inline copy to the canonical function, byte for byte and output for output."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.net import checksum, packets
from fabric.net.packets import ETH_P_IP
from fabric.net.vnet import ZERO_HDR
from fabric.router.l3 import decrement_ttl
from fabric.router.model import Port
from fabric.router.router import Router
from tests.support.packets import tcp_super_frame

A, B = "10.0.0.2", "10.0.0.3"
A_MAC, B_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
GW = packets.mac_bytes("02:fb:00:00:00:01")


def setup(vnet_in: bool, vnet_out: bool, mtu: int) -> tuple[Router, Port, Port]:
    r = Router("t", "10.0.0.0/24")
    r.add_pod("a", A, A_MAC)
    r.add_pod("b", B, B_MAC)
    pa = Port(vnet=vnet_in, mtu=1500)
    pb = Port(vnet=vnet_out, mtu=mtu)
    r.attach("a", pa, 0.0)
    r.attach("b", pb, 0.0)
    r.outputs.clear()
    return r, pa, pb


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.integers(0, 0xFFFF), st.binary(max_size=1600))
def test_inline_ttl_decrement_is_decrement_ttl(ttl: int, ident: int, payload: bytes) -> None:
    pkt = bytearray(packets.udp_packet(packets.ip_bytes(A), packets.ip_bytes(B), 1, 2,
                                       payload, ttl=max(ttl, 1), ident=ident))
    pkt[8] = ttl  # any TTL, with a valid header checksum
    pkt[10:12] = b"\0\0"
    pkt[10:12] = checksum.checksum(pkt[:20]).to_bytes(2, "big")
    r, pa, _ = setup(False, False, 9000)
    frame = bytearray(packets.eth_header(GW, packets.mac_bytes(A_MAC), ETH_P_IP)) + pkt
    ref = bytearray(frame)
    out = r.receive(pa, frame, len(frame), 1.0)
    ok = decrement_ttl(ref, 14)
    if ok:
        assert out is not None
        assert frame[14:] == ref[14:]
    else:
        assert out is None and pa.drops == {"ttl_expired": 1}


@settings(max_examples=200, deadline=None)
@given(st.booleans(), st.booleans(), st.sampled_from([576, 1280, 1500, 9000]),
       st.integers(0, 6000), st.booleans())
def test_the_inline_tail_of_receive_is_deliver(vnet_in: bool, vnet_out: bool, mtu: int,
                                               size: int, df: bool) -> None:
    """Whatever the framings and MTU: the same returned port, frame and outputs."""
    runs = []
    for inline in (True, False):
        r, pa, pb = setup(vnet_in, vnet_out, mtu)
        if vnet_in and size > 1448:
            hdr, eth = tcp_super_frame(b"\x55" * size, 1448, src=packets.ip_bytes(A),
                                       dst=packets.ip_bytes(B), mac_dst=GW,
                                       mac_src=packets.mac_bytes(A_MAC))
            frame = bytearray(hdr.pack() + eth)
        else:
            pkt = packets.udp_packet(packets.ip_bytes(A), packets.ip_bytes(B), 1, 2,
                                     b"\x55" * min(size, 1472),
                                     flags_frag=packets.IP_DF if df else 0)
            frame = bytearray((ZERO_HDR if vnet_in else b"") + packets.eth_header(
                GW, packets.mac_bytes(A_MAC), ETH_P_IP) + pkt)
        n = len(frame)
        h = pa.hlen
        if inline:
            out = r.receive(pa, frame, n, 1.0)
        else:
            ip = h + 14
            pa.rx_packets += 1
            pa.rx_bytes += n
            assert decrement_ttl(frame, ip)
            total = frame[ip + 2] << 8 | frame[ip + 3]
            out = r.deliver(r.pods["b"], pa, frame, h, n, ip, total, 1.0)
        runs.append((out is pb, bytes(frame[:n]) if out is not None else None,
                     [(p is pb, p is pa, f) for p, f in r.outputs], dict(pa.drops),
                     (pb.tx_packets, pb.tx_bytes)))
    assert runs[0] == runs[1]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFF),
       st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
       st.sampled_from([-14, 14]))
def test_shift_vnet_moves_the_header_and_its_offsets(flags: int, gso_type: int, hdr_len: int,
                                                     gso_size: int, start: int, offset: int,
                                                     delta: int) -> None:
    """shift_vnet (one struct unpack and pack) against the header's definition: the
    bytes move, hdr_len and csum_start (the latter only with NEEDS_CSUM) shift by delta,
    clamped to 0..0xFFFF (any value may come in), a hdr_len of 0 (unknown) stays 0, the
    rest is kept."""
    import struct

    from fabric.net.vnet import F_NEEDS_CSUM
    from fabric.router.l3 import shift_vnet
    from fabric.router.model import L3_OFF

    hdr = struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, start, offset)
    src, dst = (0, L3_OFF) if delta < 0 else (L3_OFF, 0)
    buf = bytearray(b"\xaa" * 64)
    buf[src:src + 10] = hdr
    shift_vnet(buf, src, dst, delta)
    want_len = min(max(hdr_len + delta, 0), 0xFFFF) if hdr_len else 0
    want_start = min(max(start + delta, 0), 0xFFFF) if flags & F_NEEDS_CSUM else start
    assert struct.unpack_from("<BBHHHH", buf, dst) == (flags, gso_type, want_len, gso_size,
                                                       want_start, offset)
    assert buf[24:] == b"\xaa" * 40  # nothing past the two header slots is touched
