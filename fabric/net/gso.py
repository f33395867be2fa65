"""Software GSO: turn an offloaded frame (a TCP/UDP super-frame, or a frame whose
checksum is still partial) into frames any port can carry.

Ports that take virtio-net headers get super-frames as they are; this is the fallback
for the ones that cannot (plain captures, tunnels, ports without offloads), and the
reference the offload paths are tested against.
"""

from __future__ import annotations

import struct

from fabric.net import checksum
from fabric.net.packets import (
    ETH_HLEN,
    ETH_P_IP,
    IP_DF,
    IP_MF,
    PROTO_TCP,
    PROTO_UDP,
    TCP_CWR,
    TCP_FIN,
    TCP_PSH,
    Malformed,
    fragment,
)
from fabric.net.vnet import F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_UDP_L4, VnetHdr

_H = struct.Struct("!H")
_I = struct.Struct("!I")

# What the fabric takes as a super-frame from a pod (the router checks with gso_sane). A
# tiny gso_size turns one frame into tens of thousands of packets (half a second of
# segmenting in Python, and an amplifier toward wherever the packets go): TCP segments
# must carry at least the classic default MSS (RFC 879, 1122), a UDP GSO frame at most
# the 64 segments Linux itself allows (UDP_MAX_SEGMENTS), and no super-frame more than
# MAX_SEGMENTS segments. `segment()` itself refuses more than SEGMENT_LIMIT (a guard
# for any caller).
MIN_TCP_GSO = 536
MIN_UDP_GSO = 8
MAX_SEGMENTS = 128
MAX_UDP_SEGMENTS = 64
SEGMENT_LIMIT = 8192


def gso_sane(gso_type: int, gso_size: int, payload: int) -> bool:
    """Whether a super-frame of this GSO type, segment size and L4 payload length is one
    the fabric forwards (see MIN_TCP_GSO and friends); GSO_NONE always is."""
    gso = gso_type & ~GSO_ECN
    if gso == GSO_NONE:
        return True
    if gso == GSO_TCPV4:
        return gso_size >= MIN_TCP_GSO and payload <= gso_size * MAX_SEGMENTS
    if gso == GSO_UDP_L4:
        return gso_size >= MIN_UDP_GSO and payload <= gso_size * MAX_UDP_SEGMENTS
    if gso == GSO_UDP:  # legacy UFO: one datagram in IP fragments of gso_size
        return gso_size >= MIN_UDP_GSO and payload <= gso_size * MAX_SEGMENTS
    return False


def complete_checksum(frame: bytearray, csum_start: int, csum_offset: int) -> None:
    """Finish a NEEDS_CSUM frame in place: the field holds the pseudo-header sum, so the
    checksum is the complement of the sum from csum_start to the end."""
    field = csum_start + csum_offset
    if field + 2 > len(frame) or csum_start >= len(frame):
        raise Malformed("checksum offset outside the frame")
    c = ~checksum.ones_sum(memoryview(frame)[csum_start:]) & 0xFFFF
    # UDP transmits a computed zero as 0xFFFF; a TCP field never becomes 0 this way
    # because the pseudo-header sum it holds is non-zero.
    if c == 0 and csum_offset == 6:
        c = 0xFFFF
    _H.pack_into(frame, field, c)


def segment(frame: bytes | bytearray | memoryview, hdr: VnetHdr) -> list[bytes]:
    """Frames with complete checksums, none bigger than headers + gso_size."""
    gso = hdr.gso_type & ~GSO_ECN
    if gso == GSO_NONE:
        buf = bytearray(frame)
        if hdr.flags & F_NEEDS_CSUM:
            # The sum must start after the headers: a checksum written into them would
            # change addresses after they were checked (or the MAC the router just set).
            l4 = ETH_HLEN
            if len(buf) >= ETH_HLEN + 20 and _H.unpack_from(buf, 12)[0] == ETH_P_IP:
                l4 += (buf[ETH_HLEN] & 0x0F) * 4
            if hdr.csum_start < l4:
                raise Malformed("checksum start inside the Ethernet or IP header")
            complete_checksum(buf, hdr.csum_start, hdr.csum_offset)
        return [bytes(buf)]
    if len(frame) < ETH_HLEN + 20 or _H.unpack_from(frame, 12)[0] != ETH_P_IP:
        raise Malformed("GSO frame is not IPv4")
    if hdr.gso_size == 0:
        raise Malformed("GSO frame with gso_size 0")
    if len(frame) > hdr.gso_size * SEGMENT_LIMIT:
        raise Malformed(f"GSO frame of {len(frame)} bytes in segments of {hdr.gso_size}")
    if gso == GSO_TCPV4:
        return _segment_tcp(frame, hdr.gso_size)
    if gso == GSO_UDP_L4:
        return _segment_udp(frame, hdr.gso_size)
    if gso == GSO_UDP:
        return _fragment_udp(frame, hdr.gso_size)
    raise Malformed(f"unsupported GSO type {hdr.gso_type}")


