"""When the router may send an ICMP error, and how many.

RFC 1122 3.2.2 and RFC 1812 4.3.2.7: never about an ICMP error, a later fragment, or a
packet whose source is not a single host (0.0.0.0, multicast, broadcast), so errors
cannot storm. And a namespace sends at most `rate` per second with bursts of `burst`
(a token bucket), so a pod cannot use the gateway to flood another pod with errors;
each sender has a bucket of its own too (`PER_SENDER_RATE`), so one pod sending TTL=1
cannot use up its neighbours' errors, and fragmentation-needed (what path-MTU discovery
needs) is only held to the sender's own bucket: no neighbour can black-hole it.
"""

from __future__ import annotations

from fabric.net import packets

ICMP_RATE = 1000.0  # ICMP errors per second per namespace
ICMP_BURST = 100.0
PER_SENDER_RATE = 200.0  # ... and per sender (a port)
PER_SENDER_BURST = 50.0


def must_stay_quiet(buf: bytearray, ip: int) -> bool:
    """True when the packet at `ip` must not be answered with an ICMP error."""
    ihl = (buf[ip] & 15) << 2
    if (buf[ip + 6] << 8 | buf[ip + 7]) & 0x1FFF:
        return True
    if packets.is_icmp_error(memoryview(buf)[ip:], ihl):
        return True
    src = int.from_bytes(buf[ip + 12:ip + 16], "big")
    return src == 0 or src >> 28 == 0xE


class IcmpLimiter:
    """A token bucket of ICMP errors."""

    __slots__ = ("rate", "burst", "_tokens", "_last")

    def __init__(self, rate: float = ICMP_RATE, burst: float = ICMP_BURST) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = 0.0

    def allow(self, now: float) -> bool:
        elapsed = now - self._last
        self._last = now
        self._tokens = min(self.burst, self._tokens + max(elapsed, 0.0) * self.rate)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
