"""Packets for the tests: super-frames built the way Linux hands them to a TAP, and
checks of every checksum against scapy's own computation (an independent oracle)."""

from __future__ import annotations

import struct
from collections.abc import Callable

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from fabric.net import checksum, gso, packets
from fabric.net.packets import PROTO_ICMP, PROTO_TCP, PROTO_UDP
from fabric.net.vnet import F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_UDP_L4, VnetHdr

SRC = bytes([10, 0, 0, 2])
DST = bytes([10, 0, 0, 3])
MAC_SRC = bytes.fromhex("0200000000aa")
MAC_DST = bytes.fromhex("0200000000bb")
TS_OPT = b"\x01\x01\x08\x0a" + struct.pack("!II", 1000, 2000)


def partial_l4(frame: bytearray, l4: int, field: int, proto: int) -> None:
    """Put the pseudo-header sum (not complemented) in the L4 checksum field, like Linux
    does for CHECKSUM_PARTIAL (tcp_v4_send_check / udp4_hwcsum)."""
    ip = 14
    length = len(frame) - l4
    psum = checksum.pseudo_header_sum(bytes(frame[ip + 12:ip + 16]),
                                      bytes(frame[ip + 16:ip + 20]), proto, length)
    frame[field:field + 2] = psum.to_bytes(2, "big")


def tcp_super_frame(payload: bytes, mss: int, *, flags: int = packets.TCP_ACK | packets.TCP_PSH,
                    seq: int = 1000, ident: int = 0x4000, options: bytes = TS_OPT,
                    ecn: bool = False, src: bytes = SRC, dst: bytes = DST,
                    mac_dst: bytes = MAC_DST, mac_src: bytes = MAC_SRC,
                    ttl: int = 64) -> tuple[VnetHdr, bytes]:
    """A TCPv4 GSO super-frame (Ethernet onwards) and its virtio-net header."""
    thl = 20 + len(options)
    tcp = bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, seq, 77, (thl // 4) << 4, flags,
                                502, 0, 0) + options + payload)
    ip = packets.ipv4_header(src, dst, packets.PROTO_TCP, len(tcp), ident=ident,
                             flags_frag=packets.IP_DF, ttl=ttl)
    frame = bytearray(packets.eth_header(mac_dst, mac_src, packets.ETH_P_IP) + ip + tcp)
    l4 = 14 + len(ip)
    partial_l4(frame, l4, l4 + 16, packets.PROTO_TCP)
    gso_type = GSO_TCPV4 | (GSO_ECN if ecn else 0)
    hdr = VnetHdr(F_NEEDS_CSUM, gso_type if len(payload) > mss else GSO_NONE, l4 + thl, mss,
                  l4, 16)
    return hdr, bytes(frame)


def udp_super_frame(payload: bytes, size: int, *, gso_type: int = GSO_UDP_L4,
                    ident: int = 0x1234, df: bool = True, src: bytes = SRC,
                    dst: bytes = DST) -> tuple[VnetHdr, bytes]:
    udp = bytearray(struct.pack("!HHHH", 5353, 53, 8 + len(payload), 0) + payload)
    ip = packets.ipv4_header(src, dst, packets.PROTO_UDP, len(udp), ident=ident,
                             flags_frag=packets.IP_DF if df else 0)
    frame = bytearray(packets.eth_header(MAC_DST, MAC_SRC, packets.ETH_P_IP) + ip + udp)
    l4 = 14 + len(ip)
    partial_l4(frame, l4, l4 + 6, packets.PROTO_UDP)
    return VnetHdr(F_NEEDS_CSUM, gso_type, l4 + 8, size, l4, 6), bytes(frame)


def scapy_valid(frame: bytes) -> Ether:
    """Parse with scapy and assert every checksum is what scapy computes itself."""
    pkt = Ether(frame)
    again = pkt.copy()
    for layer in (IP, TCP, UDP, ICMP):
        if layer in again:
            del again[layer].chksum
    assert bytes(again) == frame, "scapy computes different checksums"
    return pkt


# --- checksums -------------------------------------------------------------------------


