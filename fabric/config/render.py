"""Specs back to plain data (JSON for the API); every ``*_to_dict`` round-trips
through the matching ``parse_*``.
"""

from __future__ import annotations

from typing import Any

from fabric.config.specs import (
    ALLOW_ALL,
    DEFAULT_ACTIVATOR_MEMORY,
    DEFAULT_RELEASE_BURST,
    DEFAULT_RELEASE_INTERVAL,
    HoldSpec,
    NamespaceSpec,
    PodSpec,
    ServiceSpec,
)

# ---------------------------------------------------------------------------
# Back to plain data (JSON for the API; round-trips through parse_*)
# ---------------------------------------------------------------------------


def pod_to_dict(pod: PodSpec) -> dict[str, Any]:
    """JSON-able pod; ``parse_pod(pod_to_dict(p), ...) == p``."""
    out: dict[str, Any] = {"name": pod.name, "ip": str(pod.ip)}
    if pod.netns is not None:
        out["netns"] = pod.netns
        out["ifname"] = pod.ifname
    elif pod.interface is not None:
        out["interface"] = pod.interface
    elif pod.worker is not None:
        out["worker"] = pod.worker
    if pod.mac is not None:
        out["mac"] = pod.mac
    out["ready"] = pod.ready
    return out


def _hold(h: HoldSpec) -> dict[str, Any]:
    """The hold limits; the release pacing only where it is not the default."""
    out: dict[str, Any] = {"packets": h.packets, "bytes": h.bytes, "timeout": h.timeout}
    if h.release_burst != DEFAULT_RELEASE_BURST:
        out["release_burst"] = h.release_burst
    if h.release_interval != DEFAULT_RELEASE_INTERVAL:
        out["release_interval"] = h.release_interval
    return out


def service_to_dict(svc: ServiceSpec) -> dict[str, Any]:
    """JSON-able service; durations are float seconds, sizes int bytes."""
    out: dict[str, Any] = {
        "name": svc.name,
        "ip": str(svc.ip),
        "ports": [
            {
                "port": p.port,
                "target_port": p.target_port,
                "protocol": p.protocol,
                "activator": p.activator,
                "activator_config": p.activator_config.to_dict(),
                **({"upstream": p.upstream} if p.upstream != "vip" else {}),
                **({"activator_memory_mib": p.activator_memory >> 20}
                   if p.activator_memory != DEFAULT_ACTIVATOR_MEMORY else {}),
                **({"max_connections_per_client": p.max_connections_per_client}
                   if p.max_connections_per_client else {}),
            }
            for p in svc.ports
        ],
        "backends": list(svc.backends),
        "hold": _hold(svc.hold),
        "idle_timeout": svc.idle_timeout,
        "readiness": svc.readiness,
    }
    if svc.on_activate is not None:
        out["on_activate"] = svc.on_activate
    if svc.on_idle is not None:
        out["on_idle"] = svc.on_idle
    return out


def namespace_to_dict(ns: NamespaceSpec) -> dict[str, Any]:
    """JSON-able namespace with every default spelled out (includes the derived gateway)."""
    out: dict[str, Any] = {"name": ns.name}
    if ns.id is not None:
        out["id"] = ns.id
    if ns.egress_allow == ALLOW_ALL:
        egress: Any = True
    elif not ns.egress_allow:
        egress = False
    else:
        egress = {"allow": [str(n) for n in ns.egress_allow]}
    out.update(
        {
            "cidr": str(ns.cidr),
            "gateway": str(ns.gateway),
            "gateway_mac": ns.gateway_mac,
            "mtu": ns.mtu,
            "dns": {
                "domain": ns.dns.domain,
                "upstream": [f"{host}:{port}" for host, port in ns.dns.upstream],
                "resolv_conf": ns.dns.resolv_conf,
                "cache": ns.dns.cache,
            },
            "dhcp": {"enabled": ns.dhcp.enabled, "lease": ns.dhcp.lease},
            "egress": egress,
            "pods": [pod_to_dict(p) for p in ns.pods],
            "services": [service_to_dict(s) for s in ns.services],
        }
    )
    return out

