"""A namespace's last drops, and a live feed of them for `fabricd monitor`.

Counters say how many frames were dropped and why; an operator debugging one connection
needs which frame. The data plane hands each dropped frame's first bytes here (only on the
drop path: forwarding pays nothing). `recent` keeps the last ones, folding a burst of the
same pod and reason into one entry with a count, so a flood cannot push out the evidence
of everything else for long. Live subscribers (sinks) get each drop as it happens, each
behind its own rate limit; with no subscriber, nothing but the ring is touched.

Sans-IO: callers pass the time. Headers are decoded only when someone reads them.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import Any

HEAD_BYTES = 96  # enough for Ethernet + IPv4 with options + the L4 ports and flags
RECENT = 64  # entries per namespace for `fabricd get drops`
FOLD_SECONDS = 1.0  # the same pod and reason within this are one entry
SINK_RATE = 200.0  # drops per second per live subscriber, sustained
SINK_BURST = 400.0

_ETH_P_IP = 0x0800
_ETH_P_ARP = 0x0806
_ETH_P_IPV6 = 0x86DD
_PROTOS = {1: "icmp", 6: "tcp", 17: "udp"}
_TCP_FLAGS = "FSRPAUEC"


class Drop:
    """One ring entry: the newest frame of a burst of `count` drops."""

    __slots__ = ("ts", "last", "pod", "reason", "head", "l3", "count")

    def __init__(self, ts: float, pod: str | None, reason: str, head: bytes,
                 l3: bool) -> None:
        self.ts = ts
        self.last = ts
        self.pod = pod
        self.reason = reason
        self.head = head
        self.l3 = l3
        self.count = 1

    def to_dict(self, namespace: str) -> dict[str, Any]:
        out: dict[str, Any] = {"ts": self.last, "first": self.ts, "namespace": namespace,
                               "pod": self.pod, "reason": self.reason, "count": self.count}
        out.update(describe(self.head, self.l3))
        return out


class Sink:
    """A live subscriber: a filter, a token bucket and a callback."""

    __slots__ = ("push", "pod", "reason", "tokens", "stamp", "suppressed")

    def __init__(self, push: Callable[[dict[str, Any]], None], pod: str | None,
                 reason: str | None, now: float) -> None:
        self.push = push
        self.pod = pod
        self.reason = reason
        self.tokens = SINK_BURST
        self.stamp = now
        self.suppressed = 0

    def wants(self, pod: str | None, reason: str, now: float) -> bool:
        if (self.pod is not None and pod != self.pod) or (
                self.reason is not None and reason != self.reason):
            return False
        # A batch's `now` may be older than the sink: never let time run backwards.
        if now > self.stamp:
            tokens = min(SINK_BURST, self.tokens + (now - self.stamp) * SINK_RATE)
            self.stamp = now
        else:
            tokens = self.tokens
        if tokens < 1.0:
            self.tokens = tokens
            self.suppressed += 1
            return False
        self.tokens = tokens - 1.0
        return True


class DropLog:
    def __init__(self, namespace: str, keep: int = RECENT) -> None:
        self.namespace = namespace
        self.recent: deque[Drop] = deque(maxlen=keep)
        self.sinks: list[Sink] = []
        self.recorded = 0
        # Drops per second over the last minute, for `fabricd status`: slot = second % 60.
        self._seconds = [0] * 60
        self._counts = [0] * 60

    def record(self, pod: str | None, reason: str, head: bytes, l3: bool, now: float,
               count: int = 1) -> None:
        """A drop; `head` is the frame's first bytes (Ethernet, or IPv4 when `l3`)."""
        self.recorded += count
        sec = int(now)
        slot = sec % 60
        if self._seconds[slot] != sec:
            self._seconds[slot] = sec
            self._counts[slot] = 0
        self._counts[slot] += count
        recent = self.recent
        last = recent[-1] if recent else None
        if (last is not None and last.pod == pod and last.reason == reason
                and now - last.ts < FOLD_SECONDS):
            last.count += count
            last.last = now
            last.head = head
            last.l3 = l3
        else:
            entry = Drop(now, pod, reason, head, l3)
            entry.count = count
            recent.append(entry)
        if self.sinks:
            for sink in self.sinks:
                if sink.wants(pod, reason, now):
                    event = {"kind": "drop", "ts": now, "namespace": self.namespace,
                             "pod": pod, "reason": reason}
                    if count != 1:
                        event["count"] = count
                    if sink.suppressed:
                        event["suppressed"] = sink.suppressed  # held back since the last
                        sink.suppressed = 0
                    event.update(describe(head, l3))
                    sink.push(event)

    def last_minute(self, now: float) -> int:
        """Drops recorded in the 60 seconds up to `now`."""
        sec = int(now)
        return sum(c for s, c in zip(self._seconds, self._counts, strict=True)
                   if sec - 60 < s <= sec)

    def entries(self) -> list[dict[str, Any]]:
        """Newest first, for `fabricd get drops`."""
        return [d.to_dict(self.namespace) for d in reversed(self.recent)]


def _ip(b: bytes) -> str:
    return f"{b[0]}.{b[1]}.{b[2]}.{b[3]}"


def describe(head: bytes, l3: bool) -> dict[str, Any]:
    """The headers that matter, from whatever part of a frame is there; never raises."""
    out: dict[str, Any] = {}
    if not head:
        return out
    off = 0
    if not l3:
        if len(head) < 14:
            return {"truncated": True}
        out["src_mac"] = head[6:12].hex(":")
        out["dst_mac"] = head[0:6].hex(":")
        etype = head[12] << 8 | head[13]
        if etype == _ETH_P_ARP and len(head) >= 42:
            out["proto"] = "arp"
            out["op"] = "request" if head[21] == 1 else "reply" if head[21] == 2 else head[21]
            out["src"] = _ip(head[28:32])
            out["dst"] = _ip(head[38:42])
            return out
        if etype != _ETH_P_IP:
            out["ethertype"] = "ipv6" if etype == _ETH_P_IPV6 else f"0x{etype:04x}"
            return out
        off = 14
    ip = head[off:]
    if len(ip) < 20 or ip[0] >> 4 != 4:
        out["truncated"] = True
        return out
    ihl = (ip[0] & 15) * 4
    proto = ip[9]
    out["src"] = _ip(ip[12:16])
    out["dst"] = _ip(ip[16:20])
    out["proto"] = _PROTOS.get(proto, proto)
    out["ttl"] = ip[8]
    out["length"] = ip[2] << 8 | ip[3]
    frag = (ip[6] << 8 | ip[7]) & 0x3FFF
    if frag:
        out["fragment"] = True
    l4 = ip[ihl:] if ihl >= 20 else b""
    if frag & 0x1FFF:
        return out  # a later fragment has no L4 header
    if proto in (6, 17) and len(l4) >= 4:
        out["sport"], out["dport"] = struct.unpack_from("!HH", l4)
        if proto == 6 and len(l4) >= 14:
            flags = l4[13]
            out["flags"] = "".join(c for i, c in enumerate(_TCP_FLAGS) if flags >> i & 1)
    elif proto == 1 and len(l4) >= 2:
        out["icmp_type"], out["icmp_code"] = l4[0], l4[1]
    return out
