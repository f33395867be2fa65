"""Egress NAT: pods reach the outside world through the worker's egress TUN, source-NATed
to their namespace's egress address.

Pod CIDRs of different namespaces may overlap, so every namespace has its own `EgressNat`
and its own egress address; nothing here is shared between instances.

Sans-IO like the router: `outbound()` and `inbound()` take an IPv4 packet in a buffer and
the time, rewrite it in place (fixed offsets, RFC 1624 incremental checksum updates with
the per-flow constant part precomputed) and answer with a verdict. Timers are
`next_timer()` / `handle_timer(now)`; flows expire lazily from a wheel of one-second
buckets, so a call where nothing is due costs nothing.

Mapping is address-and-port dependent (RFC 4787): a flow is the pod's 5-tuple; its
external port is unique per protocol, the pod's own source port when that is free.
Replies are accepted only from the flow's remote address and port.
"""

from __future__ import annotations

import heapq
import math
import struct
from collections import deque
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

from fabric.net import checksum
from fabric.net.packets import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMP_TIME_EXCEEDED,
    ICMP_UNREACH,
    IP_MF,
    IP_OFFMASK,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
)

# Verdicts of `outbound()`.
OK = 0
DENIED = 1  # destination not allowed: the caller answers ICMP admin prohibited (3/13)
FULL = 2  # no flow slot or no free port: the caller drops and counts
UNSUPPORTED = 3  # not TCP/UDP/ICMP echo, or a later fragment with no known first one
MALFORMED = 4

FRAG_TIMEOUT = 30.0
MAX_FRAGMENTS = 4096
ICMP_PARAM_PROBLEM = 12

# translations_* count every packet translated (fragments and ICMP errors included),
# fragments_translated and icmp_errors_translated those kinds again on their own.
COUNTERS = (
    "flows_created",
    "flows_expired",
    "translations_out",
    "translations_in",
    "denied",
    "table_full",
    "no_flow",
    "unsupported",
    "malformed",
    "icmp_errors_translated",
    "fragments_translated",
)

_ICMP_ERRORS = frozenset((ICMP_UNREACH, ICMP_TIME_EXCEEDED, ICMP_PARAM_PROBLEM))
_from_bytes = int.from_bytes
_ones_sum = checksum.ones_sum
# Flow keys straight from the packet: (both addresses, both ports) as two ints, in one C
# call when the L4 header follows a 20-byte IP header.
_KEY = struct.Struct("!QI").unpack_from

# TCP flow state bits: just enough to choose a timeout.
_SYN_OUT = 1
_SYNACK_IN = 2
_EST = 4
_FIN_OUT = 8
_FIN_IN = 16
_RST = 32
# UDP flow state: a reply was seen.
_REPLIED = 1


def _delta(old: bytes, new: bytes) -> int:
    """The constant part ~m + m' of RFC 1624 eq. 3 for `old` -> `new`. A stored checksum
    HC becomes ~(~HC + delta); a partial (uncomplemented) sum S becomes S + delta."""
    return checksum.add(~_ones_sum(old) & 0xFFFF, _ones_sum(new))


