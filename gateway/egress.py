"""Egress NAT: pods reach the outside world through the worker's egress TUN, source-NATed
to their namespace's egress address.

Pod CIDRs of different namespaces may overlap, so every namespace has its own `EgressNat`
and its own egress address; nothing here is shared between instances.

Sans-IO like the router: `outbound()` and `inbound()` take an IPv4 packet in a buffer and
the time, rewrite it in place and answer with a verdict (fabric.flows.verdicts). The
flows, their TCP/UDP state, fragments, timeouts and checksum rewriting are the fabric's
one flow engine (fabric.flows), shared with service DNAT; what is egress's own is the
allow list, the pool of external ports and its flow policy (`EGRESS_FLOWS`: long
transitory timeouts as RFC 5382 asks of a NAT, no eviction of closed flows). Timers are
`next_timer()` / `handle_timer(now)`.

Mapping is address-and-port dependent (RFC 4787): a flow is the pod's 5-tuple; its
external port is unique per protocol, the pod's own source port when that is free.
Replies are accepted only from the flow's remote address and port.

Protected destinations: the worker itself (its addresses, loopback), link-local (cloud
metadata at 169.254.169.254), the egress pool and the ranges no host routes (0/8,
multicast, 240/4) are refused to a new flow even under `egress: true`; a namespace
reaches one only through an allow entry inside that range (`169.254.169.254/32`), never
through a wider one that happens to cover it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

from fabric.flows.headers import ECHO, FRAGMENT, ICMP_ERROR, SHORT, TRANSPORT, Headers
from fabric.flows.headers import MALFORMED as MALFORMED_PACKET
from fabric.flows.rewrite import quote, quoted_key
from fabric.flows.table import Flow, FlowPolicy, FlowTable, error_to_origin, error_to_peer
from fabric.flows.verdicts import DENIED, FULL, MALFORMED, NO_FLOW, OK, UNSUPPORTED
from fabric.net.packets import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    IP_MF,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
)

__all__ = ["ALWAYS_PROTECTED", "DENIED", "EGRESS_FLOWS", "FULL", "MALFORMED", "NO_FLOW", "OK",
           "UNSUPPORTED", "EgressNat"]

# What no namespace reaches through a wide allow entry: "this network", loopback,
# link-local (the cloud metadata service), multicast and the reserved 240/4 (with the
# limited broadcast). The worker's own addresses and the egress pool join these at run time.
ALWAYS_PROTECTED: tuple[IPv4Network, ...] = tuple(IPv4Network(n) for n in (
    "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4"))

# The flow policy of egress: established TCP for 2 h 4 min and transitory TCP (opening,
# closed) for 4 min, as RFC 5382 asks of a NAT; UDP 30 s until answered, 60 s after;
# a full table refuses new flows rather than evicting closed ones.
EGRESS_FLOWS = FlowPolicy(
    max_flows=65536, tcp_syn=240.0, tcp_established=7440.0, tcp_closed=240.0,
    udp_unreplied=30.0, udp_replied=60.0, icmp=30.0, evict_closed=False, max_fragments=4096)
# One pod may hold at most this share of its namespace's flows (or of a protocol's ports),
# so a pod that opens flows without end cannot lock its neighbours out of egress.
POD_FLOW_SHARE = 0.25

# translations_* count every packet translated (fragments and ICMP errors included),
# fragments_translated and icmp_errors_translated those kinds again on their own.
COUNTERS = (
    "translations_out",
    "translations_in",
    "denied",
    "denied_protected",
    "table_full",
    "pod_quota",
    "no_flow",
    "unsupported",
    "malformed",
    "icmp_errors_translated",
    "fragments_translated",
)

_from_bytes = int.from_bytes


class PortPool:
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
        protected: Iterable[IPv4Network | str] = ALWAYS_PROTECTED,
        port_range: tuple[int, int] = (20000, 59999),
        policy: FlowPolicy = EGRESS_FLOWS,
        pod_flows: int | None = None,
    ) -> None:
        lo, hi = port_range
        if not 1 <= lo <= hi <= 0xFFFF:
            raise ValueError(f"bad port range {port_range}")
        self.egress_ip = IPv4Address(egress_ip)
        self._eip = self.egress_ip.packed
        self.protected: tuple[IPv4Network, ...] = tuple(IPv4Network(n) for n in protected)
        self.set_allow(allow)
        self.port_range = (lo, hi)
        self.policy = policy
        self._pools = {p: PortPool(lo, hi) for p in (PROTO_TCP, PROTO_UDP, PROTO_ICMP)}
        self.table = FlowTable(policy, on_remove=self._removed)
        # flows per (protocol, pod address): each protocol has its own port pool
        self.pod_flows = pod_flows if pod_flows is not None else max(
            1, int(min(policy.max_flows, hi - lo + 1) * POD_FLOW_SHARE))
        self._per_pod: dict[tuple[int, bytes], int] = {}
        self._fwd = self.table.fwd
        self._rev = self.table.rev
        self._counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._h = Headers()

    # --- queries ---------------------------------------------------------------------------

    @property
    def flows(self) -> int:
        return self.table.entries

    @property
    def counters(self) -> dict[str, int]:
        """Translations, refusals by reason, and the flow table's own counts."""
        t = self.table.counters
        return {"flows_created": t["created"], "flows_expired": t["expired"], **self._counts}

    def set_allow(self, allow: Iterable[IPv4Network | str]) -> None:
        """Change the allow list (a config reload); existing flows keep going."""
        self.allow = tuple(IPv4Network(n) for n in allow)
        self._allow = tuple((int(n.network_address), int(n.netmask)) for n in self.allow)
        self._allow_all = any(mask == 0 for _, mask in self._allow)
        self._guard()

    def set_protected(self, protected: Iterable[IPv4Network | str]) -> None:
        """Change the protected ranges (the worker's addresses moved); flows keep going."""
        self.protected = tuple(IPv4Network(n) for n in protected)
        self._guard()

    def _guard(self) -> None:
        # Per protected range, the allow entries that name (part of) it explicitly.
        self._protected = tuple(
            (int(p.network_address), int(p.netmask),
             tuple((int(a.network_address), int(a.netmask)) for a in self.allow
                   if a.subnet_of(p)))
            for p in self.protected)

    def is_protected(self, dst: bytes) -> bool:
        """True when `dst` is in a protected range that no allow entry names explicitly."""
        d = _from_bytes(dst, "big")
        for net, mask, exempt in self._protected:
            if d & mask == net:
                for anet, amask in exempt:
                    if d & amask == anet:
                        return False
                return True
        return False

    def allowed(self, dst: bytes) -> bool:
        """True when a new flow may go to the 4 address bytes `dst`."""
        if self.is_protected(dst):
            return False
        if self._allow_all:
            return True
        d = _from_bytes(dst, "big")
        for net, mask in self._allow:
            if d & mask == net:
                return True
        return False

    def _listed(self, pkt: bytearray, off: int) -> bool:
        d = _from_bytes(pkt[off + 16:off + 20], "big")
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
        h = self._h
        kind = h.parse(pkt, off, length)
        counts = self._counts
        if kind == MALFORMED_PACKET or kind == SHORT:
            counts["malformed"] += 1
            return MALFORMED
        if not self._allow_all and not self._listed(pkt, off):
            counts["denied"] += 1
            return DENIED
        if kind == TRANSPORT:
            key = h.key(pkt)
        elif kind == ECHO and pkt[h.l4] == ICMP_ECHO_REQUEST:
            key = h.echo_key(pkt)
        elif kind == FRAGMENT:
            if self.table.readdress_fragment(self.table.frag_orig, pkt, off, now) is None:
                counts["unsupported"] += 1
                return UNSUPPORTED
            counts["translations_out"] += 1
            counts["fragments_translated"] += 1
            return OK
        elif kind == ICMP_ERROR:
            return self._icmp_error_out(pkt, h, partial)
        else:
            counts["unsupported"] += 1
            return UNSUPPORTED
        flow = self._fwd[h.proto].get(key)
        if flow is None:
            if self.is_protected(pkt[off + 16:off + 20]):
                counts["denied_protected"] += 1
                return DENIED
            flow = self._create(pkt, h, now)
            if flow is None:
                return FULL
        self.table.forward(flow, pkt, off, h.l4, h.cf, h.ff, now, partial)
        counts["translations_out"] += 1
        if h.ff & IP_MF:
            counts["fragments_translated"] += 1
        return OK

    def _icmp_error_out(self, pkt: bytearray, h: Headers, partial: bool) -> int:
        """An ICMP error from a pod (or its gateway) about a packet that came in through a
        flow: the quote carries the pod's address and port as the destination."""
        inner, il4 = quote(pkt, h.ip, h.l4, h.total)
        if inner < 0:
            self._counts["malformed"] += 1
            return MALFORMED
        qk = quoted_key(pkt, inner, il4) if inner else None
        flow = self._fwd[qk[0]].get(qk[1]) if qk is not None and qk[0] != PROTO_ICMP else None
        if flow is None:
            self._counts["unsupported"] += 1
            return UNSUPPORTED
        # Whoever in the namespace sent it, it leaves from the egress address.
        error_to_peer(flow, pkt, h.ip, h.l4, h.total, partial, inner, il4)
        self._counts["translations_out"] += 1
        self._counts["icmp_errors_translated"] += 1
        return OK

    def _create(self, pkt: bytearray, h: Headers, now: float) -> Flow | None:
        table = self.table
        proto = h.proto
        who = (proto, bytes(pkt[h.ip + 12:h.ip + 16]))
        mine = self._per_pod.get(who, 0)
        if mine >= self.pod_flows:
            table.expire(now)
            mine = self._per_pod.get(who, 0)
            if mine >= self.pod_flows:
                self._counts["pod_quota"] += 1
                return None
        if not table.make_room(now):
            self._counts["table_full"] += 1
            return None
        l4 = h.l4
        pool = self._pools[proto]
        pf = l4 + 4 if proto == PROTO_ICMP else l4
        want = pkt[pf] << 8 | pkt[pf + 1]
        ext = pool.take(want)
        if ext < 0:
            table.expire(now)
            ext = pool.take(want)
            if ext < 0:
                self._counts["table_full"] += 1
                return None
        addrs = bytes(pkt[h.ip + 12:h.ip + 20])
        eb = ext.to_bytes(2, "big")
        if proto == PROTO_ICMP:  # the identifier plays the source port, 0 the other one
            orig_ports = bytes(pkt[pf:pf + 2]) + b"\0\0"
            fwd_ports = eb + b"\0\0"
        else:
            orig_ports = bytes(pkt[l4:l4 + 4])
            fwd_ports = eb + orig_ports[2:]
        flow = Flow(proto, addrs, orig_ports, self._eip + addrs[4:], fwd_ports, tag=ext)
        table.add(flow, now)
        self._per_pod[who] = mine + 1
        return flow

    def _removed(self, flow: Flow) -> None:
        self._pools[flow.proto].release(flow.tag)
        who = (flow.proto, flow.orig_addrs[:4])
        left = self._per_pod.get(who, 0) - 1
        if left > 0:
            self._per_pod[who] = left
        else:
            self._per_pod.pop(who, None)

    # --- outside -> pod --------------------------------------------------------------------

    def inbound(self, pkt: bytearray, off: int, length: int, now: float,
                partial: bool) -> int:
        """Translate pkt[off:off+length], an IPv4 packet from the TUN, back to a pod in
        place; a verdict (OK: the destination is now the pod's address)."""
        h = self._h
        kind = h.parse(pkt, off, length)
        counts = self._counts
        if (kind == MALFORMED_PACKET or kind == SHORT
                or _from_bytes(pkt[off:off + h.ihl], "big") % 0xFFFF):
            counts["malformed"] += 1
            return MALFORMED
        if pkt[off + 16:off + 20] != self._eip:
            counts["no_flow"] += 1
            return NO_FLOW
        if kind == TRANSPORT:
            rkey = h.key(pkt)
        elif kind == ECHO and pkt[h.l4] == ICMP_ECHO_REPLY:
            rkey = h.echo_key(pkt)
        elif kind == FRAGMENT:
            if self.table.readdress_fragment(self.table.frag_reply, pkt, off, now) is None:
                counts["no_flow"] += 1
                return NO_FLOW
            counts["translations_in"] += 1
            counts["fragments_translated"] += 1
            return OK
        elif kind == ICMP_ERROR:
            return self._icmp_error_in(pkt, h, partial)
        else:
            counts["unsupported"] += 1
            return UNSUPPORTED
        flow = self._rev[h.proto].get(rkey)
        if flow is None:
            counts["no_flow"] += 1
            return NO_FLOW
        self.table.reverse(flow, pkt, off, h.l4, h.cf, h.ff, now, partial)
        counts["translations_in"] += 1
        if h.ff & IP_MF:
            counts["fragments_translated"] += 1
        return OK

    def _icmp_error_in(self, pkt: bytearray, h: Headers, partial: bool) -> int:
        """An ICMP error about a packet a flow sent: the quote (IP header + 8 bytes) has the
        egress address and external port as its source; give them back to the pod, so
        path-MTU discovery and traceroute work behind the NAT."""
        inner, il4 = quote(pkt, h.ip, h.l4, h.total)
        if inner < 0:
            self._counts["malformed"] += 1
            return MALFORMED
        if inner == 0 or pkt[inner + 12:inner + 16] != self._eip:
            self._counts["no_flow"] += 1
            return NO_FLOW
        qk = quoted_key(pkt, inner, il4)
        if qk is None or (qk[0] == PROTO_ICMP and pkt[il4] != ICMP_ECHO_REQUEST):
            self._counts["no_flow"] += 1
            return NO_FLOW
        flow = self._rev[qk[0]].get(qk[1])
        if flow is None:
            self._counts["no_flow"] += 1
            return NO_FLOW
        error_to_origin(flow, pkt, h.ip, h.l4, h.total, partial, inner, il4)
        self._counts["translations_in"] += 1
        self._counts["icmp_errors_translated"] += 1
        return OK


    # --- timers ------------------------------------------------------------------------------

    def expire(self, now: float) -> int:
        """Remove flows idle past their timeout (and stale fragment entries); how many
        flows went."""
        return self.table.expire(now)

    def next_timer(self) -> float | None:
        """When `handle_timer` next has something to do (at most a second late)."""
        return self.table.next_timer()

    def handle_timer(self, now: float) -> None:
        self.expire(now)