def valid(pkt: bytes) -> IP:
    """Parse with scapy and assert that every checksum is the one scapy computes."""
    p = IP(pkt)
    again = p.copy()
    del again[IP].chksum
    if p.flags.MF or p.frag:  # the L4 checksum covers the reassembled datagram
        assert bytes(again) == pkt, "bad IP header checksum"
        return p
    if TCP in again:
        del again[TCP].chksum
    if UDP in again and again[UDP].chksum != 0:  # 0: sent without a checksum
        del again[UDP].chksum
    if ICMP in again:
        del again[ICMP].chksum
    assert bytes(again) == pkt, "scapy computes different checksums"
    return p


def l4_field(pkt: bytes) -> int:
    """Offset of the TCP/UDP/ICMP checksum field in an IPv4 packet."""
    ihl = (pkt[0] & 15) * 4
    return ihl + {PROTO_TCP: 16, PROTO_UDP: 6, PROTO_ICMP: 2}[pkt[9]]


def make_partial(pkt: bytes) -> bytes:
    """The packet as Linux hands it over with NEEDS_CSUM: the TCP/UDP checksum field holds
    the pseudo-header sum (uncomplemented), an ICMP one 0 (no pseudo-header)."""
    b = bytearray(pkt)
    ihl = (b[0] & 15) * 4
    f = l4_field(pkt)
    if b[9] == PROTO_ICMP:
        psum = 0
    else:
        psum = checksum.pseudo_header_sum(bytes(b[12:16]), bytes(b[16:20]), b[9], len(b) - ihl)
    b[f:f + 2] = psum.to_bytes(2, "big")
    return bytes(b)


def complete(pkt: bytes) -> bytes:
    """Finish a partial checksum with fabric.net.gso on an Ethernet-framed copy."""
    frame = bytearray(packets.eth_header(b"\2" * 6, b"\4" * 6, packets.ETH_P_IP) + pkt)
    ihl = (pkt[0] & 15) * 4
    gso.complete_checksum(frame, 14 + ihl, l4_field(pkt) - ihl)
    return bytes(frame[14:])


def by_hand(pkt: bytes) -> bytes:
    """Finish a partial checksum by hand: the complement of the sum over the segment."""
    b = bytearray(pkt)
    ihl = (b[0] & 15) * 4
    f = l4_field(pkt)
    c = ~checksum.ones_sum(b[ihl:]) & 0xFFFF
    if b[9] == PROTO_UDP and c == 0:
        c = 0xFFFF
    b[f:f + 2] = c.to_bytes(2, "big")
    return bytes(b)


def completed(pkt: bytes, partial: bool) -> bytes:
    """The packet with its partial checksum (if `partial`) completed; both ways of
    completing agree."""
    if partial:
        done = complete(pkt)
        assert by_hand(pkt) == done
        pkt = done
    return pkt


def finished(pkt: bytes, partial: bool) -> bytes:
    """The packet with full checksums, checked by scapy."""
    pkt = completed(pkt, partial)
    valid(pkt)
    return pkt


# --- NAT calls on a packet inside a bigger buffer -----------------------------------------

PREFIX = bytes(range(24))  # virtio-net header + Ethernet header in front of the packet
SUFFIX = b"\xee\xee\xee"  # bytes past the packet's length (must never be touched)
Translate = Callable[[bytearray, int, int, float, bool], int]


def at_offset(fn: Translate, pkt: bytes, now: float = 0.0, partial: bool = False,
              ok: int = 0) -> tuple[int, bytes]:
    """Call a NAT's `fn(buf, off, length, now, partial)` on `pkt` embedded between PREFIX
    and SUFFIX, as the router hands packets over: its verdict and the packet afterwards.
    Asserts that nothing outside the packet changed, and that a packet whose verdict is
    not `ok` was not changed either."""
    buf = bytearray(PREFIX + pkt + SUFFIX)
    verdict = fn(buf, len(PREFIX), len(pkt), now, partial)
    assert len(buf) == len(PREFIX) + len(pkt) + len(SUFFIX)
    assert buf[:len(PREFIX)] == PREFIX and buf[len(buf) - len(SUFFIX):] == SUFFIX
    out = bytes(buf[len(PREFIX):len(PREFIX) + len(pkt)])
    if verdict != ok:
        assert out == pkt, "a packet that was not translated was changed"
    return verdict, out

