"""The router's side of services: which addresses are service VIPs, which pods are
backends, what a service's verdict means for the frame, and what its activators say.

Runs on the data-plane thread only, attached to one namespace's router
(``Router.attach_services``). The router asks it about two kinds of packets: those to a
VIP (``to_service``) and those from a backend pod (``from_backend``: replies are un-NATed
before routing). Everything a service core hands back (released packets, answers to
timed-out ones) becomes router outputs here, in order; signals go to a ``SignalQueue``
that the event loop drains (nothing is called across threads).

Activators: while a service has no ready backend, the activator of the packet's port
sees it first (``ActivatorHost.process``): it may drop it (an RST, a stray segment that
must not wake anything), and may ask for a backend without holding the packet. A failed
activator (``None``) means plain hold-and-activate. Activators are told when the service
gains or loses its last ready backend.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol

from fabric.activator import abi
from fabric.net.packets import ICMP_TIME_EXCEEDED, ICMP_UNREACH, PROTO_TCP, PROTO_UDP, UNREACH_PORT
from fabric.net.vnet import F_NEEDS_CSUM
from fabric.router.droplog import HEAD_BYTES
from fabric.router.l3 import decrement_ttl
from fabric.router.model import (
    DROP_ACTIVATOR,
    DROP_HOLD_TIMEOUT,
    DROP_MALFORMED,
    DROP_NO_ROUTE,
    DROP_SERVICE_CLIENT_QUOTA,
    DROP_SERVICE_HOLD_BUDGET,
    DROP_SERVICE_HOLD_FULL,
    DROP_SERVICE_NO_BACKEND,
    DROP_SERVICE_PORT,
    DROP_SERVICE_TABLE_FULL,
    DROP_TTL,
    Port,
)
from fabric.router.router import Router
from fabric.services import core
from fabric.services.core import Action, HoldBudget, HoldTimeout, Released, Service
from fabric.services.demand import Signal, coalesce

log = logging.getLogger("fabricd.services")

_from_bytes = int.from_bytes
# A service whose packets the shared hold budget refuses logs it at most this often.
BUDGET_WARN_INTERVAL = 60.0


class Activator(Protocol):
    """What the dispatch needs of an activator host (fabric.activator.host)."""

    label: str

    def process(self, port: int, events: list[abi.Event]) -> list[abi.Action] | None: ...


class SignalSink(Protocol):
    """Where a dispatch puts its services' signals (a SignalQueue in the daemon)."""

    def put(self, service: str, sig: Signal) -> None: ...