class Flow:
    """One translation, in per-protocol tables under two keys of the form (source and
    destination address, source and destination port) as the packets carry them: `key`
    as the pod sends, `rkey` as replies arrive. ICMP echo uses the identifier as the
    pod's port and 0 as the remote one."""

    __slots__ = ("key", "rkey", "proto", "pod_ip", "pod_addr", "pod_pb", "ext", "ext_pb",
                 "d_ip_out", "d_l4_out", "d_ip_in", "d_l4_in", "last", "timeout", "bucket",
                 "state", "dead")

    def __init__(self, key: tuple[int, int], proto: int, egress: bytes, ext: int) -> None:
        self.key = key
        self.proto = proto
        addrs, pp = key
        pod_port = pp >> 16
        self.pod_ip = (addrs >> 32).to_bytes(4, "big")
        self.pod_addr = IPv4Address(self.pod_ip)
        self.pod_pb = pod_port.to_bytes(2, "big")
        self.ext = ext
        self.ext_pb = ext.to_bytes(2, "big")
        self.rkey = ((addrs & 0xFFFFFFFF) << 32 | _from_bytes(egress, "big"),
                     (pp & 0xFFFF) << 16 | ext)
        self.d_ip_out = _delta(self.pod_ip, egress)
        self.d_ip_in = _delta(egress, self.pod_ip)
        if proto == PROTO_ICMP:  # no pseudo-header: only the identifier counts
            self.d_l4_out = _delta(self.pod_pb, self.ext_pb)
            self.d_l4_in = _delta(self.ext_pb, self.pod_pb)
        else:
            self.d_l4_out = _delta(self.pod_ip + self.pod_pb, egress + self.ext_pb)
            self.d_l4_in = _delta(egress + self.ext_pb, self.pod_ip + self.pod_pb)
        self.last = 0.0
        self.timeout = 0.0
        self.bucket = 0
        self.state = 0
        self.dead = False


class _PortPool:
    """External ports (or ICMP identifiers) of one protocol, O(1) amortised.

    Never-used ports come from a cursor (no table of 40000 ports to build), freed ones
    from a FIFO (the least recently used is reused first, which is kind to TIME_WAIT on
    remote hosts). A preferred port may be taken out of order: it stays in the FIFO and
    is skipped when popped; `queued` keeps a port from being queued twice."""

    __slots__ = ("lo", "hi", "cursor", "free", "queued", "used")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo = lo
        self.hi = hi
        self.cursor = lo
        self.free: deque[int] = deque()
        self.queued: set[int] = set()
        self.used: set[int] = set()

    def take(self, want: int) -> int:
        """A free port, `want` if it is in range and free; -1 when exhausted."""
        used = self.used
        if self.lo <= want <= self.hi and want not in used:
            used.add(want)
            return want
        while self.cursor <= self.hi:
            p = self.cursor
            self.cursor = p + 1
            if p not in used:
                used.add(p)
                return p
        free = self.free
        while free:
            p = free.popleft()
            self.queued.discard(p)
            if p not in used:
                used.add(p)
                return p
        return -1

    def release(self, p: int) -> None:
        self.used.discard(p)
        # Ports at or past the cursor will be handed out by the cursor.
        if p < self.cursor and p not in self.queued:
            self.queued.add(p)
            self.free.append(p)

    def __len__(self) -> int:
        return len(self.used)


