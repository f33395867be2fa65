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


# --- reloads: the difference between two files, applied over what runs -------------------

from fabric.config.render import namespace_to_dict  # noqa: E402
from fabric.errors import ConfigError  # noqa: E402
from fabric.runtime.reconcile import plan_peer_reload, plan_reload  # noqa: E402


def check(spec: NamespaceSpec) -> NamespaceSpec:
    return parse_namespace(namespace_to_dict(spec), SRC, "w1")


API_POD = {"name": "api", "ip": "10.10.0.50", "netns": "api"}


def with_api_pod(spec: NamespaceSpec) -> NamespaceSpec:
    return parse_namespace({**namespace_to_dict(spec),
                            "pods": [*namespace_to_dict(spec)["pods"], API_POD]}, SRC, "w1")


def test_an_unchanged_file_keeps_everything_the_api_did() -> None:
    file = ns()
    api_ns = parse_namespace({"name": "other", "cidr": "10.20.0.0/24"}, SRC, "w1")
    running = {"shop": with_api_pod(file), "other": api_ns}
    plan = plan_reload([file], [file], running, SRC, check)
    assert plan.remove == () and plan.apply == () and plan.notes == ()


def test_a_changed_file_applies_its_change_and_keeps_api_objects() -> None:
    old = ns()
    new = ns(pods=[{"name": "a", "ip": "10.10.0.2", "netns": "a"},
                   {"name": "c", "ip": "10.10.0.4", "netns": "c"}])  # b removed, c added
    plan = plan_reload([old], [new], {"shop": with_api_pod(old)}, SRC, check)
    [applied] = plan.apply
    assert [p.name for p in applied.pods] == ["a", "api", "c"]
    assert plan.remove == ()


def test_a_namespace_dropped_from_the_file_goes_with_a_note() -> None:
    other = parse_namespace({"name": "other", "cidr": "10.20.0.0/24"}, SRC, "w1")
    plan = plan_reload([ns(), other], [ns()], {"shop": ns(), "other": other}, SRC, check)
    assert plan.remove == ("other",) and "no longer in" in plan.notes[0]


def test_a_file_that_takes_an_api_namespace_over_says_so() -> None:
    api_ns = parse_namespace({"name": "other", "cidr": "10.20.0.0/24"}, SRC, "w1")
    file_ns = parse_namespace({"name": "other", "cidr": "10.30.0.0/24"}, SRC, "w1")
    plan = plan_reload([], [file_ns], {"other": api_ns}, SRC, check)
    assert plan.apply == (file_ns,) and "created through the API" in plan.notes[0]


def test_an_api_pod_that_conflicts_with_the_new_file_is_dropped_loudly() -> None:
    old = ns()
    new = ns(pods=[{"name": "a", "ip": "10.10.0.2", "netns": "a"},
                   {"name": "z", "ip": "10.10.0.50", "netns": "z"}])  # takes api's address
    plan = plan_reload([old], [new], {"shop": with_api_pod(old)}, SRC, check)
    assert plan.apply == (new,)
    assert "api" in plan.notes[0] and "10.10.0.50" in plan.notes[0]


def test_check_errors_are_config_errors() -> None:
    def refuse(spec: NamespaceSpec) -> NamespaceSpec:
        raise ConfigError(SRC, "x", "no")

    old, new = ns(), ns(egress=False)
    plan = plan_reload([old], [new], {"shop": old}, SRC, refuse)
    assert plan.apply == (new,)


def test_peer_reload_keeps_api_peers() -> None:
    key = b"\x01" * 32
    a = TunnelPeerSpec(id="a", public_key=key, endpoint=("192.0.2.1", 51820))
    b = TunnelPeerSpec(id="b", public_key=key, endpoint=("192.0.2.2", 51820))
    api = TunnelPeerSpec(id="api", public_key=key, endpoint=("192.0.2.3", 51820))
    b2 = TunnelPeerSpec(id="b", public_key=key, endpoint=("192.0.2.9", 51820))
    current = {"a": a, "b": b, "api": api}
    plan = plan_peer_reload([a, b], [a, b], current)
    assert plan.remove == () and plan.set == ()
    plan = plan_peer_reload([a, b], [b2], current)
    assert plan.remove == ("a",) and plan.set == (b2,)
