"""The Prometheus view of a worker: every metric family the daemon exports.

Counters of the packet path live on the data-plane thread, so they are copied there in
one ``DataPlane.call`` (one consistent snapshot, no reads across threads); the DNS
server's own counters live on the event loop and are read here. The exposition format is
fabric.runtime.prometheus.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from fabric.ports import netlink
from fabric.router.model import Port
from fabric.runtime.dataplane import DataPlane
from fabric.runtime.events import EventBus
from fabric.runtime.namespace import Namespace
from fabric.runtime.prometheus import Metric
from gateway.uplink import Uplink
from tunnels.link import TunnelLink


class Fabric(Protocol):
    """What the metrics read of a worker (fabric.runtime.worker.Fabric)."""

    namespaces: Mapping[str, Namespace]
    uplink: Uplink | None
    link: TunnelLink | None
    bus: EventBus

    @property
    def dataplane(self) -> DataPlane: ...

    def get_peers(self) -> list[dict[str, Any]]: ...


def _port(port: Port) -> dict[str, Any]:
    return {"rx_packets": port.rx_packets, "rx_bytes": port.rx_bytes,
            "tx_packets": port.tx_packets, "tx_bytes": port.tx_bytes,
            "drops": dict(port.drops)}


def _snapshot(fab: Fabric) -> dict[str, Any]:
    """On the data-plane thread: plain copies of what the packet path counts."""
    namespaces = []
    for ns in fab.namespaces.values():
        namespaces.append({
            "name": ns.name,
            "drops": dict(ns.router.drops),
            "pods": len(ns.pods),
            "attached": sum(1 for p in ns.pods.values() if p.port is not None),
            "held": ns.router.held(),
            "ports": {name: _port(st.port) for name, st in ns.pods.items()
                      if st.port is not None},
            "gateway": _port(ns.local_port) if ns.local_port is not None else None,
            "dns_fast": dict(ns.dns_fast.counters) if ns.dns_fast is not None else {},
            "egress": dict(ns.egress.counters) if ns.egress is not None else None,
            "egress_flows": ns.egress.flows if ns.egress is not None else 0,
        })
    up = fab.uplink.port if fab.uplink is not None else None
    link = fab.link
    return {
        "namespaces": namespaces,
        "uplink": _port(up) if up is not None else None,
        "tunnel": None if link is None else {
            "core": dict(link.core.counters), "link": link.snapshot(),
            "unknown_namespace": fab.dataplane.tunnel_unknown_namespace,
            "yielded": fab.dataplane.tunnel_yields},
    }


async def collect(fab: Fabric) -> list[Metric]:
    snap = await fab.dataplane.acall(_snapshot, fab)
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
    dns = Metric("fabric_dns_total", "counter",
                 "DNS server events per namespace (queries, local answers, forwards, "
                 "drops...), by counter name")
    egress = Metric("fabric_egress_total", "counter",
                    "Egress NAT events per namespace, by counter name")
    flows = Metric("fabric_egress_flows", "gauge", "Egress NAT flows in the table")

    def port_samples(lab: dict[str, str], c: dict[str, Any]) -> None:
        rx_p.samples.append((lab, c["rx_packets"]))
        rx_b.samples.append((lab, c["rx_bytes"]))
        tx_p.samples.append((lab, c["tx_packets"]))
        tx_b.samples.append((lab, c["tx_bytes"]))
        for reason, v in c["drops"].items():
            drops.samples.append(({**lab, "reason": reason}, v))

    for s in snap["namespaces"]:
        n = s["name"]
        for reason, v in s["drops"].items():
            drops.samples.append(({"namespace": n, "pod": "", "reason": reason}, v))
        for name, c in s["ports"].items():
            port_samples({"namespace": n, "pod": name}, c)
        pods.samples.append(({"namespace": n}, s["pods"]))
        attached.samples.append(({"namespace": n}, s["attached"]))
        held.samples.append(({"namespace": n}, s["held"]))
        ns = fab.namespaces.get(n)
        if ns is not None and ns.dns is not None:
            total: dict[str, int] = dict(ns.dns.core.counters)
            for extra in (s["dns_fast"], dict(ns.dns.counters)):
                for k, v in extra.items():
                    total[k] = total.get(k, 0) + v
            for k, v in total.items():
                dns.samples.append(({"namespace": n, "counter": k}, v))
        if s["egress"] is not None:
            for k, v in s["egress"].items():
                egress.samples.append(({"namespace": n, "counter": k}, v))
            flows.samples.append(({"namespace": n}, s["egress_flows"]))
        if s["gateway"] is not None:
            port_samples({"namespace": n, "pod": "(gateway)"}, s["gateway"])
    if snap["uplink"] is not None:
        port_samples({"namespace": "", "pod": "(uplink)"}, snap["uplink"])
    tun_metrics: list[Metric] = []
    t = snap["tunnel"]
    if t is not None:
        tun = Metric("fabric_tunnel_total", "counter",
                     "Tunnel events (handshakes, drops by reason, rx/tx), by counter name",
                     [({"counter": k}, v) for k, v in t["core"].items()])
        tun.samples += [({"counter": k}, v) for k, v in t["link"].items()]
        tun.samples.append(({"counter": "unknown_namespace"}, t["unknown_namespace"]))
        tun.samples.append(({"counter": "budget_yields"}, t["yielded"]))
        peer_rx = Metric("fabric_peer_rx_bytes_total", "counter", "Bytes from a peer")
        peer_tx = Metric("fabric_peer_tx_bytes_total", "counter", "Bytes to a peer")
        peer_drops = Metric("fabric_peer_drops_total", "counter",
                            "Datagrams of a peer dropped, by reason")
        peer_hs = Metric("fabric_peer_last_handshake_seconds", "gauge",
                         "Unix time of the peer's last completed handshake")
        for r in await fab.get_peers():
            lab = {"peer": r["id"]}
            peer_rx.samples.append((lab, r["rx_bytes"]))
            peer_tx.samples.append((lab, r["tx_bytes"]))
            for reason, v in r.get("drops", {}).items():
                peer_drops.samples.append(({**lab, "reason": reason}, v))
            if r["last_handshake"] is not None:
                peer_hs.samples.append((lab, r["last_handshake"]))
        tun_metrics = [tun, peer_rx, peer_tx, peer_drops, peer_hs]
    nss = Metric("fabric_namespaces", "gauge", "Namespaces on this worker",
                 [({}, len(fab.namespaces))])
    ev = Metric("fabric_events_total", "counter", "Events published",
                [({}, fab.bus.published)])
    evl = Metric("fabric_events_lost_total", "counter",
                 "Events a slow subscriber lost (its queue was full)", [({}, fab.bus.lost())])
    netns = Metric("fabric_netns_total", "counter",
                   "Pods' netns paths refused (refused_<why>) and calls inside a pod's "
                   "namespace given up on (timeouts), by counter name",
                   [({"counter": k}, v) for k, v in sorted(netlink.counters.snapshot().items())])
    return [nss, pods, attached, held, rx_p, rx_b, tx_p, tx_b, drops, dns, egress, flows,
            *tun_metrics, ev, evl, netns]
