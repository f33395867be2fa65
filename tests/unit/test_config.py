"""Unit tests for fabric.config: good configs, defaults, every error class, round trips."""

from __future__ import annotations

import base64
import copy
import json
import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from fabric.config.fields import parse_duration, parse_size
from fabric.config.load import default_config, load_config
from fabric.config.parse import parse_config, parse_namespace, parse_pod, parse_service
from fabric.config.render import namespace_to_dict, pod_to_dict, service_to_dict
from fabric.config.specs import (
    DEFAULT_CONTROL,
    TUNNEL_MTU,
    Config,
    DnsSpec,
    EgressSpec,
    FrozenMap,
    HoldSpec,
    NamespaceSpec,
    PodSpec,
    PortSpec,
)
from fabric.errors import ConfigError

SRC = "/etc/fabricd.yaml"
KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(1, 33))).decode()
KEY_C = base64.b64encode(bytes(range(2, 34))).decode()

FULL_YAML = f"""\
worker:
  id: w1
  control: /run/fabricd/control.sock
  control_mode: "0640"
  egress: {{tun: fabegress0, pool: 100.64.0.0/16}}
  tunnel:
    listen: 0.0.0.0:51820
    private_key: {KEY_A}
    psk: {KEY_C}
    keepalive: 25s
    peers:
      - {{id: w2, endpoint: 192.0.2.2:51820, public_key: {KEY_B}}}
namespaces:
  - name: shop
    id: 7
    cidr: 10.10.0.0/24
    gateway_mac: "02:FB:00:00:00:09"
    dns: {{domain: shop.internal, upstream: [192.0.2.53, "192.0.2.54:5353"], resolv_conf: false}}
    egress: {{allow: [192.0.2.0/24]}}
    pods:
      - {{name: web-1, ip: 10.10.0.2, netns: web1}}
      - {{name: vm-1,  ip: 10.10.0.3, interface: tap-vm1, mac: "02:00:0A:0A:00:03"}}
      - {{name: db-1,  ip: 10.10.0.4, worker: w2}}
    services:
      - name: web
        ip: 10.10.0.100
        ports:
          - port: 80
            target_port: 8080
            protocol: tcp
            activator: tcp
            activator_config: {{banner: hi, retries: [1, 2]}}
        backends: [web-1]
        hold: {{packets: 64, bytes: 512KiB, timeout: 1.5s}}
        idle_timeout: 5m
        readiness: external
        on_activate: "systemctl start web"
        on_idle: "systemctl stop web"
  - name: lab
    cidr: 10.20.0.0/16
"""


def base() -> dict[str, Any]:
    """A small valid config as a dict; tests mutate a fresh copy."""
    return copy.deepcopy(
        {
            "worker": {"id": "w1"},
            "namespaces": [
                {
                    "name": "shop",
                    "id": 7,
                    "cidr": "10.10.0.0/24",
                    "pods": [
                        {"name": "web-1", "ip": "10.10.0.2", "netns": "web1"},
                        {"name": "vm-1", "ip": "10.10.0.3", "interface": "tap-vm1"},
                    ],
                    "services": [
                        {
                            "name": "web",
                            "ip": "10.10.0.100",
                            "ports": [{"port": 80}],
                            "backends": ["web-1"],
                        },
                    ],
                },
            ],
        }
    )


def err(fn: Callable[[], object]) -> ConfigError:
    """Run ``fn`` expecting a ConfigError and return it."""
    with pytest.raises(ConfigError) as info:
        fn()
    return info.value


def cfg_err(mutate: Callable[[dict[str, Any]], None]) -> ConfigError:
    """Mutate the base config and return the ConfigError that parsing it raises."""
    data = base()
    mutate(data)
    return err(lambda: parse_config(data, SRC))


def ns0(data: dict[str, Any]) -> dict[str, Any]:
    return data["namespaces"][0]


def write(tmp_path: Path, text: str, name: str = "fabricd.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------
# Good configs
# ---------------------------------------------------------------------------


def test_full_example_loads(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_YAML)
    cfg = load_config(path)
    assert cfg.source == path
    w = cfg.worker
    assert (w.id, w.control, w.control_mode) == ("w1", DEFAULT_CONTROL, 0o640)
    assert w.egress == EgressSpec("fabegress0", IPv4Network("100.64.0.0/16"))
    assert w.tunnel is not None
    assert w.tunnel.listen == ("0.0.0.0", 51820)
    assert w.tunnel.private_key == bytes(range(32))
    assert w.tunnel.private_key_file is None
    assert w.tunnel.psk == bytes(range(2, 34))
    assert w.tunnel.keepalive == 25.0
    peer = w.tunnel.peer("w2")
    assert peer is not None
    assert peer.endpoint == ("192.0.2.2", 51820)
    assert peer.public_key == bytes(range(1, 33))
    assert w.tunnel.peer("w9") is None

    shop, lab = cfg.namespaces
    assert cfg.namespace("lab") is lab and cfg.namespace("nope") is None
    assert shop.name == "shop" and shop.id == 7
    assert shop.cidr == IPv4Network("10.10.0.0/24")
    assert shop.gateway == IPv4Address("10.10.0.1")
    assert shop.gateway_mac == "02:fb:00:00:00:09"
    assert shop.mtu == TUNNEL_MTU  # db-1 lives on w2
    assert shop.dns == DnsSpec("shop.internal", (("192.0.2.53", 53), ("192.0.2.54", 5353)), False)
    assert shop.egress_allow == (IPv4Network("192.0.2.0/24"),)

    web1, vm1, db1 = shop.pods
    assert web1 == PodSpec("web-1", IPv4Address("10.10.0.2"), netns="web1")
    assert web1.kind == "netns" and web1.ifname == "eth0" and web1.ready
    assert web1.netns_path == "/run/netns/web1"
    assert vm1.kind == "interface" and vm1.interface == "tap-vm1"
    assert vm1.mac == "02:00:0a:0a:00:03" and vm1.netns_path is None
    assert db1.kind == "remote" and db1.worker == "w2"
    assert shop.pod("vm-1") is vm1 and shop.pod("x") is None

    (svc,) = shop.services
    assert shop.service("web") is svc and shop.service("x") is None
    assert svc.ip == IPv4Address("10.10.0.100")
    (port,) = svc.ports
    assert (port.port, port.target_port, port.protocol, port.activator) == (80, 8080, "tcp", "tcp")
    assert port.activator_config == {"banner": "hi", "retries": (1, 2)}
    assert svc.backends == ("web-1",)
    assert svc.hold == HoldSpec(64, 512 * 1024, 1.5)
    assert svc.idle_timeout == 300.0
    assert svc.readiness == "external"
    assert svc.on_activate == "systemctl start web" and svc.on_idle == "systemctl stop web"

    assert lab.id is None and lab.mtu == 1500 and lab.pods == () and lab.services == ()
    assert lab.gateway == IPv4Address("10.20.0.1")
    assert lab.dns == DnsSpec() and lab.egress_allow == (IPv4Network("0.0.0.0/0"),)


def test_specs_are_frozen_hashable_and_comparable(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_YAML)
    a, b = load_config(path), load_config(path)
    assert a == b
    assert hash(a) == hash(b)
    assert isinstance(a.namespaces, tuple) and isinstance(a.namespaces[0].pods, tuple)
    with pytest.raises(AttributeError):
        a.namespaces[0].mtu = 9000  # type: ignore[misc]
    cfg = a.namespaces[0].services[0].ports[0].activator_config
    with pytest.raises(TypeError):
        cfg["banner"] = "x"  # type: ignore[index]


def test_secrets_not_in_repr(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL_YAML))
    text = repr(cfg)
    assert repr(bytes(range(32))) not in text
    assert repr(bytes(range(1, 33))) not in text
    assert repr(bytes(range(2, 34))) not in text


def test_defaults_for_minimal_config() -> None:
    cfg = parse_config({"namespaces": [{"name": "a", "cidr": "10.1.0.0/24"}]}, "api")
    assert cfg.worker.id == socket.gethostname()
    assert cfg.worker.control == "/run/fabricd/control.sock"
    assert cfg.worker.control_mode == 0o600
    assert cfg.worker.egress is None and cfg.worker.tunnel is None
    (ns,) = cfg.namespaces
    assert ns.gateway_mac == "02:fb:00:00:00:01"
    assert ns.mtu == 1500
    assert ns.dns == DnsSpec("fabric.internal", (), True)


def test_empty_mapping_and_missing_namespaces_mean_no_namespaces() -> None:
    assert parse_config({}, "x").namespaces == ()
    assert parse_config({"worker": {"id": "w1"}}, "x").namespaces == ()
    assert parse_config({"worker": None, "namespaces": None}, "x").namespaces == ()


