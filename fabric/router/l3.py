"""In-place edits of frames on their way between framings and hops: moving the virtio-net
header when an Ethernet header is removed or added (TUN ports carry IPv4 without
Ethernet), and the TTL decrement with its incremental checksum update."""

from __future__ import annotations

import struct

from fabric.net import packets
from fabric.net.vnet import F_NEEDS_CSUM
from fabric.router.model import L3_OFF

# struct virtio_net_hdr (little-endian): flags, gso_type, hdr_len, gso_size, csum_start,
# csum_offset.
_VNET = struct.Struct("<BBHHHH")
_unpack_vnet = _VNET.unpack_from
_pack_vnet = _VNET.pack_into


def shift_vnet(buf: bytearray, src: int, dst: int, delta: int) -> None:
    """Move a virtio-net header from buf[src:] to buf[dst:], moving its offsets (which
    count from the start of the frame) by `delta` bytes, as when an Ethernet header is
    removed (-14) or added (+14) between the header and the IP packet. (One unpack and
    one pack: it runs twice per egress round trip, for every super-frame and ACK.)"""
    flags, gso_type, hdr_len, gso_size, start, offset = _unpack_vnet(buf, src)
    if hdr_len:  # (0: not given) clamped: a header from a pod may hold any value
        hdr_len = min(max(hdr_len + delta, 0), 0xFFFF)
    if flags & F_NEEDS_CSUM:
        start = min(max(start + delta, 0), 0xFFFF)
    _pack_vnet(buf, dst, flags, gso_type, hdr_len, gso_size, start, offset)


def strip_l2(frame: bytes, h: int) -> bytes:
    """An L2 frame (with an h-byte virtio-net header) as an L3 port takes it."""
    if not h:
        return frame[packets.ETH_HLEN:]
    b = bytearray(frame)
    shift_vnet(b, 0, L3_OFF, -L3_OFF)
    return bytes(b[L3_OFF:])


def decrement_ttl(buf: bytearray, ip: int) -> bool:
    """TTL - 1 with the header checksum updated as Linux does (the router's main path
    has the same lines inline, and a test holds the two to the same bytes); False when
    the packet's time is up."""
    ttl = buf[ip + 8]
    if ttl <= 1:
        return False
    buf[ip + 8] = ttl - 1
    c = (buf[ip + 10] << 8 | buf[ip + 11]) + 0x100
    c = (c + (c >= 0xFFFF)) & 0xFFFF
    buf[ip + 10] = c >> 8
    buf[ip + 11] = c & 0xFF
    return True
