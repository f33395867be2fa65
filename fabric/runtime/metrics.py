"""The Prometheus view of a worker: the samples of the families fabric.runtime.families
declares.

Counters and histograms of the packet path live on the data-plane thread, so they are
copied there in one ``DataPlane.call`` (one consistent snapshot, no reads across
threads); the DNS server's and the hooks' live on the event loop and are read here. The
exposition format is fabric.runtime.prometheus.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

from fabric.histogram import HistogramSnapshot
from fabric.ports import netlink
from fabric.router.model import Port
from fabric.runtime.dataplane import DataPlane
from fabric.runtime.events import EventBus
from fabric.runtime.families import new
from fabric.runtime.namespace import Namespace
from fabric.runtime.prometheus import Metric
from fabric.services.core import WAKE_PHASES, Service
from fabric.streams.core import WAKE_PHASES as STREAM_WAKE_PHASES
from fabric.streams.front import StreamFront
from gateway.uplink import Uplink
from tunnels.core import DROPS as TUNNEL_DROPS
from tunnels.core import EVENTS as TUNNEL_EVENTS
from tunnels.link import TunnelLink

SERVICE_STATES = ("dormant", "activating", "ready", "idle")
HOOK_RESULTS = ("run", "failed", "timed_out", "skipped", "replaced")
# The link's counters that are datagrams lost; the others are events.
LINK_DROPS = ("empty", "truncated", "send_too_big", "send_errors", "kernel_drops")
# The tunnel core's totals and sizes, each its own family (not drops nor events).
TUNNEL_TOTALS = {"rx_bytes": "fabric_tunnel_rx_bytes_total",
                 "tx_bytes": "fabric_tunnel_tx_bytes_total",
                 "rx_packets": "fabric_tunnel_rx_packets_total",
                 "tx_packets": "fabric_tunnel_tx_packets_total",
                 "peers": "fabric_tunnel_peers",
                 "indices": "fabric_tunnel_session_indices",
                 "rate_limiter_entries": "fabric_tunnel_rate_limiter_entries"}


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


def _service(svc: Service) -> dict[str, Any]:
    return {"name": svc.name, "state": svc.state, "held_packets": svc.held_packets,
            "held_bytes": svc.held_bytes, "flows": len(svc.table),
            "ready": sum(1 for b in svc.backends.values() if svc.is_ready(b)),
            "counters": dict(svc.counters), "wake": svc.wake_seconds.snapshot(),
            "phases": {p: svc.wake_phase_seconds[p].snapshot() for p in WAKE_PHASES}}


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
            "dns_fast_seconds": ns.dns_fast_seconds.snapshot(),
            "egress": dict(ns.egress.counters) if ns.egress is not None else None,
            "egress_flows": ns.egress.flows if ns.egress is not None else 0,
            "dhcp": dict(ns.dhcp.counters) if ns.dhcp is not None else None,
            "services": [_service(svc) for svc in ns.dispatch],
        })
    up = fab.uplink.port if fab.uplink is not None else None
    link = fab.link
    spin = fab.dataplane.spin
    return {
        "namespaces": namespaces,
        "uplink": _port(up) if up is not None else None,
        "busy_poll": {"polls": fab.dataplane.busy_polls, "found": fab.dataplane.spins_found,
                      "empty": fab.dataplane.spins_empty, "window": spin.window,
                      "woke": fab.dataplane.spins_ahead, "early": fab.dataplane.spins_early},
        "tunnel": None if link is None else {
            "core": dict(link.core.counters), "link": link.snapshot(),
            "handshake_seconds": link.core.handshake_seconds.snapshot(),
            "unknown_namespace": fab.dataplane.tunnel_unknown_namespace,
            "yielded": fab.dataplane.tunnel_yields},
    }


class _Families:
    """The families of one scrape, made from the registry on first use, in that order."""

    def __init__(self) -> None:
        self.made: dict[str, Metric] = {}

    def __call__(self, name: str) -> Metric:
        m = self.made.get(name)
        if m is None:
            m = self.made[name] = new(name)
        return m

    def add(self, name: str, labels: dict[str, str], value: float | HistogramSnapshot
            ) -> None:
        self(name).samples.append((labels, value))


async def collect(fab: Fabric) -> list[Metric]:
    snap = await fab.dataplane.acall(_snapshot, fab)
    f = _Families()
    f.add("fabric_namespaces", {}, len(fab.namespaces))
    for name in ("fabric_pods", "fabric_pods_attached", "fabric_held_packets",
                 "fabric_port_rx_packets_total", "fabric_port_rx_bytes_total",
                 "fabric_port_tx_packets_total", "fabric_port_tx_bytes_total",
                 "fabric_drops_total", "fabric_dns_total", "fabric_dns_answer_seconds",
                 "fabric_egress_total", "fabric_egress_flows", "fabric_dhcp_total"):
        f(name)  # declared even while empty: a dashboard's query finds its family

    def port_samples(lab: dict[str, str], c: dict[str, Any]) -> None:
        for key in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes"):
            f.add(f"fabric_port_{key}_total", lab, c[key])
        for reason, v in c["drops"].items():
            f.add("fabric_drops_total", {**lab, "reason": reason}, v)

    for s in snap["namespaces"]:
        n = s["name"]
        nl = {"namespace": n}
        for reason, v in s["drops"].items():
            f.add("fabric_drops_total", {"namespace": n, "pod": "", "reason": reason}, v)
        for name, c in s["ports"].items():
            port_samples({"namespace": n, "pod": name}, c)
        f.add("fabric_pods", nl, s["pods"])
        f.add("fabric_pods_attached", nl, s["attached"])
        f.add("fabric_held_packets", nl, s["held"])
        ns = fab.namespaces.get(n)
        if ns is not None and ns.dns is not None:
            total: dict[str, int] = dict(ns.dns.core.counters)
            for extra in (s["dns_fast"], dict(ns.dns.counters)):
                for k, v in extra.items():
                    total[k] = total.get(k, 0) + v
            for k, v in total.items():
                f.add("fabric_dns_total", {"namespace": n, "counter": k}, v)
            f.add("fabric_dns_answer_seconds", {"namespace": n, "source": "local"},
                  s["dns_fast_seconds"].merged(ns.dns.local_seconds.snapshot()))
            f.add("fabric_dns_answer_seconds", {"namespace": n, "source": "upstream"},
                  ns.dns.core.upstream_seconds.snapshot())
        if s["egress"] is not None:
            for k, v in s["egress"].items():
                f.add("fabric_egress_total", {"namespace": n, "counter": k}, v)
            f.add("fabric_egress_flows", nl, s["egress_flows"])
        if s["dhcp"] is not None:
            for k, v in s["dhcp"].items():
                f.add("fabric_dhcp_total", {"namespace": n, "counter": k}, v)
        if s["gateway"] is not None:
            port_samples({"namespace": n, "pod": "(gateway)"}, s["gateway"])
        hooks = ns.services.hooks if ns is not None and ns.services is not None else None
        for sv in s["services"]:
            _service_samples(f, n, sv, hooks)
            hosts = ns.services.hosts.get(sv["name"]) if ns is not None and \
                ns.services is not None else None
            if hosts:
                summed: dict[str, int] = {}
                for host in hosts.values():
                    for k, v in dataclasses.asdict(host.stats).items():
                        summed[k] = summed.get(k, 0) + v
                for k, v in summed.items():
                    f.add("fabric_activator_total", {"namespace": n, "service": sv["name"],
                                                     "counter": k}, v)
            fronts = ns.services.fronts.get(sv["name"]) if ns is not None and \
                ns.services is not None else None
            if fronts:
                ports = [await fr.astatus() for fr in fronts.values()]
                _stream_samples(f, n, sv["name"], list(fronts.values()), ports)
    if snap["uplink"] is not None:
        port_samples({"namespace": "", "pod": "(uplink)"}, snap["uplink"])
    t = snap["tunnel"]
    if t is not None:
        await _tunnel_samples(f, fab, t)
    bp = snap["busy_poll"]
    f.add("fabric_dataplane_busy_polls_total", {}, bp["polls"])
    for outcome in ("found", "empty"):
        f.add("fabric_dataplane_busy_poll_spins_total", {"outcome": outcome}, bp[outcome])
    for event in ("woke", "early"):
        f.add("fabric_dataplane_busy_poll_ahead_total", {"event": event}, bp[event])
    f.add("fabric_dataplane_busy_poll_window_seconds", {}, bp["window"])
    f.add("fabric_events_total", {}, fab.bus.published)
    f.add("fabric_events_lost_total", {}, fab.bus.lost())
    for k, v in sorted(netlink.counters.snapshot().items()):
        f.add("fabric_netns_total", {"counter": k}, v)
    f("fabric_netns_total")
    return list(f.made.values())


def _service_samples(f: _Families, n: str, sv: dict[str, Any], hooks: Any) -> None:
    lab = {"namespace": n, "service": sv["name"]}
    for state in SERVICE_STATES:
        f.add("fabric_service_state", {**lab, "state": state}, int(sv["state"] == state))
    f.add("fabric_service_held_packets", lab, sv["held_packets"])
    f.add("fabric_service_held_bytes", lab, sv["held_bytes"])
    f.add("fabric_service_flows", lab, sv["flows"])
    f.add("fabric_service_ready_backends", lab, sv["ready"])
    f.add("fabric_service_wakes_total", lab, sv["counters"].get("activations", 0))
    for k, v in sv["counters"].items():
        f.add("fabric_service_total", {**lab, "counter": k}, v)
    if hooks is not None:
        stats = hooks.stats(sv["name"])
        for r in HOOK_RESULTS:
            f.add("fabric_service_hooks_total", {**lab, "result": r}, getattr(stats, r))
    f.add("fabric_service_wake_seconds", lab, sv["wake"])
    for phase, h in sv["phases"].items():
        f.add("fabric_service_wake_phase_seconds", {**lab, "phase": phase}, h)


def _stream_samples(f: _Families, n: str, service: str, fronts: list[StreamFront],
                    ports: list[dict[str, Any]]) -> None:
    """A service's stream ports (fabric.streams), summed over its ports (`ports`: their
    status, read on the fronts' thread)."""
    lab = {"namespace": n, "service": service}
    f.add("fabric_service_streams", lab, sum(p["streams"] for p in ports))
    totals: dict[str, int] = {}
    guest: dict[str, int] = {}
    for p in ports:
        for k, v in p["counters"].items():
            totals[k] = totals.get(k, 0) + v
        for k, v in p["guest_counters"].items():
            guest[k] = guest.get(k, 0) + v
    for k, v in totals.items():
        f.add("fabric_service_stream_total", {**lab, "counter": k}, v)
    for k, v in guest.items():
        f.add("fabric_service_activator_total", {**lab, "counter": k}, v)
    cores = [fr.core for fr in fronts]
    wake = cores[0].wake_seconds.snapshot()
    for c in cores[1:]:
        wake = wake.merged(c.wake_seconds.snapshot())
    f.add("fabric_service_stream_wake_seconds", lab, wake)
    for phase in STREAM_WAKE_PHASES:
        h = cores[0].wake_phase_seconds[phase].snapshot()
        for c in cores[1:]:
            h = h.merged(c.wake_phase_seconds[phase].snapshot())
        f.add("fabric_service_stream_wake_phase_seconds", {**lab, "phase": phase}, h)