def test_default_config() -> None:
    cfg = default_config("w7")
    assert cfg.source == "<default>"
    assert cfg.worker.id == "w7"
    (ns,) = cfg.namespaces
    assert (ns.name, ns.id, ns.cidr) == ("default", 1, IPv4Network("10.88.0.0/24"))
    assert ns.gateway == IPv4Address("10.88.0.1")
    assert ns.pods == () and ns.services == ()
    assert ns.dns == DnsSpec() and ns.egress_allow == (IPv4Network("0.0.0.0/0"),)
    assert default_config().worker.id == socket.gethostname()


def test_mtu_rules() -> None:
    data = base()
    assert parse_config(data, SRC).namespaces[0].mtu == 1500
    ns0(data)["pods"].append({"name": "db-1", "ip": "10.10.0.9", "worker": "w2"})
    assert parse_config(data, SRC).namespaces[0].mtu == 1420
    ns0(data)["mtu"] = 9000
    assert parse_config(data, SRC).namespaces[0].mtu == 9000


@pytest.mark.parametrize(
    ("egress", "expected"),
    [
        (True, ("0.0.0.0/0",)),
        (False, ()),
        (None, ("0.0.0.0/0",)),
        ({"allow": []}, ()),
        ({"allow": ["192.0.2.0/24", "198.51.100.7/32"]}, ("192.0.2.0/24", "198.51.100.7/32")),
    ],
)
def test_egress_forms(egress: Any, expected: tuple[str, ...]) -> None:
    data = base()
    ns0(data)["egress"] = egress
    allow = parse_config(data, SRC).namespaces[0].egress_allow
    assert allow == tuple(IPv4Network(n) for n in expected)


def test_pod_options() -> None:
    data = base()
    ns0(data)["pods"] = [
        {
            "name": "a",
            "ip": "10.10.0.2",
            "netns": "/var/run/netns/a",
            "ifname": "veth-a",
            "mac": "02-AA-BB-CC-DD-EE",
            "ready": False,
        },
        {"name": "b", "ip": "10.10.0.3", "netns": "/var/run/netns/a", "ifname": "eth1"},
    ]
    ns0(data)["services"] = []
    a, b = parse_config(data, SRC).namespaces[0].pods
    assert a.netns_path == "/var/run/netns/a" and a.ifname == "veth-a"
    assert a.mac == "02:aa:bb:cc:dd:ee" and a.ready is False
    assert b.ifname == "eth1"


def test_service_defaults_and_port_shorthand() -> None:
    data = base()
    ns0(data)["services"] = [
        {"name": "web", "ip": "10.10.0.100", "ports": [80, {"port": 53, "protocol": "udp"}]},
    ]
    (svc,) = parse_config(data, SRC).namespaces[0].services
    assert svc.ports == (PortSpec(80, 80), PortSpec(53, 53, "udp"))
    assert svc.ports[0].activator == "none" and svc.ports[0].activator_config == {}
    assert svc.backends == ()
    assert svc.hold == HoldSpec(1024, 8 * 1024 * 1024, 30.0)
    assert svc.idle_timeout == 300.0 and svc.readiness == "probe"
    assert svc.on_activate is None and svc.on_idle is None


@pytest.mark.parametrize(
    "activator", ["none", "tcp", "http2", "postgres", "/opt/act/x.wasm", "custom.wasm"]
)
def test_activator_forms(activator: str) -> None:
    data = base()
    ns0(data)["services"][0]["ports"] = [{"port": 80, "activator": activator}]
    svc = parse_config(data, SRC).namespaces[0].services[0]
    assert svc.ports[0].activator == activator


def test_frozen_map() -> None:
    a = FrozenMap({"x": 1, "y": FrozenMap({"z": (1, 2)})})
    b = FrozenMap({"y": FrozenMap({"z": (1, 2)}), "x": 1})
    assert a == b and hash(a) == hash(b)
    assert a == {"x": 1, "y": {"z": (1, 2)}}
    assert a != FrozenMap({"x": 2})
    assert a.to_dict() == {"x": 1, "y": {"z": [1, 2]}}
    assert len(a) == 2 and sorted(a) == ["x", "y"]
    assert "FrozenMap" in repr(a)


def test_null_means_absent() -> None:
    data = base()
    ns0(data).update({"id": None, "dns": None, "egress": None, "mtu": None})
    ns0(data)["pods"][0]["mac"] = None
    ns = parse_config(data, SRC).namespaces[0]
    assert ns.id is None and ns.mtu == 1500 and ns.pods[0].mac is None


@pytest.mark.parametrize(
    ("mode", "expected"), [("0600", 0o600), ("640", 0o640), ("0o755", 0o755), (0o644, 0o644)]
)
def test_control_mode(mode: Any, expected: int) -> None:
    cfg = parse_config({"worker": {"id": "w1", "control_mode": mode}}, SRC)
    assert cfg.worker.control_mode == expected


@pytest.mark.parametrize(("mode", "problem"), [
    ("0666", "every local user"), ("0777", "every local user"), ("0602", "every local user"),
    ("0400", "owner unable to connect")])
def test_control_mode_refuses_what_widens_the_api(mode: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as e:
        parse_config({"worker": {"id": "w1", "control_mode": mode}}, SRC)
    assert e.value.key == "worker.control_mode"


def test_yaml_octal_control_mode(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "worker: {id: w1, control_mode: 0600}\n"))
    assert cfg.worker.control_mode == 0o600


def test_egress_worker_forms() -> None:
    assert parse_config({"worker": {"egress": True}}, SRC).worker.egress == EgressSpec()
    assert parse_config({"worker": {"egress": False}}, SRC).worker.egress is None
    egress = parse_config({"worker": {"egress": {"pool": "100.70.0.0/24"}}}, SRC).worker.egress
    assert egress == EgressSpec("fabegress0", IPv4Network("100.70.0.0/24"))


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        (51821, ("0.0.0.0", 51821)),
        ("192.0.2.1:4000", ("192.0.2.1", 4000)),
        (None, ("0.0.0.0", 51820)),
    ],
)
def test_tunnel_listen(listen: Any, expected: tuple[str, int]) -> None:
    tunnel = {"private_key": KEY_A, "listen": listen}
    cfg = parse_config({"worker": {"id": "w1", "tunnel": tunnel}}, SRC)
    assert cfg.worker.tunnel is not None and cfg.worker.tunnel.listen == expected
    assert cfg.worker.tunnel.peers == () and cfg.worker.tunnel.keepalive is None


def test_tunnel_peer_hostname_endpoint() -> None:
    tunnel = {
        "private_key": KEY_A,
        "peers": [
            {"id": "w2", "public_key": KEY_B, "endpoint": "w2.example.net:51820"},
            {"id": "w3", "public_key": KEY_C},
        ],
    }
    t = parse_config({"worker": {"id": "w1", "tunnel": tunnel}}, SRC).worker.tunnel
    assert t is not None
    assert t.peers[0].endpoint == ("w2.example.net", 51820)
    assert t.peers[1].endpoint is None


def test_private_key_file_relative_to_config(tmp_path: Path) -> None:
    (tmp_path / "wg.key").write_text(KEY_A + "\n")
    (tmp_path / "wg.key").chmod(0o600)
    path = write(tmp_path, "worker:\n  id: w1\n  tunnel: {private_key_file: wg.key}\n")
    t = load_config(path).worker.tunnel
    assert t is not None
    assert t.private_key == bytes(range(32))
    assert t.private_key_file == str(tmp_path / "wg.key")


# ---------------------------------------------------------------------------
# Durations and sizes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (30, 30.0),
        (1.5, 1.5),
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (" 2 s ", 2.0),
        ("10", 10.0),
        (".5s", 0.5),
    ],
)
def test_parse_duration(value: Any, seconds: float) -> None:
    assert parse_duration(value, SRC, "k") == pytest.approx(seconds)
    assert isinstance(parse_duration(value, SRC, "k"), float)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("5x", "'5x' is not a duration (use seconds or a string like 250ms, 30s, 5m, 1h)"),
        ("", "'' is not a duration"),
        ("s", "'s' is not a duration"),
        (-1, "-1 is negative (durations must be >= 0)"),
        (
            True,
            "expected a duration (use seconds or a string like 250ms, 30s, 5m, 1h), "
            "got boolean true",
        ),
        ([1], "got a list"),
        (float("inf"), "not a finite duration"),
    ],
)
def test_parse_duration_errors(value: Any, problem: str) -> None:
    e = err(lambda: parse_duration(value, SRC, "a.b"))
    assert e.source == SRC and e.key == "a.b"
    assert problem in e.problem


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (4096, 4096),
        ("8MiB", 8 * 2**20),
        ("512KiB", 512 * 1024),
        ("1GB", 10**9),
        ("100k", 100_000),
        ("2M", 2_000_000),
        ("3G", 3 * 10**9),
        ("64B", 64),
        ("1GiB", 2**30),
        ("10KB", 10_000),
        ("1.5MiB", 3 * 2**19),
        ("7", 7),
        ("4 kib", 4096),
        ("2Mi", 2 * 2**20),
    ],
)
def test_parse_size(value: Any, size: int) -> None:
    assert parse_size(value, SRC, "k") == size


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("8XB", "'8XB' is not a size (use bytes or a string like 512KiB, 8MiB, 1GB, 100k)"),
        ("MiB", "'MiB' is not a size"),
        (-5, "-5 is negative"),
        (1.5, "got number 1.5"),
        (False, "got boolean false"),
    ],
)
def test_parse_size_errors(value: Any, problem: str) -> None:
    e = err(lambda: parse_size(value, SRC, "hold.bytes"))
    assert e.key == "hold.bytes" and problem in e.problem


