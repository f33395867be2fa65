"""Rewriting packets of a translated flow in place: addresses, ports, checksums, and the
quote inside ICMP errors.

Checksums are updated incrementally (RFC 1624, eq. 3) with a delta computed once per flow
(``delta(old, new)``), so translating a packet costs a few integer operations whatever
its size. Three cases matter:

- A complete TCP/UDP checksum covers the pseudo-header (addresses) and the ports: it
  takes the delta over addresses and ports.
- A partial one (virtio-net ``NEEDS_CSUM``: the field holds the pseudo-header sum, the
  kernel or NIC finishes it over the segment) covers the addresses only, uncomplemented:
  it takes the address delta, added rather than folded into the complement.
- A UDP checksum of 0 means "none" and stays 0; a computed 0 is sent as 0xFFFF.

ICMP errors quote the packet they are about (its IP header and at least 8 bytes of L4),
as it looked where the error was made. Behind a NAT that quote must be translated too,
or path-MTU discovery and traceroute break: ``translate_icmp_error`` rewrites the quoted
addresses and ports, the quoted checksums, the ICMP checksum and the outer addresses.
"""

from __future__ import annotations

from fabric.net import checksum
from fabric.net.packets import IP_OFFMASK, PROTO_ICMP, PROTO_TCP, PROTO_UDP

_ones_sum = checksum.ones_sum


def delta(old: bytes, new: bytes) -> int:
    """The constant part ~m + m' of RFC 1624 eq. 3 for `old` -> `new`. A stored checksum
    HC becomes ~(~HC + delta); a partial (uncomplemented) sum S becomes S + delta."""
    return checksum.add(~_ones_sum(old) & 0xFFFF, _ones_sum(new))


def adjust16(pkt: bytearray, i: int, d: int) -> None:
    """Apply a precomputed delta to the stored checksum at pkt[i:i+2]."""
    c = ((pkt[i] << 8 | pkt[i + 1]) ^ 0xFFFF) + d
    c = ((c & 0xFFFF) + (c >> 16)) ^ 0xFFFF
    pkt[i] = c >> 8
    pkt[i + 1] = c & 0xFF


def adjust_udp(pkt: bytearray, i: int, d: int) -> None:
    """``adjust16`` for a UDP checksum: 0 (none) stays 0, a computed 0 is sent as 0xFFFF."""
    c = pkt[i] << 8 | pkt[i + 1]
    if c:
        c = (c ^ 0xFFFF) + d
        c = ((c & 0xFFFF) + (c >> 16)) ^ 0xFFFF or 0xFFFF
        pkt[i] = c >> 8
        pkt[i + 1] = c & 0xFF


def rewrite(pkt: bytearray, ip: int, l4: int, cf: int, udp: bool, partial: bool,
            addrs: bytes, ports: bytes, dip: int, dl4: int) -> None:
    """Put a flow's translated addresses (8 bytes) and TCP/UDP ports (4 bytes) in place and
    update the IP header checksum (`dip`) and the L4 checksum at `cf` (`dl4`, or `dip`
    for a partial sum)."""
    pkt[ip + 12:ip + 20] = addrs
    c = ((pkt[ip + 10] << 8 | pkt[ip + 11]) ^ 0xFFFF) + dip
    c = ((c & 0xFFFF) + (c >> 16)) ^ 0xFFFF
    pkt[ip + 10] = c >> 8
    pkt[ip + 11] = c & 0xFF
    pkt[l4:l4 + 4] = ports
    c = pkt[cf] << 8 | pkt[cf + 1]
    if partial:
        c += dip
        c = (c & 0xFFFF) + (c >> 16)
        pkt[cf] = c >> 8
        pkt[cf + 1] = c & 0xFF
    elif c or not udp:
        c = (c ^ 0xFFFF) + dl4
        c = ((c & 0xFFFF) + (c >> 16)) ^ 0xFFFF
        if c == 0 and udp:
            c = 0xFFFF
        pkt[cf] = c >> 8
        pkt[cf + 1] = c & 0xFF


