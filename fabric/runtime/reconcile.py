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
- A reload applies the difference between the previous and the new file, so what the
  API created or changed survives a SIGHUP unless the file changes that same object.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fabric.config.specs import NamespaceSpec, PodSpec, ServiceSpec, TunnelPeerSpec
from fabric.errors import ConfigError


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


@dataclass(frozen=True)
class ReloadPlan:
    """A SIGHUP: namespaces to remove, specs to apply, and what to tell the operator."""

    remove: tuple[str, ...] = ()
    apply: tuple[NamespaceSpec, ...] = ()
    notes: tuple[str, ...] = ()


def _merge_objects(old: Iterable[PodSpec | ServiceSpec], new: Iterable[PodSpec | ServiceSpec],
                   running: Iterable[PodSpec | ServiceSpec]) -> list[Any]:
    """Running objects with the file's changes applied: what the file dropped goes, what
    it added or changed is set, everything else (the API's doing) stays as it runs."""
    old_by = {o.name: o for o in old}
    new_by = {o.name: o for o in new}
    out: dict[str, Any] = {}
    for obj in running:
        if obj.name in old_by and obj.name not in new_by:
            continue
        out[obj.name] = obj
    for obj in new_by.values():
        if old_by.get(obj.name) != obj:
            out[obj.name] = obj
    return list(out.values())


def plan_reload(old_file: Iterable[NamespaceSpec], new_file: Iterable[NamespaceSpec],
                running: Mapping[str, NamespaceSpec], source: str,
                merge_check: Any) -> ReloadPlan:
    """Apply the difference between two versions of the file, not the file itself.

    Namespaces, pods and services created or changed through the API stay unless the
    file changes the same object (then the file's version wins, and a note says so).
    ``merge_check(spec)`` validates a merged namespace and returns it (or raises
    ConfigError); a merge that does not validate falls back to the file's version.
    """
    old_by = {ns.name: ns for ns in old_file}
    new_list = tuple(new_file)
    new_names = {ns.name for ns in new_list}
    notes: list[str] = []
    remove = tuple(n for n in old_by if n not in new_names and n in running)
    for n in remove:
        notes.append(f"namespace {n} removed: it is no longer in {source}")
    apply: list[NamespaceSpec] = []
    for ns in new_list:
        old, run = old_by.get(ns.name), running.get(ns.name)
        if run is None or old is None:
            if run is not None:
                notes.append(f"namespace {ns.name}, created through the API, is now declared "
                             f"in {source}: the file's version replaces it")
            apply.append(ns)
            continue
        if old == ns:
            continue  # unchanged in the file: whatever the API did to it stays
        pods = _merge_objects(old.pods, ns.pods, run.pods)
        services = _merge_objects(old.services, ns.services, run.services)
        merged = replace(ns, pods=tuple(pods), services=tuple(services))
        try:
            merged = merge_check(merged)
        except ConfigError as e:
            extra = sorted({o.name for o in (*pods, *services)}
                           - {o.name for o in (*ns.pods, *ns.services)})
            notes.append(f"namespace {ns.name}: objects added through the API conflict with "
                         f"{source} ({e.message}); removing {', '.join(extra) or 'them'}")
            merged = ns
        apply.append(merged)
    return ReloadPlan(remove=remove, apply=tuple(apply), notes=tuple(notes))


def plan_peer_reload(old_file: Iterable[TunnelPeerSpec], new_file: Iterable[TunnelPeerSpec],
                     current: Mapping[str, TunnelPeerSpec]) -> PeerPlan:
    """Peers the file dropped go, peers it added or changed are set; API peers stay."""
    old_by = {p.id: p for p in old_file}
    new_by = {p.id: p for p in new_file}
    return PeerPlan(
        remove=tuple(pid for pid in old_by if pid not in new_by and pid in current),
        set=tuple(p for p in new_by.values()
                  if current.get(p.id) != p and old_by.get(p.id) != p),
    )