class SignalQueue:
    """Signals of one namespace's services on their way from the data-plane thread to the
    event loop. Bounded like a service's own queue: per service at most two, coalesced
    (fabric.services.demand.coalesce). The event loop watches `fd` (an eventfd written
    when the queue stops being empty) and calls ``drain()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, list[Signal]] = {}
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def put(self, service: str, sig: Signal) -> None:
        with self._lock:
            wake = not self._pending
            coalesce(self._pending.setdefault(service, []), sig)
        if wake:
            os.eventfd_write(self.fd, 1)

    def drain(self) -> list[tuple[str, Signal]]:
        try:
            os.eventfd_read(self.fd)
        except (BlockingIOError, OSError):
            pass
        with self._lock:
            pending, self._pending = self._pending, {}
        return [(name, sig) for name, sigs in pending.items() for sig in sigs]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StreamWatch(NamedTuple):
    """A service's ports terminated in the local stack (fabric.streams) as the data plane
    sees them: which packets go to the stack, and whom to tell about ready backends."""

    ports: frozenset[int]  # TCP service ports
    targets: frozenset[int]  # their target ports (backends' replies to the VIP)
    backends: Callable[[list[str]], None]  # the ready backends' addresses; thread safe


class ServiceDispatch:
    """One namespace's services as its router sees them (see module docstring)."""

    def __init__(self, router: Router, signals: SignalSink | None = None,
                 hold_budget: HoldBudget | None = None) -> None:
        self.router = router
        self.signals = signals
        # What the services hold together, with other namespaces' (the worker's budget);
        # None: each service only by its own hold spec.
        self.hold_budget = hold_budget
        self._budget_warned: dict[Service, float] = {}  # the last warning's time
        self.vips: dict[bytes, Service] = {}
        # Backend pod address -> the services it serves (a dict check on the hot path).
        # The services keep it themselves (Service.share_backends): a new flow's tuple
        # must be free in every service of its backend, so a reply matches one only.
        self.backend_ips: dict[bytes, list[Service]] = {}
        # Activators by service: (port, IP protocol) -> host.
        self.activators: dict[Service, dict[tuple[int, int], Activator]] = {}
        self._told: dict[Service, bool] = {}  # what activators last heard: backend or not
        self.streams: dict[Service, StreamWatch] = {}
        self._told_streams: dict[Service, list[str]] = {}
        self._packet_id = 0

    def __iter__(self) -> Iterator[Service]:
        return iter(list(self.vips.values()))

    # --- the control side (through DataPlane.call) ----------------------------------------

    def add(self, svc: Service, activators: dict[tuple[int, int], Activator] | None = None,
            streams: StreamWatch | None = None) -> None:
        self.vips[svc.vip.packed] = svc
        svc.share_backends(self.backend_ips)
        svc.set_hold_budget(self.hold_budget)
        self.activators[svc] = dict(activators or {})
        self._told[svc] = False
        if streams is not None and streams.ports:
            self.streams[svc] = streams
            self.router.stream_vips.add(svc.vip.packed)
            self._tell_streams(svc)

    def remove(self, svc: Service) -> None:
        self.vips.pop(svc.vip.packed, None)
        self.activators.pop(svc, None)
        self._told.pop(svc, None)
        self._budget_warned.pop(svc, None)
        if svc.hold_budget is self.hold_budget:
            svc.set_hold_budget(None)  # what it holds goes with it
        if self.streams.pop(svc, None) is not None:
            self.router.stream_vips.discard(svc.vip.packed)
            self._told_streams.pop(svc, None)
        if svc.peers is self.backend_ips:
            svc.share_backends({})

    def set_backend(self, svc: Service, name: str, ip: str, ready: bool, now: float) -> None:
        """A backend's readiness changed (or it appeared): update the service and send what
        its hold can release now."""
        svc.share_backends(self.backend_ips)
        svc.set_backend(name, ip, ready, now)
        self.release(svc, now)

    def remove_backend(self, svc: Service, name: str, now: float) -> None:
        if name not in svc.backends:
            return
        svc.remove_backend(name, now)
        self.release(svc, now)

    def probe_result(self, svc: Service, name: str, ok: bool, now: float) -> None:
        svc.probe_result(name, ok, now)
        self.release(svc, now)

    def release(self, svc: Service, now: float) -> None:
        """Send what the service's hold can release now, before anything else of it."""
        self._tell_activators(svc)
        if svc in self.streams:
            self._tell_streams(svc)
        if svc.releasable:
            self._actions(svc, list(svc.release(now)), now)
        self._take_signals(svc)

    # --- the packet path ----------------------------------------------------------------------

    def from_backend(self, src: bytes, buf: bytearray, h: int, ip: int, total: int,
                     now: float) -> bytes:
        """A packet from a backend pod: un-NAT replies of service flows (the source
        becomes the VIP); the destination to route by. A reply matches at most one of
        the services of `src` (their flows never share a translated tuple)."""
        partial = bool(h and buf[0] & F_NEEDS_CSUM)
        for svc in self.backend_ips[src]:
            if svc.reply(buf, ip, total, now, partial) == core.FORWARD:
                break
        return bytes(buf[ip + 16:ip + 20])

    def to_service(self, svc: Service, port: Port, buf: bytearray, h: int, n: int, ip: int,
                   now: float) -> Port | None:
        """A frame from `port` to the VIP of `svc`: the port to write it to (DNATed to a
        backend pod), or None (held, answered, dropped)."""
        router = self.router
        if self.streams and buf[ip + 9] == PROTO_TCP and self._to_stack(svc, buf, ip):
            return router.to_local(port, buf, h, n, now)
        if not decrement_ttl(buf, ip):
            router.icmp_error(port, buf, ip, ICMP_TIME_EXCEEDED, 0, now, DROP_TTL)
            return None
        total = buf[ip + 2] << 8 | buf[ip + 3]
        partial = bool(h and buf[0] & F_NEEDS_CSUM)
        if (not svc.has_ready and self.activators.get(svc)
                and self._activator_drops(svc, buf, ip, total, now)):
            port.drop(DROP_ACTIVATOR)
            return None
        v = svc.outbound(buf, ip, total, now, partial)
        out: Port | None = None
        if v == core.FORWARD:
            dpod = router.by_ip.get(bytes(buf[ip + 16:ip + 20]))
            if dpod is None:
                port.drop(DROP_NO_ROUTE)
            else:
                out = router.deliver(dpod, port, buf, h, n, ip, total, now)
        elif v == core.QUEUED:
            self.release(svc, now)
        elif v == core.HOLD_FULL:
            port.drop(DROP_SERVICE_HOLD_FULL)
        elif v == core.HOLD_BUDGET:
            port.drop(DROP_SERVICE_HOLD_BUDGET)
            self._budget_warning(svc, now)
        elif v == core.NO_BACKEND:
            port.drop(DROP_SERVICE_NO_BACKEND)
            resp = core.reject_response(bytes(buf[ip:ip + total]), partial)
            if resp is not None:
                router.send_ip(port, resp, now)
        elif v == core.NOT_SERVICE:
            router.icmp_error(port, buf, ip, ICMP_UNREACH, UNREACH_PORT, now, DROP_SERVICE_PORT)
        elif v == core.TABLE_FULL:
            port.drop(DROP_SERVICE_TABLE_FULL)
        elif v == core.CLIENT_QUOTA:
            port.drop(DROP_SERVICE_CLIENT_QUOTA)
        elif v != core.HELD:
            port.drop(DROP_MALFORMED)
        if svc.signals_pending:
            self._take_signals(svc)
        return out

    def _budget_warning(self, svc: Service, now: float) -> None:
        last = self._budget_warned.get(svc)
        if last is not None and now - last < BUDGET_WARN_INTERVAL:
            return
        self._budget_warned[svc] = now
        budget = svc.hold_budget
        log.warning("namespace %s: service %s: the worker's services hold %d bytes, their "
                    "budget is %d; new packets to hold are dropped (hold_budget: %d for "
                    "this service so far)", self.router.name, svc.name,
                    budget.used if budget is not None else 0,
                    budget.limit if budget is not None else 0, svc.counters["hold_budget"])

    def replace_activator(self, svc: Service, key: tuple[int, int], host: Activator) -> None:
        """A reload on a packet port: the next packet goes to `host` (the service's core
        holds the packets, so nothing held moves); it hears where the backends stand."""
        hosts = self.activators.get(svc)
        if hosts is None:
            return
        old = hosts.get(key)
        hosts[key] = host
        if svc.has_ready:
            host.process(key[0], [abi.BackendAvailable()])
        close = getattr(old, "close", None)
        if close is not None and old is not host:
            close()

    def _to_stack(self, svc: Service, buf: bytearray, ip: int) -> bool:
        """Whether a TCP packet to the VIP belongs to the local stack: to a port a stream
        activator terminates there, or a backend's reply to a connection from the VIP."""
        w = self.streams.get(svc)
        if w is None:
            return False
        l4 = ip + ((buf[ip] & 15) << 2)
        if buf[l4 + 2] << 8 | buf[l4 + 3] in w.ports:
            return True
        return (buf[l4] << 8 | buf[l4 + 1] in w.targets
                and svc.is_backend_ip(bytes(buf[ip + 12:ip + 16])))

    def _tell_streams(self, svc: Service) -> None:
        """Stream ports learn the ready backends whenever that set changes."""
        w = self.streams.get(svc)
        if w is None:
            return
        ready = svc.ready_addresses()
        if ready != self._told_streams.get(svc):
            self._told_streams[svc] = ready
            w.backends(ready)

    def stream_need(self, svc: Service, port: int, need: int, now: float) -> None:
        """A stream port's need level changed (the shell posts it here)."""
        if svc not in self.streams:
            return
        self._actions(svc, svc.stream_need(port, need, now), now)

    def _activator_drops(self, svc: Service, buf: bytearray, ip: int, total: int,
                         now: float) -> bool:
        """Ask the port's activator about a packet for a service with no ready backend:
        True when it says drop."""
        ihl = (buf[ip] & 15) << 2
        proto = buf[ip + 9]
        if (proto != PROTO_TCP and proto != PROTO_UDP) or total < ihl + 4:
            return False
        dport = buf[ip + ihl + 2] << 8 | buf[ip + ihl + 3]
        host = self.activators[svc].get((dport, proto))
        if host is None:
            return False
        self._packet_id = pid = (self._packet_id + 1) & 0xFFFFFFFF
        flow = (_from_bytes(buf[ip + 12:ip + 20], "big") ^
                _from_bytes(buf[ip + ihl:ip + ihl + 4], "big")) & 0xFFFFFFFF
        actions = host.process(dport, [abi.Packet(pid, flow, bytes(buf[ip:ip + total]))])
        if actions is None:
            return False
        verdict = abi.HOLD
        wants = False
        for a in actions:
            if isinstance(a, abi.PacketDecision) and a.packet_id == pid:
                verdict = a.verdict
            elif isinstance(a, abi.SetBackendNeed) and a.need == abi.NEED_ACTIVE:
                wants = True
        # A held packet activates the service itself (with its flow); the activator's
        # own request matters when it asks for a backend without holding this packet.
        if wants and verdict != abi.HOLD:
            self._actions(svc, svc.activate(host.label, now), now)
        return verdict == abi.DROP

    def _tell_activators(self, svc: Service) -> None:
        """Activators learn when the service gains or loses its last ready backend (the
        core replays held packets itself; they forget theirs, and filter again once the
        service is dormant)."""
        hosts = self.activators.get(svc)
        if not hosts:
            return
        ready = svc.has_ready
        if ready == self._told.get(svc):
            return
        self._told[svc] = ready
        ev = abi.BackendAvailable() if ready else abi.BackendUnavailable()
        for (port, _proto), host in hosts.items():
            host.process(port, [ev])

    def _actions(self, svc: Service, actions: list[Action], now: float) -> None:
        router = self.router
        for a in actions:
            if isinstance(a, Released):
                router.forward_released(bytearray(a.frame), a.off, now)
            elif isinstance(a, HoldTimeout):
                if a.response is not None:
                    client = router.by_ip.get(a.response[16:20])
                    if client is not None and client.port is not None:
                        router.send_ip(client.port, a.response, now)
                router.count(DROP_HOLD_TIMEOUT, 1)
                sender = router.by_ip.get(a.frame[a.off + 12:a.off + 16])
                router.droplog.record(sender.name if sender is not None else None,
                                      DROP_HOLD_TIMEOUT,
                                      a.frame[a.off:a.off + HEAD_BYTES], True, now)
            elif isinstance(a, Signal) and self.signals is not None:
                self.signals.put(svc.name, a)
        self._take_signals(svc)

    def _take_signals(self, svc: Service) -> None:
        if svc.signals_pending:
            sigs = svc.take_signals()
            if self.signals is not None:
                for sig in sigs:
                    self.signals.put(svc.name, sig)

    # --- timers -------------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        t: float | None = None
        for svc in self.vips.values():
            st = svc.next_timer()
            if st is not None and (t is None or st < t):
                t = st
        return t

    def handle_timer(self, now: float) -> None:
        for svc in list(self.vips.values()):
            self._actions(svc, svc.handle_timer(now), now)
            self._tell_activators(svc)
            if svc in self.streams:
                self._tell_streams(svc)