def _ip_header(frame: bytes | bytearray | memoryview, proto: int) -> tuple[int, int]:
    ip = ETH_HLEN
    vihl = frame[ip]
    ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or ihl < 20 or len(frame) < ip + ihl or frame[ip + 9] != proto:
        raise Malformed("bad IPv4 header in GSO frame")
    total = _H.unpack_from(frame, ip + 2)[0]
    if total > len(frame) - ip or total < ihl:
        raise Malformed("bad IPv4 length in GSO frame")
    return ihl, total


def _finish_ip(seg: bytearray, ihl: int, total: int, ident: int) -> None:
    ip = ETH_HLEN
    _H.pack_into(seg, ip + 2, total)
    _H.pack_into(seg, ip + 4, ident & 0xFFFF)
    _H.pack_into(seg, ip + 10, 0)
    _H.pack_into(seg, ip + 10, checksum.checksum(memoryview(seg)[ip: ip + ihl]))


def _l4_check(seg: bytearray, ihl: int, proto: int, field: int) -> None:
    ip = ETH_HLEN
    l4 = ip + ihl
    _H.pack_into(seg, field, 0)
    mv = memoryview(seg)
    psum = checksum.pseudo_header_sum(bytes(mv[ip + 12: ip + 16]), bytes(mv[ip + 16: ip + 20]),
                                      proto, len(seg) - l4)
    c = checksum.checksum(mv[l4:], psum)
    if proto == PROTO_UDP and c == 0:
        c = 0xFFFF
    _H.pack_into(seg, field, c)


def _segment_tcp(frame: bytes | bytearray | memoryview, mss: int) -> list[bytes]:
    ihl, total = _ip_header(frame, PROTO_TCP)
    l4 = ETH_HLEN + ihl
    if len(frame) < l4 + 20:
        raise Malformed("short TCP header in GSO frame")
    doff = (frame[l4 + 12] >> 4) * 4
    if doff < 20 or l4 + doff > ETH_HLEN + total:
        raise Malformed("bad TCP header length in GSO frame")
    hlen = l4 + doff
    end = ETH_HLEN + total
    head = bytes(frame[:hlen])
    seq0 = _I.unpack_from(frame, l4 + 4)[0]
    ident0 = _H.unpack_from(frame, ETH_HLEN + 4)[0]
    flags = frame[l4 + 13]
    out: list[bytes] = []
    pos = hlen
    i = 0
    while True:
        chunk = frame[pos: min(pos + mss, end)]
        last = pos + len(chunk) >= end
        seg = bytearray(head)
        seg += chunk
        _I.pack_into(seg, l4 + 4, (seq0 + pos - hlen) & 0xFFFFFFFF)
        f = flags
        if not last:
            f &= ~(TCP_FIN | TCP_PSH)
        if i:
            f &= ~TCP_CWR
        seg[l4 + 13] = f
        _finish_ip(seg, ihl, len(seg) - ETH_HLEN, ident0 + i)
        _l4_check(seg, ihl, PROTO_TCP, l4 + 16)
        out.append(bytes(seg))
        pos += len(chunk)
        i += 1
        if last:
            return out


def _segment_udp(frame: bytes | bytearray | memoryview, size: int) -> list[bytes]:
    ihl, total = _ip_header(frame, PROTO_UDP)
    l4 = ETH_HLEN + ihl
    hlen = l4 + 8
    end = ETH_HLEN + total
    if end < hlen:
        raise Malformed("short UDP header in GSO frame")
    head = bytes(frame[:hlen])
    ident0 = _H.unpack_from(frame, ETH_HLEN + 4)[0]
    out: list[bytes] = []
    pos = hlen
    i = 0
    while pos < end or i == 0:
        chunk = frame[pos: min(pos + size, end)]
        seg = bytearray(head)
        seg += chunk
        _H.pack_into(seg, l4 + 4, 8 + len(chunk))
        _finish_ip(seg, ihl, len(seg) - ETH_HLEN, ident0 + i)
        _l4_check(seg, ihl, PROTO_UDP, l4 + 6)
        out.append(bytes(seg))
        pos += len(chunk)
        i += 1
        if not chunk:
            break
    return out


def _fragment_udp(frame: bytes | bytearray | memoryview, size: int) -> list[bytes]:
    """Legacy UFO: one UDP datagram carried as IP fragments of `size` payload bytes."""
    ihl, total = _ip_header(frame, PROTO_UDP)
    if total < ihl + 8:
        raise Malformed("short UDP header in GSO frame")
    buf = bytearray(frame[: ETH_HLEN + total])
    _l4_check(buf, ihl, PROTO_UDP, ETH_HLEN + ihl + 6)
    ip = buf[ETH_HLEN:]
    ff = _H.unpack_from(ip, 6)[0] & ~(IP_DF | IP_MF)
    _H.pack_into(ip, 6, ff)
    _H.pack_into(ip, 10, 0)
    _H.pack_into(ip, 10, checksum.checksum(memoryview(ip)[:ihl]))
    eth = bytes(buf[:ETH_HLEN])
    return [eth + f for f in fragment(ip, ihl + ((size + 7) & ~7))]
