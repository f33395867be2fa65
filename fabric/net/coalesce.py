"""Receive-side coalescing: consecutive TCP segments of one flow, as they come out of
the tunnel, merged back into one GSO super-frame for the pod's TAP (what GRO does in a
kernel). One TAP write per 64 KiB instead of per 1.4 KB is the receiver's largest saving.

Only segments that are plainly mergeable are: same addresses, ports, TOS, TTL and DF,
no IP options or fragments, an identical TCP header apart from the sequence number (and
PSH on the last), contiguous sequence numbers, equal payload sizes (the last may be
shorter), only ACK/PSH flags. Anything else passes through unchanged.
"""

from __future__ import annotations

import struct

from fabric.net import checksum
from fabric.net.packets import PROTO_TCP, TCP_ACK, TCP_PSH
from fabric.net.vnet import F_NEEDS_CSUM, GSO_TCPV4, GSO_UDP_L4
from fabric.net.vnet import pack as vnet_pack

MAX_SUPER = 65535 - 14  # IPv4 total length bound
_I = struct.Struct("!I")


def _key(p: bytes) -> tuple[bytes, bytes, int, int] | None:
    """(addresses+ports, TCP header without seq/checksum/flags-PSH, payload start, seq)
    for a mergeable segment, else None."""
    if len(p) < 40 or p[0] != 0x45 or p[9] != PROTO_TCP:
        return None
    if (p[6] & 0x3F) or p[7]:  # MF or a fragment offset
        return None
    total = p[2] << 8 | p[3]
    thl = (p[32] >> 4) * 4
    if thl < 20 or total != len(p) or 20 + thl >= total:
        return None
    flags = p[33]
    if flags & ~(TCP_ACK | TCP_PSH) or not flags & TCP_ACK:
        return None
    seq = _I.unpack_from(p, 24)[0]
    # Everything that must match: TOS, DF/TTL, addresses, ports, ack, header length,
    # window, urgent pointer and options (the checksum and PSH may differ).
    match = (p[1:2] + p[6:7] + p[8:9] + p[12:24] + p[28:33] + p[34:36] + p[38:20 + thl])
    return match, bytes(p[12:24]), 20 + thl, seq


def coalesce(packets: list[bytes]) -> list[tuple[bytes, bytes | None]]:
    """(IPv4 packet, virtio-net header or None) in order: runs of mergeable segments
    become super-frames with a partial checksum."""
    out: list[tuple[bytes, bytes | None]] = []
    run: list[bytes] = []
    run_key: bytes | None = None
    next_seq = 0
    size = 0
    length = 0
    for p in packets:
        k = _key(p)
        if k is not None and run:
            match, _, start, seq = k
            payload = len(p) - start
            if (match == run_key and seq == next_seq and payload <= size
                    and length + payload <= MAX_SUPER and not run[-1][33] & TCP_PSH
                    and len(run[-1]) - (20 + ((run[-1][32] >> 4) * 4)) == size):
                run.append(p)
                next_seq = (seq + payload) & 0xFFFFFFFF
                length += payload
                continue
        if run:
            out.append(_flush(run, size))
            run = []
        if k is None:
            out.append((p, None))
            continue
        run = [p]
        run_key = k[0]
        size = len(p) - k[2]
        length = len(p)
        next_seq = (k[3] + size) & 0xFFFFFFFF
    if run:
        out.append(_flush(run, size))
    return out


def _flush(run: list[bytes], size: int) -> tuple[bytes, bytes | None]:
    if len(run) == 1:
        return run[0], None
    first = run[0]
    hl = 20 + (first[32] >> 4) * 4
    buf = bytearray(first[:hl])
    for p in run:
        buf += p[hl:]
    total = len(buf)
    buf[2] = total >> 8
    buf[3] = total & 0xFF
    buf[33] = run[-1][33]  # PSH of the last
    buf[10] = buf[11] = 0
    c = checksum.checksum(memoryview(buf)[:20])
    buf[10] = c >> 8
    buf[11] = c & 0xFF
    # The TCP checksum becomes partial: the pseudo-header sum, uncomplemented, which the
    # kernel (or the pod's stack, trusting CHECKSUM_PARTIAL) completes per segment.
    ps = checksum.pseudo_header_sum(bytes(buf[12:16]), bytes(buf[16:20]), PROTO_TCP,
                                    total - 20)
    buf[36] = ps >> 8
    buf[37] = ps & 0xFF
    hdr = vnet_pack(F_NEEDS_CSUM, GSO_TCPV4, 14 + hl, size, 14 + 20, 16)
    return bytes(buf), hdr


# --- small UDP datagrams on their way to a TAP ------------------------------------------

UDP_RUN_MAX = 64  # datagrams per super-frame (the kernel takes up to 128 on its own sends)
_UDP_HEAD = 10 + 14 + 28  # virtio-net header, Ethernet, IPv4 without options, UDP
# All bits of those 52 bytes but the IP id (bytes 28-29) and header checksum (34-35).
_SAME = ((1 << (8 * _UDP_HEAD)) - 1) & ~(0xFFFF << (8 * (_UDP_HEAD - 30))) \
    & ~(0xFFFF << (8 * (_UDP_HEAD - 36)))
