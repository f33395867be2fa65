"""Services: a virtual IP (VIP) in front of backend pods, with scale-from-zero holding.

Sans-IO like the router and egress NAT: the router hands over IPv4 packets in its buffer
(`pkt[off:off+length]`, whatever framing sits in front left alone) with the time, and the
core rewrites them in place at fixed offsets and answers with a verdict; everything slower
(held packets, their release or rejection, signals) comes back as action objects.

Forwarding
    `outbound()` takes a packet addressed to the VIP. A packet of a known flow is
    DNATed to the backend pinned in the service's flow table (fabric.flows, the engine
    egress NAT uses too, with this module's SERVICE_FLOWS policy). A new flow to one of
    the service's ports picks a ready backend by a hash of its 5-tuple and is pinned;
    `reply()` takes a packet from a backend and rewrites its source back to VIP:port
    (NOT_OURS when it belongs to no flow: the router routes it as usual). Checksums are
    updated incrementally with deltas precomputed per flow (fabric.flows.rewrite). ICMP
    errors about a flow (either way) are translated too, quote included, and later
    fragments follow their first one.

    Services that share a backend share its reply space: a client port used toward two
    VIPs would give both flows one translated tuple, and the backend's replies could not
    tell them apart. So the services of one router share `peers` (backend address ->
    services, ``share_backends``) and a new flow keeps the client's port only when no
    service with that backend has the tuple; otherwise the port is remapped, and each
    reply matches exactly one service's table.

    One client cannot take the table: a client address (as it sent the packet, before
    any hairpin SNAT) keeps at most `client_flows` flows of a protocol open in one
    service (CLIENT_FLOW_SHARE of the table by default; closed TCP flows do not count,
    the table evicts them). A new flow past it is refused (CLIENT_QUOTA, counted
    `client_quota`) after due flows are expired; other clients still get theirs.

Hairpin
    A backend calling its own service would get a packet from itself to itself: its
    kernel drops it (a "martian" with a local source) and, even if not, would answer
    over loopback, never through the fabric, so the reply could not be un-NATed and the
    client would see a SYN-ACK from the wrong address. So when the chosen backend is the
    client itself, the source is SNATed to the VIP as well (the client's port is kept
    unless that tuple is in use): the backend sees VIP:port' -> itself:target_port,
    answers to the VIP, the router hands that packet to `outbound()` (its destination is
    the VIP), which finds it in the reply table and translates it back to
    VIP:port -> client:port. The SNAT port is never one of the service's own ports of
    that protocol, so a hairpin reply can never be mistaken for a new request.

Readiness
    A backend is ready when the controller marked it ready and, with readiness "probe",
    the fabric's own TCP connect to it succeeded. The core only keeps the state:
    `probes_due(now)` says which backends to connect to (retried every
    `probe_interval`, every millisecond while packets are held), `probe_result()` reports
    back, and `next_probe()` says when the next is due (the probe runner's deadline,
    fabric.services.probes; `next_timer()` leaves probes out). Only ready backends
    get new flows; a backend going unready keeps its existing flows until they end; a
    removed backend loses its flows.

Holding and release order
    While no backend is ready, packets of new flows are held in arrival order, bounded by
    packets, bytes and time (HoldSpec), and with the other services of the worker by a
    shared HoldBudget (HOLD_BUDGET_BYTES); overflow is tail-drop. When a backend becomes
    ready the shell calls `release(now)`, which DNATs the held packets (pinning their
    flows) and returns them in arrival order. Ordering guarantee: while the hold queue is
    not empty, every packet that belongs to no pinned flow joins the queue instead of
    being forwarded -- HELD when no backend is ready, QUEUED ("queue behind") when one is
    and the queue only waits for `release()`. A packet can therefore never overtake a
    held one: held packets are by construction of unpinned flows, and an unpinned flow's
    packets always queue while anything is held; packets of pinned flows cannot have
    anything of their own flow in the queue. The router sends what `release()` returns
    before anything else of the service, which it does simply by calling `release()`
    when it sees QUEUED, after `set_backend()`/`probe_result()`, or from the timer
    (`next_timer()` is due at once while a release is pending and `handle_timer()`
    returns `Released` actions then).

    Held packets that time out come back from `handle_timer()` as `HoldTimeout` actions
    carrying the answer already built: a TCP RST for a SYN, ICMP port unreachable (from
    the VIP, quoting the packet as the client sent it) for anything else, nothing for
    RSTs, later fragments and ICMP errors.

Signals
    `need()` is a level (fabric.services.demand keeps it): the service is needed while
    it holds packets, has open flows (TCP until FIN both ways or RST, UDP until its idle
    timeout), or saw traffic or an activation within `idle_timeout`. Its edges become
    `Signal("activate", reason, flow)` (reason "held", "traffic" or "activator:<name>",
    flow the first flow) and `Signal("idle", "idle_timeout", None)`, debounced and
    coalesced, never dropped. `outbound()` and `reply()` return verdicts, so signals
    they raise wait in `signals_pending` until `take_signals()`, `activate()` or
    `handle_timer()` returns them (`next_timer()` is due at once while any are pending).
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fabric.config.specs import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_SERVICE_HOLD_BYTES,
    HoldSpec,
    PortSpec,
    ServiceSpec,
)
from fabric.flows import tcpstate
from fabric.flows.headers import FRAGMENT, ICMP_ERROR, TRANSPORT, Headers
from fabric.flows.headers import MALFORMED as MALFORMED_PACKET
from fabric.flows.rewrite import quote, quoted_key
from fabric.flows.table import Flow, FlowPolicy, FlowTable, error_to_origin, error_to_peer
from fabric.histogram import WAKE_BUCKETS, Histogram
from fabric.net import checksum, packets
from fabric.net.packets import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMP_UNREACH,
    IP_MF,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    UNREACH_PORT,
)
from fabric.services.demand import ACTIVATE_DEBOUNCE, FELL, STAYED, Demand, FlowId, Signal

# Verdicts of outbound() and reply().
FORWARD = 0  # rewritten in place: route by the new destination
HELD = 1  # copied into the hold (no backend ready): drop the buffer
QUEUED = 2  # copied behind held packets that can go now: call release() and send them
HOLD_FULL = 3  # no room in the hold (even if a release is pending): tail-dropped, counted
NO_BACKEND = 4  # no ready backend and holding disabled: answer with reject_response()
TABLE_FULL = 5  # conntrack is full: drop
NOT_SERVICE = 6  # not for a service port (or not TCP/UDP): the router decides
NOT_OURS = 7  # reply(): not part of any flow, untouched: route as usual
NO_FLOW = 8  # a later fragment or ICMP error with no flow: drop
MALFORMED = 9
CLIENT_QUOTA = 10  # the client has its share of the flow table open already: drop
HOLD_BUDGET = 11  # the services sharing a HoldBudget hold all it allows: tail-dropped

VERDICTS = ("forward", "held", "queued", "hold_full", "no_backend", "table_full",
            "not_service", "not_ours", "no_flow", "malformed", "client_quota",
            "hold_budget")

PROBE_INTERVAL = 0.2
ACTIVE_PROBE_INTERVAL = 0.001
# ... for the first seconds of a wake; a backend still not accepting after that (a slow
# start, or one that crashed while clients wait) is probed less often, so dormant
# services woken together (a port scan of their VIPs) cost the data plane a bounded
# rate of connects each: (wake age from, interval).
PROBE_BACKOFF = ((10.0, 0.02), (2.0, 0.005))
# While the service's on_idle hook runs (a stop in progress), a new demand does not probe
# its backends: a server that is shutting down still accepts, and a client released to it
# gets its reset (or PostgreSQL's "shutting down"). Probes start when the hook ends, or at
# the latest this long after it started.
IDLE_HOOK_WAIT = 10.0

# The phases of a wake (see Service.hook_started): to the on_activate hook started, to a
# backend ready (its port accepted the probe, or the controller's word), to the release.
WAKE_PHASES = ("hook", "ready", "release")

COUNTERS = (
    "held",
    "released",
    "release_dropped",
    "release_paced",
    "hold_overflow",
    "hold_budget",
    "hold_timeout",
    "dnat_flows",
    "dnat_packets",
    "reverse_nat",
    "hairpin",
    "no_backend",
    "table_full",
    "client_quota",
    "not_service",
    "no_flow",
    "malformed",
    "icmp_errors_translated",
    "fragments_translated",
    "flows_expired",
    "activations",
    "idles",
    "probes",
    "stream_need_changes",
    "waits_for_idle_hook",
)

_PROTO_NAMES = {PROTO_TCP: "tcp", PROTO_UDP: "udp"}
_PROTOS = {"tcp": PROTO_TCP, "udp": PROTO_UDP}
_from_bytes = int.from_bytes

# The flow policy of services: closed connections leave within seconds (so idle
# detection sees the end of the last one) and are the first to go when the table is
# full; an unanswered UDP flow lasts 30 s, one that was answered 2 min.
SERVICE_FLOWS = FlowPolicy(
    max_flows=65536, tcp_syn=120.0, tcp_established=7440.0, tcp_closed=10.0,
    udp_unreplied=30.0, udp_replied=120.0, evict_closed=True, max_fragments=1024)
# One client address may keep at most this share of a service's flow table open (per
# protocol), so a pod that opens connections without end and keeps them established
# cannot lock the other pods out of the service for the established timeout (2 h). A
# quarter (16384 of 65536) is far more than any ordinary client keeps open to one
# service (a connection pool holds hundreds), and leaves three quarters to everybody
# else. Closed TCP flows do not count: the table evicts them for anyone's new flow, so
# a client that opens and closes connections fast (a load test) is never refused.
CLIENT_FLOW_SHARE = 0.25
# What the services of a worker hold at most, together (HoldBudget; the config's
# `worker.service_hold_bytes`). Each holds up to its own hold.bytes (8 MiB by default, up
# to 256 MiB), and nothing else summed them: a pod SYN-flooding 50 dormant VIPs made the
# daemon hold 50 times that. 64 MiB is eight services' default holds at once, far more
# than a wake storm of ordinary clients needs (a held SYN is 60-80 bytes: a million).
HOLD_BUDGET_BYTES = DEFAULT_SERVICE_HOLD_BYTES


class HoldBudget:
    """The bytes held by every service that shares this budget (the worker's:
    ServiceDispatch gives it to its services, `Service.set_hold_budget`), bounded by
    `limit`. Past it a service's new held packet is tail-dropped (HOLD_BUDGET, counted
    `hold_budget`) even if its own hold has room. Data-plane thread only."""

    __slots__ = ("limit", "used", "refused")

    def __init__(self, limit: int = HOLD_BUDGET_BYTES) -> None:
        if limit < 0:
            raise ValueError("a hold budget cannot be negative")
        self.limit = limit
        self.used = 0
        self.refused = 0  # packets refused, all services together


# --- actions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Released:
    """A held packet, DNATed, to send now: `frame` is the buffer the router handed over
    (pkt[:off+length], its framing in front untouched), the IPv4 packet at `off`."""

    frame: bytes
    off: int
    length: int
    partial: bool

    @property
    def packet(self) -> bytes:
        return self.frame[self.off:self.off + self.length]


@dataclass(frozen=True, slots=True)
class HoldTimeout:
    """A held packet that waited too long, as it arrived; `response` is the IPv4 packet to
    send its sender (RST for a SYN, ICMP port unreachable otherwise), or None."""

    frame: bytes
    off: int
    length: int
    partial: bool
    response: bytes | None

    @property
    def packet(self) -> bytes:
        return self.frame[self.off:self.off + self.length]


Action = Signal | Released | HoldTimeout


class Backend:
    __slots__ = ("name", "ip", "addr", "marked", "probed", "probe_due", "flows", "parked")

    def __init__(self, name: str, addr: ipaddress.IPv4Address) -> None:
        self.name = name
        self.addr = addr
        self.ip = addr.packed
        self.marked = False  # ready according to the controller
        self.probed = False  # our own probe succeeded since it was marked
        self.probe_due = 0.0
        self.flows = 0
        # After an idle signal the controller scales the backend down: it is not trusted
        # (nor probed) again until demand returns, then it must pass a fresh probe.
        self.parked = False


# --- the service ------------------------------------------------------------------------------


class Service:
    """One service's forwarding, hold and demand state (see module docstring)."""

    def __init__(
        self,
        name: str,
        vip: str | ipaddress.IPv4Address,
        ports: Iterable[PortSpec],
        *,
        hold: HoldSpec = HoldSpec(),
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        readiness: str = "probe",
        probe_interval: float = PROBE_INTERVAL,
        activate_debounce: float = ACTIVATE_DEBOUNCE,
        flow_policy: FlowPolicy = SERVICE_FLOWS,
        client_flows: int | None = None,
        now: float = 0.0,
        peers: dict[bytes, list[Service]] | None = None,
    ) -> None:
        if readiness not in ("probe", "external"):
            raise ValueError(f"readiness {readiness!r} is not probe or external")
        self.name = name
        self.vip = ipaddress.IPv4Address(vip)
        self._vip = self.vip.packed
        self.ports = tuple(ports)
        # (proto << 16 | port) -> target port
        self._ports: dict[int, int] = {}
        for p in self.ports:
            proto = _PROTOS.get(p.protocol)
            if proto is None:
                raise ValueError(f"protocol {p.protocol!r} is not tcp or udp")
            self._ports[proto << 16 | p.port] = p.target_port
        tcp_targets = [p.target_port for p in self.ports if p.protocol == "tcp"]
        # The readiness probe connects to the first TCP port's target; a service with only
        # UDP ports cannot be probed by a connect and goes by the controller alone.
        self.probe_port = tcp_targets[0] if tcp_targets else None
        self.readiness = readiness
        self._probe = readiness == "probe" and self.probe_port is not None
        self.hold_spec = hold
        self.idle_timeout = idle_timeout
        self.probe_interval = probe_interval
        self.activate_debounce = activate_debounce
        self.table = FlowTable(flow_policy, on_remove=self._flow_removed,
                               on_close=self._flow_closed)
        # Open flows per (protocol, client address): the client as it sent its packets,
        # before any hairpin SNAT (Flow.orig_addrs). With a policy that does not evict
        # closed flows, closed ones count too: they hold their place as long.
        self.client_flows = client_flows if client_flows is not None else max(
            1, int(flow_policy.max_flows * CLIENT_FLOW_SHARE))
        self._count_closed = not flow_policy.evict_closed
        self._per_client: dict[tuple[int, bytes], int] = {}
        self._h = Headers()
        self.backends: dict[str, Backend] = {}
        self._by_ip: dict[bytes, Backend] = {}
        # Backend address -> every service with that backend, this one included (shared
        # with them: share_backends). Their translated tuples share one reply space.
        self.peers: dict[bytes, list[Service]] = peers if peers is not None else {}
        self._ready: list[Backend] = []  # sorted by name: the hash picks from this
        # (arrival, frame, off, length, partial)
        # (arrival, frame, off, length, partial, (proto, flow key) or None for a fragment)
        self._hold: deque[tuple[float, bytes, int, int, bool, tuple[int, Any] | None]] = deque()
        self.held_bytes = 0
        self.hold_budget: HoldBudget | None = None  # shared with other services, if set
        self._release_at: float | None = None  # a release is pending since then
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.demand = Demand(idle_timeout, activate_debounce, now, self.counters)
        # A wake: from the demand that found no ready backend to the held packets released.
        self.wake_seconds = Histogram(WAKE_BUCKETS)
        self.wake_phase_seconds = {p: Histogram(WAKE_BUCKETS) for p in WAKE_PHASES}
        self._wake_start: float | None = None  # a wake is in progress since then
        self._wake_mark = 0.0  # the end of its last phase
        self._wake_phase = 0  # 0: waiting for the hook or a backend, 1: hook started, 2: ready
        # Stream ports whose level is `active` (True) or `traffic` (False).
        self._stream_active: dict[int, bool] = {}
        # The on_idle hook runs (since the shell said so): backends stay parked until then.
        self._idle_hook_until: float | None = None

    @classmethod
    def from_spec(cls, spec: ServiceSpec, **kw: Any) -> Service:
        return cls(spec.name, spec.ip, spec.ports, hold=spec.hold,
                   idle_timeout=spec.idle_timeout, readiness=spec.readiness, **kw)

    # --- backends and readiness ------------------------------------------------------------

    def set_backend(self, name: str, ip: str | ipaddress.IPv4Address, ready: bool,
                    now: float = 0.0) -> None:
        """Add or update a backend as the controller sees it. When this makes a backend
        ready while packets are held, call `release(now)`."""
        addr = ipaddress.IPv4Address(ip)
        b = self.backends.get(name)
        if b is not None and b.addr != addr:
            self.remove_backend(name)
            b = None
        if b is None:
            other = self._by_ip.get(addr.packed)
            if other is not None:
                raise ValueError(f"{addr} is already backend {other.name}")
            b = Backend(name, addr)
            self.backends[name] = b
            self._by_ip[b.ip] = b
            self._join(b.ip)
        if ready and not b.marked:
            b.probe_due = now
        if not ready:
            b.probed = False
        b.marked = ready
        self._update_ready(now)

    def remove_backend(self, name: str, now: float = 0.0) -> None:
        """Forget a backend; its flows go with it."""
        b = self.backends.pop(name, None)
        if b is None:
            return
        del self._by_ip[b.ip]
        self._leave(b.ip)
        b.marked = b.probed = False
        for flow in list(self.table):
            if flow.tag is b:
                self.table.remove(flow)
        self._update_ready(now)

    def set_hold_budget(self, budget: HoldBudget | None) -> None:
        """Count this service's held bytes in `budget` (None: in none), moving what it
        holds now from the budget it had, so a service that leaves gives its bytes back."""
        old = self.hold_budget
        if old is budget:
            return
        if old is not None:
            old.used -= self.held_bytes
        if budget is not None:
            budget.used += self.held_bytes
        self.hold_budget = budget

    def share_backends(self, peers: dict[bytes, list[Service]]) -> None:
        """Use `peers` (backend address -> services) with the other services of the same
        router: a backend answers every service's flows alike, so a new flow's tuple must
        be free in all of them (``_free_port``), and a reply then matches one only."""
        if peers is self.peers:
            return
        for ip in self._by_ip:
            self._leave(ip)
        self.peers = peers
        for ip in self._by_ip:
            self._join(ip)

    def _join(self, ip: bytes) -> None:
        lst = self.peers.setdefault(ip, [])
        if self not in lst:
            lst.append(self)

    def _leave(self, ip: bytes) -> None:
        lst = self.peers.get(ip)
        if lst is not None and self in lst:
            lst.remove(self)
            if not lst:
                del self.peers[ip]

    def probes_due(self, now: float) -> list[tuple[str, str, int]]:
        """(name, ip, port) of the backends to probe with a TCP connect now; each is due
        again `probe_interval` later unless `probe_result()` says it succeeded."""
        out: list[tuple[str, str, int]] = []
        if not self._probe:
            return out
        until = self._idle_hook_until
        if until is not None and now >= until:
            self._idle_hook_until = None
            if self.demand.need:
                self._unpark(now)
        port = self.probe_port
        assert port is not None
        for b in self.backends.values():
            if b.marked and not b.probed and not b.parked and b.probe_due <= now:
                # While clients wait, probe fast: the wake is only as quick as the probe
                # that sees the backend's port accept.
                b.probe_due = now + (self._active_interval(now) if self._waiting else
                                     self.probe_interval)
                out.append((b.name, str(b.addr), port))
                self.counters["probes"] += 1
        return out

    def probe_result(self, name: str, ok: bool, now: float) -> None:
        """The outcome of a probe; a failure retries after `probe_interval`. When this makes
        a backend ready while packets are held, call `release(now)`."""
        b = self.backends.get(name)
        if b is None or not b.marked:
            return
        b.probed = ok
        if not ok:
            b.probe_due = now + (self._active_interval(now) if self._waiting
                                 else self.probe_interval)
        self._update_ready(now)

    def _active_interval(self, now: float) -> float:
        """How soon to probe again while clients wait: every millisecond early in a wake,
        less often as it drags on (PROBE_BACKOFF)."""
        start = self._wake_start
        if start is not None:
            age = now - start
            for since, interval in PROBE_BACKOFF:
                if age >= since:
                    return interval
        return ACTIVE_PROBE_INTERVAL

    def is_ready(self, b: Backend) -> bool:
        return b.marked and (b.probed or not self._probe)

    def _update_ready(self, now: float) -> None:
        self._ready = sorted((b for b in self.backends.values() if self.is_ready(b)),
                             key=lambda b: b.name)
        if self._ready and self._hold:
            if self._release_at is None:
                self._release_at = now
        else:
            self._release_at = None
        if self._ready and self._wake_start is not None and self._wake_phase < 2:
            self._wake_step("ready", now)
            self._wake_phase = 2
            if not self._hold:
                self._wake_done(now)  # nothing was held (an activator asked): woken now

    # --- wakes ------------------------------------------------------------------------------

    def hook_started(self, now: float) -> None:
        """The on_activate hook of the wake in progress started (the shell says when)."""
        if self._wake_start is not None and self._wake_phase == 0:
            self._wake_step("hook", now)
            self._wake_phase = 1

    def _wake_step(self, phase: str, now: float) -> None:
        self.wake_phase_seconds[phase].observe(max(0.0, now - self._wake_mark))
        self._wake_mark = now

    def _wake_done(self, now: float) -> None:
        assert self._wake_start is not None
        self.wake_seconds.observe(max(0.0, now - self._wake_start))
        self._wake_start = None

    def is_backend_ip(self, ip: bytes) -> bool:
        return ip in self._by_ip

    def ready_addresses(self) -> list[str]:
        return [str(b.addr) for b in self._ready]

    @property
    def has_ready(self) -> bool:
        return bool(self._ready)

    @property
    def releasable(self) -> bool:
        return bool(self._hold) and bool(self._ready)

    def _flow_removed(self, flow: Flow) -> None:
        b = flow.tag
        if isinstance(b, Backend):
            b.flows -= 1
        if flow.open or self._count_closed:
            self._client_count(flow, -1)

    def _flow_closed(self, flow: Flow, closed: bool) -> None:
        if not self._count_closed:
            self._client_count(flow, -1 if closed else 1)

    def _client_count(self, flow: Flow, step: int) -> None:
        who = (flow.proto, flow.orig_addrs[:4])
        n = self._per_client.get(who, 0) + step
        if n > 0:
            self._per_client[who] = n
        else:
            self._per_client.pop(who, None)

    def client_flow_count(self, proto: int, client: bytes) -> int:
        """The flows of `client` (4 address bytes) that count against its share."""
        return self._per_client.get((proto, client), 0)

    def _over_quota(self, proto: int, client: bytes, now: float) -> bool:
        """Whether a new flow of `client` would pass its share, after expiring due flows
        (which may be the client's own)."""
        who = (proto, client)
        limit = self.client_flows
        if self._per_client.get(who, 0) < limit:
            return False
        self.counters["flows_expired"] += self.table.expire(now)
        return self._per_client.get(who, 0) >= limit

    # --- packets: client -> VIP --------------------------------------------------------------

    def outbound(self, pkt: bytearray, off: int, length: int, now: float,
                 partial: bool) -> int:
        """Translate pkt[off:off+length], an IPv4 packet to the VIP, in place; a verdict.
        A packet that is not FORWARDed is left unchanged."""
        return self._outbound(pkt, off, length, now, partial, False)

    def _outbound(self, pkt: bytearray, off: int, length: int, now: float, partial: bool,
                  releasing: bool) -> int:
        h = self._h
        kind = h.parse(pkt, off, length)
        counters = self.counters
        if kind == MALFORMED_PACKET:
            counters["malformed"] += 1
            return MALFORMED
        if pkt[off + 16:off + 20] != self._vip:
            counters["not_service"] += 1
            return NOT_SERVICE
        proto = h.proto
        if kind == ICMP_ERROR:
            return self._icmp_error(pkt, h, partial)
        if proto != PROTO_TCP and proto != PROTO_UDP:
            counters["not_service"] += 1
            return NOT_SERVICE
        if kind == FRAGMENT:
            return self._later_fragment(pkt, off, length, now, partial, releasing)
        if kind != TRANSPORT:
            counters["malformed"] += 1
            return MALFORMED
        l4 = h.l4
        key = h.key(pkt)
        table = self.table
        flow = table.fwd[proto].get(key)
        if (flow is not None and proto == PROTO_TCP
                and tcpstate.reopens(flow.state, pkt[l4 + 13])):
            table.remove(flow)  # a new connection on the tuple of a closed one
            flow = None
        if flow is None:
            rflow = table.rev[proto].get(key)
            if rflow is not None:  # a hairpin reply: from a backend to VIP:snat-port
                return self._translate_reply(rflow, pkt, h, now, partial)
            target = self._ports.get(proto << 16 | (pkt[l4 + 2] << 8 | pkt[l4 + 3]))
            if target is None:
                counters["not_service"] += 1
                return NOT_SERVICE
            if not releasing and (self._hold or not self._ready):
                return self._hold_packet(pkt, off, length, now, partial, proto, l4)
            if self._over_quota(proto, bytes(pkt[off + 12:off + 16]), now):
                counters["client_quota"] += 1
                return CLIENT_QUOTA
            flow = self._new_flow(pkt, h, target, now)
            if flow is None:
                counters["table_full"] += 1
                return TABLE_FULL
        self.demand.last_traffic = now
        table.forward(flow, pkt, off, l4, h.cf, h.ff, now, partial)
        if h.ff & IP_MF:
            counters["fragments_translated"] += 1
        counters["dnat_packets"] += 1
        return FORWARD

    def _translate_reply(self, flow: Flow, pkt: bytearray, h: Headers, now: float,
                         partial: bool) -> int:
        self.demand.last_traffic = now
        self.table.reverse(flow, pkt, h.ip, h.l4, h.cf, h.ff, now, partial)
        self.counters["reverse_nat"] += 1
        if h.ff & IP_MF:
            self.counters["fragments_translated"] += 1
        return FORWARD

    def _new_flow(self, pkt: bytearray, h: Headers, target: int, now: float) -> Flow | None:
        ready = self._ready
        proto = h.proto
        ip = h.ip
        l4 = h.l4
        orig_addrs = bytes(pkt[ip + 12:ip + 20])
        orig_ports = bytes(pkt[l4:l4 + 4])
        key = (_from_bytes(orig_addrs, "big"), _from_bytes(orig_ports, "big"))
        b = ready[_mix(proto, key) % len(ready)] if len(ready) > 1 else ready[0]
        src = orig_addrs[:4]
        sport = orig_ports[0] << 8 | orig_ports[1]
        hairpin = src == b.ip
        new_src = self._vip if hairpin else src
        sport = self._free_port(proto, new_src, b.ip, target, sport, hairpin)
        if sport < 0:
            return None
        flow = Flow(proto, orig_addrs, orig_ports, new_src + b.ip,
                    sport.to_bytes(2, "big") + target.to_bytes(2, "big"), tag=b)
        if not self.table.add(flow, now):
            return None
        b.flows += 1
        who = (proto, src)
        self._per_client[who] = self._per_client.get(who, 0) + 1
        self.counters["dnat_flows"] += 1
        if hairpin:
            self.counters["hairpin"] += 1
        if not self.demand.need:
            self._raise_need("traffic", _flow_id(proto, orig_addrs, orig_ports), now)
        return flow

    def _free_port(self, proto: int, src: bytes, dst: bytes, dport: int, sport: int,
                   hairpin: bool) -> int:
        """The source port a new flow's translated tuple can use: the client's own unless
        the reply tuple is taken (two service ports with the same target, a hairpin
        clash, or another service with the same backend: the backend's replies to both
        would look alike) or, for hairpin, it is one of the service's ports; -1 if none
        is free."""
        base = _from_bytes(dst + src, "big")
        tables = [s.table for s in self.peers.get(dst, ())]
        if self.table not in tables:
            tables.append(self.table)
        p = sport
        for i in range(64):
            if i:
                p = 1024 + (sport * 2654435761 + i * 40503) % (65536 - 1024)
            if hairpin and (proto << 16 | p) in self._ports:
                continue
            rkey = (base, dport << 16 | p)
            for t in tables:
                if t.reply_taken(proto, rkey):
                    break
            else:
                return p
        return -1

    def _later_fragment(self, pkt: bytearray, off: int, length: int, now: float,
                        partial: bool, releasing: bool) -> int:
        """A fragment without the L4 header: only the addresses change."""
        table = self.table
        if table.readdress_fragment(table.frag_orig, pkt, off, now) is not None:
            self.counters["dnat_packets"] += 1
        elif table.readdress_fragment(table.frag_reply, pkt, off, now) is not None:
            self.counters["reverse_nat"] += 1  # of a hairpin reply
        elif self._hold and not releasing:  # maybe its first fragment is held
            return self._hold_packet(pkt, off, length, now, partial, pkt[off + 9], -1)
        else:
            self.counters["no_flow"] += 1
            return NO_FLOW
        self.demand.last_traffic = now
        self.counters["fragments_translated"] += 1
        return FORWARD

    # --- packets: backend -> client ------------------------------------------------------------

    def reply(self, pkt: bytearray, off: int, length: int, now: float, partial: bool) -> int:
        """Translate pkt[off:off+length], an IPv4 packet from a backend, back to VIP:port in
        place: FORWARD, or NOT_OURS (untouched) when it is no service flow's reply."""
        h = self._h
        kind = h.parse(pkt, off, length)
        if kind == MALFORMED_PACKET:
            self.counters["malformed"] += 1
            return MALFORMED
        if kind == ICMP_ERROR:
            v = self._icmp_error(pkt, h, partial, True)
            return v if v == FORWARD else NOT_OURS
        if h.proto != PROTO_TCP and h.proto != PROTO_UDP:
            return NOT_OURS
        table = self.table
        if kind == FRAGMENT:
            if table.readdress_fragment(table.frag_reply, pkt, off, now) is None:
                return NOT_OURS
            self.demand.last_traffic = now
            self.counters["reverse_nat"] += 1
            self.counters["fragments_translated"] += 1
            return FORWARD
        if kind != TRANSPORT:
            return NOT_OURS
        flow = table.rev[h.proto].get(h.key(pkt))
        if flow is None:
            return NOT_OURS
        return self._translate_reply(flow, pkt, h, now, partial)

    # --- ICMP errors ------------------------------------------------------------------------------

    def _icmp_error(self, pkt: bytearray, h: Headers, partial: bool, quiet: bool = False) -> int:
        """An ICMP error quoting a packet of a flow, in either direction: a client's error
        about a reply it got (quote VIP:port -> client) goes to the backend, a backend's
        error about a packet it got (quote client -> backend) goes to the client."""
        ip, l4, total = h.ip, h.l4, h.total
        inner, il4 = quote(pkt, ip, l4, total)
        qk = quoted_key(pkt, inner, il4) if inner > 0 else None
        if qk is None or qk[0] == PROTO_ICMP:
            if not quiet:
                self.counters["malformed" if inner < 0 else "no_flow"] += 1
            return MALFORMED if inner < 0 else NO_FLOW
        iproto, swapped = qk
        flow = self.table.get(iproto, swapped)
        if flow is not None and pkt[ip + 16:ip + 20] == self._vip:
            error_to_peer(flow, pkt, ip, l4, total, partial, inner, il4)
        else:
            flow = self.table.get_reply(iproto, swapped)
            if flow is None:
                if not quiet:
                    self.counters["no_flow"] += 1
                return NO_FLOW
            error_to_origin(flow, pkt, ip, l4, total, partial, inner, il4)
        self.counters["icmp_errors_translated"] += 1
        return FORWARD


    # --- holding ----------------------------------------------------------------------------------

    def _hold_packet(self, pkt: bytearray, off: int, length: int, now: float, partial: bool,
                     proto: int, l4: int) -> int:
        counters = self.counters
        spec = self.hold_spec
        if not self.demand.need:
            flow = None
            if l4 >= 0:
                flow = _flow_id(proto, bytes(pkt[off + 12:off + 20]), bytes(pkt[l4:l4 + 4]))
            self._raise_need("held" if spec.packets > 0 and spec.timeout > 0 else "traffic",
                             flow, now)
        self.demand.last_traffic = now
        if spec.packets <= 0 or spec.bytes <= 0 or spec.timeout <= 0:
            counters["no_backend"] += 1
            return NO_BACKEND
        if len(self._hold) >= spec.packets or self.held_bytes + length > spec.bytes:
            counters["hold_overflow"] += 1
            return HOLD_FULL
        budget = self.hold_budget
        if budget is not None:
            if budget.used + length > budget.limit:
                budget.refused += 1
                counters["hold_budget"] += 1
                return HOLD_BUDGET
            budget.used += length
        fk = (proto, self._h.key(pkt)) if l4 >= 0 else None
        self._hold.append((now, bytes(pkt[:off + length]), off, length, partial, fk))
        self.held_bytes += length
        counters["held"] += 1
        if self._ready:
            if self._release_at is None:
                self._release_at = now
            return QUEUED
        return HELD

    def release(self, now: float) -> list[Released]:
        """The held packets, DNATed to ready backends (their flows pinned), in arrival
        order; nothing while no backend is ready. Send them before anything that arrives
        later (see module docstring).

        Paced: one call starts at most ``hold.release_burst`` new flows per ready backend;
        the packets of flows it did not start stay queued, in order (so nothing of theirs
        is overtaken), and the next step is due ``hold.release_interval`` later. Packets
        of flows already started go on at once, so no started flow waits behind a paced
        one. Later fragments wait too once the budget is spent (they may be of a flow
        still queued)."""
        out: list[Released] = []
        ready = self._ready
        if not ready or (self._release_at is not None and now < self._release_at):
            return out
        hold = self._hold
        spec = self.hold_spec
        budget = spec.release_burst * len(ready)
        fwd = self.table.fwd
        started: set[tuple[int, Any]] = set()
        kept: deque[tuple[float, bytes, int, int, bool, tuple[int, Any] | None]] = deque()
        counters = self.counters
        while hold:
            entry = hold.popleft()
            fk = entry[5]
            if fk is None:
                if kept:
                    kept.append(entry)
                    continue
            elif fk not in started and fk[1] not in fwd[fk[0]]:
                if budget <= 0:
                    kept.append(entry)
                    continue
                budget -= 1
                started.add(fk)
            _, frame, off, length, partial, _ = entry[:6]
            self._unhold(length)
            b = bytearray(frame)
            v = self._outbound(b, off, length, now, partial, True)
            if v == FORWARD:
                out.append(Released(bytes(b), off, length, partial))
                counters["released"] += 1
            else:
                counters["release_dropped"] += 1
        if kept:
            # counted once per packet: a 7th field marks those counted already
            for i, entry in enumerate(kept):
                if len(entry) == 6:
                    kept[i] = (*entry, True)  # type: ignore[assignment]
                    counters["release_paced"] += 1
            self._hold = kept
            self._release_at = now + spec.release_interval
            return out
        self._release_at = None
        if self._wake_start is not None and self._wake_phase == 2:
            self._wake_step("release", now)
            self._wake_done(now)
        return out

    def _unhold(self, length: int) -> None:
        self.held_bytes -= length
        if self.hold_budget is not None:
            self.hold_budget.used -= length

    @property
    def held_packets(self) -> int:
        return len(self._hold)

    # --- demand -----------------------------------------------------------------------------------

    def need(self) -> bool:
        """Whether the service is wanted now (a level; see fabric.services.demand)."""
        return self.demand.need

    def activate(self, reason: str, now: float, flow: FlowId | None = None) -> list[Signal]:
        """An activator asks for the service: counts as traffic now. Returns the pending
        signals (an activate if this raised the need)."""
        d = self.demand
        d.last_traffic = max(d.last_traffic, now)
        if not d.need:
            self._raise_need(f"activator:{reason}", flow, now)
        return d.take_signals()

    def stream_need(self, port: int, need: int, now: float) -> list[Signal]:
        """A stream port's level (activators/ABI.md, "Streams"): `active` (2) wakes the
        service and keeps it from idling, `traffic` (1) counts as traffic now, `none` (0)
        lets it idle after idle_timeout even with connections open. The signals due."""
        d = self.demand
        if need:
            self._stream_active[port] = need == 2
        else:
            self._stream_active.pop(port, None)
        d.last_traffic = max(d.last_traffic, now)
        if need == 2 and not d.need:
            self._raise_need(f"stream:{port}", None, now)
        self.counters["stream_need_changes"] += 1
        return d.take_signals()

    @property
    def signals_pending(self) -> bool:
        return self.demand.signals_pending

    def take_signals(self) -> list[Signal]:
        return self.demand.take_signals()

    def idle_hook(self, running: bool, now: float) -> None:
        """The on_idle hook started or ended (the shell says when): while it runs, a new
        demand waits for it before probing (IDLE_HOOK_WAIT at most)."""
        if running:
            self._idle_hook_until = now + IDLE_HOOK_WAIT
            for b in self.backends.values():  # a demand that came first waits too
                if not b.probed:
                    b.parked = True
            return
        self._idle_hook_until = None
        if self.demand.need:
            self._unpark(now)

    def _unpark(self, now: float) -> None:
        for b in self.backends.values():
            if b.parked:
                b.parked = False
                b.probe_due = now

    def _raise_need(self, reason: str, flow: FlowId | None, now: float) -> None:
        until = self._idle_hook_until
        if until is None or now >= until:
            self._idle_hook_until = None
            self._unpark(now)
        elif not self.demand.need:
            self.counters["waits_for_idle_hook"] += 1
        if not self._ready and self._wake_start is None:
            self._wake_start = self._wake_mark = now
            self._wake_phase = 0
        self.demand.rise(reason, flow, now)

    @property
    def clients_waiting(self) -> bool:
        """Clients wait for a backend now (probes are then fast and short)."""
        return self._waiting

    @property
    def _waiting(self) -> bool:
        """Clients wait for a backend: held packets, or a stream port that needs one."""
        return bool(self._hold) or any(self._stream_active.values())

    @property
    def _busy(self) -> bool:
        """Something still holds the service up: held packets or open flows."""
        return (bool(self._hold) or self.table.open > 0
                or any(self._stream_active.values()))

    def _fell(self, result: int, now: float) -> None:
        if result != STAYED:
            self._wake_start = None  # no longer needed: a wake still in progress is abandoned
        if result == FELL:
            if self._probe:
                # The controller scales the backends down now: not trusted (nor probed)
                # again until demand returns, then only after a fresh probe.
                for b in self.backends.values():
                    b.probed = False
                    b.parked = True
                self._update_ready(now)

    # --- timers -----------------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """The earliest of flow expiry, a pending release, the oldest held packet's timeout
        and the demand's timers (signals waiting, a deferred activate, idleness). Probes
        have their own deadline: ``next_probe()``."""
        t = self.table.next_timer()
        r = self._release_at
        if r is not None and (t is None or r < t):
            t = r
        if self._hold:
            h = self._hold[0][0] + self.hold_spec.timeout
            if t is None or h < t:
                t = h
        d = self.demand.next_timer(self._busy)
        if d is not None and (t is None or d < t):
            t = d
        return t

    def next_probe(self) -> float | None:
        """When ``probes_due()`` next has a backend to probe."""
        if not self._probe:
            return None
        t: float | None = None
        for b in self.backends.values():
            if b.marked and not b.probed and not b.parked and (t is None or b.probe_due < t):
                t = b.probe_due
        until = self._idle_hook_until
        if until is not None and self.demand.need and (t is None or until < t):
            t = until  # the hook overran its wait: probe anyway then
        return t

    def handle_timer(self, now: float) -> list[Action]:
        """Expire flows, release held packets if a backend is ready, time out held packets,
        deliver deferred activations and idleness. Probes are the shell's: it calls
        ``probes_due(now)`` at ``next_probe()``."""
        out: list[Action] = []
        self.counters["flows_expired"] += self.table.expire(now)
        if self._ready and self._hold:
            out.extend(self.release(now))
        hold = self._hold
        timeout = self.hold_spec.timeout
        while hold and hold[0][0] + timeout <= now:
            _, frame, off, length, partial, _ = hold.popleft()[:6]
            self._unhold(length)
            self.counters["hold_timeout"] += 1
            resp = reject_response(frame[off:off + length], partial)
            out.append(HoldTimeout(frame, off, length, partial, resp))
        self._fell(self.demand.handle_timer(now, self._busy), now)
        out.extend(self.demand.take_signals())
        return out

    # --- status -----------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        if self._ready:
            return "ready" if self.demand.need else "idle"
        return "activating" if self.demand.need else "dormant"

    def status(self) -> dict[str, Any]:
        """A row for `fabricd get services`."""
        return {
            "name": self.name,
            "ip": str(self.vip),
            "ports": [{"port": p.port, "target_port": p.target_port, "protocol": p.protocol}
                      for p in self.ports],
            "state": self.state,
            "need": self.demand.need,
            "held_packets": len(self._hold),
            "held_bytes": self.held_bytes,
            "flows": len(self.table),
            "open_flows": self.table.open,
            "backends": [
                {"name": b.name, "ip": str(b.addr), "ready": self.is_ready(b),
                 "marked_ready": b.marked, "probed": b.probed, "flows": b.flows}
                for b in self.backends.values()
            ],
            "counters": dict(self.counters),
        }


# --- helpers --------------------------------------------------------------------------------------


def _mix(proto: int, key: tuple[int, int]) -> int:
    """A well-spread, deterministic hash of a flow key (splitmix64's finaliser)."""
    x = (key[0] ^ (key[1] << 29) ^ (proto << 61)) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _flow_id(proto: int, addrs: bytes, ports: bytes) -> FlowId:
    return FlowId(_PROTO_NAMES.get(proto, str(proto)), packets.ip_str(addrs[:4]),
                  ports[0] << 8 | ports[1], packets.ip_str(addrs[4:8]), ports[2] << 8 | ports[3])


def _complete_l4(packet: bytearray, ihl: int) -> None:
    """Finish a NEEDS_CSUM partial TCP/UDP checksum in place (the field holds the
    pseudo-header sum): the complement of the sum over the segment."""
    proto = packet[9]
    f = ihl + (16 if proto == PROTO_TCP else 6)
    if f + 2 > len(packet):
        return
    c = ~checksum.ones_sum(packet[ihl:]) & 0xFFFF
    if proto == PROTO_UDP and c == 0:
        c = 0xFFFF
    packet[f] = c >> 8
    packet[f + 1] = c & 0xFF


def reject_response(packet: bytes | bytearray, partial: bool = False) -> bytes | None:
    """The answer to a packet no backend will take, from the address it was sent to: a
    RST for a TCP SYN, ICMP port unreachable for anything else; None for RSTs, ICMP
    errors, later fragments and unanswerable sources. Never raises."""
    try:
        return _reject(packet, partial)
    except (packets.Malformed, ValueError, IndexError):
        return None


def _reject(packet: bytes | bytearray, partial: bool) -> bytes | None:
    h = packets.IPv4.parse(packet)
    if h.frag_offset or packets.is_icmp_error(packet, h.ihl):
        return None
    src = _from_bytes(h.src, "big")
    if src == 0 or src >> 28 >= 0xE or src == 0xFFFFFFFF:
        return None
    p = bytearray(packet[:h.total_length])
    l4 = h.ihl
    if h.proto == PROTO_TCP and len(p) >= l4 + 20:
        flags = p[l4 + 13]
        if flags & TCP_RST:
            return None
        if flags & TCP_SYN and not flags & TCP_ACK:
            sport = p[l4] << 8 | p[l4 + 1]
            dport = p[l4 + 2] << 8 | p[l4 + 3]
            seq = _from_bytes(p[l4 + 4:l4 + 8], "big")
            doff = (p[l4 + 12] >> 4) * 4
            seg_len = max(len(p) - l4 - doff, 0) + 1 + (1 if flags & TCP_FIN else 0)
            return packets.tcp_packet(h.dst, h.src, dport, sport, 0,
                                      (seq + seg_len) & 0xFFFFFFFF, TCP_RST | TCP_ACK,
                                      window=0)
    if h.proto == PROTO_ICMP and len(p) > l4 and p[l4] not in (ICMP_ECHO_REQUEST,
                                                               ICMP_ECHO_REPLY):
        return None
    if partial and h.proto in (PROTO_TCP, PROTO_UDP) and not h.more_fragments:
        _complete_l4(p, l4)
    return packets.icmp_error(h.dst, p, ICMP_UNREACH, UNREACH_PORT)
