"""Software GSO (fabric.net.gso) on super-frames built the way Linux hands them to a TAP with
IFF_VNET_HDR: virtio-net header with NEEDS_CSUM, csum_start/csum_offset pointing at the L4
checksum field, and that field holding the uncomplemented pseudo-header sum."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, defragment
from scapy.layers.l2 import Ether

from fabric.net import checksum, gso, packets, vnet
from fabric.net.packets import Malformed
from fabric.net.vnet import F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_UDP_L4, VnetHdr
from tests.support.packets import (
    DST,
    MAC_DST,
    MAC_SRC,
    SRC,
    TS_OPT,
    partial_l4,
    scapy_valid,
    tcp_super_frame,
    udp_super_frame,
)

# --- TCP --------------------------------------------------------------------------------


@pytest.mark.parametrize("length,mss", [(1, 1448), (1448, 1448), (1449, 1448), (4000, 1448),
                                        (64000, 1448), (9000, 536), (3000, 1000)])
def test_tcp_super_frame_segments(length: int, mss: int) -> None:
    payload = bytes((i * 31 + 7) & 0xFF for i in range(length))
    flags = packets.TCP_ACK | packets.TCP_PSH | packets.TCP_FIN | packets.TCP_CWR
    hdr, frame = tcp_super_frame(payload, mss, flags=flags, seq=0xFFFFF000, ecn=True)
    hdr = hdr._replace(gso_type=GSO_TCPV4 | GSO_ECN)  # even when it would fit
    segs = gso.segment(frame, hdr)
    n = -(-length // mss)
    assert len(segs) == n
    data = b""
    for i, seg in enumerate(segs):
        pkt = scapy_valid(seg)
        ip, tcp = pkt[IP], pkt[TCP]
        chunk = bytes(tcp.payload)
        assert len(chunk) == (mss if i < n - 1 else length - mss * (n - 1))
        assert ip.len == 20 + 32 + len(chunk) == len(seg) - 14
        assert ip.id == (0x4000 + i) & 0xFFFF
        assert ip.flags == "DF" and ip.ttl == 64
        assert tcp.seq == (0xFFFFF000 + i * mss) & 0xFFFFFFFF  # wraps
        assert tcp.ack == 77 and tcp.window == 502 and tcp.dataofs == 8
        assert bytes(tcp)[20:32] == TS_OPT
        expected = packets.TCP_ACK
        if i == 0:
            expected |= packets.TCP_CWR
        if i == n - 1:
            expected |= packets.TCP_PSH | packets.TCP_FIN
        assert int(tcp.flags) == expected, (i, tcp.flags)
        assert seg[:14] == frame[:14]
        data += chunk
    assert data == payload


def test_tcp_segments_match_independent_builder() -> None:
    payload = bytes(range(256)) * 12
    hdr, frame = tcp_super_frame(payload, 1000, options=b"", flags=packets.TCP_ACK, seq=5,
                                 ident=65535)
    segs = gso.segment(frame, hdr)
    assert len(segs) == 4
    for i, seg in enumerate(segs):
        chunk = payload[i * 1000:(i + 1) * 1000]
        expected = packets.eth_header(MAC_DST, MAC_SRC, packets.ETH_P_IP) + packets.tcp_packet(
            SRC, DST, 40000, 5201, 5 + i * 1000, 77, packets.TCP_ACK, chunk, window=502,
            ident=(65535 + i) & 0xFFFF)
        assert seg == expected


def test_tcp_super_frame_memoryview_and_padding() -> None:
    payload = b"z" * 3000
    hdr, frame = tcp_super_frame(payload, 1448)
    segs = gso.segment(memoryview(frame + b"\0" * 20), hdr)
    assert segs == gso.segment(frame, hdr)
    assert b"".join(bytes(Ether(s)[TCP].payload) for s in segs) == payload


def test_tcp_header_only_super_frame() -> None:
    hdr, frame = tcp_super_frame(b"", 1448, flags=packets.TCP_FIN | packets.TCP_ACK)
    hdr = hdr._replace(gso_type=GSO_TCPV4)
    (seg,) = gso.segment(frame, hdr)
    pkt = scapy_valid(seg)
    assert int(pkt[TCP].flags) == packets.TCP_FIN | packets.TCP_ACK and pkt[IP].len == 52


@given(st.integers(1, 20000), st.integers(88, 9000), st.integers(0, 0xFFFFFFFF),
       st.integers(0, 0xFFFF), st.sampled_from([b"", TS_OPT, b"\x02\x04\x05\xb4"]))
@settings(max_examples=40, deadline=None)
def test_tcp_segmentation_property(length: int, mss: int, seq: int, ident: int,
                                   options: bytes) -> None:
    payload = bytes((i * 7 + length) & 0xFF for i in range(length))
    hdr, frame = tcp_super_frame(payload, mss, seq=seq, ident=ident, options=options,
                                 flags=packets.TCP_ACK | packets.TCP_PSH)
    hdr = hdr._replace(gso_type=GSO_TCPV4)
    segs = gso.segment(frame, hdr)
    assert len(segs) == max(1, -(-length // mss))
    out = b""
    for i, s in enumerate(segs):
        pkt = scapy_valid(s)
        assert pkt[TCP].seq == (seq + len(out)) & 0xFFFFFFFF
        assert pkt[IP].id == (ident + i) & 0xFFFF
        assert len(s) <= 14 + 20 + 20 + len(options) + mss
        assert bool(pkt[TCP].flags & packets.TCP_PSH) == (i == len(segs) - 1)
        out += bytes(pkt[TCP].payload)
    assert out == payload


# --- UDP --------------------------------------------------------------------------------


@pytest.mark.parametrize("length,size", [(0, 1000), (1, 1000), (1000, 1000), (1001, 1000),
                                         (8000, 1472), (30000, 1200)])
def test_udp_l4_segments(length: int, size: int) -> None:
    payload = bytes((i * 5 + 1) & 0xFF for i in range(length))
    hdr, frame = udp_super_frame(payload, size)
    segs = gso.segment(frame, hdr)
    n = max(1, -(-length // size))
    assert len(segs) == n
    data = b""
    for i, seg in enumerate(segs):
        pkt = scapy_valid(seg)
        chunk = bytes(pkt[UDP].payload)
        assert len(chunk) == min(size, length - i * size)
        assert pkt[UDP].len == 8 + len(chunk) and pkt[IP].len == 28 + len(chunk)
        assert pkt[IP].id == 0x1234 + i and pkt[IP].flags == "DF"
        assert (pkt[UDP].sport, pkt[UDP].dport) == (5353, 53)
        assert pkt[UDP].chksum != 0
        data += chunk
    assert data == payload


def _zero_sum_filler(src: bytes, dst: bytes, udp_head: bytes, chunk: bytes) -> bytes:
    """Two bytes that, appended to `chunk`, make the UDP checksum compute to 0."""
    seg = bytearray(udp_head + chunk + b"\0\0")
    seg[4:6] = (len(seg)).to_bytes(2, "big")
    seg[6:8] = b"\0\0"
    s = checksum.add(checksum.ones_sum(seg),
                     checksum.pseudo_header_sum(src, dst, packets.PROTO_UDP, len(seg)))
    return (~s & 0xFFFF).to_bytes(2, "big")


def test_udp_l4_segment_with_zero_checksum_sends_ffff() -> None:
    # Make the second segment's checksum compute to zero: it must go out as 0xFFFF.
    size = 100
    first = bytes(range(100))
    head = struct.pack("!HHHH", 5353, 53, 0, 0)
    second = bytes(98) + b"\x01\x02"
    second = second[:98] + _zero_sum_filler(SRC, DST, head, second[:98])
    hdr, frame = udp_super_frame(first + second + b"tail", size)
    segs = gso.segment(frame, hdr)
    assert len(segs) == 3
    assert Ether(segs[1])[UDP].chksum == 0xFFFF
    assert segs[1][14 + 20 + 6:14 + 20 + 8] == b"\xff\xff"
    for s in segs:
        scapy_valid(s)


def test_udp_needs_csum_zero_result_sends_ffff() -> None:
    payload = b"abcdef"
    head = struct.pack("!HHHH", 5353, 53, 0, 0)
    payload += _zero_sum_filler(SRC, DST, head, payload)
    hdr, frame = udp_super_frame(payload, 0, gso_type=GSO_NONE)
    (out,) = gso.segment(frame, hdr)
    assert out[14 + 26:14 + 28] == b"\xff\xff"
    assert out[:40] == frame[:40] and out[42:] == frame[42:]
    scapy_valid(out)
    assert out == packets.eth_header(MAC_DST, MAC_SRC, packets.ETH_P_IP) + packets.udp_packet(
        SRC, DST, 5353, 53, payload, ident=0x1234)


def test_legacy_ufo_fragments_one_datagram() -> None:
    payload = bytes(range(256)) * 20
    hdr, frame = udp_super_frame(payload, 1480, gso_type=GSO_UDP, df=False, ident=99)
    frags = gso.segment(frame, hdr)
    assert len(frags) == 4
    ips = [Ether(f)[IP] for f in frags]
    assert [ip.frag * 8 for ip in ips] == [0, 1480, 2960, 4440]
    assert [int(ip.flags) for ip in ips] == [1, 1, 1, 0]  # MF
    assert all(ip.id == 99 for ip in ips)
    for f in frags:
        ip = Ether(f)[IP]
        assert checksum.verify(f[14:34]) and ip.len == len(f) - 14 <= 1500
    (whole,) = defragment(ips)
    assert bytes(whole[UDP].payload) == payload
    again = whole.copy()
    del again[UDP].chksum
    assert IP(bytes(again))[UDP].chksum == whole[UDP].chksum


# --- non-GSO partial checksums ----------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 2, 3, 100, 1001, 1448])
def test_non_gso_needs_csum_tcp(length: int) -> None:
    payload = bytes(range(length % 256)) * (length // 256) + bytes(range(length % 256))
    hdr, frame = tcp_super_frame(payload, 1448)
    assert hdr.gso_type == GSO_NONE and hdr.flags == F_NEEDS_CSUM
    (out,) = gso.segment(frame, hdr)
    pkt = scapy_valid(out)
    assert bytes(pkt[TCP].payload) == payload
    assert out[:50] == frame[:50] and out[52:] == frame[52:]  # only the checksum changed


def test_non_gso_without_needs_csum_is_untouched() -> None:
    raw = packets.eth_header(MAC_DST, MAC_SRC, packets.ETH_P_IP) + packets.udp_packet(
        SRC, DST, 1, 2, b"hi")
    assert gso.segment(raw, VnetHdr(0, GSO_NONE, 0, 0, 0, 0)) == [raw]
    # DATA_VALID (from the kernel towards us) changes nothing either.
    assert gso.segment(raw, VnetHdr(vnet.F_DATA_VALID, GSO_NONE, 0, 0, 0, 0)) == [raw]
    # Not IPv4 at all: a frame without offload passes as is.
    arp = packets.arp_frame(1, MAC_SRC, SRC, bytes(6), DST, packets.BROADCAST_MAC)
    assert gso.segment(arp, VnetHdr(0, GSO_NONE, 0, 0, 0, 0)) == [arp]


def test_needs_csum_icmp() -> None:
    raw = bytearray(packets.eth_header(MAC_DST, MAC_SRC, packets.ETH_P_IP)
                    + packets.icmp_echo(SRC, DST, 1, 2, b"hello!!"))
    good = bytes(raw)
    raw[36:38] = b"\0\0"  # ICMP has no pseudo-header: the partial sum is zero
    (out,) = gso.segment(raw, VnetHdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, 34, 2))
    assert out == good
    scapy_valid(out)


def test_needs_csum_right_after_ip_options_is_fine() -> None:
    udp = packets.udp_packet(SRC, DST, 1, 2, b"opts")[20:]
    ip = packets.ipv4_header(SRC, DST, 17, len(udp), options=b"\x94\x04\0\0")
    good = packets.eth_header(MAC_DST, MAC_SRC, packets.ETH_P_IP) + ip + udp
    raw = bytearray(good)
    partial_l4(raw, 38, 44, packets.PROTO_UDP)
    assert gso.segment(raw, VnetHdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, 38, 6)) == [good]


def test_complete_checksum_in_place() -> None:
    hdr, frame = tcp_super_frame(b"data", 1448)
    buf = bytearray(frame)
    gso.complete_checksum(buf, hdr.csum_start, hdr.csum_offset)
    scapy_valid(bytes(buf))


# --- malformed --------------------------------------------------------------------------


def _tcp() -> tuple[VnetHdr, bytes]:
    return tcp_super_frame(bytes(5000), 1448)


@pytest.mark.parametrize("case", [
    "ipv6", "gso_size0", "proto_udp", "ihl", "version", "total_big", "total_small",
    "short_tcp", "doff_small", "doff_big", "tcpv6", "unknown", "csum_outside",
    "csum_start_outside", "short_frame", "udp_short", "udp_on_tcp", "csum_in_eth",
    "csum_in_ip", "csum_in_ip_options", "csum_in_eth_arp", "ufo_short",
])
def test_malformed_raises(case: str) -> None:
    hdr, frame = _tcp()
    f = bytearray(frame)
    if case == "ipv6":
        f[12:14] = b"\x86\xdd"
    elif case == "gso_size0":
        hdr = hdr._replace(gso_size=0)
    elif case == "proto_udp":
        f[14 + 9] = 17
    elif case == "ihl":
        f[14] = 0x44
    elif case == "version":
        f[14] = 0x65
    elif case == "total_big":
        f[16:18] = (len(f) - 13).to_bytes(2, "big")
    elif case == "total_small":
        f[16:18] = (19).to_bytes(2, "big")
    elif case == "short_tcp":
        f = f[:14 + 20 + 19]
        f[16:18] = (39).to_bytes(2, "big")
    elif case == "doff_small":
        f[14 + 20 + 12] = 0x40
    elif case == "doff_big":
        f[16:18] = (20 + 40).to_bytes(2, "big")
        f[14 + 20 + 12] = 0xF0
    elif case == "tcpv6":
        hdr = hdr._replace(gso_type=vnet.GSO_TCPV6)
    elif case == "unknown":
        hdr = hdr._replace(gso_type=9)
    elif case == "csum_outside":
        hdr = hdr._replace(gso_type=GSO_NONE, csum_offset=len(f))
    elif case == "csum_start_outside":
        hdr = hdr._replace(gso_type=GSO_NONE, csum_start=len(f), csum_offset=0)
    elif case == "short_frame":
        f = f[:30]
    elif case == "udp_short":
        hdr, frame = udp_super_frame(b"x" * 100, 10)
        f = bytearray(frame)
        f[16:18] = (24).to_bytes(2, "big")
    elif case == "udp_on_tcp":
        hdr = hdr._replace(gso_type=GSO_UDP_L4)
    elif case == "ufo_short":
        hdr, frame = udp_super_frame(b"x" * 100, 10, gso_type=GSO_UDP, df=False)
        f = bytearray(frame[:14 + 20 + 4])
        f[16:18] = (24).to_bytes(2, "big")
    elif case == "csum_in_eth":
        # A partial checksum must never be written over the MACs...
        hdr = hdr._replace(gso_type=GSO_NONE, csum_start=0, csum_offset=0)
    elif case == "csum_in_ip":
        # ... nor over the IP addresses, which were checked before.
        hdr = hdr._replace(gso_type=GSO_NONE, csum_start=14, csum_offset=12)
    elif case == "csum_in_ip_options":
        f = bytearray(packets.eth_header(MAC_DST, MAC_SRC, packets.ETH_P_IP)
                      + packets.ipv4_header(SRC, DST, 17, 8, options=b"\x94\x04\0\0")
                      + bytes(8))
        hdr = VnetHdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, 34, 2)  # 34 is inside the options
    elif case == "csum_in_eth_arp":
        f = bytearray(packets.arp_frame(1, MAC_SRC, SRC, bytes(6), DST,
                                        packets.BROADCAST_MAC))
        hdr = VnetHdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, 6, 0)
    with pytest.raises(Malformed):
        gso.segment(bytes(f), hdr)


# --- virtio-net header ------------------------------------------------------------------


def test_vnet_header_pack_parse() -> None:
    raw = vnet.pack(F_NEEDS_CSUM, GSO_TCPV4 | GSO_ECN, 66, 1448, 34, 16)
    assert len(raw) == vnet.VNET_HDR_LEN == 10
    assert raw == bytes([1, 0x81, 66, 0, 0xA8, 0x05, 34, 0, 16, 0])  # little-endian fields
    h = VnetHdr.parse(b"\xff" + raw, 1)
    assert h == VnetHdr(1, 0x81, 66, 1448, 34, 16)
    assert h.gso == GSO_TCPV4 and h.needs_csum and h.pack() == raw
    assert not VnetHdr.parse(vnet.ZERO_HDR).needs_csum
