"""Read a capture into IPv4 packets with their times: the harness's only file format.

A small reader of its own (not scapy) because the harness must replay 10,000 packets in
well under two seconds, and scapy spends about 100 us dissecting each one. Classic pcap
in either byte order, micro- or nanosecond stamps, with the link types tcpdump and tshark
write on Linux: Ethernet (with 802.1Q tags), raw IP, Linux cooked (SLL, SLL2) and BSD
loopback. pcapng is refused with the command that converts it. Non-IPv4 frames (ARP,
IPv6) are skipped and counted; the harness speaks IPv4 like the fabric.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC_US, MAGIC_NS, PCAPNG = 0xA1B2C3D4, 0xA1B23C4D, 0x0A0D0D0A
ETHERNET, NULL, RAW, RAW_BSD, RAW_IP4, SLL, SLL2, LOOP = 1, 0, 101, 12, 228, 113, 276, 108
ETH_IP4, ETH_VLAN, ETH_QINQ = 0x0800, 0x8100, 0x88A8
PROTO_TCP, PROTO_UDP = 6, 17
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


class CaptureError(ValueError):
    """A file the harness cannot read: one line for people, naming the file."""


@dataclass(slots=True)
class IPPacket:
    """One IPv4 packet of the capture with what the harness needs parsed out of it."""

    index: int  # position in the file (0-based), for messages
    ts: float  # capture timestamp, seconds
    data: bytes  # the whole IPv4 packet, header onwards
    proto: int
    src: str
    dst: str
    sport: int
    dport: int
    # TCP only (0 otherwise)
    seq: int = 0
    ack: int = 0
    flags: int = 0
    payload: bytes = b""


@dataclass(slots=True)
class Capture:
    packets: list[IPPacket]
    skipped: int  # frames that were not IPv4 (or were cut short)
    linktype: int


def _ip_offset(linktype: int, frame: bytes) -> int | None:
    """Where the IPv4 header starts in a frame of this link type, None if not IPv4."""
    if linktype == ETHERNET:
        off, etype = 14, int.from_bytes(frame[12:14], "big") if len(frame) >= 14 else 0
        while etype in (ETH_VLAN, ETH_QINQ) and len(frame) >= off + 4:
            etype = int.from_bytes(frame[off + 2:off + 4], "big")
            off += 4
        return off if etype == ETH_IP4 else None
    if linktype in (RAW, RAW_BSD, RAW_IP4):
        return 0 if frame[:1] and frame[0] >> 4 == 4 else None
    if linktype == SLL:
        return 16 if frame[14:16] == b"\x08\x00" else None
    if linktype == SLL2:
        return 20 if frame[0:2] == b"\x08\x00" else None
    if linktype in (NULL, LOOP):
        return 4 if frame[:1] and len(frame) > 4 and frame[4] >> 4 == 4 else None
    raise CaptureError(f"link type {linktype} is not supported (Ethernet, raw IP, "
                       "Linux cooked SLL/SLL2 or BSD loopback)")


def parse_ip(index: int, ts: float, pkt: bytes) -> IPPacket | None:
    """An IPv4 packet's addresses, ports and TCP header; None when it is too short to
    hold them (a fragment after the first is kept without ports)."""
    if len(pkt) < 20 or pkt[0] >> 4 != 4:
        return None
    ihl = (pkt[0] & 15) * 4
    total = int.from_bytes(pkt[2:4], "big")
    if total < ihl or ihl < 20:
        return None
    pkt = pkt[:total]  # Ethernet padding off
    proto = pkt[9]
    src, dst = socket.inet_ntoa(pkt[12:16]), socket.inet_ntoa(pkt[16:20])
    frag = int.from_bytes(pkt[6:8], "big") & 0x1FFF
    p = IPPacket(index, ts, pkt, proto, src, dst, 0, 0)
    l4 = pkt[ihl:]
    if frag or proto not in (PROTO_TCP, PROTO_UDP) or len(l4) < 8:
        return p
    p.sport, p.dport = struct.unpack_from("!HH", l4)
    if proto == PROTO_TCP:
        if len(l4) < 20:
            return p
        p.seq, p.ack = struct.unpack_from("!II", l4, 4)
        doff = (l4[12] >> 4) * 4
        p.flags = l4[13]
        p.payload = l4[doff:] if doff >= 20 else b""
    return p


def read_capture(path: str | Path) -> Capture:
    """Every IPv4 packet of a classic pcap file, in file order, with its time."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CaptureError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise CaptureError(f"{name}: is a directory, not a capture") from None
    except OSError as e:
        raise CaptureError(f"{name}: {e.strerror or e}") from None
    if len(data) < 24:
        raise CaptureError(f"{name}: not a pcap file ({len(data)} bytes)")
    for endian in ("<", ">"):
        (magic,) = struct.unpack_from(endian + "I", data)
        if magic in (MAGIC_US, MAGIC_NS):
            break
    else:
        if struct.unpack_from("<I", data)[0] == PCAPNG:
            raise CaptureError(f"{name}: pcapng is not supported; convert it with "
                               f"`editcap -F pcap {name} OUT.pcap`")
        raise CaptureError(f"{name}: not a pcap file (bad magic {data[:4].hex()})")
    unit = 1e-6 if magic == MAGIC_US else 1e-9
    linktype = struct.unpack_from(endian + "I", data, 20)[0] & 0xFFFF
    rec = struct.Struct(endian + "IIII")
    out: list[IPPacket] = []
    skipped = 0
    off, n, index = 24, len(data), 0
    while off + 16 <= n:
        sec, frac, incl, _orig = rec.unpack_from(data, off)
        off += 16
        frame = data[off:off + incl]
        off += incl
        if len(frame) < incl:
            skipped += 1  # the last record was cut short (an interrupted capture)
            break
        ip = _ip_offset(linktype, frame)
        p = parse_ip(index, sec + frac * unit, frame[ip:]) if ip is not None else None
        if p is None:
            skipped += 1
        else:
            out.append(p)
        index += 1
    return Capture(out, skipped, linktype)