_from_bytes = int.from_bytes


class UdpRun:
    """Consecutive datagrams of one UDP flow that the data plane forwards to one TAP in
    one wakeup, gathered into one `GSO_UDP_L4` super-frame: one write instead of one per
    datagram, and the pod's kernel cuts it back into the same datagrams (a TAP write of
    64-byte datagrams costs 3.3 µs each alone, 0.9 µs each eight at a time:
    tests/bench/tap_write_cost.py).

    Only what the kernel gives back unchanged is gathered: frames with a virtio-net
    header asking for the UDP checksum (NEEDS_CSUM at the UDP checksum, as a pod's stack
    sends over a TAP with checksum offload), IPv4 without options or fragmentation, the
    same addresses, ports, TOS, DF and TTL, IP ids one apart (the kernel numbers the
    segments so), equal payload sizes (the last may be shorter), and no padding. The
    first frame is kept as it came; a run of one is written byte for byte as it came.
    """

    __slots__ = ("frame", "count", "size", "port", "_n", "_same", "_next_id", "_short")

    def __init__(self) -> None:
        self.frame = bytearray()
        self.count = 0
        self.size = 0
        self.port: object = None
        self._n = 0  # the first frame's length
        self._same = 0  # its headers as a number, IP id and checksum masked out
        self._next_id = 0
        self._short = False

    @staticmethod
    def _eligible(buf: bytearray, n: int) -> bool:
        # vnet: NEEDS_CSUM only, no GSO, csum_start 34 and csum_offset 6 (little-endian)
        return (n > _UDP_HEAD and buf[0] == 1 and buf[1] == 0 and buf[6] == 34
                and buf[7] == 0 and buf[8] == 6 and buf[9] == 0 and buf[24] == 0x45
                and buf[33] == 17 and buf[30] & 0xBF == 0 and buf[31] == 0
                and (buf[26] << 8 | buf[27]) == n - 24
                and (buf[48] << 8 | buf[49]) == n - 44)

    def start(self, port: object, buf: bytearray, n: int) -> bool:
        """Begin a run with buf[:n] for `port`; False if the frame cannot be gathered."""
        if not self._eligible(buf, n):
            return False
        self.frame = buf[:n]
        self.count = 1
        self.size = n - _UDP_HEAD
        self.port = port
        self._n = n
        self._same = _from_bytes(buf[:_UDP_HEAD], "big") & _SAME
        self._next_id = ((buf[28] << 8 | buf[29]) + 1) & 0xFFFF
        self._short = False
        return True

    def extend(self, buf: bytearray, n: int) -> bool:
        """Append buf[:n] to the run if it continues it (else the caller writes the run
        first and starts a new one)."""
        # A datagram of the first one's size continues the run when its 52 header bytes
        # equal the first one's but for the IP id (the next one) and the IP checksum.
        if (n == self._n and not self._short and self.count < UDP_RUN_MAX
                and _from_bytes(buf[:_UDP_HEAD], "big") & _SAME == self._same
                and (buf[28] << 8 | buf[29]) == self._next_id
                and len(self.frame) + n - _UDP_HEAD <= 65535):
            self.frame += buf[_UDP_HEAD:n]  # (a slice: faster here than a memoryview)
            self.count += 1
            self._next_id = (self._next_id + 1) & 0xFFFF
            return True
        return n < self._n and self._extend_short(buf, n)

    def _extend_short(self, buf: bytearray, n: int) -> bool:
        """A shorter datagram ends the run (its lengths and partial checksum differ)."""
        size = n - _UDP_HEAD
        if (self._short or self.count >= UDP_RUN_MAX or not self._eligible(buf, n)
                or (buf[28] << 8 | buf[29]) != self._next_id
                or buf[:10] != self.frame[:10] or buf[10:26] != self.frame[10:26]
                or buf[30:34] != self.frame[30:34] or buf[36:48] != self.frame[36:48]
                or len(self.frame) + size > 65535):
            return False
        self.frame += buf[_UDP_HEAD:n]
        self.count += 1
        self._short = True
        return True

    def take(self) -> bytearray:
        """The run as one frame (a super-frame when it holds more than one datagram);
        the run is empty afterwards."""
        f = self.frame
        if self.count > 1:
            ulen = len(f) - 44
            old = bytes(f[48:50])
            new = ulen.to_bytes(2, "big")
            f[48:50] = new
            # The UDP checksum field holds the pseudo-header sum (NEEDS_CSUM), which
            # includes the UDP length; the IPv4 header checksum covers its total length.
            psum = checksum.adjust_partial(f[50] << 8 | f[51], old, new)
            f[50:52] = psum.to_bytes(2, "big")
            old_total = bytes(f[26:28])
            new_total = (ulen + 20).to_bytes(2, "big")
            f[26:28] = new_total
            c = checksum.adjust(f[34] << 8 | f[35], old_total, new_total)
            f[34:36] = c.to_bytes(2, "big")
            f[0:10] = vnet_pack(F_NEEDS_CSUM, GSO_UDP_L4, 14 + 28, self.size, 34, 6)
        self.frame = bytearray()
        self.count = 0
        self.port = None
        return f