async def _tunnel_samples(f: _Families, fab: Fabric, t: dict[str, Any]) -> None:
    core: dict[str, int] = t["core"]
    for k in TUNNEL_DROPS:
        f.add("fabric_tunnel_drops_total", {"reason": k}, core.get(k, 0))
    for k in LINK_DROPS:
        f.add("fabric_tunnel_drops_total", {"reason": k}, t["link"].get(k, 0))
    f.add("fabric_tunnel_drops_total", {"reason": "unknown_namespace"}, t["unknown_namespace"])
    for k in TUNNEL_EVENTS:
        f.add("fabric_tunnel_events_total", {"event": k}, core.get(k, 0))
    f.add("fabric_tunnel_events_total", {"event": "rate_limiter_table_full"},
          core.get("rate_limiter_table_full", 0))
    for k, v in t["link"].items():
        if k not in LINK_DROPS:
            f.add("fabric_tunnel_events_total", {"event": k}, v)
    f.add("fabric_tunnel_events_total", {"event": "budget_yields"}, t["yielded"])
    for key, name in TUNNEL_TOTALS.items():
        f.add(name, {}, core.get(key, 0))
    f.add("fabric_tunnel_handshake_seconds", {}, t["handshake_seconds"])
    for name in ("fabric_peer_rx_bytes_total", "fabric_peer_tx_bytes_total",
                 "fabric_peer_drops_total", "fabric_peer_last_handshake_timestamp_seconds"):
        f(name)
    for r in await fab.get_peers():
        lab = {"peer": r["id"]}
        f.add("fabric_peer_rx_bytes_total", lab, r["rx_bytes"])
        f.add("fabric_peer_tx_bytes_total", lab, r["tx_bytes"])
        for reason, v in r.get("drops", {}).items():
            f.add("fabric_peer_drops_total", {**lab, "reason": reason}, v)
        if r["last_handshake"] is not None:
            f.add("fabric_peer_last_handshake_timestamp_seconds", lab, r["last_handshake"])
