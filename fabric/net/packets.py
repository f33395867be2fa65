"""Parsing and building Ethernet, ARP, IPv4, ICMP, TCP and UDP with slices and struct.

The router's per-packet path reads fields at fixed offsets itself; these helpers are
for the slow path (replies, errors, segmentation) and for tests. Builders return
complete frames with correct checksums.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from fabric.net import checksum

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_HLEN = 14

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17

ARP_REQUEST = 1
ARP_REPLY = 2

ICMP_ECHO_REPLY = 0
ICMP_UNREACH = 3
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11
ICMP_PARAM_PROBLEM = 12
# ICMP errors that quote the packet they are about (what NATs must translate).
ICMP_ERRORS = frozenset((ICMP_UNREACH, ICMP_TIME_EXCEEDED, ICMP_PARAM_PROBLEM))
UNREACH_NET = 0
UNREACH_HOST = 1
UNREACH_PORT = 3
UNREACH_FRAG_NEEDED = 4
UNREACH_ADMIN = 13

IP_DF = 0x4000
IP_MF = 0x2000
IP_OFFMASK = 0x1FFF

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_CWR = 0x80

BROADCAST_MAC = b"\xff" * 6

_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IP = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_TCP = struct.Struct("!HHIIBBHHH")
_ICMP = struct.Struct("!BBHHH")


class Malformed(ValueError):
    """A frame that cannot be parsed; callers drop and count it."""


def mac_bytes(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {mac!r}")
    return bytes(int(p, 16) for p in parts)


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def ip_bytes(ip: str | ipaddress.IPv4Address) -> bytes:
    return ipaddress.IPv4Address(ip).packed


def ip_str(ip: bytes) -> str:
    return str(ipaddress.IPv4Address(ip))


# --- Ethernet -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ethernet:
    dst: bytes
    src: bytes
    ethertype: int

    @classmethod
    def parse(cls, frame: bytes | bytearray | memoryview) -> Ethernet:
        if len(frame) < ETH_HLEN:
            raise Malformed("short Ethernet frame")
        return cls(*_ETH.unpack_from(frame, 0))


def eth_header(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return _ETH.pack(dst, src, ethertype)


# --- ARP ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arp:
    op: int
    sha: bytes
    spa: bytes
    tha: bytes
    tpa: bytes

    @classmethod
    def parse(cls, payload: bytes | bytearray | memoryview) -> Arp:
        """Parse an Ethernet/IPv4 ARP packet (the part after the Ethernet header)."""
        if len(payload) < 28:
            raise Malformed("short ARP packet")
        htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(payload, 0)
        if htype != 1 or ptype != ETH_P_IP or hlen != 6 or plen != 4:
            raise Malformed("ARP not for Ethernet/IPv4")
        return cls(op, sha, spa, tha, tpa)


def arp_frame(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes, dst: bytes) -> bytes:
    return _ETH.pack(dst, sha, ETH_P_ARP) + _ARP.pack(1, ETH_P_IP, 6, 4, op, sha, spa, tha, tpa)


# --- IPv4 -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IPv4:
    ihl: int  # header length in bytes
    tos: int
    total_length: int
    ident: int
    flags_frag: int
    ttl: int
    proto: int
    check: int
    src: bytes
    dst: bytes

    @classmethod
    def parse(cls, packet: bytes | bytearray | memoryview) -> IPv4:
        if len(packet) < 20:
            raise Malformed("short IPv4 header")
        vihl, tos, total, ident, ff, ttl, proto, check, src, dst = _IP.unpack_from(packet, 0)
        ihl = (vihl & 0x0F) * 4
        if vihl >> 4 != 4 or ihl < 20 or len(packet) < ihl:
            raise Malformed("bad IPv4 version or header length")
        if total < ihl or total > len(packet):
            raise Malformed("bad IPv4 total length")
        return cls(ihl, tos, total, ident, ff, ttl, proto, check, src, dst)

    @property
    def df(self) -> bool:
        return bool(self.flags_frag & IP_DF)

    @property
    def more_fragments(self) -> bool:
        return bool(self.flags_frag & IP_MF)

    @property
    def frag_offset(self) -> int:
        """Fragment offset in bytes."""
        return (self.flags_frag & IP_OFFMASK) * 8

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags_frag & (IP_MF | IP_OFFMASK))


def ipv4_header(
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    *,
    ttl: int = 64,
    ident: int = 0,
    flags_frag: int = 0,
    tos: int = 0,
    options: bytes = b"",
) -> bytes:
    if len(options) % 4:
        raise ValueError("IPv4 options must be padded to 4 bytes")
    ihl = 20 + len(options)
    hdr = _IP.pack(0x40 | ihl // 4, tos, ihl + payload_len, ident, flags_frag, ttl, proto, 0,
                   src, dst) + options
    return hdr[:10] + checksum.checksum(hdr).to_bytes(2, "big") + hdr[12:]


def l4_checksum(src: bytes, dst: bytes, proto: int, segment: bytes | bytearray) -> int:
    """Full TCP/UDP checksum of `segment` (its checksum field must be zero)."""
    c = checksum.checksum(segment, checksum.pseudo_header_sum(src, dst, proto, len(segment)))
    if proto == PROTO_UDP and c == 0:
        return 0xFFFF
    return c


def udp_packet(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes,
               *, ttl: int = 64, ident: int = 0, flags_frag: int = IP_DF) -> bytes:
    seg = bytearray(_UDP.pack(sport, dport, 8 + len(payload), 0) + payload)
    seg[6:8] = l4_checksum(src, dst, PROTO_UDP, seg).to_bytes(2, "big")
    return ipv4_header(src, dst, PROTO_UDP, len(seg), ttl=ttl, ident=ident,
                       flags_frag=flags_frag) + bytes(seg)


def tcp_packet(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
               payload: bytes = b"", *, window: int = 65535, options: bytes = b"",
               ttl: int = 64, ident: int = 0) -> bytes:
    if len(options) % 4:
        raise ValueError("TCP options must be padded to 4 bytes")
    doff = (20 + len(options)) // 4
    seg = bytearray(_TCP.pack(sport, dport, seq, ack, doff << 4, flags, window, 0, 0)
                    + options + payload)
    seg[16:18] = l4_checksum(src, dst, PROTO_TCP, seg).to_bytes(2, "big")
    return ipv4_header(src, dst, PROTO_TCP, len(seg), ttl=ttl, ident=ident,
                       flags_frag=IP_DF) + bytes(seg)


def icmp_message(icmp_type: int, code: int, rest: int, body: bytes) -> bytes:
    """An ICMP message: type, code, checksum, the 4-byte rest-of-header, body."""
    msg = bytearray(struct.pack("!BBHI", icmp_type, code, 0, rest) + body)
    msg[2:4] = checksum.checksum(msg).to_bytes(2, "big")
    return bytes(msg)


def icmp_echo(src: bytes, dst: bytes, ident: int, seq: int, payload: bytes,
              *, reply: bool = False, ttl: int = 64) -> bytes:
    msg = icmp_message(ICMP_ECHO_REPLY if reply else ICMP_ECHO_REQUEST, 0,
                       (ident << 16) | seq, payload)
    return ipv4_header(src, dst, PROTO_ICMP, len(msg), ttl=ttl) + msg


def icmp_error(src: bytes, offending: bytes | bytearray | memoryview, icmp_type: int, code: int,
               *, mtu: int = 0) -> bytes:
    """An ICMP error from `src` about `offending` (an IPv4 packet): its header and the first
    8 bytes of its payload are quoted, as RFC 792 asks and path-MTU discovery needs."""
    ihl = (offending[0] & 0x0F) * 4
    quoted = bytes(offending[: ihl + 8])
    rest = mtu & 0xFFFF if icmp_type == ICMP_UNREACH and code == UNREACH_FRAG_NEEDED else 0
    msg = icmp_message(icmp_type, code, rest, quoted)
    return ipv4_header(src, bytes(offending[12:16]), PROTO_ICMP, len(msg), ttl=64) + msg


def is_icmp_error(packet: bytes | bytearray | memoryview, ihl: int) -> bool:
    """ICMP errors must never trigger ICMP errors (RFC 1122 3.2.2)."""
    if packet[9] != PROTO_ICMP or len(packet) < ihl + 1:
        return False
    return packet[ihl] not in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY, 13, 14, 15, 16, 17, 18)


def fragment(packet: bytes | bytearray | memoryview, mtu: int) -> list[bytes]:
    """Split an IPv4 packet (DF clear) into fragments of at most `mtu` bytes.

    Options marked "copied" go into every fragment; others only into the first.
    """
    ip = IPv4.parse(packet)
    if ip.df:
        raise ValueError("packet has DF set")
    if ip.total_length <= mtu:
        return [bytes(packet[: ip.total_length])]
    opts = bytes(packet[20: ip.ihl])
    copied = _copied_options(opts)
    payload = memoryview(packet)[ip.ihl: ip.total_length]
    base_off = ip.frag_offset
    last_mf = ip.flags_frag & IP_MF
    out: list[bytes] = []
    pos = 0
    first = True
    while pos < len(payload):
        o = opts if first else copied
        hlen = 20 + len(o)
        room = (mtu - hlen) & ~7
        if room <= 0:
            raise ValueError(f"MTU {mtu} too small to fragment")
        chunk = payload[pos: pos + room]
        more = pos + len(chunk) < len(payload)
        ff = ((base_off + pos) // 8) | (IP_MF if more or last_mf else 0)
        out.append(ipv4_header(ip.src, ip.dst, ip.proto, len(chunk), ttl=ip.ttl,
                               ident=ip.ident, flags_frag=ff, tos=ip.tos, options=o)
                   + bytes(chunk))
        pos += len(chunk)
        first = False
    return out


def _copied_options(opts: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(opts):
        t = opts[i]
        if t == 0:
            break
        if t == 1:
            i += 1
            continue
        if i + 1 >= len(opts) or opts[i + 1] < 2:
            break
        ln = opts[i + 1]
        if t & 0x80:
            out += opts[i: i + ln]
        i += ln
    while len(out) % 4:
        out.append(0)
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Ports:
    """The L4 ports (or ICMP id) of a packet, for flows and tests."""

    sport: int
    dport: int


def l4_ports(packet: bytes | bytearray | memoryview, ihl: int) -> Ports | None:
    proto = packet[9]
    if proto in (PROTO_TCP, PROTO_UDP) and len(packet) >= ihl + 4:
        sport, dport = struct.unpack_from("!HH", packet, ihl)
        return Ports(sport, dport)
    return None


def clamp_mss(packet: bytearray, max_mss: int) -> bool:
    """Lower the MSS option of a TCP SYN in place to at most `max_mss` (updating the TCP
    checksum incrementally), so connections across a smaller-MTU link never need
    fragmentation. Returns True when it changed something."""
    if len(packet) < 20 or packet[9] != PROTO_TCP or packet[6] & 0x1F or packet[7]:
        return False
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) < ihl + 20 or not packet[ihl + 13] & TCP_SYN:
        return False
    doff = (packet[ihl + 12] >> 4) * 4
    end = min(ihl + doff, len(packet))
    i = ihl + 20
    while i < end:
        kind = packet[i]
        if kind == 0:
            return False
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end or packet[i + 1] < 2:
            return False
        if kind == 2 and packet[i + 1] == 4 and i + 4 <= end:
            mss = packet[i + 2] << 8 | packet[i + 3]
            if mss <= max_mss:
                return False
            old = bytes(packet[i + 2:i + 4])
            new = max_mss.to_bytes(2, "big")
            packet[i + 2:i + 4] = new
            # Options start 20 bytes into the header, so the MSS value is 16-bit aligned.
            c = checksum.adjust(packet[ihl + 16] << 8 | packet[ihl + 17], old, new) \
                if (i - ihl) % 2 == 0 else None
            if c is None:
                seg = packet[ihl:]
                seg[16:18] = b"\0\0"
                c = l4_checksum(bytes(packet[12:16]), bytes(packet[16:20]), PROTO_TCP, seg)
            packet[ihl + 16:ihl + 18] = c.to_bytes(2, "big")
            return True
        i += packet[i + 1]
    return False
