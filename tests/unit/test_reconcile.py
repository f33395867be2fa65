"""fabric.runtime.reconcile: the planners behind reloads and API updates, on specs alone."""

from __future__ import annotations

from fabric.config.parse import parse_namespace
from fabric.config.specs import NamespaceSpec, TunnelPeerSpec
from fabric.runtime.reconcile import needs_rebuild, plan_namespace, plan_peers

SRC = "test"


def ns(**over: object) -> NamespaceSpec:
    data: dict[str, object] = {
        "name": "shop", "id": 7, "cidr": "10.10.0.0/24",
        "pods": [{"name": "a", "ip": "10.10.0.2", "netns": "a"},
                 {"name": "b", "ip": "10.10.0.3", "netns": "b"}],
        "services": [{"name": "web", "ip": "10.10.0.100", "backends": ["a"],
                      "ports": [{"port": 80, "target_port": 8080}]}],
    }
    data.update(over)
    return parse_namespace(data, SRC, "w1")


def test_a_new_namespace_is_created_with_everything() -> None:
    new = ns()
    plan = plan_namespace(None, new)
    assert plan.create and not plan.rebuild
    assert [p.name for p in plan.pods.add] == ["a", "b"] and not plan.pods.remove
    assert [s.name for s in plan.services.add] == ["web"]


def test_the_same_spec_changes_nothing() -> None:
    plan = plan_namespace(ns(), ns())
    assert not plan.changed and plan.pods.empty and plan.services.empty


def test_addressing_changes_rebuild() -> None:
    for over in ({"cidr": "10.11.0.0/24", "pods": [], "services": []}, {"mtu": 1400},
                 {"gateway_mac": "02:fb:00:00:00:09"}, {"id": 8}):
        old, new = ns(), ns(**over)
        assert needs_rebuild(old, new)
        plan = plan_namespace(old, new)
        assert plan.rebuild and plan.changed


def test_changed_pods_are_removed_then_added_and_others_stay() -> None:
    new = ns(pods=[{"name": "a", "ip": "10.10.0.2", "netns": "a"},
                   {"name": "b", "ip": "10.10.0.9", "netns": "b"},  # moved
                   {"name": "c", "ip": "10.10.0.4", "netns": "c"}])  # new
    plan = plan_namespace(ns(), new)
    assert not plan.rebuild
    assert plan.pods.remove == ("b",)
    assert [p.name for p in plan.pods.add] == ["b", "c"]
    assert plan.services.empty and plan.names_changed


def test_an_address_moves_between_pods_in_one_plan() -> None:
    new = ns(pods=[{"name": "a", "ip": "10.10.0.3", "netns": "a"},
                   {"name": "b", "ip": "10.10.0.2", "netns": "b"}])
    plan = plan_namespace(ns(), new)
    assert set(plan.pods.remove) == {"a", "b"} and {p.name for p in plan.pods.add} == {"a", "b"}


def test_services_and_egress() -> None:
    new = ns(services=[{"name": "web", "ip": "10.10.0.100", "backends": ["a", "b"],
                        "ports": [{"port": 80, "target_port": 8080}]}],
             egress={"allow": ["192.0.2.0/24"]})
    plan = plan_namespace(ns(), new)
    assert plan.services.remove == ("web",) and [s.name for s in plan.services.add] == ["web"]
    assert plan.egress_changed and plan.pods.empty and not plan.names_changed
    gone = plan_namespace(ns(), ns(services=[]))
    assert gone.services.remove == ("web",) and not gone.services.add and gone.names_changed


def test_dns_settings_count_as_a_change_of_names() -> None:
    plan = plan_namespace(ns(), ns(dns={"domain": "corp.internal"}))
    assert plan.names_changed and plan.changed and plan.pods.empty


def test_peers() -> None:
    k1, k2 = bytes(range(32)), bytes(range(1, 33))
    cur = {"w2": TunnelPeerSpec("w2", k1, ("192.0.2.2", 51820)),
           "w3": TunnelPeerSpec("w3", k1, None)}
    want = (TunnelPeerSpec("w2", k2, ("192.0.2.2", 51820)),  # new key
            TunnelPeerSpec("w4", k1, ("192.0.2.4", 51820)))
    plan = plan_peers(cur, want)
    assert plan.remove == ("w3",)
    assert [p.id for p in plan.set] == ["w2", "w4"]
    assert plan_peers(cur, tuple(cur.values())).set == ()
