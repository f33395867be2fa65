"""Connection tracking for services: 5-tuple -> backend, with the NAT rewrite of each flow.

Sans-IO and per service. A `Conn` is one flow as the client sent it (`key`, the original
direction) and as the backend answers it (`rkey`, the reply direction). Keys have the form
egress uses (gateway/egress.py): (source and destination address as one int, source and
destination port as one int), in one table per protocol.

Each `Conn` carries its rewrite precomputed both ways: the 8 address bytes and 4 port bytes
a packet gets, and the RFC 1624 deltas (gateway.egress._delta) for the IP header checksum
(addresses only) and for a complete TCP/UDP checksum (addresses and ports). A NEEDS_CSUM
partial sum covers the addresses but not the ports, so it takes the IP delta.

TCP is tracked through the handshake, FIN from each side and RST: a connection is *open*
from its first packet until both FINs or a RST were seen; then it stays (not open) for
`tcp_closed_timeout` so retransmitted FINs and last ACKs are still translated. UDP flows
are open until they have been idle for their timeout (longer once both sides spoke).
`open` counts open flows, which is what service demand (idle detection) looks at.

The table is bounded: when it is full, due flows are expired, then the oldest closed TCP
flow is evicted; if nothing can go, `add()` refuses (counted). Expiry uses a wheel of
one-second buckets like egress: a flow is visited when its bucket is due, and activity
since it was scheduled only moves it to a later bucket.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator

from fabric.net.packets import PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from gateway.egress import _delta

# TCP state bits.
SYN_ORIG = 1  # the client sent SYN
SYN_REPLY = 2  # the backend answered SYN+ACK
ESTABLISHED = 4
FIN_ORIG = 8
FIN_REPLY = 16
RST = 32
# UDP state bits.
REPLIED = 1

FRAG_TIMEOUT = 30.0
MAX_FRAGMENTS = 1024

COUNTERS = ("created", "expired", "evicted", "closed", "table_full")


class Conn:
    """One tracked flow and its translation (see module docstring).

    `fwd_addrs`/`fwd_ports`: what a client packet's addresses and ports become;
    `rev_addrs`/`rev_ports`: what a backend reply's become (the original tuple swapped).
    `orig_addrs`/`orig_ports`: the tuple as the client sent it."""

    __slots__ = ("key", "rkey", "proto", "backend", "hairpin", "orig_addrs", "orig_ports",
                 "fwd_addrs", "fwd_ports", "fwd_dip", "fwd_dl4", "rev_addrs", "rev_ports",
                 "rev_dip", "rev_dl4", "state", "open", "last", "timeout", "bucket", "dead")

    def __init__(self, proto: int, orig_addrs: bytes, orig_ports: bytes, fwd_addrs: bytes,
                 fwd_ports: bytes, backend: object, hairpin: bool) -> None:
        self.proto = proto
        self.backend = backend
        self.hairpin = hairpin
        self.orig_addrs = orig_addrs
        self.orig_ports = orig_ports
        self.fwd_addrs = fwd_addrs
        self.fwd_ports = fwd_ports
        self.key = (int.from_bytes(orig_addrs, "big"), int.from_bytes(orig_ports, "big"))
        # Replies come from the translated destination to the translated source.
        reply_addrs = fwd_addrs[4:] + fwd_addrs[:4]
        reply_ports = fwd_ports[2:] + fwd_ports[:2]
        self.rkey = (int.from_bytes(reply_addrs, "big"), int.from_bytes(reply_ports, "big"))
        self.rev_addrs = orig_addrs[4:] + orig_addrs[:4]
        self.rev_ports = orig_ports[2:] + orig_ports[:2]
        self.fwd_dip = _delta(orig_addrs, fwd_addrs)
        self.fwd_dl4 = _delta(orig_addrs + orig_ports, fwd_addrs + fwd_ports)
        self.rev_dip = _delta(reply_addrs, self.rev_addrs)
        self.rev_dl4 = _delta(reply_addrs + reply_ports, self.rev_addrs + self.rev_ports)
        self.state = 0
        self.open = True
        self.last = 0.0
        self.timeout = 0.0
        self.bucket = 0
        self.dead = False

    @property
    def closed(self) -> bool:
        return not self.open


class Conntrack:
    """A bounded flow table with TCP state and a timing wheel (see module docstring).

    `on_remove(conn)` is called for every flow that leaves the table (expired, evicted or
    removed), after it is gone."""

    def __init__(
        self,
        max_entries: int = 65536,
        *,
        tcp_syn_timeout: float = 120.0,
        tcp_established_timeout: float = 7440.0,
        tcp_closed_timeout: float = 10.0,
        udp_timeout: float = 30.0,
        udp_stream_timeout: float = 120.0,
        max_fragments: int = MAX_FRAGMENTS,
        on_remove: Callable[[Conn], None] | None = None,
    ) -> None:
        if max_entries < 1 or max_fragments < 1:
            raise ValueError("max_entries and max_fragments must be positive")
        self.max_entries = max_entries
        self.max_fragments = max_fragments
        self.tcp_syn_timeout = tcp_syn_timeout
        self.tcp_established_timeout = tcp_established_timeout
        self.tcp_closed_timeout = tcp_closed_timeout
        self.udp_timeout = udp_timeout
        self.udp_stream_timeout = udp_stream_timeout
        self.on_remove = on_remove
        self.fwd: dict[int, dict[tuple[int, int], Conn]] = {PROTO_TCP: {}, PROTO_UDP: {}}
        self.rev: dict[int, dict[tuple[int, int], Conn]] = {PROTO_TCP: {}, PROTO_UDP: {}}
        self.entries = 0
        self.open = 0
        # Closed TCP flows in the order they closed: the first to evict when full.
        self._closed: dict[Conn, None] = {}
        # (proto, addresses, IP id) of a first fragment -> (conn, expiry), per direction;
        # insertion order is expiry order.
        self.frag_fwd: dict[tuple[int, int, int], tuple[Conn, float]] = {}
        self.frag_rev: dict[tuple[int, int, int], tuple[Conn, float]] = {}
        self._buckets: dict[int, dict[Conn, None]] = {}
        self._wheel: list[int] = []
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    def __len__(self) -> int:
        return self.entries

    def __iter__(self) -> Iterator[Conn]:
        for table in self.fwd.values():
            yield from list(table.values())

    # --- lookups and changes ---------------------------------------------------------------

    def get(self, proto: int, key: tuple[int, int]) -> Conn | None:
        table = self.fwd.get(proto)
        return table.get(key) if table is not None else None

    def get_reply(self, proto: int, rkey: tuple[int, int]) -> Conn | None:
        table = self.rev.get(proto)
        return table.get(rkey) if table is not None else None

    def add(self, conn: Conn, now: float) -> bool:
        """Insert a flow (its key and reply key must be free); False when the table is full
        and nothing could be expired or evicted."""
        if self.entries >= self.max_entries:
            self.expire(now)
            if self.entries >= self.max_entries:
                if not self._closed:
                    self.counters["table_full"] += 1
                    return False
                self.remove(next(iter(self._closed)))
                self.counters["evicted"] += 1
        fwd = self.fwd[conn.proto]
        rev = self.rev[conn.proto]
        if conn.key in fwd or conn.rkey in rev:
            raise ValueError("flow already tracked")
        fwd[conn.key] = conn
        rev[conn.rkey] = conn
        conn.last = now
        conn.timeout = self.tcp_syn_timeout if conn.proto == PROTO_TCP else self.udp_timeout
        self.entries += 1
        self.open += 1
        self._schedule(conn, now + conn.timeout)
        self.counters["created"] += 1
        return True

    def remove(self, conn: Conn) -> None:
        if conn.dead:
            return
        del self.fwd[conn.proto][conn.key]
        del self.rev[conn.proto][conn.rkey]
        bucket = self._buckets.get(conn.bucket)
        if bucket is not None:
            bucket.pop(conn, None)
        self.entries -= 1
        if conn.open:
            conn.open = False
            self.open -= 1
        self._closed.pop(conn, None)
        conn.dead = True
        if self.on_remove is not None:
            self.on_remove(conn)

    def reply_taken(self, proto: int, rkey: tuple[int, int]) -> bool:
        return rkey in self.rev[proto]

    # --- state -----------------------------------------------------------------------------

    def tcp_orig(self, conn: Conn, flags: int) -> None:
        """A TCP segment from the client (call only for SYN/FIN/RST or before ESTABLISHED)."""
        st = old = conn.state
        if flags & TCP_RST:
            st |= RST
        elif flags & TCP_SYN:
            st |= SYN_ORIG
        else:
            if flags & TCP_ACK and st & SYN_REPLY:
                st |= ESTABLISHED
            if flags & TCP_FIN:
                st |= FIN_ORIG
        if st != old:
            conn.state = st
            self._retime(conn)

    def tcp_reply(self, conn: Conn, flags: int) -> None:
        """A TCP segment from the backend."""
        st = old = conn.state
        if flags & TCP_RST:
            st |= RST
        elif flags & TCP_SYN:
            if flags & TCP_ACK:
                st |= SYN_REPLY
        else:
            if flags & TCP_ACK and not st & (SYN_ORIG | SYN_REPLY):
                st |= ESTABLISHED  # picked up mid-stream
            if flags & TCP_FIN:
                st |= FIN_REPLY
        if st != old:
            conn.state = st
            self._retime(conn)

    def udp_reply(self, conn: Conn) -> None:
        if not conn.state & REPLIED:
            conn.state |= REPLIED
            conn.timeout = self.udp_stream_timeout  # longer: the lazy wheel re-checks it

    @staticmethod
    def fresh_syn(conn: Conn, flags: int) -> bool:
        """A client SYN reusing the tuple of a closed connection: a new connection."""
        return (not conn.open and flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN)

    def _retime(self, conn: Conn) -> None:
        st = conn.state
        if st & RST or (st & FIN_ORIG and st & FIN_REPLY):
            t = self.tcp_closed_timeout
            if conn.open:
                conn.open = False
                self.open -= 1
                self._closed[conn] = None
                self.counters["closed"] += 1
        elif st & ESTABLISHED:
            t = self.tcp_established_timeout
        else:
            t = self.tcp_syn_timeout
        conn.timeout = t
        due = conn.last + t
        # A later deadline is found lazily when the bucket fires; an earlier one must move.
        if math.ceil(due) < conn.bucket:
            bucket = self._buckets.get(conn.bucket)
            if bucket is not None:
                bucket.pop(conn, None)
            self._schedule(conn, due)

    # --- fragments -------------------------------------------------------------------------

    def remember_fragment(self, table: dict[tuple[int, int, int], tuple[Conn, float]],
                          fkey: tuple[int, int, int], conn: Conn, now: float) -> None:
        """Note a first fragment's flow for its later fragments (oldest goes when full)."""
        if table.pop(fkey, None) is None and len(table) >= self.max_fragments:
            del table[next(iter(table))]
        table[fkey] = (conn, now + FRAG_TIMEOUT)

    @staticmethod
    def fragment_conn(table: dict[tuple[int, int, int], tuple[Conn, float]],
                      fkey: tuple[int, int, int], now: float) -> Conn | None:
        entry = table.get(fkey)
        if entry is None:
            return None
        conn, expires = entry
        if expires <= now or conn.dead:
            del table[fkey]
            return None
        return conn

    # --- timers ----------------------------------------------------------------------------

    def _schedule(self, conn: Conn, due: float) -> None:
        k = math.ceil(due)
        bucket = self._buckets.get(k)
        if bucket is None:
            bucket = self._buckets[k] = {}
            heapq.heappush(self._wheel, k)
        bucket[conn] = None
        conn.bucket = k

    def expire(self, now: float) -> int:
        """Remove flows idle past their timeout and stale fragment entries; how many flows
        went."""
        n = 0
        wheel = self._wheel
        buckets = self._buckets
        while wheel and wheel[0] <= now:
            bucket = buckets.pop(heapq.heappop(wheel), None)
            if not bucket:
                continue
            for conn in list(bucket):
                due = conn.last + conn.timeout
                if due <= now:
                    conn.bucket = 0
                    self.remove(conn)
                    n += 1
                else:
                    self._schedule(conn, due)
        for table in (self.frag_fwd, self.frag_rev):
            while table:
                k = next(iter(table))
                if table[k][1] > now:
                    break
                del table[k]
        self.counters["expired"] += n
        return n

    def next_timer(self) -> float | None:
        """When `expire` next has something to do (at most a second late)."""
        wheel = self._wheel
        buckets = self._buckets
        while wheel and not buckets.get(wheel[0]):
            buckets.pop(heapq.heappop(wheel), None)
        t: float | None = float(wheel[0]) if wheel else None
        for table in (self.frag_fwd, self.frag_rev):
            if table:
                d = table[next(iter(table))][1]
                t = d if t is None or d < t else t
        return t
