"""The flow table every NAT of the fabric shares: egress SNAT and service DNAT.

A ``Flow`` is one translated connection. It knows its tuple as the originator sent it
(``orig_*``), what the originator's packets become (``fwd_*``) and what the other side's
replies become (``rev_*``, the original tuple swapped), with the RFC 1624 checksum deltas
of both rewrites precomputed (``*_dip`` for addresses only: the IP header and partial
L4 sums; ``*_dl4`` for a complete TCP/UDP checksum: addresses and ports). It is found by
``key`` (the originator's packets) or ``rkey`` (replies), both of the form packets carry:
(source and destination address as one int, source and destination port as one int), in
one table per protocol. ICMP echo flows use the identifier as the source port on the way
out (so replies carry it as their destination port).

``FlowTable`` holds them, bounded, and does for both users what is the same:
- lookup, insertion with bounds and eviction, removal with an ``on_remove`` hook;
- translating a packet of a known flow either way (``forward``/``reverse``), tracking
  TCP through ``tcpstate`` and UDP's first reply, remembering first fragments so later
  fragments (no L4 header) follow them (``readdress_fragment``);
- expiry on a ``TimingWheel`` (one-second resolution), with the timeout of each state;
- ``open``: how many flows are still open (TCP not closed, UDP not expired), which is
  what a service's idle detection looks at.

What differs between egress and services is a ``FlowPolicy``: the limits, the timeout of
each phase and whether a full table evicts the oldest closed TCP flow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fabric.flows import tcpstate
from fabric.flows.rewrite import delta, readdress, rewrite, rewrite_echo, translate_icmp_error
from fabric.flows.wheel import TimingWheel
from fabric.net.packets import IP_MF, PROTO_ICMP, PROTO_TCP, PROTO_UDP

FRAGMENT_TIMEOUT = 30.0
UDP_REPLIED = 1  # UDP flow state once the other side answered

COUNTERS = ("created", "expired", "evicted", "closed", "table_full")

_CLOSED = tcpstate.CLOSED
_TIMEOUT_CLASS = tcpstate.TIMEOUT_CLASS
_advance = tcpstate.advance
_may_change = tcpstate.may_change


@dataclass(frozen=True, slots=True)
class FlowPolicy:
    """What one user of the flow table wants: bounds, timeouts (seconds) and eviction."""

    max_flows: int = 65536
    tcp_syn: float = 120.0  # opening (SYN seen, or picked up mid-stream)
    tcp_established: float = 7440.0  # also half-closed (RFC 5382: 2 h 4 min)
    tcp_closed: float = 10.0  # FIN both ways or RST: stragglers only
    udp_unreplied: float = 30.0
    udp_replied: float = 120.0
    icmp: float = 30.0
    evict_closed: bool = True  # a full table evicts its oldest closed TCP flow first
    max_fragments: int = 1024  # first fragments remembered per direction
    fragment_timeout: float = FRAGMENT_TIMEOUT

    def __post_init__(self) -> None:
        if self.max_flows < 1 or self.max_fragments < 1:
            raise ValueError("max_flows and max_fragments must be positive")
        for name in ("tcp_syn", "tcp_established", "tcp_closed", "udp_unreplied",
                     "udp_replied", "icmp", "fragment_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")

    def tcp_timeout(self, state: int) -> float:
        return (self.tcp_syn, self.tcp_established, self.tcp_closed)[_TIMEOUT_CLASS[state]]


class Flow:
    """One translated flow (see module docstring). `tag` is the user's: the backend of a
    service flow, the external port of an egress flow."""

    __slots__ = ("proto", "key", "rkey", "orig_addrs", "orig_ports", "fwd_addrs", "fwd_ports",
                 "fwd_dip", "fwd_dl4", "rev_addrs", "rev_ports", "rev_dip", "rev_dl4", "state",
                 "last", "timeout", "bucket", "dead", "tag")

    def __init__(self, proto: int, orig_addrs: bytes, orig_ports: bytes, fwd_addrs: bytes,
                 fwd_ports: bytes, tag: Any = None) -> None:
        self.proto = proto
        self.tag = tag
        self.orig_addrs = orig_addrs
        self.orig_ports = orig_ports
        self.fwd_addrs = fwd_addrs
        self.fwd_ports = fwd_ports
        self.key = (int.from_bytes(orig_addrs, "big"), int.from_bytes(orig_ports, "big"))
        # Replies come from the translated destination to the translated source, and
        # become the original tuple swapped.
        reply_addrs = fwd_addrs[4:] + fwd_addrs[:4]
        reply_ports = fwd_ports[2:] + fwd_ports[:2]
        self.rkey = (int.from_bytes(reply_addrs, "big"), int.from_bytes(reply_ports, "big"))
        self.rev_addrs = orig_addrs[4:] + orig_addrs[:4]
        self.rev_ports = orig_ports[2:] + orig_ports[:2]
        self.fwd_dip = delta(orig_addrs, fwd_addrs)
        self.rev_dip = delta(reply_addrs, self.rev_addrs)
        if proto == PROTO_ICMP:  # no pseudo-header: only the identifier counts
            self.fwd_dl4 = delta(orig_ports[:2], fwd_ports[:2])
            self.rev_dl4 = delta(reply_ports[2:], self.rev_ports[2:])
        else:
            self.fwd_dl4 = delta(orig_addrs + orig_ports, fwd_addrs + fwd_ports)
            self.rev_dl4 = delta(reply_addrs + reply_ports, self.rev_addrs + self.rev_ports)
        self.state = 0
        self.last = 0.0
        self.timeout = 0.0
        self.bucket = 0
        self.dead = False

    @property
    def open(self) -> bool:
        return not (self.proto == PROTO_TCP and self.state == _CLOSED)

    def __repr__(self) -> str:
        return f"Flow({self.proto}, {self.orig_addrs.hex()}:{self.orig_ports.hex()} -> " \
               f"{self.fwd_addrs.hex()}:{self.fwd_ports.hex()}, state {self.state})"


FragmentKey = tuple[int, int, int]  # (protocol, both addresses, IP id)


class FragmentTable:
    """First fragments seen in one direction -> their flow, so later fragments follow.
    Insertion order is expiry order; the oldest entry goes when full."""

    __slots__ = ("entries", "limit", "timeout", "dropped")

    def __init__(self, limit: int, timeout: float) -> None:
        self.entries: dict[FragmentKey, tuple[Flow, float]] = {}
        self.limit = limit
        self.timeout = timeout
        self.dropped = 0

    def __len__(self) -> int:
        return len(self.entries)

    def remember(self, fkey: FragmentKey, flow: Flow, now: float) -> None:
        entries = self.entries
        if entries.pop(fkey, None) is None and len(entries) >= self.limit:
            del entries[next(iter(entries))]
            self.dropped += 1
        entries[fkey] = (flow, now + self.timeout)

    def find(self, fkey: FragmentKey, now: float) -> Flow | None:
        entry = self.entries.get(fkey)
        if entry is None:
            return None
        flow, expires = entry
        if expires <= now or flow.dead:
            del self.entries[fkey]
            return None
        return flow

    def expire(self, now: float) -> None:
        entries = self.entries
        while entries:
            k = next(iter(entries))
            if entries[k][1] > now:
                break
            del entries[k]

    def next_deadline(self) -> float | None:
        entries = self.entries
        return entries[next(iter(entries))][1] if entries else None


def fragment_key(pkt: bytearray, ip: int) -> FragmentKey:
    """The key fragments of one datagram share: protocol, addresses, IP id."""
    return (pkt[ip + 9], int.from_bytes(pkt[ip + 12:ip + 20], "big"),
            pkt[ip + 4] << 8 | pkt[ip + 5])


class FlowTable:
    """Bounded flows with TCP/UDP state, fragments and expiry (see module docstring).

    `on_remove(flow)` runs for every flow that leaves the table (expired, evicted or
    removed), after it is gone. `on_close(flow, closed)` runs when a TCP flow in the
    table closes (True) or a closed one reopens (False): what a user that counts only
    open flows needs besides `on_remove` (a removed flow's `open` still says which it
    was)."""

    def __init__(self, policy: FlowPolicy | None = None,
                 on_remove: Callable[[Flow], None] | None = None,
                 on_close: Callable[[Flow, bool], None] | None = None) -> None:
        self.policy = policy = policy or FlowPolicy()
        self.on_remove = on_remove
        self.on_close = on_close
        self.fwd: dict[int, dict[tuple[int, int], Flow]] = {
            PROTO_TCP: {}, PROTO_UDP: {}, PROTO_ICMP: {}}
        self.rev: dict[int, dict[tuple[int, int], Flow]] = {
            PROTO_TCP: {}, PROTO_UDP: {}, PROTO_ICMP: {}}
        self.entries = 0
        self.open = 0
        # Closed TCP flows in the order they closed: the first to evict when full.
        self._closed: dict[Flow, None] = {}
        self.frag_orig = FragmentTable(policy.max_fragments, policy.fragment_timeout)
        self.frag_reply = FragmentTable(policy.max_fragments, policy.fragment_timeout)
        self.wheel: TimingWheel[Flow] = TimingWheel(_deadline)
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    def __len__(self) -> int:
        return self.entries

    def __iter__(self) -> Iterator[Flow]:
        for table in self.fwd.values():
            yield from list(table.values())

    # --- lookups and changes ---------------------------------------------------------------

    def get(self, proto: int, key: tuple[int, int]) -> Flow | None:
        table = self.fwd.get(proto)
        return table.get(key) if table is not None else None

    def get_reply(self, proto: int, rkey: tuple[int, int]) -> Flow | None:
        table = self.rev.get(proto)
        return table.get(rkey) if table is not None else None

    def reply_taken(self, proto: int, rkey: tuple[int, int]) -> bool:
        return rkey in self.rev[proto]

    def make_room(self, now: float) -> bool:
        """Whether a flow can be added, expiring due flows and (if the policy says so)
        evicting the oldest closed TCP flow when the table is full."""
        if self.entries < self.policy.max_flows:
            return True
        self.expire(now)
        if self.entries < self.policy.max_flows:
            return True
        if self.policy.evict_closed and self._closed:
            self.remove(next(iter(self._closed)))
            self.counters["evicted"] += 1
            return True
        self.counters["table_full"] += 1
        return False

    def add(self, flow: Flow, now: float) -> bool:
        """Insert a flow (its key and reply key must be free); False when the table is
        full and nothing could be expired or evicted."""
        if not self.make_room(now):
            return False
        fwd = self.fwd[flow.proto]
        rev = self.rev[flow.proto]
        if flow.key in fwd or flow.rkey in rev:
            raise ValueError("flow already tracked")
        fwd[flow.key] = flow
        rev[flow.rkey] = flow
        flow.last = now
        p = self.policy
        proto = flow.proto
        flow.timeout = (p.tcp_syn if proto == PROTO_TCP else
                        p.udp_unreplied if proto == PROTO_UDP else p.icmp)
        self.entries += 1
        self.open += 1
        self.wheel.schedule(flow, now + flow.timeout)
        self.counters["created"] += 1
        return True

    def remove(self, flow: Flow) -> None:
        if flow.dead:
            return
        del self.fwd[flow.proto][flow.key]
        del self.rev[flow.proto][flow.rkey]
        self.wheel.discard(flow)
        self.entries -= 1
        if flow.open:
            self.open -= 1
        self._closed.pop(flow, None)
        flow.dead = True
        if self.on_remove is not None:
            self.on_remove(flow)

    # --- translating packets of known flows -----------------------------------------------

    def forward(self, flow: Flow, pkt: bytearray, ip: int, l4: int, cf: int, ff: int,
                now: float, partial: bool) -> None:
        """Translate an originator's packet in place and track it. `cf` is the L4
        checksum's offset, `ff` the IP flags and fragment offset field."""
        flow.last = now
        proto = flow.proto
        if proto == PROTO_ICMP:
            rewrite_echo(pkt, ip, l4, partial, flow.fwd_addrs, flow.fwd_ports[:2],
                         flow.fwd_dip, flow.fwd_dl4)
        else:
            rewrite(pkt, ip, l4, cf, proto == PROTO_UDP, partial, flow.fwd_addrs,
                    flow.fwd_ports, flow.fwd_dip, flow.fwd_dl4)
            if proto == PROTO_TCP:
                f = pkt[l4 + 13]
                if _may_change(flow.state, f):
                    self.track_tcp(flow, tcpstate.ORIG, f)
        if ff & IP_MF:  # more fragments: the rest follows this one
            self.frag_orig.remember((proto, flow.key[0], pkt[ip + 4] << 8 | pkt[ip + 5]),
                                    flow, now)

    def reverse(self, flow: Flow, pkt: bytearray, ip: int, l4: int, cf: int, ff: int,
                now: float, partial: bool) -> None:
        """Translate a reply in place (back to the original tuple) and track it."""
        flow.last = now
        proto = flow.proto
        if ff & IP_MF:
            self.frag_reply.remember(
                (proto, int.from_bytes(pkt[ip + 12:ip + 20], "big"),
                 pkt[ip + 4] << 8 | pkt[ip + 5]), flow, now)
        if proto == PROTO_ICMP:
            rewrite_echo(pkt, ip, l4, partial, flow.rev_addrs, flow.rev_ports[2:],
                         flow.rev_dip, flow.rev_dl4)
            return
        rewrite(pkt, ip, l4, cf, proto == PROTO_UDP, partial, flow.rev_addrs, flow.rev_ports,
                flow.rev_dip, flow.rev_dl4)
        if proto == PROTO_TCP:
            f = pkt[l4 + 13]
            if _may_change(flow.state, f):
                self.track_tcp(flow, tcpstate.REPLY, f)
        elif not flow.state:
            flow.state = UDP_REPLIED
            flow.timeout = self.policy.udp_replied  # later: the lazy wheel re-checks it

    def readdress_fragment(self, table: FragmentTable, pkt: bytearray, ip: int,
                           now: float) -> Flow | None:
        """A later fragment (no L4 header) of a datagram whose first fragment went through
        a flow, in the direction `table` keeps: readdressed in place, or None."""
        flow = table.find(fragment_key(pkt, ip), now)
        if flow is None:
            return None
        flow.last = now
        if table is self.frag_orig:
            readdress(pkt, ip, flow.fwd_addrs, flow.fwd_dip)
        else:
            readdress(pkt, ip, flow.rev_addrs, flow.rev_dip)
        return flow

    # --- state ---------------------------------------------------------------------------

    def track_tcp(self, flow: Flow, direction: int, flags: int) -> None:
        """Advance a TCP flow's state; a new state gets its own timeout."""
        old = flow.state
        st = _advance(old, direction, flags)
        if st == old:
            return
        flow.state = st
        if st == _CLOSED:
            self.open -= 1
            self._closed[flow] = None
            self.counters["closed"] += 1
            if self.on_close is not None:
                self.on_close(flow, True)
        elif old == _CLOSED:  # reopened
            self.open += 1
            self._closed.pop(flow, None)
            if self.on_close is not None:
                self.on_close(flow, False)
        t = self.policy.tcp_timeout(st)
        flow.timeout = t
        self.wheel.move_earlier(flow, flow.last + t)

    # --- timers ----------------------------------------------------------------------------

    def expire(self, now: float) -> int:
        """Remove flows idle past their timeout and stale fragment entries; how many flows
        went."""
        gone = self.wheel.expire(now)
        for flow in gone:
            self.remove(flow)
        self.frag_orig.expire(now)
        self.frag_reply.expire(now)
        self.counters["expired"] += len(gone)
        return len(gone)

    def next_timer(self) -> float | None:
        """When ``expire`` next has something to do (flows at most a second late)."""
        t = self.wheel.next_deadline()
        for frags in (self.frag_orig, self.frag_reply):
            d = frags.next_deadline()
            if d is not None and (t is None or d < t):
                t = d
        return t

    def stats(self) -> dict[str, int]:
        return {**self.counters, "flows": self.entries, "open": self.open,
                "fragments": len(self.frag_orig) + len(self.frag_reply),
                "fragments_dropped": self.frag_orig.dropped + self.frag_reply.dropped}


