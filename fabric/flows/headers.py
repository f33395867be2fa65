"""Where a packet's transport fields are: the one header parse every NAT starts with.

``Headers.parse`` reads an IPv4 packet in place (no copies, no objects per packet: each
NAT keeps one ``Headers`` and reuses it) and says what kind of packet it is, leaving the
offsets the translation needs in its slots. The kinds are what the NATs decide on:

- ``MALFORMED``: not a sane IPv4 header inside the given bounds
- ``FRAGMENT``: a later fragment (no L4 header: only addresses can be translated)
- ``SHORT``: a first fragment or whole packet too short for its L4 header
- ``TRANSPORT``: TCP or UDP with its header; ``cf`` is the checksum field
- ``ECHO``: an ICMP echo request or reply (the identifier at l4+4 plays the port)
- ``ICMP_ERROR``: destination unreachable, time exceeded or parameter problem, not
  fragmented (its quote can be translated)
- ``OTHER``: any other protocol or ICMP type
"""

from __future__ import annotations

import struct
from typing import Final

from fabric.net.packets import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMP_ERRORS,
    IP_MF,
    IP_OFFMASK,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
)

MALFORMED: Final = 0
FRAGMENT: Final = 1
SHORT: Final = 2
TRANSPORT: Final = 3
ECHO: Final = 4
ICMP_ERROR: Final = 5
OTHER: Final = 6

# Flow keys straight from the packet: (both addresses, both ports) as two ints, in one C
# call when the L4 header follows a 20-byte IP header.
_KEY = struct.Struct("!QI").unpack_from
_from_bytes = int.from_bytes
_ECHOES = (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY)


def ip_total(pkt: bytearray, off: int, length: int) -> int:
    """The total length of the IPv4 packet at pkt[off:off+length], or 0 when its header
    is not a sane IPv4 header inside those bounds."""
    if off < 0 or length < 20 or off + length > len(pkt):
        return 0
    vihl = pkt[off]
    ihl = (vihl & 15) << 2
    total = pkt[off + 2] << 8 | pkt[off + 3]
    if vihl >> 4 != 4 or ihl < 20 or total < ihl or total > length:
        return 0
    return total


class Headers:
    """The offsets of the packet last parsed (see module docstring)."""

    __slots__ = ("ip", "ihl", "total", "proto", "ff", "l4", "cf")

    def __init__(self) -> None:
        self.ip = self.ihl = self.total = self.proto = self.ff = self.l4 = self.cf = 0

    def parse(self, pkt: bytearray, off: int, length: int) -> int:
        total = ip_total(pkt, off, length)
        if not total:
            return MALFORMED
        ihl = (pkt[off] & 15) << 2
        proto = pkt[off + 9]
        ff = pkt[off + 6] << 8 | pkt[off + 7]
        l4 = off + ihl
        self.ip = off
        self.ihl = ihl
        self.total = total
        self.proto = proto
        self.ff = ff
        self.l4 = l4
        if ff & IP_OFFMASK:
            return FRAGMENT
        n4 = total - ihl
        if proto == PROTO_TCP:
            self.cf = l4 + 16
            return TRANSPORT if n4 >= 20 else SHORT
        if proto == PROTO_UDP:
            self.cf = l4 + 6
            return TRANSPORT if n4 >= 8 else SHORT
        if proto == PROTO_ICMP:
            if n4 < 8:
                return SHORT
            self.cf = l4 + 2
            t = pkt[l4]
            if t in _ECHOES:
                return ECHO
            if t in ICMP_ERRORS and not ff & IP_MF:
                return ICMP_ERROR
        return OTHER

    def key(self, pkt: bytearray) -> tuple[int, int]:
        """The flow key of a TRANSPORT packet: (addresses, ports) as it travels."""
        ip = self.ip
        if self.ihl == 20:
            return _KEY(pkt, ip + 12)
        l4 = self.l4
        return (_from_bytes(pkt[ip + 12:ip + 20], "big"), _from_bytes(pkt[l4:l4 + 4], "big"))

    def echo_key(self, pkt: bytearray) -> tuple[int, int]:
        """The flow key of an ECHO packet: a request carries its identifier as the source
        port, a reply as the destination port (see fabric.flows.table)."""
        ip = self.ip
        l4 = self.l4
        ident = pkt[l4 + 4] << 8 | pkt[l4 + 5]
        addrs = _from_bytes(pkt[ip + 12:ip + 20], "big")
        return (addrs, ident << 16) if pkt[l4] == ICMP_ECHO_REQUEST else (addrs, ident)
