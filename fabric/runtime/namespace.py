"""A namespace at run time: its router and services, its pods' ports and readiness, its
gateway (local stack, DNS server), egress and tunnel wiring.

Threads: this object lives on the event loop. The router, the service dispatch and the
probe runner live on the data-plane thread and are only touched through the data plane:
awaited (``acall``) where a result or an error matters (adding a pod, every read for a
view), posted (``post``) where nothing waits (readiness, teardown: a port is unregistered
and its fd closed by the data plane itself, in order). Nothing here blocks the event loop
on the data plane. Port creation talks netlink and may block, so it runs in a worker
thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fabric.config.activator_keys import known, unknown_keys
from fabric.config.parse import Taken
from fabric.config.specs import (
    DEFAULT_EGRESS_TUN,
    DnsSpec,
    NamespaceSpec,
    PodSpec,
    ServiceSpec,
)
from fabric.errors import FabricError, NotFound, PortError
from fabric.histogram import DNS_BUCKETS, Histogram
from fabric.net import packets
from fabric.net.sockpool import SocketPool
from fabric.ports import podsockets
from fabric.ports.afpacket import PacketPort
from fabric.ports.localstack import LocalStack
from fabric.ports.tap import NetnsId, TapPort
from fabric.router.model import Port
from fabric.router.router import Router
from fabric.runtime.capture import CaptureHub, CaptureSubscription
from fabric.runtime.closer import Closer
from fabric.runtime.dataplane import DataPlane
from fabric.runtime.events import EventBus
from fabric.runtime.netnswatch import NetnsWatch
from fabric.runtime.reconcile import SpecPlan
from fabric.services.core import HoldBudget
from fabric.services.dispatch import ServiceDispatch, SignalQueue
from fabric.services.manager import BackendState, ServiceManager
from fabric.services.probes import ProbeRunner
from fabric.streams.podlocal import PodLocal
from gateway import resolvconf
from gateway.dhcp import DhcpCore, DhcpSettings
from gateway.dns import DnsCore
from gateway.dns_server import DnsServer
from gateway.egress import EgressNat
from gateway.records import Records
from gateway.uplink import Uplink

log = logging.getLogger("fabricd.namespace")

RETRY_INTERVAL = 2.0


def _barrier() -> None:
    """A call that does nothing: once it has run, so has everything posted before it."""


def _same_interface(io: PacketPort) -> bool:
    """Whether the interface an AF_PACKET port is bound to is still the one of its name."""
    try:
        return socket.if_nametoindex(io.name) == io.ifindex
    except OSError:
        return False


def pod_mac(pod: PodSpec) -> str:
    """The MAC the fabric gives a pod whose TAP it makes: locally administered, from the IP."""
    if pod.mac:
        return pod.mac
    return packets.mac_str(b"\x02\x00" + pod.ip.packed)


@dataclass
class PodState:
    spec: PodSpec
    ready: bool
    port: Port | None = None
    io: TapPort | PacketPort | None = None
    error: str | None = None
    attached_at: float | None = None
    hub: CaptureHub | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Namespace:
    def __init__(self, spec: NamespaceSpec, dataplane: DataPlane, bus: EventBus, *,
                 netns_watch: NetnsWatch | None = None, closer: Closer | None = None,
                 hold_budget: HoldBudget | None = None) -> None:
        # The pods of the spec live in a dict (attach and detach are O(1)); the tuple of
        # `spec.pods` is made again only when someone reads `spec` (see the property).
        self._spec = spec
        self._pod_specs: dict[str, PodSpec] = {p.name: p for p in spec.pods}
        self._spec_stale = False
        self._taken: Taken | None = None
        self.name = spec.name
        self.dataplane = dataplane
        self.bus = bus
        self.router = Router(spec.name, spec.cidr, gateway_mac=spec.gateway_mac)
        self.signals = SignalQueue()
        self.dispatch = ServiceDispatch(self.router, self.signals, hold_budget)
        self.router.attach_services(self.dispatch)
        self.probes: ProbeRunner | None = None
        self.pods: dict[str, PodState] = {}
        # The pods without a port that retries should attach: the retry loop visits
        # these, not every pod (10,000 attached pods cost it nothing).
        self.unattached: dict[str, PodState] = {}
        # Pods whose TAP is made inside their netns are watched for its deletion; their
        # ports are closed off the data-plane thread (fabric.runtime.closer).
        self.netns_watch = netns_watch
        self.closer = closer
        self.created = time.time()
        self.local: LocalStack | None = None
        self.local_port: Port | None = None
        # Attached netns pods by IP, for stream ports with `upstream: pod-local`; used
        # and changed on the data-plane thread only (fabric.streams.podlocal).
        self.pod_local = PodLocal(podsockets.open_exact, podsockets.sockets_in)
        self.dns: DnsServer | None = None
        self.egress: EgressNat | None = None
        self.uplink: Uplink | None = None
        self.dns_fast: DnsCore | None = None
        # The data plane's local answers: the time each took to build (on its thread).
        self.dns_fast_seconds = Histogram(DNS_BUCKETS)
        self.services: ServiceManager | None = None
        self.records = Records(spec.name, spec.dns.domain, spec.cidr)
        self.sync_records()
        self.dhcp: DhcpCore | None = None
        self.dhcp_on = False
        self.update_dhcp()
        dataplane.post(dataplane.add_owner, self.router)

    @property
    def spec(self) -> NamespaceSpec:
        """The namespace as a spec, its pods included: a whole-namespace read (views,
        reconcile) pays for the tuple of pods once after a change, an attach never."""
        if self._spec_stale:
            self._spec = dataclasses.replace(self._spec, pods=tuple(self._pod_specs.values()))
            self._spec_stale = False
        return self._spec

    @spec.setter
    def spec(self, spec: NamespaceSpec) -> None:
        self._spec = spec
        self._pod_specs = {p.name: p for p in spec.pods}
        self._spec_stale = False
        self._taken = None

    @property
    def settings(self) -> NamespaceSpec:
        """The spec for its settings (cidr, gateway, mtu, dns...): never copies the pods,
        which may be out of date here (use `spec`, `pod_spec` or `taken` for them)."""
        return self._spec

    @property
    def taken(self) -> Taken:
        """What the pods and services hold (names, addresses, MACs, interfaces, netns
        slots), indexed once and kept up to date by record_pod and forget_pod."""
        if self._taken is None:
            self._taken = Taken(self.spec)
        return self._taken

    def pod_spec(self, name: str) -> PodSpec | None:
        return self._pod_specs.get(name)

    def record_pod(self, spec: PodSpec) -> None:
        """`spec` joins the spec (or replaces the pod of its name), with its DNS name."""
        old = self._pod_specs.pop(spec.name, None)
        taken = self.taken
        if old is not None:
            taken.remove_pod(old)
        self._pod_specs[spec.name] = spec  # a replaced pod goes last, as it always did
        taken.add_pod(spec)
        self._spec_stale = True
        if old is not None and old.name != spec.name:
            self.records.remove(old.name)
        self.records.set(spec.name, spec.ip)

    def forget_pod(self, name: str) -> None:
        """The pod leaves the spec and DNS (a detach)."""
        old = self._pod_specs.pop(name, None)
        if old is None:
            return
        self.taken.remove_pod(old)
        self._spec_stale = True
        self.records.remove(name)

    async def start_local_stack(self) -> None:
        """Give the namespace its local stack: the gateway address then lives in a private
        kernel namespace (the kernel answers ping; the DNS server listens there)."""
        spec = self.settings
        stack = await asyncio.to_thread(LocalStack.create, spec.name, spec.cidr, spec.gateway,
                                        spec.mtu)
        port = Port(vnet=True, mtu=spec.mtu, fd=stack.fd, kind="local", l3=True)
        self.local = stack
        self.local_port = port
        await self.dataplane.acall(self._attach_local_here, port)
        gw = str(spec.gateway)
        udp = await asyncio.to_thread(stack.listen_udp, gw, 53)
        tcp = await asyncio.to_thread(stack.listen_tcp, gw, 53)
        core = DnsCore(self.records, list(spec.dns.upstream), cache=spec.dns.cache)
        self.dns = DnsServer(core, udp, tcp, spec.name)
        await self.dns.start()
        # Local names are answered by the data plane itself (one core per thread);
        # forwarded names and TCP go on to the server above.
        self.dns_fast = DnsCore(self.records, [])
        self.dataplane.post(self.router.attach_dns, self.dns_fast.answer_local,
                            self.dns_fast_seconds)

    def _attach_local_here(self, port: Port) -> None:
        self.router.attach_local(port)
        self.dataplane.add_port(self.router, port)

    async def start_services(self) -> None:
        """Services of the spec: cores and probes on the data plane, the manager here."""
        stack = self.local
        gw = str(self.settings.gateway)
        pool = (SocketPool(lambda n: stack.tcp_sockets_later(gw, n))
                if stack is not None else None)
        self.probes = ProbeRunner(self.dispatch, self.dataplane, pool)
        self.dataplane.post(self.dataplane.add_owner, self.probes, self.router)
        if pool is not None:  # probes' SYN-ACKs end them as the router sees them
            self.dataplane.post(setattr, self.router, "synack", self.probes.synack)
        self.services = ServiceManager(self.name, self.dataplane, self.dispatch,
                                       self.probes, self.signals, self.bus.emit,
                                       self._backend_state, stack, self.pod_local)
        await self.apply_services(SpecPlan(add=self.settings.services))

    async def apply_services(self, plan: SpecPlan) -> None:
        assert self.services is not None
        for name in plan.remove:
            self.services.remove(name)
        for spec in plan.add:
            assert isinstance(spec, ServiceSpec)
            for p in spec.ports:
                unread = unknown_keys(p.activator, p.activator_config)
                if unread:
                    log.warning("namespace %s: service %s port %d: the %s activator does "
                                "not read activator_config %s (it reads %s); ignored",
                                self.name, spec.name, p.port, p.activator, ", ".join(unread),
                                ", ".join(known(p.activator)))
            await self.services.add(spec)

    def _backend_state(self, pod_name: str) -> BackendState | None:
        state = self.pods.get(pod_name)
        if state is None:
            return None
        spec = state.spec
        remote = spec.kind == "remote"
        return BackendState(str(spec.ip), state.ready and (state.port is not None or remote),
                            remote)

    def start_egress(self, uplink: Uplink) -> None:
        """Give the namespace its own egress address and NAT on the worker's uplink."""
        addr = uplink.allocate(self.name, self.settings.id)
        nat = EgressNat(addr, self.settings.egress_allow, protected=uplink.protected)
        self.egress = nat
        self.uplink = uplink
        self.dataplane.post(self._attach_egress, uplink, addr, nat)
        log.info("namespace %s: egress as %s (allow %s)", self.name, addr,
                 ", ".join(map(str, self.settings.egress_allow)) or "nothing")

    def _attach_egress(self, uplink: Uplink, addr: ipaddress.IPv4Address,
                       nat: EgressNat) -> None:
        self.router.attach_egress(nat, uplink.port)
        uplink.add(self.name, addr, self.router)

    def start_tunnel(self, ns_id: int) -> None:
        """Pods of this namespace on other workers are reached through the tunnel (the
        data plane sends the router's tunnel outputs and routes what comes back)."""
        self.dataplane.post(self.router.attach_tunnel, ns_id, self.settings.mtu)
        self.dataplane.post(self.dataplane.route_tunnel, ns_id, self.router)

    def update_egress(self) -> None:
        if self.egress is not None:
            self.dataplane.post(self.egress.set_allow, self.settings.egress_allow)

    def update_protected(self) -> None:
        if self.egress is not None and self.uplink is not None:
            self.dataplane.post(self.egress.set_protected, self.uplink.protected)

    def update_dns(self, old: DnsSpec) -> None:
        """Apply a changed `dns` section in place: a new domain gets a new zone (both the
        data plane's core and the server's answer from it at once), new upstreams take the
        next forwarded query, and attached pods get a resolv.conf with the new search."""
        new = self.settings.dns
        if new.domain != old.domain:
            self.records = Records(self.name, new.domain, self.settings.cidr)
            self.sync_records()
        if self.dns is not None:
            self.dns.core.answers.max_entries = new.cache
            self.dns.core.reconfigure(self.records, list(new.upstream))
        if self.dns_fast is not None:
            self.dataplane.post(self.dns_fast.reconfigure, self.records, [])
        log.info("namespace %s: dns applied (domain %s, upstream %s)", self.name, new.domain,
                 ", ".join(f"{h}:{p}" for h, p in new.upstream) or "none")
        for state in self.pods.values():
            spec = state.spec
            if state.port is None or spec.kind != "netns" or not spec.netns:
                continue
            if not new.resolv_conf:
                if state.extra.pop("resolv_conf", None):
                    resolvconf.remove(spec.netns, f"{self.name}/{spec.name}")
                continue
            settings = self.dns_settings()
            try:
                state.extra["resolv_conf"] = resolvconf.write(
                    spec.netns, f"{self.name}/{spec.name}", settings["nameservers"][0],
                    settings["search"])
            except OSError as e:
                log.warning("namespace %s: pod %s: cannot write resolv.conf: %s", self.name,
                            spec.name, e)

    def dhcp_settings(self) -> DhcpSettings:
        """What DHCP tells pods: the same gateway, DNS server and search list as the
        resolv.conf the fabric writes (dns_settings)."""
        s = self.settings
        search = tuple(self.dns_settings()["search"])
        return DhcpSettings.for_network(s.cidr, s.mtu, search[0], search, int(s.dhcp.lease))

    def update_dhcp(self) -> None:
        """Start, stop or reconfigure DHCP to follow the spec (dhcp, dns). A core once
        made stays (detached while off), so its counters never go back."""
        on = self.settings.dhcp.enabled
        if not on and not self.dhcp_on:
            return
        if not on:
            self.dhcp_on = False
            self.dataplane.post(self.router.attach_dhcp, None)
            return
        settings = self.dhcp_settings()
        if self.dhcp is None:
            self.dhcp = DhcpCore(settings)
        elif self.dhcp.settings != settings:
            self.dataplane.post(self.dhcp.reconfigure, settings)
        if not self.dhcp_on:
            self.dhcp_on = True
            self.dataplane.post(self.router.attach_dhcp, self.dhcp)

    def sync_records(self) -> None:
        """DNS names follow the table at once: pods (attached or not) and services."""
        names = {p.name: p.ip for p in self._pod_specs.values()}
        names.update({s.name: s.ip for s in self.settings.services})
        self.records.sync(names)

    # --- pods ----------------------------------------------------------------------------

    async def add_pod(self, spec: PodSpec, *, strict: bool) -> PodState:
        """Put a pod in the table and attach its port. With `strict`, a port that cannot be
        made is an error and the pod is not added; otherwise the pod stays in the table
        unattached (its traffic held) and attaching is retried."""
        mac = spec.mac if spec.kind == "interface" else pod_mac(spec)
        await self.dataplane.acall(self.router.add_pod, spec.name, spec.ip, mac,
                                   spec.worker if spec.kind == "remote" else None)
        state = PodState(spec, spec.ready)
        self.pods[spec.name] = state
        if spec.kind == "remote":
            self._sync_backend(spec.name)
            return state
        try:
            await self._attach(state)
        except FabricError as e:
            if strict:
                self.dataplane.post(self.router.remove_pod, spec.name)
                del self.pods[spec.name]
                raise
            state.error = e.message
            self.unattached[spec.name] = state
            log.warning("namespace %s: pod %s not attached yet: %s (retrying every %.0fs)",
                        self.name, spec.name, e.message, RETRY_INTERVAL,
                        extra={"namespace": self.name, "pod": spec.name})
            self.bus.emit("pod_attach_failed", self.name, spec.name, error=e.message)
        return state

    async def _attach(self, state: PodState) -> None:
        spec = state.spec
        prefix = self.settings.cidr.prefixlen
        watched: tuple[str, NetnsId] | None = None
        if spec.kind == "netns":
            assert spec.netns is not None
            path = spec.netns_path
            watch = self.netns_watch
            io: TapPort | PacketPort
            if self.closer is not None:
                await self.closer.wait(path)  # the TAP of the pod before, if any
            if path is not None and watch is not None and watch.can_watch(path):
                io, ident = await asyncio.to_thread(
                    TapPort.create_inside, spec.name, spec.netns, spec.ip, prefix,
                    self.settings.gateway, pod_mac(spec), self.settings.mtu, spec.ifname)
                watched = (path, ident)
                state.extra["netns_id"] = (path, ident)
            else:
                io = await asyncio.to_thread(
                    TapPort.create, spec.name, spec.netns, spec.ip, prefix,
                    self.settings.gateway, pod_mac(spec), self.settings.mtu, spec.ifname)
                # The TAP was moved in and nothing of ours holds this namespace: it
                # goes (the TAP with it) when its process exits or its file is deleted,
                # which is how the pod is seen gone. A pod-local upstream must not hold
                # it either, so this pod's connections use the VIP.
                state.extra["netns_id"] = (path, None)
            kind = "netns"
        elif spec.kind == "interface":
            assert spec.interface is not None
            own = {DEFAULT_EGRESS_TUN} | ({self.uplink.tun} if self.uplink is not None else set())
            io = await asyncio.to_thread(PacketPort.open, spec.interface, frozenset(own))
            kind = "interface"
        else:
            raise PortError(f"pod {spec.name} has no local port")
        if self.pods.get(spec.name) is not state:  # removed while we were creating it
            io.close()
            return
        await self._connect(state, io, kind)
        if watched is not None and self.netns_watch is not None and state.io is io:
            path, ident = watched
            state.extra["watch"] = (path, self.netns_watch.add(
                path, ident, lambda: self._netns_gone(state, io)))

    def _netns_gone(self, state: PodState, io: TapPort | PacketPort) -> None:
        """The pod's netns was deleted (its TAP, inside, kept it alive): lose the port,
        as when a moved TAP dies with its namespace."""
        if self.pods.get(state.spec.name) is state and state.io is io:
            state.extra.pop("watch", None)
            self.lose_port(state, "its network namespace was deleted")

    def _unwatch(self, state: PodState) -> None:
        w = state.extra.pop("watch", None)
        if w is not None and self.netns_watch is not None:
            self.netns_watch.remove(*w)

    async def add_pod_fd(self, spec: PodSpec, io: TapPort) -> PodState:
        """A pod whose port the caller opened (a TAP fd handed in)."""
        await self.dataplane.acall(self.router.add_pod, spec.name, spec.ip, spec.mac)
        state = PodState(spec, spec.ready)
        self.pods[spec.name] = state
        await self._connect(state, io, "fd")
        return state

    async def _connect(self, state: PodState, io: TapPort | PacketPort, kind: str) -> None:
        mtu = min(io.mtu, self.settings.mtu) if io.mtu else self.settings.mtu
        port = Port(vnet=io.vnet, mtu=mtu, fd=io.fd, kind=kind)
        mac = state.spec.mac if kind == "interface" else None
        try:
            await self.dataplane.acall(self._attach_port, state.spec.name, port, mac)
        except BaseException:
            io.close()
            raise
        state.io = io
        state.port = port
        state.error = None
        netns_id = state.extra.get("netns_id") if kind == "netns" else None
        if netns_id is not None:  # before the backend can be ready (_sync_backend below)
            self.dataplane.post(self.pod_local.attach, state.spec.name, str(state.spec.ip),
                                *netns_id)
        self.unattached.pop(state.spec.name, None)
        state.attached_at = time.time()
        if kind == "netns" and self.settings.dns.resolv_conf and state.spec.netns:
            settings = self.dns_settings()
            try:
                state.extra["resolv_conf"] = resolvconf.write(
                    state.spec.netns, f"{self.name}/{state.spec.name}",
                    settings["nameservers"][0], settings["search"])
            except OSError as e:
                log.warning("namespace %s: pod %s: cannot write resolv.conf: %s", self.name,
                            state.spec.name, e)
        self.bus.emit("pod_attached", self.name, state.spec.name, port=kind,
                      ip=str(state.spec.ip))
        self._sync_backend(state.spec.name)

    def _attach_port(self, name: str, port: Port, mac: str | None) -> None:
        """On the data-plane thread: connect the port (what it releases is flushed right
        after the call) and start reading it."""
        self.router.attach(name, port, time.monotonic(), mac)
        self.dataplane.add_port(self.router, port)

    def owns(self, port: Port) -> bool:
        return any(st.port is port for st in self.pods.values())

    async def port_trouble(self, port: Port, err: int) -> None:
        """The data plane found `port` broken (errno `err`): when its device is gone,
        detach the pod, say so, and let the retries attach it again (a TAP made anew in
        the recreated netns, an AF_PACKET socket on the recreated interface)."""
        state = next((st for st in self.pods.values() if st.port is port), None)
        if state is None:
            self.dataplane.trouble.forget(port)
            return
        if err == errno.ENETDOWN:
            io = state.io
            if not isinstance(io, PacketPort) or await asyncio.to_thread(_same_interface, io):
                self.dataplane.trouble.forget(port)  # a link that went down, not gone
                return
        self.lose_port(state, os.strerror(err) if err else "gone")

    def lose_port(self, state: PodState, reason: str) -> None:
        port, io = state.port, state.io
        name = state.spec.name
        self._unwatch(state)
        self.dataplane.post(self.pod_local.detach, name, str(state.spec.ip))
        if port is not None:
            self.dataplane.post(self._detach_here, name, port, io, False, self._key(state))
            self.dataplane.trouble.forget(port)
        elif io is not None:
            io.close()
        state.port = None
        state.io = None
        self.unattached[name] = state
        state.error = f"port lost ({reason}); re-attaching"
        log.warning("namespace %s: pod %s: its port is gone (%s); its traffic is held and "
                    "it is attached again as soon as it can be", self.name, name, reason,
                    extra={"namespace": self.name, "pod": name})
        self.bus.emit("pod_port_lost", self.name, name, error=reason)
        self._sync_backend(name)

    async def reattach(self, state: PodState) -> None:
        """Attach a pod whose port is missing now (a PUT of its unchanged spec)."""
        if state.port is None and state.spec.kind in ("netns", "interface"):
            await self._attach(state)

    async def retry_unattached(self) -> None:
        for state in list(self.unattached.values()):
            if self.pods.get(state.spec.name) is not state:
                self.unattached.pop(state.spec.name, None)
                continue
            if state.port is None and state.spec.kind in ("netns", "interface"):
                try:
                    await self._attach(state)
                except FabricError as e:
                    if e.message != state.error:
                        state.error = e.message
                        log.warning("namespace %s: pod %s still not attached: %s", self.name,
                                    state.spec.name, e.message,
                                    extra={"namespace": self.name, "pod": state.spec.name})

    def remove_pod(self, name: str) -> None:
        """Forget a pod at once; the data plane stops reading its port, drops it from the
        router and closes the fd, in that order, when it gets to it."""
        state = self.pods.pop(name, None)
        if state is None:
            raise NotFound(f"pod {name} not found in namespace {self.name}")
        self.unattached.pop(name, None)
        self._unwatch(state)
        self.dataplane.post(self.pod_local.detach, name, str(state.spec.ip))
        if state.hub is not None:
            state.hub.close()
        after = None
        if state.extra.get("resolv_conf") and state.spec.netns:
            after = functools.partial(resolvconf.remove, state.spec.netns,
                                      f"{self.name}/{state.spec.name}")
            if self.closer is None:
                after()
                after = None
        # the file goes after the TAP, both off the event loop (a new pod in the netns
        # waits for both: its resolv.conf is written after)
        self.dataplane.post(self._detach_here, name, state.port, state.io, True,
                            self._key(state), after)
        self.bus.emit("pod_detached", self.name, name)
        self._sync_backend(name)

    @staticmethod
    def _key(state: PodState) -> str | None:
        """What a pod's next port must wait for the closing of its last one by."""
        return state.spec.netns_path if state.spec.kind == "netns" else None

    def _detach_here(self, name: str, port: Port | None, io: TapPort | PacketPort | None,
                     remove: bool, key: str | None = None,
                     after: Callable[[], None] | None = None) -> None:
        """On the data-plane thread: unregister the port, then close its fd (nothing can
        read it any more; the closer does it, a close waits for RCU), then detach (or
        remove) the pod in the router."""
        try:
            if port is not None:
                self.dataplane.remove_port(port)
            if self.closer is not None:
                if io is not None or after is not None:
                    self.closer.close(io, key, after)
            elif io is not None:
                io.close()
        finally:
            if remove:
                self.router.remove_pod(name)
            elif port is not None:
                self.router.detach(name)

    def set_ready(self, name: str, ready: bool) -> None:
        state = self.get(name)
        if state.ready != ready:
            state.ready = ready
            self.bus.emit("pod_ready" if ready else "pod_unready", self.name, name)
            self._sync_backend(name)

    def _sync_backend(self, name: str) -> None:
        if self.services is not None:
            self.services.sync_backend(name)

    def get(self, name: str) -> PodState:
        state = self.pods.get(name)
        if state is None:
            raise NotFound(f"pod {name} not found in namespace {self.name}")
        return state

    def capture(self, name: str, max_frames: int | None) -> CaptureSubscription:
        state = self.get(name)
        if state.port is None:
            raise FabricError(f"pod {self.name}/{name} has no attached port to capture")
        if state.hub is None or state.hub.port is not state.port:
            state.hub = CaptureHub(state.port, time.time() - time.monotonic())
        return state.hub.add(max_frames)

    async def close(self) -> None:
        """Take the namespace off the data plane (posted, in order), then close what the
        data plane may have been reading once it has got there."""
        dp = self.dataplane
        if self.services is not None:
            self.services.close()
            self.services = None
        for name in list(self.pods):
            self.remove_pod(name)
        if self.dns is not None:
            self.dns.close()
            self.dns = None
        dp.post(self.pod_local.close)
        dp.post(self._close_here, self.probes, self.local_port, self.uplink)
        self.probes = None
        self.local_port = None
        self.uplink = None
        local, self.local = self.local, None
        try:
            await dp.acall(_barrier)
        except FabricError as e:
            # Better an fd left open than one closed under a reader that may reuse it.
            log.error("namespace %s: the data plane did not finish removing it (%s); its "
                      "local stack is left open", self.name, e.message)
            return
        if local is not None:
            await asyncio.to_thread(local.close)
        self.signals.close()

    def _close_here(self, probes: ProbeRunner | None, local_port: Port | None,
                    uplink: Uplink | None) -> None:
        dp = self.dataplane
        if probes is not None:
            probes.close()
            dp.remove_owner(probes)
        self.router.attach_dns(None)
        if local_port is not None:
            dp.remove_port(local_port)
            self.router.attach_local(None)
        if uplink is not None:
            uplink.remove(self.name)
            self.router.attach_egress(None, None)
        if self.settings.id is not None and dp.by_ns_id.get(self.settings.id) is self.router:
            dp.route_tunnel(self.settings.id, None)
        dp.remove_owner(self.router)

    # --- views (read on the data-plane thread) ---------------------------------------------

    async def pod_views(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        states = [self.pods[n] for n in names] if names is not None else list(
            self.pods.values())
        return list(await self.dataplane.acall(self._pod_views_here, states))

    async def pod_view(self, state: PodState) -> dict[str, Any]:
        return (await self.dataplane.acall(self._pod_views_here, [state]))[0]

    def _pod_views_here(self, states: list[PodState]) -> list[dict[str, Any]]:
        dns = self.dns_settings()
        return [self._pod_view_here(s, dns) for s in states]

    def _pod_view_here(self, state: PodState, dns: dict[str, Any]) -> dict[str, Any]:
        spec = state.spec
        rpod = self.router.pods.get(spec.name)
        port = state.port
        drops: dict[str, int] = dict(port.drops) if port else {}
        return {
            "namespace": self.name,
            "name": spec.name,
            "ip": str(spec.ip),
            "mac": packets.mac_str(rpod.mac) if rpod and rpod.mac else None,
            "kind": spec.kind if port is None or port.kind != "fd" else "fd",
            "netns": spec.netns,
            "interface": spec.interface,
            "worker": spec.worker,
            # what a runtime needs to describe the pod's interface (a CNI result)
            "ifname": spec.ifname if spec.kind == "netns" else None,
            "cidr": str(self.settings.cidr),
            "gateway": str(self.settings.gateway),
            "mtu": port.mtu if port else self.settings.mtu,
            "attached": port is not None,
            "ready": state.ready,
            "error": state.error,
            "held": len(rpod.pending) if rpod else 0,
            "rx_packets": port.rx_packets if port else 0,
            "rx_bytes": port.rx_bytes if port else 0,
            "tx_packets": port.tx_packets if port else 0,
            "tx_bytes": port.tx_bytes if port else 0,
            "drops": sum(drops.values()),
            "drop_reasons": drops,
            "dns": dns,
        }

    def dns_settings(self) -> dict[str, Any]:
        d = self.settings.dns
        zone = f"{self.name}.{d.domain}"
        return {"nameservers": [str(self.settings.gateway)], "search": [zone, d.domain]}

    async def summary(self) -> dict[str, Any]:
        return dict(await self.dataplane.acall(self._summary_here))

    def _summary_here(self) -> dict[str, Any]:
        s = self.settings
        return {
            "name": s.name,
            "id": s.id,
            "cidr": str(s.cidr),
            "gateway": str(s.gateway),
            "gateway_mac": s.gateway_mac,
            "mtu": s.mtu,
            "pods": len(self.pods),
            "attached": sum(1 for p in self.pods.values() if p.port is not None),
            "ready": sum(1 for p in self.pods.values() if p.ready),
            "held": self.router.held(),
            "egress": str(self.egress.egress_ip) if self.egress is not None else None,
            "egress_flows": self.egress.flows if self.egress is not None else 0,
            "drops": sum(self.router.drops.values()) + sum(
                sum(p.port.drops.values()) for p in self.pods.values() if p.port),
            "drops_last_minute": self.router.droplog.last_minute(time.monotonic()),
        }