# ---------------------------------------------------------------------------
# Error classes through a whole config: exact key path and message
# ---------------------------------------------------------------------------


def test_message_format() -> None:
    e = cfg_err(lambda d: ns0(d)["pods"][1].update(ip="10.10.1.5"))
    assert str(e) == f"{SRC}: namespaces[0].pods[1].ip: 10.10.1.5 is not inside cidr 10.10.0.0/24"
    assert e.message == str(e)
    assert (e.source, e.key, e.problem) == (
        SRC,
        "namespaces[0].pods[1].ip",
        "10.10.1.5 is not inside cidr 10.10.0.0/24",
    )
    assert e.status == 400 and e.to_dict()["code"] == "invalid"


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets ``data[path...] = value``."""

    def mutate(data: dict[str, Any]) -> None:
        node: Any = data
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value

    return mutate


def _del(path: list[Any]) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        node: Any = data
        for p in path[:-1]:
            node = node[p]
        del node[path[-1]]

    return mutate


NS = ["namespaces", 0]
POD0 = [*NS, "pods", 0]
POD1 = [*NS, "pods", 1]
SVC0 = [*NS, "services", 0]

UNKNOWN_CASES = [
    (["podz"], "podz", "unknown key 'podz' (expected one of: worker, namespaces)"),
    (
        [*NS, "podz"],
        "namespaces[0].podz",
        "unknown key 'podz' (expected one of: name, id, cidr, gateway, gateway_mac, mtu, dns, "
        "dhcp, egress, pods, services)",
    ),
    ([*POD0, "nets"], "namespaces[0].pods[0].nets", "unknown key 'nets'"),
    ([*SVC0, "port"], "namespaces[0].services[0].port", "unknown key 'port'"),
    ([*SVC0, "ports", 0, "proto"], "namespaces[0].services[0].ports[0].proto", "unknown key"),
    (
        ["worker", "ident"],
        "worker.ident",
        "unknown key 'ident' (expected one of: id, control, control_mode, state_dir, egress, "
        "tunnel, busy_poll, service_hold_bytes)",
    ),
]


@pytest.mark.parametrize(("path", "key", "problem"), UNKNOWN_CASES)
def test_unknown_keys(path: list[Any], key: str, problem: str) -> None:
    e = cfg_err(_set(path, 1))
    assert e.key == key
    assert problem in e.problem


@pytest.mark.parametrize(
    ("where", "key"),
    [
        ("hold", "namespaces[0].services[0].hold.pakets"),
        ("dns", "namespaces[0].dns.pakets"),
        ("egress", "namespaces[0].egress.pakets"),
    ],
)
def test_unknown_nested_keys(where: str, key: str) -> None:
    def mutate(d: dict[str, Any]) -> None:
        target = ns0(d)["services"][0] if where == "hold" else ns0(d)
        target[where] = {"pakets": 1}

    e = cfg_err(mutate)
    assert e.key == key and e.problem.startswith("unknown key 'pakets'")


def test_non_string_key() -> None:
    e = cfg_err(_set([*POD0, 5], "x"))
    assert e.key == "namespaces[0].pods[0]" and e.problem == "keys must be strings, got integer 5"


TYPE_CASES = [
    ([*NS, "name"], 5, "namespaces[0].name", "expected a string, got integer 5"),
    ([*NS, "pods"], {"a": 1}, "namespaces[0].pods", "expected a list, got a mapping"),
    ([*NS], "shop", "namespaces[0]", "expected a mapping, got string 'shop'"),
    (["namespaces"], "shop", "namespaces", "expected a list, got string 'shop'"),
    (["worker"], [], "worker", "expected a mapping, got a list"),
    (
        [*POD0, "ready"],
        "yes",
        "namespaces[0].pods[0].ready",
        "expected a boolean (true or false), got string 'yes'",
    ),
    ([*NS, "mtu"], "big", "namespaces[0].mtu", "expected an integer, got string 'big'"),
    ([*NS, "id"], True, "namespaces[0].id", "expected an integer, got boolean true"),
    ([*NS, "id"], 1.0, "namespaces[0].id", "expected an integer, got number 1.0"),
    ([*POD0, "ip"], 10, "namespaces[0].pods[0].ip", "expected a string, got integer 10"),
    (
        [*NS, "egress"],
        "yes",
        "namespaces[0].egress",
        "expected a boolean or a mapping {allow: [CIDR, ...]}, got string 'yes'",
    ),
    (
        [*SVC0, "ports", 0],
        "80",
        "namespaces[0].services[0].ports[0]",
        "expected a mapping, got string '80'",
    ),
    (
        [*SVC0, "backends"],
        "web-1",
        "namespaces[0].services[0].backends",
        "expected a list, got string 'web-1'",
    ),
    (
        [*SVC0, "ports", 0, "activator_config"],
        [1],
        "namespaces[0].services[0].ports[0].activator_config",
        "expected a mapping, got a list",
    ),
    (
        [
            *NS,
            "dns",
        ],
        {"upstream": "192.0.2.53"},
        "namespaces[0].dns.upstream",
        "expected a list, got string '192.0.2.53'",
    ),
]


@pytest.mark.parametrize(("path", "value", "key", "problem"), TYPE_CASES)
def test_wrong_types(path: list[Any], value: Any, key: str, problem: str) -> None:
    e = cfg_err(_set(path, value))
    assert (e.key, e.problem) == (key, problem)


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ([*NS, "name"], "namespaces[0].name"),
        ([*NS, "cidr"], "namespaces[0].cidr"),
        ([*POD0, "name"], "namespaces[0].pods[0].name"),
        ([*POD0, "ip"], "namespaces[0].pods[0].ip"),
        ([*SVC0, "ports"], "namespaces[0].services[0].ports"),
        ([*SVC0, "ip"], "namespaces[0].services[0].ip"),
        ([*SVC0, "ports", 0, "port"], "namespaces[0].services[0].ports[0].port"),
    ],
)
def test_missing_required(path: list[Any], key: str) -> None:
    e = cfg_err(_del(path))
    assert (e.key, e.problem) == (key, "required key is missing")


@pytest.mark.parametrize(
    ("cidr", "problem"),
    [
        ("10.10.0.5/24", "10.10.0.5/24 has host bits set (the network would be 10.10.0.0/24)"),
        ("10.0.0.0/7", "prefix /7 of 10.0.0.0/7 is out of range (/8../30)"),
        ("10.0.0.0/31", "prefix /31 of 10.0.0.0/31 is out of range (/8../30)"),
        ("10.10.0.0", "'10.10.0.0' is not a network (expected e.g. 10.10.0.0/24)"),
        ("10.10.0.0/33", "'10.10.0.0/33' is not an IPv4 network (expected e.g. 10.10.0.0/24)"),
        ("fd00::/64", "'fd00::/64' is not an IPv4 network (expected e.g. 10.10.0.0/24)"),
    ],
)
def test_cidr_errors(cidr: str, problem: str) -> None:
    e = cfg_err(_set([*NS, "cidr"], cidr))
    assert (e.key, e.problem) == ("namespaces[0].cidr", problem)


@pytest.mark.parametrize("name", ["Shop", "-shop", "shop-", "sh_op", "a" * 64, ""])
def test_bad_namespace_name(name: str) -> None:
    e = cfg_err(_set([*NS, "name"], name))
    assert e.key == "namespaces[0].name"
    assert "not a valid name" in e.problem or e.problem == "must not be empty"


@pytest.mark.parametrize("value", [0, 2**32, -1])
def test_namespace_id_range(value: int) -> None:
    e = cfg_err(_set([*NS, "id"], value))
    assert (e.key, e.problem) == ("namespaces[0].id", f"{value} is out of range (1..4294967295)")


@pytest.mark.parametrize("value", [575, 65536])
def test_mtu_range(value: int) -> None:
    e = cfg_err(_set([*NS, "mtu"], value))
    assert (e.key, e.problem) == ("namespaces[0].mtu", f"{value} is out of range (576..65535)")


def test_duplicate_namespace_name_and_id() -> None:
    def dup_name(d: dict[str, Any]) -> None:
        d["namespaces"].append({"name": "shop", "cidr": "10.30.0.0/24"})

    def dup_id(d: dict[str, Any]) -> None:
        d["namespaces"].append({"name": "lab", "id": 7, "cidr": "10.30.0.0/24"})

    e = cfg_err(dup_name)
    assert (e.key, e.problem) == (
        "namespaces[1].name",
        "duplicate namespace name shop (also namespaces[0])",
    )
    e = cfg_err(dup_id)
    assert (e.key, e.problem) == ("namespaces[1].id", "id 7 is already used by namespace shop")


def test_cross_namespace_host_ports() -> None:
    def dup_iface(d: dict[str, Any]) -> None:
        d["namespaces"].append(
            {
                "name": "lab",
                "cidr": "10.30.0.0/24",
                "pods": [{"name": "x", "ip": "10.30.0.2", "interface": "tap-vm1"}],
            }
        )

    def dup_netns(d: dict[str, Any]) -> None:
        d["namespaces"].append(
            {
                "name": "lab",
                "cidr": "10.30.0.0/24",
                "pods": [{"name": "x", "ip": "10.30.0.2", "netns": "/run/netns/web1"}],
            }
        )

    e = cfg_err(dup_iface)
    assert (e.key, e.problem) == (
        "namespaces[1].pods[0].interface",
        "interface tap-vm1 is already used by pod vm-1 in namespace shop",
    )
    e = cfg_err(dup_netns)
    assert (e.key, e.problem) == (
        "namespaces[1].pods[0].netns",
        "netns /run/netns/web1 already has eth0 (pod web-1 in namespace shop)",
    )


def test_gateway_key() -> None:
    data = base()
    ns0(data)["gateway"] = "10.10.0.1"
    assert parse_config(data, SRC).namespaces[0].gateway == IPv4Address("10.10.0.1")
    e = cfg_err(_set([*NS, "gateway"], "10.10.0.254"))
    assert (e.key, e.problem) == (
        "namespaces[0].gateway",
        "10.10.0.254 is not the gateway of 10.10.0.0/24: it is always the first host, 10.10.0.1",
    )


# -- pods --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "problem"),
    [
        ("10.10.1.5", "10.10.1.5 is not inside cidr 10.10.0.0/24"),
        ("10.10.0.0", "10.10.0.0 is the network address of 10.10.0.0/24"),
        ("10.10.0.255", "10.10.0.255 is the broadcast address of 10.10.0.0/24"),
        ("10.10.0.1", "10.10.0.1 is the gateway address of 10.10.0.0/24"),
        ("10.10.0.2", "10.10.0.2 is already used by pod web-1"),
        ("10.10.0", "'10.10.0' is not an IPv4 address"),
    ],
)
def test_pod_ip_errors(ip: str, problem: str) -> None:
    e = cfg_err(_set([*POD1, "ip"], ip))
    assert (e.key, e.problem) == ("namespaces[0].pods[1].ip", problem)


def test_pod_ip_clash_with_service_declared_later() -> None:
    e = cfg_err(_set([*SVC0, "ip"], "10.10.0.3"))
    assert (e.key, e.problem) == (
        "namespaces[0].services[0].ip",
        "10.10.0.3 is already used by pod vm-1",
    )


def test_pod_kind_errors() -> None:
    e = cfg_err(_del([*POD1, "interface"]))
    assert (e.key, e.problem) == (
        "namespaces[0].pods[1]",
        "give exactly one of netns, interface or worker",
    )
    e = cfg_err(_set([*POD1, "netns"], "vm"))
    assert (e.key, e.problem) == (
        "namespaces[0].pods[1]",
        "netns and interface are mutually exclusive (give exactly one of netns, interface or "
        "worker)",
    )
    e = cfg_err(_set([*POD1, "worker"], "w2"))
    assert "interface and worker are mutually exclusive" in e.problem


def test_pod_worker_is_this_worker() -> None:
    def mutate(d: dict[str, Any]) -> None:
        d["namespaces"][0]["pods"][1] = {"name": "vm-1", "ip": "10.10.0.3", "worker": "w1"}

    e = cfg_err(mutate)
    assert (e.key, e.problem) == (
        "namespaces[0].pods[1].worker",
        "worker w1 is this worker: give netns or interface",
    )


def test_pod_bad_worker_id() -> None:
    def mutate(d: dict[str, Any]) -> None:
        d["namespaces"][0]["pods"][1] = {"name": "vm-1", "ip": "10.10.0.3", "worker": "w 2"}

    e = cfg_err(mutate)
    assert e.key == "namespaces[0].pods[1].worker" and "not a valid worker id" in e.problem


def test_ifname_rules() -> None:
    e = cfg_err(_set([*POD1, "ifname"], "eth1"))
    assert (e.key, e.problem) == ("namespaces[0].pods[1].ifname", "ifname is only valid with netns")
    e = cfg_err(_set([*POD0, "ifname"], "a-very-long-ifname"))
    assert e.key == "namespaces[0].pods[0].ifname"
    assert e.problem.startswith("'a-very-long-ifname' is not a valid interface name")
    e = cfg_err(_set([*POD0, "ifname"], "eth/0"))
    assert "not a valid interface name" in e.problem
    e = cfg_err(_set([*POD1, "interface"], "tap vm"))
    assert e.key == "namespaces[0].pods[1].interface" and "not a valid interface name" in e.problem


@pytest.mark.parametrize("netns", ["a/b", "..", "."])
def test_bad_netns(netns: str) -> None:
    e = cfg_err(_set([*POD0, "netns"], netns))
    assert (e.key, e.problem) == (
        "namespaces[0].pods[0].netns",
        f"{netns!r} must be a name under /run/netns or an absolute path",
    )


@pytest.mark.parametrize(
    ("mac", "problem"),
    [
        (
            "01:00:5e:00:00:01",
            "01:00:5e:00:00:01 is a multicast MAC (the first octet must be even)",
        ),
        ("00:00:00:00:00:00", "00:00:00:00:00:00 is the all-zero MAC"),
        ("02:00:00:00:01", "'02:00:00:00:01' is not a MAC address (expected 02:00:00:00:00:01)"),
        ("zz:00:00:00:00:01", "'zz:00:00:00:00:01' is not a MAC address"),
        (45296, "expected a MAC address string, got integer 45296 (quote MAC addresses in YAML)"),
        ("02:fb:00:00:00:01", "02:fb:00:00:00:01 is the namespace's gateway_mac"),
    ],
)
def test_pod_mac_errors(mac: Any, problem: str) -> None:
    e = cfg_err(_set([*POD1, "mac"], mac))
    assert e.key == "namespaces[0].pods[1].mac" and e.problem.startswith(problem)


def test_pod_duplicates() -> None:
    e = cfg_err(_set([*POD1, "name"], "web-1"))
    assert (e.key, e.problem) == (
        "namespaces[0].pods[1].name",
        "duplicate pod name web-1 (also pods[0])",
    )

    def dup_mac(d: dict[str, Any]) -> None:
        ns0(d)["pods"][0]["mac"] = "02:00:00:00:00:05"
        ns0(d)["pods"][1]["mac"] = "02:00:00:00:00:05"

    e = cfg_err(dup_mac)
    assert (e.key, e.problem) == (
        "namespaces[0].pods[1].mac",
        "02:00:00:00:00:05 is already used by pod web-1",
    )

    def dup_iface(d: dict[str, Any]) -> None:
        ns0(d)["pods"].append({"name": "vm-2", "ip": "10.10.0.4", "interface": "tap-vm1"})

    e = cfg_err(dup_iface)
    assert (e.key, e.problem) == (
        "namespaces[0].pods[2].interface",
        "interface tap-vm1 is already used by pod vm-1",
    )

    def dup_netns(d: dict[str, Any]) -> None:
        ns0(d)["pods"].append({"name": "web-2", "ip": "10.10.0.4", "netns": "/run/netns/web1"})

    e = cfg_err(dup_netns)
    assert (e.key, e.problem) == (
        "namespaces[0].pods[2].netns",
        "netns /run/netns/web1 already has eth0 (pod web-1); give a different ifname",
    )


def test_pod_name_clashes_with_service() -> None:
    def mutate(d: dict[str, Any]) -> None:
        ns0(d)["services"][0]["name"] = "vm-1"

    e = cfg_err(mutate)
    assert (e.key, e.problem) == ("namespaces[0].services[0].name", "vm-1 is already a pod name")


# -- services ----------------------------------------------------------------


SERVICE_CASES = [
    (["ports"], [], "ports", "must list at least one port"),
    (["ports"], [{"port": 0}], "ports[0].port", "0 is out of range (1..65535)"),
    (["ports"], [{"port": 70000}], "ports[0].port", "70000 is out of range (1..65535)"),
    (
        ["ports"],
        [{"port": 80, "target_port": 0}],
        "ports[0].target_port",
        "0 is out of range (1..65535)",
    ),
    (
        ["ports"],
        [{"port": 80, "protocol": "sctp"}],
        "ports[0].protocol",
        "'sctp' is not tcp or udp",
    ),
    (
        ["ports"],
        [80, {"port": 80, "protocol": "tcp"}],
        "ports[1].port",
        "80/tcp is already listed in ports[0]",
    ),
    (
        ["ports"],
        [{"port": 80, "activator": "Bad Name"}],
        "ports[0].activator",
        "'Bad Name' is not an activator (expected none, a shipped name like tcp, or a path "
        "ending .wasm)",
    ),
    (
        ["ports"],
        [{"port": 80, "activator": "/opt/x.so"}],
        "ports[0].activator",
        "'/opt/x.so' is not an activator",
    ),
    (
        ["ports"],
        [{"port": 80, "activator_config": {"a": 1}}],
        "ports[0].activator_config",
        "activator_config given but activator is none",
    ),
    (
        ["ports"],
        [{"port": 80, "activator": "tcp", "activator_config": {"a": {1: 2}}}],
        "ports[0].activator_config.a",
        "keys must be strings, got integer 1",
    ),
    (
        ["ports"],
        [{"port": 80, "activator": "tcp", "activator_config": {"a": {1, 2}}}],
        "ports[0].activator_config.a",
        "expected plain data",
    ),
    (
        ["ports"],
        [{"port": 80, "activator": "stream", "upstream": "pod"}],
        "ports[0].upstream",
        "'pod' is not vip or pod-local",
    ),
    (
        ["ports"],
        [{"port": 80, "upstream": "pod-local"}],
        "ports[0].upstream",
        "upstream: pod-local needs a stream activator on a tcp port",
    ),
    (
        ["ports"],
        [{"port": 53, "protocol": "udp", "activator": "stream", "upstream": "pod-local"}],
        "ports[0].upstream",
        "upstream: pod-local needs a stream activator on a tcp port",
    ),
    (
        ["ports"],
        [{"port": 80, "activator": "http2", "activator_memory_mib": 0}],
        "ports[0].activator_memory_mib",
        "0 is out of range (1..1024)",
    ),
    (
        ["ports"],
        [{"port": 80, "activator": "http2", "activator_memory_mib": "64M"}],
        "ports[0].activator_memory_mib",
        "expected an integer",
    ),
    (
        ["ports"],
        [{"port": 80, "activator_memory_mib": 64}],
        "ports[0].activator_memory_mib",
        "activator_memory_mib given but activator is none",
    ),
    (
        ["ports"],
        [{"port": 80, "activator": "http2", "max_connections_per_client": 0}],
        "ports[0].max_connections_per_client",
        "0 is out of range (1..65535)",
    ),
    (
        ["ports"],
        [{"port": 80, "max_connections_per_client": 8}],
        "ports[0].max_connections_per_client",
        "max_connections_per_client needs a stream activator on a tcp port",
    ),
    (["backends"], ["web-9"], "backends[0]", "no pod named web-9 in namespace shop"),
    (["backends"], ["web-1", "web-1"], "backends[1]", "web-1 is listed twice"),
    (["backends"], [3], "backends[0]", "expected a string, got integer 3"),
    (["hold"], {"packets": 0}, "hold.packets", "0 is out of range (1..65536)"),
    (["hold"], {"bytes": "lots"}, "hold.bytes", "'lots' is not a size"),
    (["hold"], {"bytes": 0}, "hold.bytes", "must be at least 1 byte"),
    (["hold"], {"timeout": "soon"}, "hold.timeout", "'soon' is not a duration"),
    (["hold"], 5, "hold", "expected a mapping, got integer 5"),
    (["idle_timeout"], "-3s", "idle_timeout", "'-3s' is not a duration"),
    (["idle_timeout"], -3, "idle_timeout", "-3 is negative"),
    (["readiness"], "maybe", "readiness", "'maybe' is not probe or external"),
    (["on_activate"], "  ", "on_activate", "must not be empty"),
    (["on_idle"], 5, "on_idle", "expected a string, got integer 5"),
    (["name"], "Web", "name", "'Web' is not a valid name"),
    (["ip"], "10.10.0.255", "ip", "10.10.0.255 is the broadcast address of 10.10.0.0/24"),
    (["ip"], "10.10.0.1", "ip", "10.10.0.1 is the gateway address of 10.10.0.0/24"),
    (["ip"], "10.10.0.2", "ip", "10.10.0.2 is already used by pod web-1"),
]


@pytest.mark.parametrize(("path", "value", "key", "problem"), SERVICE_CASES)
def test_service_errors(path: list[Any], value: Any, key: str, problem: str) -> None:
    e = cfg_err(_set([*SVC0, *path], value))
    assert e.key == f"namespaces[0].services[0].{key}"
    assert e.problem.startswith(problem), e.problem


def test_duplicate_service_name_and_ip() -> None:
    def dup_name(d: dict[str, Any]) -> None:
        ns0(d)["services"].append({"name": "web", "ip": "10.10.0.101", "ports": [80]})

    def dup_ip(d: dict[str, Any]) -> None:
        ns0(d)["services"].append({"name": "api", "ip": "10.10.0.100", "ports": [80]})

    e = cfg_err(dup_name)
    assert (e.key, e.problem) == (
        "namespaces[0].services[1].name",
        "duplicate service name web (also services[0])",
    )
    e = cfg_err(dup_ip)
    assert (e.key, e.problem) == (
        "namespaces[0].services[1].ip",
        "10.10.0.100 is already used by service web",
    )


# -- dns / egress ------------------------------------------------------------


@pytest.mark.parametrize(
    ("dns", "key", "problem"),
    [
        ({"domain": "bad_domain"}, "domain", "'bad_domain' is not a valid DNS domain"),
        ({"upstream": ["192.0.2.1:0"]}, "upstream[0]", "'192.0.2.1:0' has an invalid port"),
        (
            {"upstream": ["dns.google"]},
            "upstream[0]",
            "'dns.google' in 'dns.google' is not an IPv4 address",
        ),
        (
            {"resolv_conf": "no"},
            "resolv_conf",
            "expected a boolean (true or false), got string 'no'",
        ),
        ({"cache": -1}, "cache", ""),
        ({"cache": 10**30}, "cache", ""),
        ({"cache": "big"}, "cache", ""),
    ],
)
def test_dns_errors(dns: dict[str, Any], key: str, problem: str) -> None:
    e = cfg_err(_set([*NS, "dns"], dns))
    assert e.key == f"namespaces[0].dns.{key}" and e.problem.startswith(problem)


def test_dns_cache_size() -> None:
    data = base()
    assert parse_config(data, SRC).namespaces[0].dns.cache == 4096
    ns0(data)["dns"] = {"cache": 0}
    assert parse_config(data, SRC).namespaces[0].dns.cache == 0


def test_dns_domain_normalised() -> None:
    data = base()
    ns0(data)["dns"] = {"domain": "Corp.Example."}
    assert parse_config(data, SRC).namespaces[0].dns.domain == "corp.example"


def test_egress_allow_errors() -> None:
    e = cfg_err(_set([*NS, "egress"], {"allow": ["192.0.2.1/24"]}))
    assert (e.key, e.problem) == (
        "namespaces[0].egress.allow[0]",
        "192.0.2.1/24 has host bits set (the network would be 192.0.2.0/24)",
    )
    e = cfg_err(_set([*NS, "egress"], {}))
    assert (e.key, e.problem) == ("namespaces[0].egress.allow", "required key is missing")


# -- worker ------------------------------------------------------------------


def worker_err(worker: dict[str, Any]) -> ConfigError:
    return err(lambda: parse_config({"worker": worker}, SRC))


@pytest.mark.parametrize(
    ("mode", "problem"),
    [
        ("0800", "'0800' is not an octal mode (expected e.g. \"0600\")"),
        (600, '600 is not a valid mode (give an octal string like "0600")'),
        ("", "'' is not an octal mode"),
        (True, 'expected an octal mode string like "0600", got boolean true'),
    ],
)
def test_control_mode_errors(mode: Any, problem: str) -> None:
    e = worker_err({"id": "w1", "control_mode": mode})
    assert e.key == "worker.control_mode" and e.problem.startswith(problem), e.problem


def test_worker_errors() -> None:
    e = worker_err({"id": "bad id"})
    assert e.key == "worker.id" and "not a valid worker id" in e.problem
    e = worker_err({"control": "/" + "x" * 120})
    assert e.key == "worker.control" and e.problem.startswith("socket path is too long")
    e = worker_err({"egress": {"pool": "100.64.0.0/33"}})
    assert e.key == "worker.egress.pool"
    e = worker_err({"egress": {"tun": "x" * 16}})
    assert e.key == "worker.egress.tun"


def test_egress_pool_overlapping_namespace() -> None:
    data = base()
    data["worker"]["egress"] = {"pool": "10.10.0.0/16"}
    e = err(lambda: parse_config(data, SRC))
    assert (e.key, e.problem) == (
        "worker.egress.pool",
        "10.10.0.0/16 overlaps cidr 10.10.0.0/24 of namespace shop",
    )


TUNNEL_CASES = [
    ({}, "worker.tunnel", "give exactly one of private_key or private_key_file"),
    (
        {"private_key": KEY_A, "private_key_file": "/k"},
        "worker.tunnel",
        "give exactly one of private_key or private_key_file",
    ),
    (
        {"private_key": "not base64!"},
        "worker.tunnel.private_key",
        "is not valid base64 (expected a base64 32-byte key)",
    ),
    (
        {"private_key": base64.b64encode(b"short").decode()},
        "worker.tunnel.private_key",
        "decodes to 5 bytes (expected a base64 32-byte key)",
    ),
    ({"private_key": KEY_A, "psk": "AAAA"}, "worker.tunnel.psk", "decodes to 3 bytes"),
    (
        {"private_key": KEY_A, "keepalive": "often"},
        "worker.tunnel.keepalive",
        "'often' is not a duration",
    ),
    (
        {"private_key": KEY_A, "listen": "0.0.0.0"},
        "worker.tunnel.listen",
        "'0.0.0.0' has no port (expected HOST:PORT)",
    ),
    (
        {"private_key": KEY_A, "listen": "host:51820"},
        "worker.tunnel.listen",
        "'host' in 'host:51820' is not an IPv4 address",
    ),
    ({"private_key": KEY_A, "listen": 0}, "worker.tunnel.listen", "0 is out of range"),
    (
        {"private_key": KEY_A, "peers": [{"id": "w1", "public_key": KEY_B}]},
        "worker.tunnel.peers[0].id",
        "w1 is this worker's own id",
    ),
    (
        {
            "private_key": KEY_A,
            "peers": [{"id": "w2", "public_key": KEY_B}, {"id": "w2", "public_key": KEY_C}],
        },
        "worker.tunnel.peers[1].id",
        "duplicate peer id w2",
    ),
    (
        {
            "private_key": KEY_A,
            "peers": [{"id": "w2", "public_key": KEY_B}, {"id": "w3", "public_key": KEY_B}],
        },
        "worker.tunnel.peers[1].public_key",
        "public key is already used by peer w2",
    ),
    (
        {"private_key": KEY_A, "peers": [{"id": "w2"}]},
        "worker.tunnel.peers[0].public_key",
        "required key is missing",
    ),
    (
        {
            "private_key": KEY_A,
            "peers": [{"id": "w2", "public_key": KEY_B, "endpoint": "192.0.2.2"}],
        },
        "worker.tunnel.peers[0].endpoint",
        "'192.0.2.2' has no port (expected HOST:PORT)",
    ),
    (
        {
            "private_key": KEY_A,
            "peers": [{"id": "w2", "public_key": KEY_B, "endpoint": "bad_host:1"}],
        },
        "worker.tunnel.peers[0].endpoint",
        "'bad_host' in 'bad_host:1' is not an IPv4 address or host name",
    ),
    (
        {"private_key": KEY_A, "peers": [{"id": "w2", "public_key": KEY_B, "pubkey": 1}]},
        "worker.tunnel.peers[0].pubkey",
        "unknown key 'pubkey' (expected one of: id, endpoint, public_key)",
    ),
    ({"private_key": KEY_A, "peer": []}, "worker.tunnel.peer", "unknown key 'peer'"),
]


@pytest.mark.parametrize(("tunnel", "key", "problem"), TUNNEL_CASES)
def test_tunnel_errors(tunnel: dict[str, Any], key: str, problem: str) -> None:
    e = worker_err({"id": "w1", "tunnel": tunnel})
    assert e.key == key and e.problem.startswith(problem), e.problem


def test_private_key_file_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.key")
    e = worker_err({"id": "w1", "tunnel": {"private_key_file": missing}})
    assert (e.key, e.problem) == (
        "worker.tunnel.private_key_file",
        f"cannot read {missing}: No such file or directory",
    )
    bad = tmp_path / "bad.key"
    bad.write_text("garbage\n")
    bad.chmod(0o640)
    e = worker_err({"id": "w1", "tunnel": {"private_key_file": str(bad)}})
    assert e.problem == f"{bad} does not hold a base64 32-byte key"
    open_key = tmp_path / "open.key"
    open_key.write_text(KEY_A + "\n")
    open_key.chmod(0o644)
    e = worker_err({"id": "w1", "tunnel": {"private_key_file": str(open_key)}})
    assert "readable by every user (mode 0644)" in e.problem
    e = worker_err({"id": "w1", "tunnel": {"private_key_file": str(tmp_path)}})
    assert "not a regular file" in e.problem or "Is a directory" in e.problem


# ---------------------------------------------------------------------------
# Files: read errors, YAML errors, empty / non-mapping
# ---------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "none.yaml")
    e = err(lambda: load_config(path))
    assert str(e) == f"{path}: cannot read: No such file or directory"


def test_directory(tmp_path: Path) -> None:
    e = err(lambda: load_config(str(tmp_path)))
    assert str(e) == f"{tmp_path}: cannot read: Is a directory"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"worker: \xff\xfe\n")
    e = err(lambda: load_config(str(path)))
    assert e.problem.startswith("cannot read: not UTF-8 text")


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    e = err(lambda: load_config(path))
    assert (e.source, e.key) == (path, "")
    assert e.problem == "file is empty (expected a mapping with worker and namespaces)"


@pytest.mark.parametrize(("text", "what"), [("- a\n- b\n", "a list"), ("hello\n", "string")])
def test_top_level_not_mapping(tmp_path: Path, text: str, what: str) -> None:
    path = write(tmp_path, text)
    e = err(lambda: load_config(path))
    assert e.problem.startswith(f"expected a mapping at the top level, got {what}")


def test_parse_config_empty_and_non_mapping() -> None:
    assert err(lambda: parse_config(None, "x")).problem.startswith("config is empty")
    assert str(err(lambda: parse_config([1], "x"))) == (
        "x: expected a mapping at the top level, got a list"
    )


def test_yaml_syntax_error_reports_line(tmp_path: Path) -> None:
    path = write(tmp_path, "worker:\n  id: w1\nnamespaces:\n  - name: a\n    cidr: [10.0.0.0/24\n")
    e = err(lambda: load_config(path))
    assert e.source == path and e.key == ""
    assert e.problem.startswith("line 6, column 1: invalid YAML:"), e.problem
    path = write(tmp_path, "worker:\n  id: w1\n   bad: indent\n")
    e = err(lambda: load_config(path))
    assert e.problem.startswith("line 3, column 7: invalid YAML: mapping values are not allowed")


def test_yaml_duplicate_key(tmp_path: Path) -> None:
    path = write(tmp_path, "worker:\n  id: w1\n  id: w2\n")
    e = err(lambda: load_config(path))
    assert e.problem == "line 3, column 3: invalid YAML: duplicate key 'id' (first at line 2)"


def test_yaml_merge_keys_allowed(tmp_path: Path) -> None:
    text = (
        "namespaces:\n"
        "  - &ns {name: a, cidr: 10.1.0.0/24, mtu: 1400}\n"
        "  - <<: *ns\n"
        "    name: b\n"
        "    cidr: 10.2.0.0/24\n"
    )
    cfg = load_config(write(tmp_path, text))
    assert [(n.name, n.mtu) for n in cfg.namespaces] == [("a", 1400), ("b", 1400)]


def test_file_error_paths_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_YAML.replace("10.10.0.4, worker: w2", "10.10.1.4, worker: w2"))
    e = err(lambda: load_config(path))
    assert str(e) == f"{path}: namespaces[0].pods[2].ip: 10.10.1.4 is not inside cidr 10.10.0.0/24"


def test_unquoted_mac_read_as_int_by_yaml(tmp_path: Path) -> None:
    text = (
        "worker: {id: w1}\nnamespaces:\n  - name: a\n    cidr: 10.1.0.0/24\n"
        "    gateway_mac: 12:34:56:00:00:01\n"
    )
    e = err(lambda: load_config(write(tmp_path, text)))
    assert e.key == "namespaces[0].gateway_mac"
    assert e.problem.endswith("(quote MAC addresses in YAML)")


# ---------------------------------------------------------------------------
# API-style parsing: relative key paths, runtime attach/replace
# ---------------------------------------------------------------------------


def shop() -> NamespaceSpec:
    return parse_config(base(), SRC).namespaces[0]


def test_parse_namespace_api_key_paths() -> None:
    src = "PUT /v1/namespaces/shop"
    data = ns0(base())
    data["pods"][1]["ip"] = "10.10.1.5"
    e = err(lambda: parse_namespace(data, src, "w1"))
    assert str(e) == f"{src}: pods[1].ip: 10.10.1.5 is not inside cidr 10.10.0.0/24"
    e = err(lambda: parse_namespace([], src, "w1"))
    assert str(e) == f"{src}: expected a mapping, got a list"
    e = err(lambda: parse_namespace({"name": "x", "cidr": "10.0.0.0/8", "bogus": 1}, src, "w1"))
    assert e.key == "bogus"


def test_parse_pod_attach_and_replace() -> None:
    ns = shop()
    src = "PUT /v1/namespaces/shop/pods/web-2"
    pod = parse_pod({"name": "web-2", "ip": "10.10.0.5", "netns": "web2"}, src, ns, "w1")
    assert pod == PodSpec("web-2", IPv4Address("10.10.0.5"), netns="web2")
    # Re-attaching web-1 with its own IP, netns and ifname is a replace, not a clash.
    again = parse_pod(
        {"name": "web-1", "ip": "10.10.0.2", "netns": "web1", "ready": False}, src, ns, "w1"
    )
    assert again.ready is False
    moved = parse_pod({"name": "web-1", "ip": "10.10.0.50", "worker": "w2"}, src, ns, "w1")
    assert moved.kind == "remote"


@pytest.mark.parametrize(
    ("pod", "key", "problem"),
    [
        (
            {"name": "web-2", "ip": "10.10.0.3", "netns": "web2"},
            "ip",
            "10.10.0.3 is already used by pod vm-1",
        ),
        (
            {"name": "web-2", "ip": "10.10.0.100", "netns": "web2"},
            "ip",
            "10.10.0.100 is already used by service web",
        ),
        (
            {"name": "web", "ip": "10.10.0.9", "netns": "web2"},
            "name",
            "web is already a service name",
        ),
        (
            {"name": "web-2", "ip": "10.10.0.9", "netns": "/run/netns/web1"},
            "netns",
            "netns /run/netns/web1 already has eth0 (pod web-1); give a different ifname",
        ),
        (
            {"name": "web-2", "ip": "10.10.0.9", "interface": "tap-vm1"},
            "interface",
            "interface tap-vm1 is already used by pod vm-1",
        ),
        (
            {"name": "web-2", "ip": "10.10.0.9", "worker": "w1"},
            "worker",
            "worker w1 is this worker: give netns or interface",
        ),
        (
            {"name": "web-2", "ip": "10.10.0.9"},
            "",
            "give exactly one of netns, interface or worker",
        ),
    ],
)
def test_parse_pod_conflicts(pod: dict[str, Any], key: str, problem: str) -> None:
    src = "PUT /v1/namespaces/shop/pods/x"
    e = err(lambda: parse_pod(pod, src, shop(), "w1"))
    assert (e.source, e.key, e.problem) == (src, key, problem)


def test_parse_pod_key_prefix() -> None:
    e = err(
        lambda: parse_pod(
            {"name": "x", "ip": "1.2.3.4", "netns": "x"}, "api", shop(), "w1", key_prefix="pods[3]"
        )
    )
    assert e.key == "pods[3].ip"


def test_parse_service_runtime() -> None:
    ns = shop()
    src = "PUT /v1/namespaces/shop/services/web"
    svc = parse_service(
        {"name": "web", "ip": "10.10.0.100", "ports": [443], "backends": ["web-1", "vm-1"]}, src, ns
    )
    assert svc.ports == (PortSpec(443, 443),) and svc.backends == ("web-1", "vm-1")
    e = err(lambda: parse_service({"name": "api", "ip": "10.10.0.100", "ports": [80]}, src, ns))
    assert (e.key, e.problem) == ("ip", "10.10.0.100 is already used by service web")
    e = err(
        lambda: parse_service(
            {"name": "api", "ip": "10.10.0.101", "ports": [80], "backends": ["ghost"]}, src, ns
        )
    )
    assert (e.key, e.problem) == ("backends[0]", "no pod named ghost in namespace shop")
    e = err(lambda: parse_service({"name": "web-1", "ip": "10.10.0.101", "ports": [80]}, src, ns))
    assert (e.key, e.problem) == ("name", "web-1 is already a pod name")


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


def test_namespace_round_trip(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL_YAML))
    for ns in cfg.namespaces:
        d = namespace_to_dict(ns)
        again = parse_namespace(json.loads(json.dumps(d)), "api", "w1")
        assert again == ns
    d = namespace_to_dict(cfg.namespaces[0])
    assert d["gateway"] == "10.10.0.1"
    assert d["egress"] == {"allow": ["192.0.2.0/24"]}
    assert d["dns"]["upstream"] == ["192.0.2.53:53", "192.0.2.54:5353"]
    assert d["services"][0]["ports"][0]["activator_config"] == {"banner": "hi", "retries": [1, 2]}
    assert d["services"][0]["hold"] == {"packets": 64, "bytes": 524288, "timeout": 1.5}
    assert "id" not in namespace_to_dict(cfg.namespaces[1])


@pytest.mark.parametrize("egress", [True, False, {"allow": ["10.0.0.0/8"]}])
def test_namespace_round_trip_egress(egress: Any) -> None:
    ns = parse_namespace({"name": "a", "cidr": "10.1.0.0/24", "egress": egress}, "x", "w1")
    d = namespace_to_dict(ns)
    assert d["egress"] == egress
    assert parse_namespace(d, "x", "w1") == ns


def test_default_round_trip() -> None:
    ns = default_config("w1").namespaces[0]
    assert parse_namespace(namespace_to_dict(ns), "x", "w1") == ns


def test_pod_round_trip() -> None:
    ns = parse_config(base(), SRC).namespaces[0]
    pods = [
        *ns.pods,
        PodSpec("r", IPv4Address("10.10.0.60"), worker="w2", mac="02:00:00:00:00:60", ready=False),
        PodSpec("n", IPv4Address("10.10.0.61"), netns="/proc/1/ns/net", ifname="eth9"),
    ]
    for pod in pods:
        d = pod_to_dict(pod)
        assert json.loads(json.dumps(d)) == d
        assert parse_pod(d, "x", ns, "w1") == pod
    assert "ifname" not in pod_to_dict(ns.pods[1])


def test_service_round_trip() -> None:
    ns = shop()
    svc = parse_service(
        {
            "name": "db",
            "ip": "10.10.0.101",
            "ports": [
                {"port": 5432, "activator": "postgres", "activator_config": {"x": {"y": [1, "z"]}}},
                {"port": 53, "protocol": "udp"},
            ],
            "hold": {"bytes": "1k"},
            "on_idle": "stop",
        },
        "x",
        ns,
    )
    d = service_to_dict(svc)
    assert "on_activate" not in d and d["on_idle"] == "stop"
    assert parse_service(json.loads(json.dumps(d)), "x", ns) == svc


def test_config_equality_detects_change(tmp_path: Path) -> None:
    a = load_config(write(tmp_path, FULL_YAML, "a.yaml"))
    b = load_config(
        write(tmp_path, FULL_YAML.replace("idle_timeout: 5m", "idle_timeout: 6m"), "b.yaml")
    )
    assert a.namespaces[1] == b.namespaces[1]
    assert a.namespaces[0] != b.namespaces[0]
    assert isinstance(a, Config)


@pytest.mark.parametrize(("cmd", "problem"), [
    ("echo 'x", "No closing quotation"), ("   ", "must not be empty"), ('"', "No closing"),
    ("''", "it is empty")])
def test_hook_commands_are_split_at_load_time(cmd: str, problem: str) -> None:
    data = base()
    ns0(data)["services"][0]["on_idle"] = cmd
    with pytest.raises(ConfigError, match=problem) as e:
        parse_config(data, SRC)
    assert e.value.key == "namespaces[0].services[0].on_idle"


# --- validation holes: every one used to escape as something other than ConfigError ------


@pytest.mark.parametrize("kind", ["pods", "services"])
def test_names_the_gateway_answers_to_are_reserved(kind: str) -> None:
    data = base()
    ns0(data)[kind][0]["name"] = "gateway"
    if kind == "pods":
        ns0(data)["services"][0]["backends"] = []
    e = err(lambda: parse_config(data, SRC))
    assert e.key == f"namespaces[0].{kind}[0].name" and "reserved" in e.problem
    ns = parse_config(base(), SRC).namespaces[0]
    runtime = err(lambda: parse_pod({"name": "gateway", "ip": "10.10.0.9", "netns": "g"},
                                    "api", ns, "w1"))
    assert "reserved" in runtime.problem


@pytest.mark.parametrize("value", ["shop\n", "web-1\n", "a\nb"])
def test_names_with_a_newline_are_refused(value: str) -> None:
    e = cfg_err(_set(["namespaces", 0, "name"], value))
    assert "not a valid name" in e.problem
    e = cfg_err(_set(["worker", "id"], "w1\n"))
    assert "not a valid worker id" in e.problem
    e = cfg_err(_set(["namespaces", 0, "pods", 0, "netns"], "web1\nx"))
    assert e.key == "namespaces[0].pods[0].netns"


def test_zone_and_names_must_fit_in_a_dns_name() -> None:
    long_domain = ".".join(["a" * 63] * 3) + "." + "b" * 61  # 253 characters: valid alone
    data = base()
    ns0(data)["name"] = "x" * 63
    ns0(data)["dns"] = {"domain": long_domain}
    e = err(lambda: parse_config(data, SRC))
    assert e.key == "namespaces[0].dns" and "zone" in e.problem
    data = base()
    ns0(data)["dns"] = {"domain": ".".join(["a" * 63] * 3) + ".b" * 20}  # zone fits, pods not
    ns0(data)["pods"][0]["name"] = "p" * 63
    e = err(lambda: parse_config(data, SRC))
    assert e.key == "namespaces[0].pods[0].name" and "253" in e.problem


@pytest.mark.parametrize(("value", "problem"), [
    ("9" * 400, "more than 1TiB"), ("1e3", "not a size"), (10**50, "more than 1TiB"),
    ("2048GiB", "more than 1TiB")])
def test_huge_sizes_are_a_clear_error(value: Any, problem: str) -> None:
    e = err(lambda: parse_size(value, "x", "k"))
    assert problem in e.problem and len(e.problem) < 200


@pytest.mark.parametrize("value", [1e308, 10**50, "99999999999h"])
def test_huge_durations_are_a_clear_error(value: Any) -> None:
    e = err(lambda: parse_duration(value, "x", "k"))
    assert "longer than a year" in e.problem and len(e.problem) < 200


def test_huge_integers_are_a_clear_error(tmp_path: Path) -> None:
    e = cfg_err(_set(["namespaces", 0, "id"], 10**5000))
    assert "out of range" in e.problem and len(e.problem) < 200
    e = err(lambda: load_config(write(tmp_path, "worker: {id: w1}\nx: " + "9" * 5000)))
    assert "invalid value" in e.problem
    e = err(lambda: load_config(write(tmp_path, "a: " + "[" * 100000, "deep.yaml")))
    assert "nested too deeply" in e.problem


@pytest.mark.parametrize(("hold", "problem"), [
    ({"packets": 1 << 20}, "out of range"), ({"bytes": "1000GiB"}, "more than 256MiB"),
    ({"bytes": "300MiB"}, "more than 256MiB"), ({"timeout": "1000h"}, "longer than 600s")])
def test_hold_has_upper_bounds(hold: dict[str, Any], problem: str) -> None:
    e = cfg_err(_set(["namespaces", 0, "services", 0, "hold"], hold))
    assert problem in e.problem, e.problem


def test_a_large_namespace_validates_in_linear_time() -> None:
    import time

    def doc(n: int) -> dict[str, Any]:
        pods = [{"name": f"p{i}", "ip": str(IPv4Address("10.0.0.2") + i), "netns": f"n{i}",
                 "mac": f"02:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"}
                for i in range(n)]
        return {"name": "big", "cidr": "10.0.0.0/16", "pods": pods,
                "services": [{"name": "s", "ip": "10.0.255.200", "ports": [80],
                              "backends": [f"p{i}" for i in range(0, n, 10)]}]}

    def took(n: int) -> float:
        d = doc(n)
        t = time.perf_counter()
        parse_namespace(d, "api", "w1")
        return time.perf_counter() - t

    # 8x the pods: linear is ~8x the time, quadratic 64x; the bound leaves room for a
    # noisy machine and still fails the old checks (which took 60x).
    small, large = min(took(2000) for _ in range(3)), min(took(16000) for _ in range(3))
    assert large / small < 32, (small, large)


@pytest.mark.parametrize("key", ["\n", "a\nb", "x\r\ny", "tab\there", "\x1b[31mred", ""])
def test_an_odd_unknown_key_is_named_on_one_line(key: str) -> None:
    """A key with a newline or control character must not break the one-line promise
    (nor forge a log line): it is quoted in the key path."""
    e = cfg_err(_set([*POD0, key], 1))
    assert "\n" not in e.message and "\r" not in e.message and "\x1b" not in e.message
    assert e.key == f"namespaces[0].pods[0][{key!r}]", e.key
    assert e.problem.startswith("unknown key ")


def test_errors_are_one_line_whatever_their_message() -> None:
    from fabric.errors import FabricError, PortError

    for exc in (FabricError("a\nb"), PortError("interface x\r\ny: gone"),
                ConfigError("file\n.yaml", "k\n", "bad\nvalue")):
        assert "\n" not in exc.message and "\r" not in exc.message, exc.message
        assert "\n" not in str(exc) and "\\n" in exc.message


def test_worker_busy_poll_is_a_short_duration_and_adaptive_by_default() -> None:
    from fabric.config.specs import ADAPTIVE_MAX

    w = parse_config(base(), SRC).worker
    assert w.busy_poll == ADAPTIVE_MAX and w.busy_poll_adaptive
    data = base()
    data["worker"]["busy_poll"] = 0
    w = parse_config(data, SRC).worker
    assert w.busy_poll == 0.0 and not w.busy_poll_adaptive  # off
    data["worker"]["busy_poll"] = "2.5ms"
    assert parse_config(data, SRC).worker.busy_poll == pytest.approx(0.0025)
    e = cfg_err(_set(["worker", "busy_poll"], "1s"))
    assert e.key == "worker.busy_poll" and "more than 100 ms" in e.problem
    e = cfg_err(_set(["worker", "busy_poll"], -1))
    assert e.key == "worker.busy_poll"


def test_worker_service_hold_bytes_is_a_bounded_size() -> None:
    from fabric.config.specs import DEFAULT_SERVICE_HOLD_BYTES

    assert parse_config(base(), SRC).worker.service_hold_bytes == \
        DEFAULT_SERVICE_HOLD_BYTES == 64 << 20
    data = base()
    data["worker"]["service_hold_bytes"] = "128MiB"
    assert parse_config(data, SRC).worker.service_hold_bytes == 128 << 20
    for bad, problem in (("512KiB", "not between 1MiB and 4GiB"),
                         ("5GiB", "not between 1MiB and 4GiB"),
                         ("lots", "is not a size"), (True, "size"), (-1, "negative")):
        e = cfg_err(_set(["worker", "service_hold_bytes"], bad))
        assert e.key == "worker.service_hold_bytes" and problem in e.problem, e.problem
        assert e.source == SRC


def test_worker_busy_poll_adaptive_has_a_max_and_a_mapping_form() -> None:
    from fabric.config.specs import ADAPTIVE_MAX

    data = base()
    data["worker"]["busy_poll"] = "2.5ms"
    assert not parse_config(data, SRC).worker.busy_poll_adaptive  # a duration is fixed
    data["worker"]["busy_poll"] = "adaptive"
    w = parse_config(data, SRC).worker
    assert w.busy_poll_adaptive and w.busy_poll == ADAPTIVE_MAX
    data["worker"]["busy_poll"] = {"max": "0.5ms"}
    w = parse_config(data, SRC).worker
    assert w.busy_poll_adaptive and w.busy_poll == pytest.approx(0.0005)
    e = cfg_err(_set(["worker", "busy_poll"], {"max": "1s"}))
    assert e.key == "worker.busy_poll.max" and "more than 100 ms" in e.problem
    e = cfg_err(_set(["worker", "busy_poll"], {}))
    assert e.key == "worker.busy_poll.max" and "required" in e.problem
    e = cfg_err(_set(["worker", "busy_poll"], {"max": "1ms", "min": "1us"}))
    assert e.key == "worker.busy_poll.min" and "unknown key" in e.problem
    e = cfg_err(_set(["worker", "busy_poll"], "adaptve"))
    assert e.key == "worker.busy_poll" and "neither a duration nor adaptive" in e.problem
    e = cfg_err(_set(["worker", "busy_poll"], True))
    assert e.key == "worker.busy_poll"


def test_stream_port_upstream_defaults_to_the_vip_and_round_trips() -> None:
    pods = [{"name": "db", "ip": "10.1.0.5", "netns": "db"}]
    ns = parse_namespace({"name": "a", "cidr": "10.1.0.0/24", "pods": pods, "services": [
        {"name": "pg", "ip": "10.1.0.100", "backends": ["db"],
         "ports": [{"port": 5432, "activator": "postgres", "upstream": "pod-local"},
                   {"port": 5433, "target_port": 5432, "activator": "stream"}]}]},
        "x", "w1")
    local, vip = ns.services[0].ports
    assert (local.upstream, vip.upstream) == ("pod-local", "vip")
    d = namespace_to_dict(ns)
    assert d["services"][0]["ports"][0]["upstream"] == "pod-local"
    assert "upstream" not in d["services"][0]["ports"][1]  # the default is not spelled out
    assert parse_namespace(json.loads(json.dumps(d)), "api", "w1") == ns


def test_activator_memory_defaults_to_16_mib_and_round_trips() -> None:
    pods = [{"name": "web", "ip": "10.1.0.5", "netns": "web"}]
    ns = parse_namespace({"name": "a", "cidr": "10.1.0.0/24", "pods": pods, "services": [
        {"name": "rpc", "ip": "10.1.0.100", "backends": ["web"],
         "ports": [{"port": 80, "activator": "http2", "activator_memory_mib": 64,
                    "max_connections_per_client": 32},
                   {"port": 81, "activator": "http2"}]}]},
        "x", "w1")
    big, default = ns.services[0].ports
    assert (big.activator_memory, default.activator_memory) == (64 << 20, 16 << 20)
    d = namespace_to_dict(ns)
    assert d["services"][0]["ports"][0]["activator_memory_mib"] == 64
    assert big.max_connections_per_client == 32 and default.max_connections_per_client == 0
    assert d["services"][0]["ports"][0]["max_connections_per_client"] == 32
    assert "max_connections_per_client" not in d["services"][0]["ports"][1]
    assert "activator_memory_mib" not in d["services"][0]["ports"][1]
    assert parse_namespace(json.loads(json.dumps(d)), "api", "w1") == ns
