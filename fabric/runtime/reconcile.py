"""What to do to get from one spec to another, as plain data: the planners behind
`PUT /v1/namespaces/...`, SIGHUP reloads and peer changes.

Pure functions of frozen specs (fabric.config.specs), so they are tested like config:
no namespaces, ports or threads. The runtime executes the plans. The rules:

- A namespace is rebuilt when what every pod's addressing or link depends on changes
  (CIDR, gateway MAC, MTU, namespace id); otherwise it is reconciled in place.
- In place, a pod whose spec is unchanged is left alone, with its port and flows; a pod
  whose spec changed is removed and added again; pods are removed before they are added
  (so an address can move from one pod to another in one reload).
- Services likewise: unchanged ones stay (with their flows and held packets), changed
  ones are rebuilt, removals first.
- Peers: removed ones go, new or changed ones are set (a changed key or endpoint).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fabric.config.specs import NamespaceSpec, PodSpec, ServiceSpec, TunnelPeerSpec


@dataclass(frozen=True)
class SpecPlan:
    """Names to remove, then specs to add, of one kind of object (pods, services)."""

    remove: tuple[str, ...] = ()
    add: tuple[PodSpec | ServiceSpec, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.remove and not self.add


@dataclass(frozen=True)
class NamespacePlan:
    """What reconciling a namespace means: `rebuild` (remove it, create it anew), or the
    changes in place."""

    create: bool = False  # there was none
    rebuild: bool = False
    pods: SpecPlan = field(default_factory=SpecPlan)
    services: SpecPlan = field(default_factory=SpecPlan)
    egress_changed: bool = False
    names_changed: bool = False  # DNS names (pods or services) differ

    @property
    def changed(self) -> bool:
        return (self.create or self.rebuild or not self.pods.empty or not self.services.empty
                or self.egress_changed or self.names_changed)


@dataclass(frozen=True)
class PeerPlan:
    remove: tuple[str, ...] = ()
    set: tuple[TunnelPeerSpec, ...] = ()


def needs_rebuild(old: NamespaceSpec, new: NamespaceSpec) -> bool:
    """Changes that alter every pod's addressing or link."""
    return (old.cidr != new.cidr or old.gateway_mac != new.gateway_mac or old.mtu != new.mtu
            or old.id != new.id)


def plan_specs(current: Mapping[str, PodSpec | ServiceSpec],
               wanted: Iterable[PodSpec | ServiceSpec]) -> SpecPlan:
    """Unchanged stay, changed are removed and added again, missing are removed."""
    wanted = tuple(wanted)
    by_name = {s.name: s for s in wanted}
    remove = tuple(name for name, spec in current.items()
                   if name not in by_name or by_name[name] != spec)
    add = tuple(s for s in wanted if s.name not in current or s.name in remove)
    return SpecPlan(remove, add)


def plan_namespace(old: NamespaceSpec | None, new: NamespaceSpec) -> NamespacePlan:
    if old is None:
        return NamespacePlan(create=True, pods=SpecPlan(add=new.pods),
                             services=SpecPlan(add=new.services), names_changed=True)
    if needs_rebuild(old, new):
        return NamespacePlan(rebuild=True, pods=SpecPlan(add=new.pods),
                             services=SpecPlan(add=new.services), names_changed=True)
    names = ({p.name: p.ip for p in old.pods} | {s.name: s.ip for s in old.services}) != \
            ({p.name: p.ip for p in new.pods} | {s.name: s.ip for s in new.services})
    return NamespacePlan(
        pods=plan_specs({p.name: p for p in old.pods}, new.pods),
        services=plan_specs({s.name: s for s in old.services}, new.services),
        egress_changed=old.egress_allow != new.egress_allow,
        names_changed=names or old.dns != new.dns,
    )


def plan_peers(current: Mapping[str, TunnelPeerSpec],
               wanted: Iterable[TunnelPeerSpec]) -> PeerPlan:
    wanted = tuple(wanted)
    ids = {p.id for p in wanted}
    return PeerPlan(remove=tuple(pid for pid in current if pid not in ids),
                    set=tuple(p for p in wanted if current.get(p.id) != p))
