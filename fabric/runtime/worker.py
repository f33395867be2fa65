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
from typing import TYPE_CHECKING, Any

from fabric.config.parse import parse_namespace, parse_peer, parse_pod, validate_namespace_set
from fabric.config.render import namespace_to_dict
from fabric.config.specs import EgressSpec, NamespaceSpec, PodSpec, TunnelPeerSpec, TunnelSpec
from fabric.errors import ConfigError, FabricError, NotFound
from fabric.ports.tap import TapPort
from fabric.router.router import L3_OFF
from fabric.runtime.capture import CaptureSubscription
from fabric.runtime.dataplane import DataPlane
from fabric.runtime.events import EventBus, Subscription
from fabric.runtime.namespace import RETRY_INTERVAL, Namespace, PodState
from fabric.runtime.prometheus import Metric
from gateway.uplink import Uplink

if TYPE_CHECKING:
    from tunnels.link import TunnelLink

log = logging.getLogger("fabricd")


class Fabric:
    """Namespaces, pods and their ports on this worker.

    Use as `async with Fabric(worker_id="w1") as fab:`; leaving the block detaches every
    pod and removes every interface the fabric created.
    """

    def __init__(self, worker_id: str | None = None, *, local_stack: bool = True,
                 egress: EgressSpec | None = None, tunnel: TunnelSpec | None = None) -> None:
        self.worker_id = worker_id or socket.gethostname()
        # Noise-encrypted UDP tunnels to other workers, for pods that live there.
        self.tunnel = tunnel
        self.link: TunnelLink | None = None
        self.peer_specs: dict[str, TunnelPeerSpec] = {}
        self._by_id: dict[int, Namespace] = {}
        self.tunnel_unknown_namespace = 0
        # The worker's egress TUN (and its address pool), if pods may reach the outside.
        self.egress = egress
        self.uplink: Uplink | None = None
        # Each namespace's gateway lives in a private kernel namespace (needs root and
        # unshare); without it the router answers ping at the gateway itself.
        self.local_stack = local_stack
        self.bus = EventBus()
        self.namespaces: dict[str, Namespace] = {}
        self.started = time.time()
        self._dataplane: DataPlane | None = None
        self._lock = asyncio.Lock()
        self._retry_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Fabric:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._dataplane is None:
            self._dataplane = DataPlane()
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
                self._dataplane.add_reader(uplink, port, uplink.receive, L3_OFF)
                log.info("egress through %s, pool %s", self.egress.tun, self.egress.pool)
            if self.tunnel is not None:
                await self._start_tunnel(self.tunnel)
            self._retry_task = asyncio.create_task(self._retry_loop())

    async def close(self) -> None:
        if self._retry_task is not None:
            self._retry_task.cancel()
            self._retry_task = None
        async with self._lock:
            for name in list(self.namespaces):
                self._remove(name)
        if self._dataplane is not None:
            if self.link is not None and self.link.sock is not None:
                self._dataplane.remove_handler(self.link.sock.fileno())
                self._dataplane.remove_router(self.link)  # type: ignore[arg-type]
            if self.uplink is not None and self.uplink.port is not None:
                self._dataplane.remove_port(self.uplink.port)
            self._dataplane.close()
            self._dataplane = None
        if self.uplink is not None:
            self.uplink.close()
            self.uplink = None
        if self.link is not None:
            self.link.close()
            self.link = None
        self.bus.close()

    async def _start_tunnel(self, spec: TunnelSpec) -> None:
        from tunnels.core import TunnelCore
        from tunnels.link import TunnelLink

        # Initiation timestamps must grow across restarts: they follow the wall clock.
        core = TunnelCore(spec.private_key, spec.psk,
                          wall_offset=time.time() - time.monotonic())
        for peer in spec.peers:
            core.add_peer(peer.id, peer.public_key, peer.endpoint, spec.keepalive)
            self.peer_specs[peer.id] = peer
        link = TunnelLink(core, spec.listen, self._deliver)
        fd = await asyncio.to_thread(link.open)
        self.link = link
        self.dataplane.add_handler(fd, link.readable, "tunnel")
        self.dataplane.add_router(link)  # type: ignore[arg-type]  # for its timers
        log.info("tunnel listening on %s:%d, %d peers", spec.listen[0], spec.listen[1],
                 len(spec.peers))

    def _deliver(self, peer: str, ns_id: int, packet: bytes, now: float,
                 vnet_hdr: bytes | None = None) -> None:
        """On the data-plane thread: a packet from another worker, to its namespace."""
        ns = self._by_id.get(ns_id)
        if ns is None:
            self.tunnel_unknown_namespace += 1
            return
        router = ns.router
        router.receive_remote(peer, packet, now, vnet_hdr)
        if router.outputs:
            self.dataplane.flush(router)

    def _link(self) -> TunnelLink:
        if self.link is None:
            raise FabricError("no tunnel: this worker has no `worker.tunnel` configured")
        return self.link

    def set_peer(self, spec: Mapping[str, Any] | TunnelPeerSpec,
                 source: str = "set_peer") -> dict[str, Any]:
        """Add a peer or change its key/endpoint, without a restart."""
        link = self._link()
        if not isinstance(spec, TunnelPeerSpec):
            others = [p for pid, p in self.peer_specs.items() if pid != spec.get("id")]
            spec = parse_peer(dict(spec), source, self.worker_id, others)
        keepalive = self.tunnel.keepalive if self.tunnel else None
        old = self.peer_specs.get(spec.id)
        if old is not None and old != spec:
            self.dataplane.call(link.core.remove_peer, spec.id)
        if old != spec:
            self.dataplane.call(link.core.add_peer, spec.id, spec.public_key, spec.endpoint,
                                keepalive)
            self.peer_specs[spec.id] = spec
            self.bus.emit("peer_added" if old is None else "peer_changed", peer=spec.id)
        return next(p for p in self.get_peers() if p.get("id") == spec.id)

    def remove_peer(self, peer_id: str) -> None:
        link = self._link()
        if peer_id not in self.peer_specs:
            raise NotFound(f"peer {peer_id} not found")
        self.dataplane.call(link.core.remove_peer, peer_id)
        del self.peer_specs[peer_id]
        self.bus.emit("peer_removed", peer=peer_id)

    def rekey_peer(self, peer_id: str) -> None:
        link = self._link()
        if peer_id not in self.peer_specs:
            raise NotFound(f"peer {peer_id} not found")
        self.dataplane.call(link.rekey, peer_id, time.monotonic())

    def sync_peers(self, peers: tuple[TunnelPeerSpec, ...]) -> None:
        """Make the peer set equal to `peers` (a config reload)."""
        if self.link is None:
            return
        wanted = {p.id: p for p in peers}
        for pid in list(self.peer_specs):
            if pid not in wanted:
                self.remove_peer(pid)
        for p in peers:
            self.set_peer(p)

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
        others = [ns.spec for name, ns in self.namespaces.items() if name != spec.name]
        validate_namespace_set(others + [spec], source)
        async with self._lock:
            ns = self.namespaces.get(spec.name)
            if ns is not None and _needs_rebuild(ns.spec, spec):
                self._remove(spec.name)
                ns = None
            _warn_unimplemented(spec)
            if ns is None:
                ns = Namespace(spec, self.dataplane, self.bus)
                try:
                    if self.local_stack:
                        await ns.start_local_stack()
                    if self.uplink is not None:
                        ns.start_egress(self.uplink)
                    if self.link is not None and spec.id is not None:
                        ns.start_tunnel(self.link, spec.id)
                        self._by_id[spec.id] = ns
                    ns.start_services()
                except BaseException:
                    ns.close()
                    raise
                self.namespaces[spec.name] = ns
                for pod in spec.pods:
                    await ns.add_pod(pod, strict=False)
                self.bus.emit("namespace_applied", spec.name, created=True)
                log.info("namespace %s: created (%s, %d pods)", spec.name, spec.cidr,
                         len(spec.pods))
                return ns.summary()
            old = ns.spec
            ns.spec = spec
            wanted = {p.name: p for p in spec.pods}
            changed = 0
            for name in list(ns.pods):
                if name not in wanted or ns.pods[name].spec != wanted[name]:
                    ns.remove_pod(name)
                    changed += 1
            for pod in spec.pods:
                if pod.name not in ns.pods:
                    await ns.add_pod(pod, strict=False)
                    changed += 1
                else:
                    ns.pods[pod.name].spec = pod
            ns.sync_records()
            if ns.services is not None and old.services != spec.services:
                ns.services.apply(spec.services)
            if old.egress_allow != spec.egress_allow:
                ns.update_egress()
            if old != spec:
                self.bus.emit("namespace_applied", spec.name, created=False, pods_changed=changed)
                log.info("namespace %s: reconciled, %d pods changed", spec.name, changed)
            return ns.summary()

    async def remove_namespace(self, name: str) -> None:
        async with self._lock:
            self._remove(name)

    def _remove(self, name: str) -> None:
        ns = self.namespaces.pop(name, None)
        if ns is None:
            raise NotFound(f"namespace {name} not found")
        if ns.spec.id is not None and self._by_id.get(ns.spec.id) is ns:
            self.dataplane.call(self._by_id.pop, ns.spec.id, None)
        ns.close()
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
        Returns the pod, including the DNS settings a VMM or runtime should give it."""
        ns = self._ns(namespace)
        source = f"attach_pod {namespace}"
        if not isinstance(spec, PodSpec):
            data = dict(spec)
            if fd is not None:
                if "netns" in data or "interface" in data or "worker" in data:
                    raise ConfigError(source, "fd", "give either fd or netns/interface/worker")
                data["interface"] = f"fd{fd}"
            spec = parse_pod(data, source, ns.spec, self.worker_id)
        async with self._lock:
            if spec.name in ns.pods:
                if ns.pods[spec.name].spec == spec and fd is None:
                    return ns.pod_view(ns.pods[spec.name])
                ns.remove_pod(spec.name)
            if fd is not None:
                io = TapPort.from_fd(fd, vnet, mtu=ns.spec.mtu)
                os.set_blocking(fd, False)
                self.dataplane.call(ns.router.add_pod, spec.name, spec.ip, spec.mac)
                state = PodState(spec, spec.ready)
                ns.pods[spec.name] = state
                ns.attach_fd(state, io)
            else:
                state = await ns.add_pod(spec, strict=True)
            self._record_pod(ns, spec)
            return ns.pod_view(state)

    async def detach_pod(self, namespace: str, name: str) -> None:
        async with self._lock:
            ns = self._ns(namespace)
            ns.remove_pod(name)
            ns.spec = dataclasses.replace(
                ns.spec, pods=tuple(p for p in ns.spec.pods if p.name != name))
            ns.sync_records()

    def _record_pod(self, ns: Namespace, spec: PodSpec) -> None:
        pods = tuple(p for p in ns.spec.pods if p.name != spec.name) + (spec,)
        ns.spec = dataclasses.replace(ns.spec, pods=pods)
        ns.sync_records()

    def set_ready(self, namespace: str, pod: str, ready: bool) -> None:
        self._ns(namespace).set_ready(pod, ready)

    # --- views ---------------------------------------------------------------------------

    def get_namespaces(self) -> list[dict[str, Any]]:
        return [ns.summary() for ns in self.namespaces.values()]

    def get_namespace(self, name: str) -> dict[str, Any]:
        ns = self._ns(name)
        d = namespace_to_dict(ns.spec)
        d["status"] = ns.summary()
        return d

    def get_pods(self, namespace: str | None = None) -> list[dict[str, Any]]:
        spaces = [self._ns(namespace)] if namespace else list(self.namespaces.values())
        return [ns.pod_view(p) for ns in spaces for p in ns.pods.values()]

    def get_services(self, namespace: str | None = None) -> list[dict[str, Any]]:
        spaces = [self._ns(namespace)] if namespace else list(self.namespaces.values())
        return [row for ns in spaces if ns.services is not None
                for row in ns.services.views()]

    def get_peers(self) -> list[dict[str, Any]]:
        if self.link is None:
            return []
        mono = time.monotonic()
        rows = self.dataplane.call(self.link.core.peers, mono)
        wall = time.time()
        for r in rows:
            ep = r.get("endpoint")
            r["endpoint"] = f"{ep[0]}:{ep[1]}" if ep else None
            lh = r.get("last_handshake")
            r["last_handshake"] = round(wall - (mono - lh), 3) if lh is not None else None
            r["last_handshake_age"] = round(mono - lh, 3) if lh is not None else None
            r["drops_total"] = sum(r.get("drops", {}).values())
        return rows

    def events(self) -> Subscription:
        return self.bus.subscribe()

    def capture(self, namespace: str, pod: str,
                max_frames: int | None = None) -> CaptureSubscription:
        return self._ns(namespace).capture(pod, max_frames)

    def counters(self) -> dict[str, Any]:
        """All counters as plain data, for embedding workers that keep their own metrics."""
        out: dict[str, Any] = {}
        for ns in self.namespaces.values():
            out[ns.name] = {
                "drops": dict(ns.router.drops),
                "held": ns.router.held(),
                "pods": {name: ns.pod_view(p) for name, p in ns.pods.items()},
            }
        return out

    def metrics(self) -> list[Metric]:
        rx_p = Metric("fabric_port_rx_packets_total", "counter",
                      "Frames received from a pod's port (a GSO super-frame counts once)")
        rx_b = Metric("fabric_port_rx_bytes_total", "counter", "Bytes received from a pod's port")
        tx_p = Metric("fabric_port_tx_packets_total", "counter", "Frames sent to a pod's port")
        tx_b = Metric("fabric_port_tx_bytes_total", "counter", "Bytes sent to a pod's port")
        drops = Metric("fabric_drops_total", "counter",
                       "Frames dropped, by namespace, ingress pod (empty if none) and reason")
        pods = Metric("fabric_pods", "gauge", "Pods in the namespace's table")
        attached = Metric("fabric_pods_attached", "gauge", "Pods whose port is attached")
        held = Metric("fabric_held_packets", "gauge", "Frames held for pods not attached yet")
        for ns in self.namespaces.values():
            n = ns.name
            for reason, v in dict(ns.router.drops).items():
                drops.samples.append(({"namespace": n, "pod": "", "reason": reason}, v))
            for name, st in ns.pods.items():
                port = st.port
                if port is None:
                    continue
                lab = {"namespace": n, "pod": name}
                rx_p.samples.append((lab, port.rx_packets))
                rx_b.samples.append((lab, port.rx_bytes))
                tx_p.samples.append((lab, port.tx_packets))
                tx_b.samples.append((lab, port.tx_bytes))
                for reason, v in dict(port.drops).items():
                    drops.samples.append(({**lab, "reason": reason}, v))
            pods.samples.append(({"namespace": n}, len(ns.pods)))
            attached.samples.append(
                ({"namespace": n}, sum(1 for p in ns.pods.values() if p.port is not None)))
            held.samples.append(({"namespace": n}, ns.router.held()))
        dns = Metric("fabric_dns_total", "counter",
                     "DNS server events per namespace (queries, local answers, forwards, "
                     "drops...), by counter name")
        egress = Metric("fabric_egress_total", "counter",
                        "Egress NAT events per namespace, by counter name")
        flows = Metric("fabric_egress_flows", "gauge", "Egress NAT flows in the table")
        for ns in self.namespaces.values():
            n = ns.name
            if ns.dns is not None:
                total: dict[str, int] = dict(ns.dns.core.counters)
                for extra in (ns.dns_fast.counters if ns.dns_fast else {}, ns.dns.counters):
                    for k, v in dict(extra).items():
                        total[k] = total.get(k, 0) + v
                for k, v in total.items():
                    dns.samples.append(({"namespace": n, "counter": k}, v))
            if ns.egress is not None:
                for k, v in dict(ns.egress.counters).items():
                    egress.samples.append(({"namespace": n, "counter": k}, v))
                flows.samples.append(({"namespace": n}, ns.egress.flows))
            lp = ns.local_port
            if lp is not None:
                lab = {"namespace": n, "pod": "(gateway)"}
                rx_p.samples.append((lab, lp.rx_packets))
                rx_b.samples.append((lab, lp.rx_bytes))
                tx_p.samples.append((lab, lp.tx_packets))
                tx_b.samples.append((lab, lp.tx_bytes))
                for reason, v in dict(lp.drops).items():
                    drops.samples.append(({**lab, "reason": reason}, v))
        up = self.uplink.port if self.uplink is not None else None
        if up is not None:
            lab = {"namespace": "", "pod": "(uplink)"}
            rx_p.samples.append((lab, up.rx_packets))
            rx_b.samples.append((lab, up.rx_bytes))
            tx_p.samples.append((lab, up.tx_packets))
            tx_b.samples.append((lab, up.tx_bytes))
            for reason, v in dict(up.drops).items():
                drops.samples.append(({**lab, "reason": reason}, v))
        tun_metrics: list[Metric] = []
        if self.link is not None:
            core_c = self.dataplane.call(lambda: self.link.core.counters)  # type: ignore[union-attr]
            tun = Metric("fabric_tunnel_total", "counter",
                         "Tunnel events (handshakes, drops by reason, rx/tx), by counter name",
                         [({"counter": k}, v) for k, v in core_c.items()])
            tun.samples += [({"counter": k}, v) for k, v in self.link.counters.items()]
            tun.samples.append(({"counter": "unknown_namespace"}, self.tunnel_unknown_namespace))
            peer_rx = Metric("fabric_peer_rx_bytes_total", "counter", "Bytes from a peer")
            peer_tx = Metric("fabric_peer_tx_bytes_total", "counter", "Bytes to a peer")
            peer_drops = Metric("fabric_peer_drops_total", "counter",
                                "Datagrams of a peer dropped, by reason")
            peer_hs = Metric("fabric_peer_last_handshake_seconds", "gauge",
                             "Unix time of the peer's last completed handshake")
            for r in self.get_peers():
                lab = {"peer": r["id"]}
                peer_rx.samples.append((lab, r["rx_bytes"]))
                peer_tx.samples.append((lab, r["tx_bytes"]))
                for reason, v in r.get("drops", {}).items():
                    peer_drops.samples.append(({**lab, "reason": reason}, v))
                if r["last_handshake"] is not None:
                    peer_hs.samples.append((lab, r["last_handshake"]))
            tun_metrics = [tun, peer_rx, peer_tx, peer_drops, peer_hs]
        nss = Metric("fabric_namespaces", "gauge", "Namespaces on this worker",
                     [({}, len(self.namespaces))])
        ev = Metric("fabric_events_total", "counter", "Events published",
                    [({}, self.bus.published)])
        evl = Metric("fabric_events_lost_total", "counter",
                     "Events a slow subscriber lost (its queue was full)", [({}, self.bus.lost())])
        return [nss, pods, attached, held, rx_p, rx_b, tx_p, tx_b, drops, dns, egress, flows,
                *tun_metrics, ev, evl]

    async def _retry_loop(self) -> None:
        while True:
            await asyncio.sleep(RETRY_INTERVAL)
            for ns in list(self.namespaces.values()):
                try:
                    async with self._lock:
                        if self.namespaces.get(ns.name) is ns:
                            await ns.retry_unattached()
                except Exception:
                    log.exception("namespace %s: retrying attachments failed", ns.name)


def _needs_rebuild(old: NamespaceSpec, new: NamespaceSpec) -> bool:
    """Changes that alter every pod's addressing or link: rebuild the namespace."""
    return (old.cidr != new.cidr or old.gateway_mac != new.gateway_mac or old.mtu != new.mtu
            or old.id != new.id)


def _warn_unimplemented(spec: NamespaceSpec) -> None:
    """Say plainly which accepted parts of a spec this version does not act on yet."""
    for svc in spec.services:
        for p in svc.ports:
            if p.activator not in ("none", "tcp") and not p.activator.endswith(".wasm"):
                log.warning("namespace %s: service %s port %d: activator %r is not shipped "
                            "in this version (shipped: tcp); the service holds and "
                            "activates without it", spec.name, svc.name, p.port, p.activator)