def error_to_origin(flow: Flow, pkt: bytearray, ip: int, l4: int, total: int, partial: bool,
                    inner: int, il4: int) -> None:
    """An ICMP error about a packet the flow forwarded (quoting it translated) travels back
    to the originator: the quote becomes the packet as the originator sent it, the outer
    destination the originator, and an outer source that is the translated peer the
    original one (an error from a router on the way keeps its address)."""
    src = bytes(pkt[ip + 12:ip + 16])
    if src == flow.fwd_addrs[4:]:
        src = flow.orig_addrs[4:]
    translate_icmp_error(pkt, ip, l4, total, partial, inner, il4, flow.orig_addrs,
                         flow.orig_ports, src + flow.orig_addrs[:4])


def error_to_peer(flow: Flow, pkt: bytearray, ip: int, l4: int, total: int, partial: bool,
                  inner: int, il4: int) -> None:
    """An ICMP error the originator's side sent about a reply of the flow (quoting it as
    delivered) travels on to the peer: the quote becomes the reply as the peer sent it,
    and the error goes from the translated originator to the peer."""
    fwd = flow.fwd_addrs
    ports = flow.fwd_ports
    translate_icmp_error(pkt, ip, l4, total, partial, inner, il4, fwd[4:] + fwd[:4],
                         ports[2:] + ports[:2], fwd)


def _deadline(flow: Flow) -> float:
    return flow.last + flow.timeout
