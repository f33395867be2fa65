"""Handing packets for pods on other workers to the tunnel.

The far side gets plain IPv4 packets that fit the tunnel: GSO super-frames are cut into
segments and partial checksums completed, TCP SYNs get their MSS clamped so the
connection never needs fragments, and a packet that is still too big is fragmented, or,
with DF set, refused so the router can answer fragmentation-needed.
"""

from __future__ import annotations

from fabric.net import gso, packets
from fabric.net.packets import IP_DF
from fabric.net.vnet import F_NEEDS_CSUM, GSO_NONE, VnetHdr


def tunnel_packets(buf: bytearray, h: int, n: int, ip: int,
                   mtu: int) -> tuple[list[bytes], bytes | None]:
    """The packets to send for the frame in buf[:n] (IPv4 at `ip`, an h-byte virtio-net
    header in front when h), and the first segment that has DF set and does not fit the
    tunnel's `mtu` (None when all fit): the router answers it with fragmentation-needed
    and sends nothing after it. Raises packets.Malformed for a bad offload header."""
    if h and (buf[1] != GSO_NONE or buf[0] & F_NEEDS_CSUM):
        segs = [f[packets.ETH_HLEN:]
                for f in gso.segment(memoryview(buf)[h:n], VnetHdr.parse(buf))]
    else:
        total = buf[ip + 2] << 8 | buf[ip + 3]
        segs = [bytes(buf[ip:ip + total])]
    out: list[bytes] = []
    for seg in segs:
        pkt = bytearray(seg)
        packets.clamp_mss(pkt, mtu - 40)
        if len(pkt) <= mtu:
            out.append(bytes(pkt))
        elif (pkt[6] << 8 | pkt[7]) & IP_DF:
            return out, bytes(pkt)
        else:
            out.extend(packets.fragment(pkt, mtu))
    return out, None