def rewrite_echo(pkt: bytearray, ip: int, l4: int, partial: bool, addrs: bytes,
                 ident: bytes, dip: int, dl4: int) -> None:
    """The same for an ICMP echo: the identifier (at l4+4) plays the port. ICMP has no
    pseudo-header, so a partial checksum needs nothing."""
    pkt[ip + 12:ip + 20] = addrs
    adjust16(pkt, ip + 10, dip)
    pkt[l4 + 4:l4 + 6] = ident
    if not partial:
        adjust16(pkt, l4 + 2, dl4)


def readdress(pkt: bytearray, ip: int, addrs: bytes, dip: int) -> None:
    """A later fragment (no L4 header): only the addresses change."""
    pkt[ip + 12:ip + 20] = addrs
    adjust16(pkt, ip + 10, dip)


def quote(pkt: bytearray, ip: int, l4: int, total: int) -> tuple[int, int]:
    """Offsets of the quoted IPv4 header and its L4 header in an ICMP error: (-1, -1)
    when malformed, (0, 0) when the quote is a later fragment (no ports to map)."""
    inner = l4 + 8
    end = ip + total
    if end - inner < 28:
        return -1, -1
    ivihl = pkt[inner]
    iihl = (ivihl & 15) << 2
    if ivihl >> 4 != 4 or iihl < 20 or inner + iihl + 8 > end:
        return -1, -1
    if (pkt[inner + 6] << 8 | pkt[inner + 7]) & IP_OFFMASK:
        return 0, 0
    return inner, inner + iihl


def quoted_key(pkt: bytearray, inner: int, il4: int) -> tuple[int, tuple[int, int]] | None:
    """(protocol, key) of the flow direction *opposite* to the quoted packet: the quote is
    a packet that went one way, the error travels back the other way, so its addresses
    and ports are swapped into the key form of the error's own direction. ICMP echo
    quotes key on their identifier (in the destination-port slot). None if the quoted
    protocol is not tracked."""
    iproto = pkt[inner + 9]
    addrs = int.from_bytes(pkt[inner + 16:inner + 20] + pkt[inner + 12:inner + 16], "big")
    if iproto == PROTO_TCP or iproto == PROTO_UDP:
        return iproto, (addrs, int.from_bytes(pkt[il4 + 2:il4 + 4] + pkt[il4:il4 + 2], "big"))
    if iproto == PROTO_ICMP and pkt[il4] in (0, 8):
        return iproto, (addrs, pkt[il4 + 4] << 8 | pkt[il4 + 5])
    return None


def translate_icmp_error(pkt: bytearray, ip: int, l4: int, total: int, partial: bool,
                         inner: int, il4: int, quote_addrs: bytes, quote_ports: bytes,
                         outer_addrs: bytes) -> None:
    """Rewrite an ICMP error in place: the quoted packet's addresses (8 bytes) and ports
    (4 bytes; for a quoted ICMP echo the first two are its identifier), the quoted IP,
    UDP, TCP (when the quote reaches it) and ICMP echo checksums, the error's own ICMP
    checksum (left alone when partial) and the outer addresses."""
    end = ip + total
    iproto = pkt[inner + 9]
    old = bytes(pkt[inner:end])
    old_addrs = old[12:20]
    pkt[inner + 12:inner + 20] = quote_addrs
    adjust16(pkt, inner + 10, delta(old_addrs, quote_addrs))
    if iproto == PROTO_ICMP:
        ident = quote_ports[:2]
        d = delta(pkt[il4 + 4:il4 + 6], ident)
        pkt[il4 + 4:il4 + 6] = ident
        adjust16(pkt, il4 + 2, d)
    else:
        d = delta(old_addrs + pkt[il4:il4 + 4], quote_addrs + quote_ports)
        pkt[il4:il4 + 4] = quote_ports
        if iproto == PROTO_UDP:
            adjust_udp(pkt, il4 + 6, d)
        elif il4 + 18 <= end:
            adjust16(pkt, il4 + 16, d)
    if not partial:
        adjust16(pkt, l4 + 2, delta(old, pkt[inner:end]))
    old_outer = bytes(pkt[ip + 12:ip + 20])
    pkt[ip + 12:ip + 20] = outer_addrs
    adjust16(pkt, ip + 10, delta(old_outer, outer_addrs))