class EgressNat:
    """Source NAT of one namespace's pods to `egress_ip` (see module docstring)."""

    def __init__(
        self,
        egress_ip: IPv4Address | str,
        allow: Iterable[IPv4Network | str],
        *,
        port_range: tuple[int, int] = (20000, 59999),
        max_flows: int = 65536,
        tcp_established_timeout: float = 7440.0,
        tcp_transitory_timeout: float = 240.0,
        udp_timeout: float = 60.0,
        udp_unreplied_timeout: float = 30.0,
        icmp_timeout: float = 30.0,
        max_fragments: int = MAX_FRAGMENTS,
    ) -> None:
        lo, hi = port_range
        if not 1 <= lo <= hi <= 0xFFFF:
            raise ValueError(f"bad port range {port_range}")
        if max_flows < 1 or max_fragments < 1:
            raise ValueError("max_flows and max_fragments must be positive")
        self.egress_ip = IPv4Address(egress_ip)
        self._eip = self.egress_ip.packed
        self.set_allow(allow)
        self.port_range = (lo, hi)
        self.max_flows = max_flows
        self.max_fragments = max_fragments
        self.tcp_established_timeout = tcp_established_timeout
        self.tcp_transitory_timeout = tcp_transitory_timeout
        self.udp_timeout = udp_timeout
        self.udp_unreplied_timeout = udp_unreplied_timeout
        self.icmp_timeout = icmp_timeout
        self._pools = {p: _PortPool(lo, hi) for p in (PROTO_TCP, PROTO_UDP, PROTO_ICMP)}
        self._fwd: dict[int, dict[tuple[int, int], Flow]] = {p: {} for p in self._pools}
        self._rev: dict[int, dict[tuple[int, int], Flow]] = {p: {} for p in self._pools}
        self._flows = 0
        # (proto, src|dst, IP id) of a first fragment seen -> (flow, expiry); insertion
        # order is expiry order, so the oldest entry is the first.
        self._frag_out: dict[tuple[int, int, int], tuple[Flow, float]] = {}
        self._frag_in: dict[tuple[int, int, int], tuple[Flow, float]] = {}
        # Timer wheel: whole second -> flows whose deadline was at most that when scheduled
        # (activity since then only moves deadlines later), plus a heap of the seconds that
        # have a bucket (each once).
        self._buckets: dict[int, dict[Flow, None]] = {}
        self._wheel: list[int] = []
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    # --- queries ---------------------------------------------------------------------------

    @property
    def flows(self) -> int:
        return self._flows

    def set_allow(self, allow: Iterable[IPv4Network | str]) -> None:
        """Change the allow list (a config reload); existing flows keep going."""
        self.allow = tuple(IPv4Network(n) for n in allow)
        self._allow = tuple((int(n.network_address), int(n.netmask)) for n in self.allow)
        self._allow_all = any(mask == 0 for _, mask in self._allow)

    def allowed(self, dst: bytes) -> bool:
        """True when the 4 address bytes `dst` are inside the allow list."""
        if self._allow_all:
            return True
        d = _from_bytes(dst, "big")
        for net, mask in self._allow:
            if d & mask == net:
                return True
        return False

    def ports_in_use(self, proto: int) -> int:
        return len(self._pools[proto])

    # --- pod -> outside --------------------------------------------------------------------

    def outbound(self, pkt: bytearray, off: int, length: int, now: float,
                 partial: bool) -> int:
        """Translate pkt[off:off+length], an IPv4 packet from a pod, in place; a verdict.

        `partial`: the frame has virtio-net NEEDS_CSUM, so the TCP/UDP checksum field holds
        the pseudo-header sum, which covers the addresses but not the ports."""
        ip = off
        counters = self.counters
        if off < 0 or length < 20 or off + length > len(pkt):
            counters["malformed"] += 1
            return MALFORMED
        vihl = pkt[ip]
        ihl = (vihl & 15) << 2
        total = pkt[ip + 2] << 8 | pkt[ip + 3]
        if vihl >> 4 != 4 or ihl < 20 or total < ihl or total > length:
            counters["malformed"] += 1
            return MALFORMED
        if not self._allow_all and not self.allowed(pkt[ip + 16:ip + 20]):
            counters["denied"] += 1
            return DENIED
        proto = pkt[ip + 9]
        ff = pkt[ip + 6] << 8 | pkt[ip + 7]
        if ff & IP_OFFMASK:
            return self._later_fragment_out(pkt, ip, proto, now)
        l4 = ip + ihl
        n4 = total - ihl
        if proto == PROTO_TCP:
            need, cf, pf = 20, l4 + 16, l4
        elif proto == PROTO_UDP:
            need, cf, pf = 8, l4 + 6, l4
        elif proto == PROTO_ICMP:
            if n4 < 8:
                counters["malformed"] += 1
                return MALFORMED
            t = pkt[l4]
            if t in _ICMP_ERRORS and not ff & IP_MF:
                return self._icmp_error_out(pkt, ip, l4, total, partial)
            if t != ICMP_ECHO_REQUEST:
                counters["unsupported"] += 1
                return UNSUPPORTED
            need, cf, pf = 8, l4 + 2, l4 + 4
        else:
            counters["unsupported"] += 1
            return UNSUPPORTED
        if n4 < need:
            counters["malformed"] += 1
            return MALFORMED
        if proto == PROTO_ICMP:
            key = (_from_bytes(pkt[ip + 12:ip + 20], "big"), (pkt[pf] << 8 | pkt[pf + 1]) << 16)
        elif ihl == 20:
            key = _KEY(pkt, ip + 12)
        else:
            key = (_from_bytes(pkt[ip + 12:ip + 20], "big"), _from_bytes(pkt[l4:l4 + 4], "big"))
        flow = self._fwd[proto].get(key)
        if flow is None:
            flow = self._create(key, proto, now)
            if flow is None:
                return FULL
        flow.last = now
        pkt[ip + 12:ip + 16] = self._eip
        c = ((pkt[ip + 10] << 8 | pkt[ip + 11]) ^ 0xFFFF) + flow.d_ip_out
        c = ((c & 0xFFFF) + (c >> 16)) ^ 0xFFFF
        pkt[ip + 10] = c >> 8
        pkt[ip + 11] = c & 0xFF
        pkt[pf:pf + 2] = flow.ext_pb
        c = pkt[cf] << 8 | pkt[cf + 1]
        if partial:
            if proto != PROTO_ICMP:  # ICMP has no pseudo-header: nothing to update
                c += flow.d_ip_out
                c = (c & 0xFFFF) + (c >> 16)
                pkt[cf] = c >> 8
                pkt[cf + 1] = c & 0xFF
        elif c or proto != PROTO_UDP:  # a UDP checksum of 0 means "none" and stays 0
            c = ((c ^ 0xFFFF) + flow.d_l4_out)
            c = ((c & 0xFFFF) + (c >> 16)) ^ 0xFFFF
            if c == 0 and proto == PROTO_UDP:
                c = 0xFFFF
            pkt[cf] = c >> 8
            pkt[cf + 1] = c & 0xFF
        if proto == PROTO_TCP:
            f = pkt[l4 + 13]
            if f & (TCP_SYN | TCP_FIN | TCP_RST) or not flow.state & _EST:
                self._tcp_out(flow, f)
        counters["translations_out"] += 1
        if ff & IP_MF:
            self._remember(self._frag_out, (proto, key[0], pkt[ip + 4] << 8 | pkt[ip + 5]),
                           flow, now)
            counters["fragments_translated"] += 1
        return OK

    def _later_fragment_out(self, pkt: bytearray, ip: int, proto: int, now: float) -> int:
        """A fragment without the L4 header: only the address changes."""
        fkey = (proto, _from_bytes(pkt[ip + 12:ip + 20], "big"), pkt[ip + 4] << 8 | pkt[ip + 5])
        flow = self._fragment_flow(self._frag_out, fkey, now)
        if flow is None:
            self.counters["unsupported"] += 1
            return UNSUPPORTED
        flow.last = now
        pkt[ip + 12:ip + 16] = self._eip
        self._adjust16(pkt, ip + 10, flow.d_ip_out)
        self.counters["translations_out"] += 1
        self.counters["fragments_translated"] += 1
        return OK

    def _icmp_error_out(self, pkt: bytearray, ip: int, l4: int, total: int,
                        partial: bool) -> int:
        """An ICMP error from a pod (or its gateway) about a packet that came in through a
        flow: the quote carries the pod's address and port as the destination."""
        inner, il4 = self._quote(pkt, ip, l4, total)
        if inner < 0:
            self.counters["malformed"] += 1
            return MALFORMED
        if inner == 0 or pkt[inner + 9] not in (PROTO_TCP, PROTO_UDP):
            self.counters["unsupported"] += 1
            return UNSUPPORTED
        iproto = pkt[inner + 9]
        key = (_from_bytes(pkt[inner + 16:inner + 20] + pkt[inner + 12:inner + 16], "big"),
               _from_bytes(pkt[il4 + 2:il4 + 4] + pkt[il4:il4 + 2], "big"))
        flow = self._fwd[iproto].get(key)
        if flow is None:
            self.counters["unsupported"] += 1
            return UNSUPPORTED
        old = bytes(pkt[inner:il4 + 8])
        pkt[inner + 16:inner + 20] = self._eip
        self._adjust16(pkt, inner + 10, flow.d_ip_out)
        pkt[il4 + 2:il4 + 4] = flow.ext_pb
        if iproto == PROTO_UDP:
            self._adjust_udp(pkt, il4 + 6, flow.d_l4_out)
        if not partial:
            self._set16(pkt, l4 + 2, checksum.adjust(self._get16(pkt, l4 + 2), old,
                                                     bytes(pkt[inner:il4 + 8])))
        old_src = bytes(pkt[ip + 12:ip + 16])
        pkt[ip + 12:ip + 16] = self._eip
        self._set16(pkt, ip + 10, checksum.adjust(self._get16(pkt, ip + 10), old_src,
                                                  self._eip))
        self.counters["translations_out"] += 1
        self.counters["icmp_errors_translated"] += 1
        return OK

    def _create(self, key: tuple[int, int], proto: int, now: float) -> Flow | None:
        if self._flows >= self.max_flows:
            self.expire(now)
            if self._flows >= self.max_flows:
                self.counters["table_full"] += 1
                return None
        pool = self._pools[proto]
        want = key[1] >> 16
        ext = pool.take(want)
        if ext < 0:
            self.expire(now)
            ext = pool.take(want)
            if ext < 0:
                self.counters["table_full"] += 1
                return None
        flow = Flow(key, proto, self._eip, ext)
        flow.last = now
        if proto == PROTO_TCP:
            flow.timeout = self.tcp_transitory_timeout
        elif proto == PROTO_UDP:
            flow.timeout = self.udp_unreplied_timeout
        else:
            flow.timeout = self.icmp_timeout
        self._fwd[proto][key] = flow
        self._rev[proto][flow.rkey] = flow
        self._flows += 1
        self._schedule(flow, now + flow.timeout)
        self.counters["flows_created"] += 1
        return flow

    # --- outside -> pod --------------------------------------------------------------------

    def inbound(self, pkt: bytearray, off: int, length: int, now: float,
                partial: bool) -> IPv4Address | None:
        """Translate pkt[off:off+length], an IPv4 packet from the TUN, back to a pod in
        place; the pod's address, or None when no flow (or nothing sane) matches."""
        ip = off
        counters = self.counters
        if off < 0 or length < 20 or off + length > len(pkt):
            counters["malformed"] += 1
            return None
        vihl = pkt[ip]
        ihl = (vihl & 15) << 2
        total = pkt[ip + 2] << 8 | pkt[ip + 3]
        if (vihl >> 4 != 4 or ihl < 20 or total < ihl or total > length
                or _from_bytes(pkt[ip:ip + ihl], "big") % 0xFFFF):
            counters["malformed"] += 1
            return None
        if pkt[ip + 16:ip + 20] != self._eip:
            counters["no_flow"] += 1
            return None
        proto = pkt[ip + 9]
        ff = pkt[ip + 6] << 8 | pkt[ip + 7]
        if ff & IP_OFFMASK:
            return self._later_fragment_in(pkt, ip, proto, now)
        l4 = ip + ihl
        n4 = total - ihl
        if proto == PROTO_TCP:
            need, cf, pf = 20, l4 + 16, l4 + 2
        elif proto == PROTO_UDP:
            need, cf, pf = 8, l4 + 6, l4 + 2
        elif proto == PROTO_ICMP:
            if n4 < 8:
                counters["malformed"] += 1
                return None
            t = pkt[l4]
            if t in _ICMP_ERRORS and not ff & IP_MF:
                return self._icmp_error_in(pkt, ip, l4, total, partial)
            if t != ICMP_ECHO_REPLY:
                counters["unsupported"] += 1
                return None
            need, cf, pf = 8, l4 + 2, l4 + 4
        else:
            counters["unsupported"] += 1
            return None
        if n4 < need:
            counters["malformed"] += 1
            return None
        if proto == PROTO_ICMP:
            rkey = (_from_bytes(pkt[ip + 12:ip + 20], "big"), pkt[pf] << 8 | pkt[pf + 1])
        elif ihl == 20:
            rkey = _KEY(pkt, ip + 12)
        else:
            rkey = (_from_bytes(pkt[ip + 12:ip + 20], "big"), _from_bytes(pkt[l4:l4 + 4], "big"))
        flow = self._rev[proto].get(rkey)
        if flow is None:
            counters["no_flow"] += 1
            return None
        if ff & IP_MF:
            self._remember(self._frag_in, (proto, _from_bytes(pkt[ip + 12:ip + 20], "big"),
                                           pkt[ip + 4] << 8 | pkt[ip + 5]), flow, now)
            counters["fragments_translated"] += 1
        flow.last = now
        pkt[ip + 16:ip + 20] = flow.pod_ip
        c = ((pkt[ip + 10] << 8 | pkt[ip + 11]) ^ 0xFFFF) + flow.d_ip_in
        c = ((c & 0xFFFF) + (c >> 16)) ^ 0xFFFF
        pkt[ip + 10] = c >> 8
        pkt[ip + 11] = c & 0xFF
        pkt[pf:pf + 2] = flow.pod_pb
        c = pkt[cf] << 8 | pkt[cf + 1]
        if partial:
            if proto != PROTO_ICMP:
                c += flow.d_ip_in
                c = (c & 0xFFFF) + (c >> 16)
                pkt[cf] = c >> 8
                pkt[cf + 1] = c & 0xFF
        elif c or proto != PROTO_UDP:
            c = ((c ^ 0xFFFF) + flow.d_l4_in)
            c = ((c & 0xFFFF) + (c >> 16)) ^ 0xFFFF
            if c == 0 and proto == PROTO_UDP:
                c = 0xFFFF
            pkt[cf] = c >> 8
            pkt[cf + 1] = c & 0xFF
        if proto == PROTO_TCP:
            f = pkt[l4 + 13]
            if f & (TCP_SYN | TCP_FIN | TCP_RST) or not flow.state & _EST:
                self._tcp_in(flow, f)
        elif proto == PROTO_UDP and not flow.state:
            flow.state = _REPLIED
            flow.timeout = self.udp_timeout  # longer: the lazy wheel re-checks it
        counters["translations_in"] += 1
        return flow.pod_addr

    def _later_fragment_in(self, pkt: bytearray, ip: int, proto: int,
                           now: float) -> IPv4Address | None:
        fkey = (proto, _from_bytes(pkt[ip + 12:ip + 20], "big"), pkt[ip + 4] << 8 | pkt[ip + 5])
        flow = self._fragment_flow(self._frag_in, fkey, now)
        if flow is None:
            self.counters["no_flow"] += 1
            return None
        flow.last = now
        pkt[ip + 16:ip + 20] = flow.pod_ip
        self._adjust16(pkt, ip + 10, flow.d_ip_in)
        self.counters["translations_in"] += 1
        self.counters["fragments_translated"] += 1
        return flow.pod_addr

    def _icmp_error_in(self, pkt: bytearray, ip: int, l4: int, total: int,
                       partial: bool) -> IPv4Address | None:
        """An ICMP error about a packet a flow sent: the quote (IP header + 8 bytes) has the
        egress address and external port as its source; give them back to the pod, so
        path-MTU discovery and traceroute work behind the NAT."""
        inner, il4 = self._quote(pkt, ip, l4, total)
        if inner < 0:
            self.counters["malformed"] += 1
            return None
        if inner == 0 or pkt[inner + 12:inner + 16] != self._eip:
            self.counters["no_flow"] += 1
            return None
        iproto = pkt[inner + 9]
        # The quote is as the flow sent it; a reply carries the swapped addresses and ports.
        addrs = _from_bytes(pkt[inner + 16:inner + 20] + pkt[inner + 12:inner + 16], "big")
        if iproto == PROTO_TCP or iproto == PROTO_UDP:
            rkey = (addrs, _from_bytes(pkt[il4 + 2:il4 + 4] + pkt[il4:il4 + 2], "big"))
            pf = il4
        elif iproto == PROTO_ICMP and pkt[il4] == ICMP_ECHO_REQUEST:
            rkey = (addrs, pkt[il4 + 4] << 8 | pkt[il4 + 5])
            pf = il4 + 4
        else:
            self.counters["no_flow"] += 1
            return None
        flow = self._rev[iproto].get(rkey)
        if flow is None:
            self.counters["no_flow"] += 1
            return None
        old = bytes(pkt[inner:il4 + 8])
        pkt[inner + 12:inner + 16] = flow.pod_ip
        self._adjust16(pkt, inner + 10, flow.d_ip_in)
        pkt[pf:pf + 2] = flow.pod_pb
        if iproto == PROTO_UDP:
            self._adjust_udp(pkt, il4 + 6, flow.d_l4_in)
        elif iproto == PROTO_ICMP:
            self._adjust16(pkt, il4 + 2, flow.d_l4_in)
        # (A quoted TCP checksum lies beyond the 8 bytes and cannot be kept valid.)
        if not partial:
            self._set16(pkt, l4 + 2, checksum.adjust(self._get16(pkt, l4 + 2), old,
                                                     bytes(pkt[inner:il4 + 8])))
        pkt[ip + 16:ip + 20] = flow.pod_ip
        self._adjust16(pkt, ip + 10, flow.d_ip_in)
        self.counters["translations_in"] += 1
        self.counters["icmp_errors_translated"] += 1
        return flow.pod_addr

    # --- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _quote(pkt: bytearray, ip: int, l4: int, total: int) -> tuple[int, int]:
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

    @staticmethod
    def _get16(pkt: bytearray, i: int) -> int:
        return pkt[i] << 8 | pkt[i + 1]

    @staticmethod
    def _set16(pkt: bytearray, i: int, v: int) -> None:
        pkt[i] = v >> 8
        pkt[i + 1] = v & 0xFF

    @staticmethod
    def _adjust16(pkt: bytearray, i: int, delta: int) -> None:
        """Apply a precomputed RFC 1624 delta to the stored checksum at pkt[i:i+2]."""
        c = ((pkt[i] << 8 | pkt[i + 1]) ^ 0xFFFF) + delta
        c = ((c & 0xFFFF) + (c >> 16)) ^ 0xFFFF
        pkt[i] = c >> 8
        pkt[i + 1] = c & 0xFF

    @staticmethod
    def _adjust_udp(pkt: bytearray, i: int, delta: int) -> None:
        """Like _adjust16 for a UDP checksum: 0 (none) stays 0, a computed 0 is sent as
        0xFFFF."""
        c = pkt[i] << 8 | pkt[i + 1]
        if c:
            c = ((c ^ 0xFFFF) + delta)
            c = ((c & 0xFFFF) + (c >> 16)) ^ 0xFFFF or 0xFFFF
            pkt[i] = c >> 8
            pkt[i + 1] = c & 0xFF

    def _remember(self, table: dict[tuple[int, int, int], tuple[Flow, float]],
                  fkey: tuple[int, int, int], flow: Flow, now: float) -> None:
        """Note a first fragment's flow for the later fragments; the oldest entry goes when
        the table is full."""
        if table.pop(fkey, None) is None and len(table) >= self.max_fragments:
            del table[next(iter(table))]
        table[fkey] = (flow, now + FRAG_TIMEOUT)

    @staticmethod
    def _fragment_flow(table: dict[tuple[int, int, int], tuple[Flow, float]],
                       fkey: tuple[int, int, int], now: float) -> Flow | None:
        entry = table.get(fkey)
        if entry is None:
            return None
        flow, expires = entry
        if expires <= now or flow.dead:
            del table[fkey]
            return None
        return flow

    # --- TCP state -----------------------------------------------------------------------------

    def _tcp_out(self, flow: Flow, f: int) -> None:
        st = old = flow.state
        if f & TCP_RST:
            st |= _RST
        elif f & TCP_SYN:
            if not f & TCP_ACK and st & (_EST | _FIN_OUT | _FIN_IN | _RST):
                st = _SYN_OUT  # the 5-tuple is reused for a new connection
            else:
                st |= _SYN_OUT
        else:
            if f & TCP_ACK and st & _SYNACK_IN:
                st |= _EST
            if f & TCP_FIN:
                st |= _FIN_OUT
        if st != old:
            flow.state = st
            self._retime(flow)

    def _tcp_in(self, flow: Flow, f: int) -> None:
        st = old = flow.state
        if f & TCP_RST:
            st |= _RST
        elif f & TCP_SYN:
            if f & TCP_ACK:
                st |= _SYNACK_IN
        else:
            if f & TCP_ACK and not st & (_SYN_OUT | _SYNACK_IN | _EST | _RST):
                st |= _EST  # picked up mid-stream (e.g. after a restart): both sides talk
            if f & TCP_FIN:
                st |= _FIN_IN
        if st != old:
            flow.state = st
            self._retime(flow)

    def _retime(self, flow: Flow) -> None:
        st = flow.state
        if st & _RST or (st & _FIN_OUT and st & _FIN_IN) or not st & _EST:
            t = self.tcp_transitory_timeout
        else:
            t = self.tcp_established_timeout
        flow.timeout = t
        due = flow.last + t
        # A later deadline is found lazily when the bucket fires; an earlier one must move.
        if math.ceil(due) < flow.bucket:
            bucket = self._buckets.get(flow.bucket)
            if bucket is not None:
                bucket.pop(flow, None)
            self._schedule(flow, due)

    # --- timers ------------------------------------------------------------------------------

    def _schedule(self, flow: Flow, due: float) -> None:
        k = math.ceil(due)
        bucket = self._buckets.get(k)
        if bucket is None:
            bucket = self._buckets[k] = {}
            heapq.heappush(self._wheel, k)
        bucket[flow] = None
        flow.bucket = k

    def expire(self, now: float) -> int:
        """Remove flows idle past their timeout (and stale fragment entries); how many
        flows went. Only buckets that are due are visited; a flow that was active since
        it was scheduled moves to the bucket of its new deadline."""
        n = 0
        wheel = self._wheel
        buckets = self._buckets
        while wheel and wheel[0] <= now:
            bucket = buckets.pop(heapq.heappop(wheel), None)
            if not bucket:
                continue
            for flow in bucket:
                due = flow.last + flow.timeout
                if due <= now:
                    self._remove(flow)
                    n += 1
                else:
                    self._schedule(flow, due)
        for table in (self._frag_out, self._frag_in):
            while table:
                k = next(iter(table))
                if table[k][1] > now:
                    break
                del table[k]
        self.counters["flows_expired"] += n
        return n

    def _remove(self, flow: Flow) -> None:
        del self._fwd[flow.proto][flow.key]
        del self._rev[flow.proto][flow.rkey]
        self._flows -= 1
        self._pools[flow.proto].release(flow.ext)
        flow.dead = True

    def next_timer(self) -> float | None:
        """When `handle_timer` next has something to do (at most a second late)."""
        wheel = self._wheel
        buckets = self._buckets
        while wheel and not buckets.get(wheel[0]):
            buckets.pop(heapq.heappop(wheel), None)
        t: float | None = float(wheel[0]) if wheel else None
        for table in (self._frag_out, self._frag_in):
            if table:
                d = table[next(iter(table))][1]
                t = d if t is None or d < t else t
        return t

    def handle_timer(self, now: float) -> None:
        self.expire(now)
