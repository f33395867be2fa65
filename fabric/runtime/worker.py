"""The embedding API: an asyncio `Fabric` that a worker process drives, and that the
daemon and its control API are thin shells over.

Every call validates its input with the same rules and messages as the config file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Mapping
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Any

from fabric.config.parse import (
    Taken,
    parse_namespace,
    parse_peer,
    parse_pod,
    parse_service,
    validate_namespace_set,
)
from fabric.config.render import namespace_to_dict
from fabric.config.specs import (
    NETNS_DIR,
    SHIPPED_ACTIVATORS,
    EgressSpec,
    NamespaceSpec,
    PodSpec,
    ServiceSpec,
    TunnelPeerSpec,
    TunnelSpec,
)
from fabric.errors import ConfigError, Conflict, FabricError, NotFound, PortError
from fabric.ports.tap import TapPort
from fabric.runtime.addresses import FILE_NAME as ADDRESS_FILE
from fabric.runtime.addresses import AddressBook, first_free
from fabric.runtime.capture import CaptureSubscription
from fabric.runtime.closer import Closer
from fabric.runtime.dataplane import DataPlane, DataPlaneBusy
from fabric.runtime.endpoints import REFRESH_INTERVAL, EndpointResolver
from fabric.runtime.events import EventBus, Subscription
from fabric.runtime.metrics import collect
from fabric.runtime.monitor import MonitorSubscription
from fabric.runtime.namespace import RETRY_INTERVAL, Namespace
from fabric.runtime.netnswatch import NetnsWatch
from fabric.runtime.prometheus import Metric
from fabric.runtime.reconcile import NamespacePlan, plan_namespace, plan_peers
from fabric.services.core import HOLD_BUDGET_BYTES, HoldBudget
from gateway import resolvconf
from gateway.uplink import Uplink

if TYPE_CHECKING:
    from tunnels.link import TunnelLink

log = logging.getLogger("fabricd")
HEALTH_TIMEOUT = 2.0  # a data plane that takes no call for this long is stuck


class Fabric:
    """Namespaces, pods and their ports on this worker.

    Use as `async with Fabric(worker_id="w1") as fab:`; leaving the block detaches every
    pod and removes every interface the fabric created.
    """

    def __init__(self, worker_id: str | None = None, *, local_stack: bool = True,
                 egress: EgressSpec | None = None, tunnel: TunnelSpec | None = None,
                 state_dir: str | None = None, busy_poll: float = 0.0,
                 busy_poll_adaptive: bool = False,
                 service_hold_bytes: int = HOLD_BUDGET_BYTES) -> None:
        self.worker_id = worker_id or socket.gethostname()
        # the data plane's busy-poll window (fabric.runtime.spin)
        self.busy_poll = busy_poll
        self.busy_poll_adaptive = busy_poll_adaptive
        # Addresses handed to pods that came without one; in `state_dir` they outlive us.
        self.addresses = AddressBook(
            os.path.join(state_dir, ADDRESS_FILE) if state_dir is not None else None)
        # namespace -> (its Taken, a host every address below which was in use)
        self._scan_hints: dict[str, tuple[Taken, int]] = {}
        # Noise-encrypted UDP tunnels to other workers, for pods that live there.
        self.tunnel = tunnel
        self.link: TunnelLink | None = None
        self.peer_specs: dict[str, TunnelPeerSpec] = {}
        self.resolver = EndpointResolver()
        # The worker's egress TUN (and its address pool), if pods may reach the outside.
        self.egress = egress
        self.uplink: Uplink | None = None
        # Each namespace's gateway lives in a private kernel namespace (needs root and
        # unshare); without it the router answers ping at the gateway itself.
        self.local_stack = local_stack
        self.bus = EventBus()
        self.namespaces: dict[str, Namespace] = {}
        # What every namespace's services hold together (fabric.services.core): a flood to
        # many dormant VIPs is bounded once, not once per service.
        self.hold_budget = HoldBudget(service_hold_bytes)
        self.started = time.time()
        # True while a daemon applies its config file: not healthy (ready) until done
        self.starting = False
        self._dataplane: DataPlane | None = None
        # TAPs made inside their pod's netns, and their closing (fabric.runtime.netnswatch,
        # fabric.runtime.closer): what lets attaching and detaching run at 100s a second.
        self.netns_watch: NetnsWatch | None = None
        self.closer: Closer | None = None
        self._lock = asyncio.Lock()
        self._retry_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> Fabric:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._dataplane is None:
            # A daemon killed with SIGKILL left its pods' resolv.conf files behind; those
            # whose netns is gone are nobody's any more (gateway.resolvconf).
            await asyncio.to_thread(resolvconf.sweep_stale)
            self._dataplane = DataPlane(busy_poll=self.busy_poll,
                                        adaptive=self.busy_poll_adaptive)
            self._dataplane.start()
            if self.egress is not None:
                uplink = Uplink(self.egress.tun, self.egress.pool)
                try:
                    port = await asyncio.to_thread(uplink.open)
                except BaseException:
                    self._dataplane.close()
                    self._dataplane = None
                    raise
                self.uplink = uplink
                await self._dataplane.acall(self._dataplane.attach_uplink, uplink, port)
                log.info("egress through %s, pool %s", self.egress.tun, self.egress.pool)
            if self.tunnel is not None:
                await self._start_tunnel(self.tunnel)
            self._retry_task = asyncio.create_task(self._retry_loop())
            loop = asyncio.get_running_loop()
            loop.add_reader(self._dataplane.trouble.fd, self._on_port_trouble)
            self.closer = Closer()
            watch = NetnsWatch()
            if watch.available:
                self.netns_watch = watch
                loop.add_reader(watch.fd, watch.readable)

    async def close(self) -> None:
        if self._retry_task is not None:
            self._retry_task.cancel()
            self._retry_task = None
        if self._dataplane is not None:
            asyncio.get_running_loop().remove_reader(self._dataplane.trouble.fd)
        if self.netns_watch is not None:
            asyncio.get_running_loop().remove_reader(self.netns_watch.fd)
        async with self._lock:
            for name in list(self.namespaces):
                await self._remove(name)
        if self._dataplane is not None:
            dp = self._dataplane
            if self.link is not None:
                dp.post(dp.attach_tunnel, None)
            if self.uplink is not None:
                dp.post(dp.attach_uplink, None, None)
            await asyncio.to_thread(dp.close)  # runs what is still queued, then stops
            self._dataplane = None
        if self.closer is not None:
            await asyncio.to_thread(self.closer.shutdown)  # every TAP gone before we return
            self.closer = None
        if self.netns_watch is not None:
            self.netns_watch.close()
            self.netns_watch = None
        if self.uplink is not None:
            self.uplink.close()
            self.uplink = None
        if self.link is not None:
            self.link.close()
            self.link = None
        self.addresses.close()
        self.bus.close()

    async def _start_tunnel(self, spec: TunnelSpec) -> None:
        from tunnels.core import TunnelCore
        from tunnels.link import TunnelLink

        # Initiation timestamps must grow across restarts: they follow the wall clock.
        core = TunnelCore(spec.private_key, spec.psk,
                          wall_offset=time.time() - time.monotonic())
        for peer in spec.peers:
            endpoint = await self.resolver.resolve(peer.id, peer.endpoint)
            core.add_peer(peer.id, peer.public_key, endpoint, spec.keepalive)
            self.peer_specs[peer.id] = peer
        link = TunnelLink(core, spec.listen)
        await asyncio.to_thread(link.open)
        self.link = link
        await self.dataplane.acall(self.dataplane.attach_tunnel, link)
        log.info("tunnel listening on %s:%d, %d peers", spec.listen[0], spec.listen[1],
                 len(spec.peers))

    def _link(self) -> TunnelLink:
        if self.link is None:
            raise FabricError("no tunnel: this worker has no `worker.tunnel` configured")
        return self.link

    async def set_peer(self, spec: Mapping[str, Any] | TunnelPeerSpec,
                       source: str = "set_peer") -> dict[str, Any]:
        """Add a peer or change its key/endpoint, without a restart."""
        link = self._link()
        if not isinstance(spec, TunnelPeerSpec):
            others = [p for pid, p in self.peer_specs.items() if pid != spec.get("id")]
            spec = parse_peer(dict(spec), source, self.worker_id, others)
        keepalive = self.tunnel.keepalive if self.tunnel else None
        old = self.peer_specs.get(spec.id)
        if old is not None and old != spec:
            await self.dataplane.acall(link.core.remove_peer, spec.id)
        if old != spec:
            endpoint = await self.resolver.resolve(spec.id, spec.endpoint)
            await self.dataplane.acall(link.core.add_peer, spec.id, spec.public_key,
                                       endpoint, keepalive)
            self.peer_specs[spec.id] = spec
            self.bus.emit("peer_added" if old is None else "peer_changed", peer=spec.id)
        return next(p for p in await self.get_peers() if p.get("id") == spec.id)

    async def remove_peer(self, peer_id: str) -> None:
        link = self._link()
        if peer_id not in self.peer_specs:
            raise NotFound(f"peer {peer_id} not found")
        await self.dataplane.acall(link.core.remove_peer, peer_id)
        del self.peer_specs[peer_id]
        self.resolver.forget(peer_id)
        self.bus.emit("peer_removed", peer=peer_id)

    async def rekey_peer(self, peer_id: str) -> None:
        link = self._link()
        if peer_id not in self.peer_specs:
            raise NotFound(f"peer {peer_id} not found")
        await self.dataplane.acall(link.rekey, peer_id, time.monotonic())

    async def sync_peers(self, peers: tuple[TunnelPeerSpec, ...]) -> None:
        """Make the peer set equal to `peers` (a config reload)."""
        if self.link is None:
            return
        plan = plan_peers(self.peer_specs, peers)
        for pid in plan.remove:
            await self.remove_peer(pid)
        for p in plan.set:
            await self.set_peer(p)

    def set_busy_poll(self, seconds: float, adaptive: bool = False) -> None:
        """How long the data plane polls after frames before it sleeps (a config reload):
        fixed `seconds`, or adaptive up to them; the thread picks it up on its next turn."""
        self.busy_poll = seconds
        self.busy_poll_adaptive = adaptive
        if self._dataplane is not None:
            self._dataplane.set_busy_poll(seconds, adaptive)

    def set_service_hold_bytes(self, limit: int) -> None:
        """What all services hold together (a config reload): packets already held stay;
        the data-plane thread compares against the new limit from its next packet."""
        self.hold_budget.limit = limit

    @property
    def dataplane(self) -> DataPlane:
        if self._dataplane is None:
            raise FabricError("the fabric is not started (use `async with Fabric(...)`)")
        return self._dataplane

    # --- namespaces ----------------------------------------------------------------------

    async def apply_namespace(self, spec: Mapping[str, Any] | NamespaceSpec,
                              source: str = "apply_namespace") -> dict[str, Any]:
        """Create or reconcile a namespace: unchanged pods (and their flows) are untouched,
        changed pods are re-attached, missing ones detached."""
        if not isinstance(spec, NamespaceSpec):
            spec = parse_namespace(dict(spec), source, self.worker_id)
        if spec.id is None and any(p.kind == "remote" for p in spec.pods):
            raise ConfigError(source, "id", f"namespace {spec.name} has pods on other workers:"
                              " it needs an id (the same on every worker)")
        if self.egress is not None and spec.cidr.overlaps(self.egress.pool):
            raise ConfigError(source, "cidr", f"{spec.cidr} overlaps the egress pool "
                              f"{self.egress.pool} (worker.egress.pool)")
        async with self._lock:
            # Under the lock: two concurrent applies must not both pass against the old set.
            others = [ns.spec for name, ns in self.namespaces.items() if name != spec.name]
            validate_namespace_set(others + [spec], source)
            ns = self.namespaces.get(spec.name)
            plan = plan_namespace(ns.spec if ns is not None else None, spec)
            _warn_unimplemented(spec)
            if ns is not None and not plan.rebuild:
                await self._reconcile(ns, spec, plan)
                return await ns.summary()
            previous = ns.spec if ns is not None else None
            if ns is not None:
                await self._remove(spec.name)
            try:
                ns = await self._create(spec)
            except BaseException:
                if previous is not None:  # a failed rebuild must not lose every pod
                    log.error("namespace %s: rebuild failed; restoring the previous spec",
                              spec.name)
                    try:
                        await self._create(previous)
                    except Exception:
                        log.exception("namespace %s: restoring the previous spec failed",
                                      spec.name)
                raise
            self.bus.emit("namespace_applied", spec.name, created=True)
            log.info("namespace %s: created (%s, %d pods)", spec.name, spec.cidr,
                     len(spec.pods))
            return await ns.summary()

    async def _create(self, spec: NamespaceSpec) -> Namespace:
        ns = Namespace(spec, self.dataplane, self.bus, netns_watch=self.netns_watch,
                       closer=self.closer, hold_budget=self.hold_budget)
        try:
            if self.local_stack:
                await ns.start_local_stack()
            if self.uplink is not None:
                ns.start_egress(self.uplink)
            if self.link is not None and spec.id is not None:
                ns.start_tunnel(spec.id)
            await ns.start_services()
        except BaseException:
            await ns.close()
            raise
        self.namespaces[spec.name] = ns
        for pod in spec.pods:
            await ns.add_pod(pod, strict=False)
        return ns

    async def _reconcile(self, ns: Namespace, spec: NamespaceSpec,
                         plan: NamespacePlan | None = None) -> None:
        """Bring a namespace to `spec` in place (a plan that does not rebuild it)."""
        if plan is None:
            plan = plan_namespace(ns.spec, spec)
        assert not plan.rebuild and not plan.create
        old_dns = ns.spec.dns
        ns.spec = spec
        for name in plan.pods.remove:
            ns.remove_pod(name)
        for pod in plan.pods.add:
            assert isinstance(pod, PodSpec)
            await ns.add_pod(pod, strict=False)
        for pod in spec.pods:
            ns.pods[pod.name].spec = pod
        ns.sync_records()
        if spec.dns != old_dns:
            ns.update_dns(old_dns)
        ns.update_dhcp()
        if ns.services is not None and not plan.services.empty:
            await ns.apply_services(plan.services)
        if plan.egress_changed:
            ns.update_egress()
        if plan.changed:
            changed = len(set(plan.pods.remove) | {p.name for p in plan.pods.add})
            self.bus.emit("namespace_applied", spec.name, created=False, pods_changed=changed)
            log.info("namespace %s: reconciled, %d pods changed", spec.name, changed)

    async def remove_namespace(self, name: str) -> None:
        async with self._lock:
            await self._remove(name)

    async def _remove(self, name: str) -> None:
        ns = self.namespaces.pop(name, None)
        if ns is None:
            raise NotFound(f"namespace {name} not found")
        await ns.close()
        self.bus.emit("namespace_removed", name)
        log.info("namespace %s: removed", name)

    def _ns(self, name: str) -> Namespace:
        ns = self.namespaces.get(name)
        if ns is None:
            raise NotFound(f"namespace {name} not found")
        return ns

    # --- pods ----------------------------------------------------------------------------

    async def attach_pod(self, namespace: str, spec: Mapping[str, Any] | PodSpec, *,
                         fd: int | None = None, vnet: bool = True) -> dict[str, Any]:
        """Add a pod and attach its port: a TAP the fabric makes in `netns`, an existing
        `interface`, or (with `fd`) a TAP file descriptor the caller already opened.
        Without `ip` the fabric picks the lowest free address of the CIDR (the one it
        gave this pod before, if any), keeps it across restarts and frees it on detach.
        Returns the pod, including the DNS settings a VMM or runtime should give it."""
        ns = self._ns(namespace)
        source = f"attach_pod {namespace}"
        data: dict[str, Any] | None = None
        if not isinstance(spec, PodSpec):
            data = dict(spec)
            if fd is not None:
                if "netns" in data or "interface" in data or "worker" in data:
                    raise ConfigError(source, "fd", "give either fd or netns/interface/worker")
                data["interface"] = f"fd{fd}"
        async with self._lock:
            if self.namespaces.get(namespace) is not ns:
                raise NotFound(f"namespace {namespace} not found")
            chosen = data is not None and data.get("ip") is None
            if data is not None:  # under the lock: against the spec as it is now
                if chosen:
                    data["ip"] = str(self._choose_address(ns, data.get("name")))
                spec = parse_pod(data, source, ns.settings, self.worker_id,
                                 taken=ns.taken)
            assert isinstance(spec, PodSpec)
            if fd is None:
                self._check_pod_set(ns, spec, source)
            old: PodSpec | None = None
            if spec.name in ns.pods:
                state = ns.pods[spec.name]
                if state.spec == spec and fd is None:
                    await ns.reattach(state)  # a lost port comes back on the same PUT
                    return await ns.pod_view(state)
                # a pod on a TAP fd the caller handed in cannot come back: its fd is closed
                handed_in = state.port is not None and state.port.kind == "fd"
                old = None if handed_in else state.spec
                ns.remove_pod(spec.name)
                if handed_in:
                    self._forget_pod(ns, spec.name)
            try:
                if fd is not None:
                    io = TapPort.from_fd(fd, vnet, mtu=ns.settings.mtu)
                    os.set_blocking(fd, False)
                    state = await ns.add_pod_fd(spec, io)
                else:
                    state = await ns.add_pod(spec, strict=True)
            except BaseException:
                if old is not None:  # the replace failed: the pod as it was comes back
                    await ns.add_pod(old, strict=False)
                raise
            self._record_pod(ns, spec)
            if chosen:
                where = ({"netns": spec.netns, "ifname": spec.ifname}
                         if spec.netns is not None and fd is None else None)
                self.addresses.assign(namespace, spec.name, spec.ip, where)
            else:  # an address given by the caller is the caller's to manage
                self.addresses.release(namespace, spec.name)
            return await ns.pod_view(state)

    def _choose_address(self, ns: Namespace, name: object) -> IPv4Address:
        """The address for a pod that came without one: the one it has or was given
        before, if still free, else the lowest free host. Called under the lock."""
        cidr, gateway = ns.settings.cidr, ns.settings.gateway
        pod = str(name) if isinstance(name, str) else ""
        current = ns.pod_spec(pod)
        if current is not None:
            return current.ip
        taken = ns.taken
        book = self.addresses
        space = ns.name

        def used(ip: IPv4Address) -> bool:  # the pods', the services', the booked ones
            return ip in taken.ips or book.holder(space, ip) not in (None, pod)

        before = book.get(space, pod)
        if (before is not None and before in cidr and not used(before)
                and before not in (gateway, cidr.network_address, cidr.broadcast_address)):
            return before
        # Every host below the hint was in use at the last choice; what was freed since
        # (a detach, a release) lowers it, so a choice costs O(1) amortised, not O(pods).
        hint = self._scan_hints.get(space)
        start = hint[1] if hint is not None and hint[0] is taken else None
        for low in (taken.take_freed(), book.take_released(space)):
            if start is not None and low is not None and low < start:
                start = low
        gw = int(gateway)
        first = int(cidr.network_address) + 1
        n = first_free(first if start is None else max(first, start),
                       int(cidr.broadcast_address) - 1,
                       lambda n: n == gw or used(IPv4Address(n)))
        if n is None:
            self._scan_hints.pop(space, None)
            raise Conflict(f"namespace {ns.name}: no free address left in {cidr} "
                           f"({len(taken.ips)} in use); detach a pod or give this one an ip")
        self._scan_hints[space] = (taken, n)
        ip = IPv4Address(n)
        return ip

    async def restore_pods(self) -> int:
        """After a restart: attach again the netns pods the fabric gave an address to
        (a CNI runtime's containers) whose netns still exists; free the addresses of
        those whose netns is gone. Returns how many came back."""
        restored = 0
        for ns in list(self.namespaces.values()):
            for pod in self.addresses.booked(ns.name):
                where = self.addresses.where(ns.name, pod)
                if pod in ns.pods or not where.get("netns"):
                    continue
                netns = where["netns"]
                if not os.path.exists(netns if netns.startswith("/") else
                                      os.path.join(NETNS_DIR, netns)):
                    log.info("namespace %s: pod %s: netns %s is gone; its address is free",
                             ns.name, pod, where["netns"])
                    self.addresses.release(ns.name, pod)
                    continue
                try:
                    await self.attach_pod(ns.name, {"name": pod, **where})
                    restored += 1
                except FabricError as e:
                    log.warning("namespace %s: pod %s not restored: %s", ns.name, pod,
                                e.message)
        return restored

    async def detach_pod(self, namespace: str, name: str) -> None:
        """Detach the pod and free the address the fabric gave it. A pod the daemon
        forgot (it restarted) but whose address is still booked only frees that."""
        async with self._lock:
            released = self.addresses.release(namespace, name)
            try:
                ns = self._ns(namespace)
                ns.remove_pod(name)
            except NotFound:
                if released:
                    return
                raise
            self._forget_pod(ns, name)

    def _check_pod_set(self, ns: Namespace, spec: PodSpec, source: str) -> None:
        """The cross-namespace rules (an interface or a netns slot used once on this worker)
        for `spec` joining `ns`; within `ns` parse_pod has checked them. Under the lock."""
        if spec.kind == "remote":
            return
        for other in self.namespaces.values():
            if other is ns:
                continue
            taken = other.taken
            if spec.interface is not None:
                holder = taken.interfaces.get(spec.interface)
                if holder is not None:
                    raise ConfigError(source, "interface", f"interface {spec.interface} is "
                                      f"already used by pod {holder} in namespace {other.name}")
            if spec.netns_path is not None:
                holder = taken.netns.get((spec.netns_path, spec.ifname))
                if holder is not None:
                    raise ConfigError(source, "netns", f"netns {spec.netns} already has "
                                      f"{spec.ifname} (pod {holder} in namespace {other.name})")

    @staticmethod
    def _forget_pod(ns: Namespace, name: str) -> None:
        ns.forget_pod(name)

    @staticmethod
    def _record_pod(ns: Namespace, spec: PodSpec) -> None:
        ns.record_pod(spec)

    def set_ready(self, namespace: str, pod: str, ready: bool) -> None:
        self._ns(namespace).set_ready(pod, ready)

    # --- services ------------------------------------------------------------------------

    async def reload_activator(self, namespace: str, service: str, port: int | None = None,
                               module: str | None = None) -> list[dict[str, Any]]:
        """Swap a service port's activator (all its activator ports without `port`) for
        a fresh load of `module` (a .wasm path or a shipped name; default: the configured
        one). New flows and streams go to the new module, live streams stay with the old
        until they end; a module that cannot load, instantiate or init is refused
        (ActivatorRefused, 422) and the old one keeps serving."""
        ns = self._ns(namespace)
        if ns.services is None:
            raise NotFound(f"namespace {namespace} has no services")
        return await ns.services.reload_activator(service, port, module)

    async def apply_service(self, namespace: str,
                            spec: Mapping[str, Any] | ServiceSpec) -> dict[str, Any]:
        """Add a service or replace the one with its name (same validation as the config
        file); an unchanged spec leaves the service, its flows and held packets alone."""
        ns = self._ns(namespace)
        if not isinstance(spec, ServiceSpec):
            spec = parse_service(dict(spec), f"apply_service {namespace}", ns.spec)
        async with self._lock:
            services = tuple(s for s in ns.spec.services if s.name != spec.name) + (spec,)
            await self._reconcile(ns, dataclasses.replace(ns.spec, services=services))
            return next(r for r in await ns.services.views() if r["name"] == spec.name) \
                if ns.services is not None else {}

    async def remove_service(self, namespace: str, name: str) -> None:
        ns = self._ns(namespace)
        async with self._lock:
            if ns.spec.service(name) is None:
                raise NotFound(f"service {name} not found in namespace {namespace}")
            services = tuple(s for s in ns.spec.services if s.name != name)
            await self._reconcile(ns, dataclasses.replace(ns.spec, services=services))

    # --- views ---------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """ok only when the data plane runs and takes a call within HEALTH_TIMEOUT."""
        out: dict[str, Any] = {"ok": False, "worker": self.worker_id}
        dp = self._dataplane
        if dp is None:
            return out | {"error": "the fabric is not started"}
        if not dp.alive:
            return out | {"error": "the data-plane thread has died (see the log)"}
        if self.starting:
            return out | {"error": "starting: the config file's namespaces are being applied"}
        try:
            await dp.acall(int, timeout=HEALTH_TIMEOUT)
        except DataPlaneBusy:
            return out | {"error": f"the data plane did not answer within {HEALTH_TIMEOUT}s"}
        return out | {"ok": True}

    async def get_namespaces(self) -> list[dict[str, Any]]:
        return [await ns.summary() for ns in list(self.namespaces.values())]

    async def get_namespace(self, name: str) -> dict[str, Any]:
        ns = self._ns(name)
        d = namespace_to_dict(ns.spec)
        d["status"] = await ns.summary()
        return d

    async def get_pods(self, namespace: str | None = None) -> list[dict[str, Any]]:
        spaces = [self._ns(namespace)] if namespace else list(self.namespaces.values())
        return [row for ns in spaces for row in await ns.pod_views()]

    async def get_services(self, namespace: str | None = None) -> list[dict[str, Any]]:
        spaces = [self._ns(namespace)] if namespace else list(self.namespaces.values())
        return [row for ns in spaces if ns.services is not None
                for row in await ns.services.views()]

    async def get_peers(self) -> list[dict[str, Any]]:
        if self.link is None:
            return []
        mono = time.monotonic()
        rows = await self.dataplane.acall(self.link.core.peers, mono)
        wall = time.time()
        for r in rows:
            ep = r.get("endpoint")
            r["endpoint"] = f"{ep[0]}:{ep[1]}" if ep else None
            lh = r.get("last_handshake")
            r["last_handshake"] = round(wall - (mono - lh), 3) if lh is not None else None
            r["last_handshake_age"] = round(mono - lh, 3) if lh is not None else None
            r["drops_total"] = sum(r.get("drops", {}).values())
        return rows

    async def get_drops(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """The last drops of each namespace (newest first), with the frames' headers."""
        spaces = [self._ns(namespace)] if namespace else list(self.namespaces.values())
        offset = time.time() - time.monotonic()
        rows: list[dict[str, Any]] = []
        for ns in spaces:
            for r in await self.dataplane.acall(ns.router.droplog.entries):
                r["ts"] = round(r["ts"] + offset, 6)
                r["first"] = round(r["first"] + offset, 6)
                rows.append(r)
        return rows

    def monitor(self, namespace: str | None = None, pod: str | None = None,
                reason: str | None = None) -> MonitorSubscription:
        """Follow drops live (sampled, bounded); filters apply before anything is queued."""
        spaces = [self._ns(namespace)] if namespace else list(self.namespaces.values())
        if pod is not None and namespace is not None:
            self._ns(namespace).get(pod)  # an unknown pod is a 404, not a silent feed
        return MonitorSubscription([ns.router.droplog for ns in spaces], pod, reason,
                                   asyncio.get_running_loop())

    def monitor_sinks(self) -> int:
        return sum(len(ns.router.droplog.sinks) for ns in list(self.namespaces.values()))

    def recent_events(self, namespace: str | None = None, pod: str | None = None,
                      service: str | None = None) -> list[dict[str, Any]]:
        return self.bus.recent(namespace, pod, service)

    def events(self) -> Subscription:
        return self.bus.subscribe()

    def capture(self, namespace: str, pod: str,
                max_frames: int | None = None) -> CaptureSubscription:
        return self._ns(namespace).capture(pod, max_frames)

    async def counters(self) -> dict[str, Any]:
        """All counters as plain data, for embedding workers that keep their own metrics."""
        out: dict[str, Any] = {}
        for ns in list(self.namespaces.values()):
            drops, held = await self.dataplane.acall(
                lambda ns=ns: (dict(ns.router.drops), ns.router.held()))
            out[ns.name] = {"drops": drops, "held": held,
                            "pods": {row["name"]: row for row in await ns.pod_views()}}
        return out

    async def metrics(self) -> list[Metric]:
        """Every metric family of this worker (fabric.runtime.metrics)."""
        return await collect(self)

    def _on_port_trouble(self) -> None:
        t = asyncio.get_running_loop().create_task(self._port_trouble())
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _port_trouble(self) -> None:
        for port, err in self.dataplane.trouble.take():
            try:
                async with self._lock:
                    owner = next((ns for ns in self.namespaces.values() if ns.owns(port)),
                                 None)
                    if owner is None:
                        self.dataplane.trouble.forget(port)  # already detached or replaced
                    else:
                        await owner.port_trouble(port, err)
            except Exception:
                log.exception("handling a broken port failed")

    async def _retry_loop(self) -> None:
        next_lookup = time.monotonic() + REFRESH_INTERVAL
        while True:
            await asyncio.sleep(RETRY_INTERVAL)
            await self._refresh_host()
            if time.monotonic() >= next_lookup:
                next_lookup = time.monotonic() + REFRESH_INTERVAL
                await self._refresh_endpoints()
            for ns in list(self.namespaces.values()):
                try:
                    async with self._lock:
                        if self.namespaces.get(ns.name) is ns:
                            await ns.retry_unattached()
                except Exception:
                    log.exception("namespace %s: retrying attachments failed", ns.name)


    async def _refresh_endpoints(self) -> None:
        """Peers named by host name follow their name's answer."""
        link = self.link
        if link is None:
            return
        keepalive = self.tunnel.keepalive if self.tunnel else None
        for pid in self.resolver.named():
            spec = self.peer_specs.get(pid)
            if spec is None:
                continue
            before = self.resolver.answers.get(pid)
            after = await self.resolver.resolve(pid, spec.endpoint)
            if after is not None and after != before and self.peer_specs.get(pid) is spec:
                try:
                    await self.dataplane.acall(link.core.add_peer, pid, spec.public_key,
                                               after, keepalive)
                except (FabricError, ValueError) as e:
                    log.warning("peer %s: new endpoint not applied: %s", pid, e)

    async def _refresh_host(self) -> None:
        """Egress keeps refusing this worker's own addresses when they change."""
        uplink = self.uplink
        if uplink is None:
            return
        try:
            if not await asyncio.to_thread(uplink.refresh_host):
                return
        except PortError as e:
            log.warning("egress: cannot re-read this worker's addresses: %s", e.message)
            return
        log.info("egress: this worker's addresses are now %s; pods cannot reach them",
                 ", ".join(map(str, uplink.host)) or "none")
        async with self._lock:
            for ns in self.namespaces.values():
                ns.update_protected()


def _warn_unimplemented(spec: NamespaceSpec) -> None:
    """Say plainly which accepted parts of a spec this version does not act on yet."""
    for svc in spec.services:
        for p in svc.ports:
            if (p.activator not in ("none", *SHIPPED_ACTIVATORS)
                    and not p.activator.endswith(".wasm")):
                log.warning("namespace %s: service %s port %d: activator %r is not shipped "
                            "in this version (shipped: %s); the service holds and "
                            "activates without it", spec.name, svc.name, p.port, p.activator,
                            ", ".join(SHIPPED_ACTIVATORS))
