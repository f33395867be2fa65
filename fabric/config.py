"""fabricd configuration: validate YAML files and API dicts into frozen specs.

Everything the daemon acts on passes through here, so a bad value anywhere stops with
one line naming the source, the key path and the problem (``ConfigError``). Specs are
frozen dataclasses made of tuples, so a reload can diff old and new specs with ``==``.

The same parsers serve the YAML file (``load_config``/``parse_config``) and the
control API (``parse_namespace``/``parse_pod``/``parse_service`` with a source such as
``PUT /v1/namespaces/shop`` and key paths relative to the posted object).
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import yaml

from fabric.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_SOURCE",
    "DEFAULT_CONTROL",
    "DEFAULT_CONTROL_MODE",
    "DEFAULT_DOMAIN",
    "DEFAULT_GATEWAY_MAC",
    "DEFAULT_IFNAME",
    "DEFAULT_MTU",
    "NETNS_DIR",
    "TUNNEL_MTU",
    "Config",
    "DnsSpec",
    "EgressSpec",
    "FrozenMap",
    "HoldSpec",
    "NamespaceSpec",
    "PodSpec",
    "PortSpec",
    "ServiceSpec",
    "TunnelPeerSpec",
    "TunnelSpec",
    "WorkerSpec",
    "default_config",
    "load_config",
    "namespace_to_dict",
    "parse_config",
    "parse_duration",
    "parse_namespace",
    "parse_peer",
    "parse_pod",
    "parse_service",
    "parse_size",
    "pod_to_dict",
    "service_to_dict",
    "validate_namespace_set",
]

DEFAULT_CONTROL = "/run/fabricd/control.sock"
DEFAULT_CONTROL_MODE = 0o600
DEFAULT_GATEWAY_MAC = "02:fb:00:00:00:01"
DEFAULT_MTU = 1500
TUNNEL_MTU = 1420
DEFAULT_DOMAIN = "fabric.internal"
DEFAULT_IFNAME = "eth0"
DEFAULT_LISTEN = ("0.0.0.0", 51820)
DEFAULT_EGRESS_TUN = "fabegress0"
DEFAULT_EGRESS_POOL = IPv4Network("100.64.0.0/16")
DEFAULT_HOLD_PACKETS = 1024
DEFAULT_HOLD_BYTES = 8 * 1024 * 1024
DEFAULT_HOLD_TIMEOUT = 30.0
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_CONFIG_SOURCE = "<default>"
NETNS_DIR = "/run/netns"
ALLOW_ALL: tuple[IPv4Network, ...] = (IPv4Network("0.0.0.0/0"),)

_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_MAC = re.compile(r"^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$")
_ACTIVATOR_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
}


# ---------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------


class FrozenMap(Mapping[str, Any]):
    """A read-only, hashable mapping so activator configs can live in frozen specs."""

    __slots__ = ("_data",)

    def __init__(self, items: Mapping[str, Any] | Sequence[tuple[str, Any]] = ()) -> None:
        self._data: dict[str, Any] = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self.items()) == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts and lists again, for JSON and for handing to activators."""
        return {k: _thaw(v) for k, v in self._data.items()}


def _freeze(value: Any) -> Any:
    """Deep-freeze JSON-like data: mappings become FrozenMap, lists become tuples."""
    if isinstance(value, Mapping):
        return FrozenMap({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """Undo ``_freeze`` so the result is JSON-serialisable."""
    if isinstance(value, FrozenMap):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class PodSpec:
    """One pod: a local netns, a local tap/interface, or a pod living on another worker."""

    name: str
    ip: IPv4Address
    netns: str | None = None
    interface: str | None = None
    worker: str | None = None
    mac: str | None = None
    ifname: str = DEFAULT_IFNAME
    ready: bool = True

    @property
    def kind(self) -> str:
        """``netns``, ``interface`` or ``remote`` — which port type serves this pod."""
        if self.netns is not None:
            return "netns"
        if self.interface is not None:
            return "interface"
        return "remote"

    @property
    def netns_path(self) -> str | None:
        """The netns as a path: bare names live under /run/netns (as ``ip netns`` does)."""
        if self.netns is None:
            return None
        if self.netns.startswith("/"):
            return self.netns
        return f"{NETNS_DIR}/{self.netns}"


@dataclass(frozen=True)
class PortSpec:
    """One service port and the activator that wakes the backends for it."""

    port: int
    target_port: int
    protocol: str = "tcp"
    activator: str = "none"
    activator_config: FrozenMap = field(default_factory=FrozenMap)


@dataclass(frozen=True)
class HoldSpec:
    """How much traffic to hold while a service's backends are starting."""

    packets: int = DEFAULT_HOLD_PACKETS
    bytes: int = DEFAULT_HOLD_BYTES
    timeout: float = DEFAULT_HOLD_TIMEOUT


@dataclass(frozen=True)
class ServiceSpec:
    """A virtual IP in a namespace, fronting a set of backend pods."""

    name: str
    ip: IPv4Address
    ports: tuple[PortSpec, ...]
    backends: tuple[str, ...] = ()
    hold: HoldSpec = HoldSpec()
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    readiness: str = "probe"
    on_activate: str | None = None
    on_idle: str | None = None


@dataclass(frozen=True)
class DnsSpec:
    """The namespace's resolver: search domain, upstreams, and whether to write resolv.conf."""

    domain: str = DEFAULT_DOMAIN
    upstream: tuple[tuple[str, int], ...] = ()
    resolv_conf: bool = True


@dataclass(frozen=True)
class NamespaceSpec:
    """An isolated L3 network: one CIDR, its gateway, pods and services."""

    name: str
    id: int | None
    cidr: IPv4Network
    gateway: IPv4Address
    gateway_mac: str = DEFAULT_GATEWAY_MAC
    mtu: int = DEFAULT_MTU
    dns: DnsSpec = DnsSpec()
    egress_allow: tuple[IPv4Network, ...] = ALLOW_ALL
    pods: tuple[PodSpec, ...] = ()
    services: tuple[ServiceSpec, ...] = ()

    def pod(self, name: str) -> PodSpec | None:
        """The pod called ``name``, or None."""
        for pod in self.pods:
            if pod.name == name:
                return pod
        return None

    def service(self, name: str) -> ServiceSpec | None:
        """The service called ``name``, or None."""
        for svc in self.services:
            if svc.name == name:
                return svc
        return None


@dataclass(frozen=True)
class EgressSpec:
    """The worker's egress TUN and the pool its NAT allocates from."""

    tun: str = DEFAULT_EGRESS_TUN
    pool: IPv4Network = DEFAULT_EGRESS_POOL


@dataclass(frozen=True)
class TunnelPeerSpec:
    """Another worker reachable through the tunnel."""

    id: str
    public_key: bytes = field(repr=False)
    endpoint: tuple[str, int] | None = None


@dataclass(frozen=True)
class TunnelSpec:
    """The inter-worker tunnel. ``private_key`` is always filled (read from the file if given)."""

    listen: tuple[str, int]
    private_key: bytes = field(repr=False)
    private_key_file: str | None = None
    psk: bytes | None = field(default=None, repr=False)
    keepalive: float | None = None
    peers: tuple[TunnelPeerSpec, ...] = ()

    def peer(self, peer_id: str) -> TunnelPeerSpec | None:
        """The peer with this worker id, or None."""
        for peer in self.peers:
            if peer.id == peer_id:
                return peer
        return None


@dataclass(frozen=True)
class WorkerSpec:
    """This worker: its id, control socket, and optional egress and tunnel."""

    id: str
    control: str = DEFAULT_CONTROL
    control_mode: int = DEFAULT_CONTROL_MODE
    egress: EgressSpec | None = None
    tunnel: TunnelSpec | None = None


@dataclass(frozen=True)
class Config:
    """The whole daemon config; ``source`` is where it came from (a path or ``<default>``)."""

    worker: WorkerSpec
    namespaces: tuple[NamespaceSpec, ...]
    source: str

    def namespace(self, name: str) -> NamespaceSpec | None:
        """The namespace called ``name``, or None."""
        for ns in self.namespaces:
            if ns.name == name:
                return ns
        return None


# ---------------------------------------------------------------------------
# Low-level readers: each takes (value, source, key) and raises ConfigError
# ---------------------------------------------------------------------------


def _key(prefix: str, name: str) -> str:
    """Join a key path: ``namespaces[0]`` + ``pods`` -> ``namespaces[0].pods``."""
    return f"{prefix}.{name}" if prefix else name


def _index(prefix: str, i: int) -> str:
    """Index a key path: ``pods`` + 1 -> ``pods[1]``."""
    return f"{prefix}[{i}]"


def _describe(value: Any) -> str:
    """Say what a wrong value was, so the error shows what the user actually wrote."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:37] + "..."
        return f"string {text!r}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def _type_error(value: Any, src: str, key: str, expected: str) -> ConfigError:
    return ConfigError(src, key, f"expected {expected}, got {_describe(value)}")


class _Obj:
    """A mapping being read; rejects unknown keys up front so typos never pass silently.

    An explicit null counts as absent, so ``pods:`` with nothing under it is no pods.
    """

    def __init__(self, data: Any, src: str, path: str, allowed: tuple[str, ...]) -> None:
        if not isinstance(data, Mapping):
            raise _type_error(data, src, path, "a mapping")
        for k in data:
            if not isinstance(k, str):
                raise ConfigError(src, path, f"keys must be strings, got {_describe(k)}")
            if k not in allowed:
                raise ConfigError(
                    src,
                    _key(path, k),
                    f"unknown key {k!r} (expected one of: {', '.join(allowed)})",
                )
        self.data = data
        self.src = src
        self.path = path

    def key(self, name: str) -> str:
        return _key(self.path, name)

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def get(self, name: str) -> Any:
        return self.data.get(name)

    def required(self, name: str) -> Any:
        value = self.data.get(name)
        if value is None:
            raise ConfigError(self.src, self.key(name), "required key is missing")
        return value


def _str(value: Any, src: str, key: str) -> str:
    if not isinstance(value, str):
        raise _type_error(value, src, key, "a string")
    if not value.strip():
        raise ConfigError(src, key, "must not be empty")
    return value


def _int(value: Any, src: str, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(value, src, key, "an integer")
    if not lo <= value <= hi:
        raise ConfigError(src, key, f"{value} is out of range ({lo}..{hi})")
    return value


def _bool(value: Any, src: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise _type_error(value, src, key, "a boolean (true or false)")
    return value


def _list(value: Any, src: str, key: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise _type_error(value, src, key, "a list")
    return list(value)


def _dns_label(value: Any, src: str, key: str) -> str:
    text = _str(value, src, key)
    if not _DNS_LABEL.match(text):
        raise ConfigError(
            src,
            key,
            f"{text!r} is not a valid name (DNS label: lowercase letters, digits and '-', "
            "at most 63 characters, starting and ending with a letter or digit)",
        )
    return text


def _worker_id(value: Any, src: str, key: str) -> str:
    text = _str(value, src, key)
    if not _WORKER_ID.match(text):
        raise ConfigError(
            src,
            key,
            f"{text!r} is not a valid worker id (letters, digits, '.', '_', '-'; "
            "at most 63 characters, starting with a letter or digit)",
        )
    return text


def _ifname(value: Any, src: str, key: str) -> str:
    text = _str(value, src, key)
    if not _IFNAME.match(text) or text in (".", ".."):
        raise ConfigError(
            src,
            key,
            f"{text!r} is not a valid interface name (1-15 characters: letters, digits, "
            "'-', '_', '.')",
        )
    return text


def _ipv4(value: Any, src: str, key: str) -> IPv4Address:
    if isinstance(value, IPv4Address):
        return value
    text = _str(value, src, key)
    try:
        return IPv4Address(text.strip())
    except ValueError:
        raise ConfigError(src, key, f"{text!r} is not an IPv4 address") from None


def _network(value: Any, src: str, key: str, lo: int = 0, hi: int = 32) -> IPv4Network:
    """An IPv4 network in CIDR form; host bits set is an error that shows the real network."""
    if isinstance(value, IPv4Network):
        net = value
    else:
        text = _str(value, src, key).strip()
        if "/" not in text:
            raise ConfigError(src, key, f"{text!r} is not a network (expected e.g. 10.10.0.0/24)")
        try:
            net = IPv4Network(text, strict=False)
        except ValueError:
            raise ConfigError(
                src, key, f"{text!r} is not an IPv4 network (expected e.g. 10.10.0.0/24)"
            ) from None
        if net.network_address != IPv4Address(text.split("/", 1)[0]):
            raise ConfigError(src, key, f"{text} has host bits set (the network would be {net})")
    if not lo <= net.prefixlen <= hi:
        raise ConfigError(
            src, key, f"prefix /{net.prefixlen} of {net} is out of range (/{lo}../{hi})"
        )
    return net


def _mac(value: Any, src: str, key: str) -> str:
    """A unicast MAC, normalised to lowercase colon form."""
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads some unquoted MACs (e.g. 12:34:56:00:00:01) as base-60 integers.
        raise ConfigError(
            src,
            key,
            f"expected a MAC address string, got {_describe(value)} (quote MAC addresses in YAML)",
        )
    text = _str(value, src, key).strip()
    if not _MAC.match(text):
        raise ConfigError(src, key, f"{text!r} is not a MAC address (expected 02:00:00:00:00:01)")
    mac = text.lower().replace("-", ":")
    if mac == "00:00:00:00:00:00":
        raise ConfigError(src, key, f"{mac} is the all-zero MAC")
    if int(mac[:2], 16) & 1:
        raise ConfigError(src, key, f"{mac} is a multicast MAC (the first octet must be even)")
    return mac


def parse_duration(value: Any, src: str, key: str) -> float:
    """Seconds as a number, or a string like ``250ms``, ``30s``, ``5m``, ``1h``, ``1.5s``."""
    hint = "use seconds or a string like 250ms, 30s, 5m, 1h"
    if isinstance(value, bool):
        raise _type_error(value, src, key, f"a duration ({hint})")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ConfigError(src, key, f"{value!r} is not a duration ({hint})")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise _type_error(value, src, key, f"a duration ({hint})")
    if math.isnan(seconds) or math.isinf(seconds):
        raise ConfigError(src, key, f"{value} is not a finite duration")
    if seconds < 0:
        raise ConfigError(src, key, f"{value} is negative (durations must be >= 0)")
    return seconds


def parse_size(value: Any, src: str, key: str) -> int:
    """Bytes as an int, or a string like ``8MiB``, ``512KiB``, ``1GB``, ``100k``.

    ``*iB`` (and ``Ki``/``Mi``/``Gi``) are binary; ``k``/``M``/``G``/``KB``/``MB``/``GB``
    are decimal. Units are case-insensitive.
    """
    hint = "use bytes or a string like 512KiB, 8MiB, 1GB, 100k"
    if isinstance(value, bool):
        raise _type_error(value, src, key, f"a size ({hint})")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        m = _SIZE.match(value)
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _SIZE_UNITS:
            raise ConfigError(src, key, f"{value!r} is not a size ({hint})")
        size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    else:
        raise _type_error(value, src, key, f"a size ({hint})")
    if size < 0:
        raise ConfigError(src, key, f"{value} is negative (sizes must be >= 0)")
    return size


def _host_port(
    value: Any, src: str, key: str, *, default_port: int | None, hostname_ok: bool
) -> tuple[str, int]:
    """``HOST:PORT`` (or bare ``HOST`` when a default port exists) as (host, port)."""
    text = _str(value, src, key).strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ConfigError(src, key, f"{text!r} has no port (expected HOST:PORT)")
        port = default_port
    else:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ConfigError(src, key, f"{text!r} has an invalid port (expected 1..65535)")
        port = int(port_text)
    try:
        host = str(IPv4Address(host))
    except ValueError:
        labels = host.rstrip(".").split(".")
        if (
            not hostname_ok
            or not host
            or not all(
                re.match(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$", lb) for lb in labels
            )
        ):
            what = "an IPv4 address or host name" if hostname_ok else "an IPv4 address"
            raise ConfigError(src, key, f"{host!r} in {text!r} is not {what}") from None
    return host, port


def _key32(value: Any, src: str, key: str) -> bytes:
    """A base64-encoded 32-byte key (X25519 keys and PSKs)."""
    text = _str(value, src, key).strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(src, key, "is not valid base64 (expected a base64 32-byte key)") from None
    if len(raw) != 32:
        raise ConfigError(src, key, f"decodes to {len(raw)} bytes (expected a base64 32-byte key)")
    return raw


def _json_value(value: Any, src: str, key: str) -> Any:
    """Activator config must be plain JSON-like data so it can be frozen and sent anywhere."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(src, key, f"keys must be strings, got {_describe(k)}")
            out[k] = _json_value(v, src, _key(key, k))
        return FrozenMap(out)
    if isinstance(value, (list, tuple)):
        return tuple(_json_value(v, src, _index(key, i)) for i, v in enumerate(value))
    raise ConfigError(
        src,
        key,
        f"expected plain data (string, number, boolean, list, mapping), got {_describe(value)}",
    )


# ---------------------------------------------------------------------------
# Namespaces, pods, services
# ---------------------------------------------------------------------------

_NS_KEYS = (
    "name",
    "id",
    "cidr",
    "gateway",
    "gateway_mac",
    "mtu",
    "dns",
    "egress",
    "pods",
    "services",
)
_POD_KEYS = ("name", "ip", "netns", "interface", "worker", "ifname", "mac", "ready")
_SERVICE_KEYS = (
    "name",
    "ip",
    "ports",
    "backends",
    "hold",
    "idle_timeout",
    "readiness",
    "on_activate",
    "on_idle",
)
_PORT_KEYS = ("port", "target_port", "protocol", "activator", "activator_config")
_HOLD_KEYS = ("packets", "bytes", "timeout")
_DNS_KEYS = ("domain", "upstream", "resolv_conf")


def _check_address(ip: IPv4Address, ns: NamespaceSpec, src: str, key: str) -> None:
    """A pod or service IP must be a usable host address of the namespace, not the gateway."""
    cidr = ns.cidr
    if ip not in cidr:
        raise ConfigError(src, key, f"{ip} is not inside cidr {cidr}")
    if ip == cidr.network_address:
        raise ConfigError(src, key, f"{ip} is the network address of {cidr}")
    if ip == cidr.broadcast_address:
        raise ConfigError(src, key, f"{ip} is the broadcast address of {cidr}")
    if ip == ns.gateway:
        raise ConfigError(src, key, f"{ip} is the gateway address of {cidr}")


def _ip_owner(
    ip: IPv4Address, ns: NamespaceSpec, skip_pod: str | None, skip_service: str | None
) -> str | None:
    """Who already holds ``ip`` in the namespace ("pod web-1"/"service web"), if anyone."""
    for pod in ns.pods:
        if pod.ip == ip and pod.name != skip_pod:
            return f"pod {pod.name}"
    for svc in ns.services:
        if svc.ip == ip and svc.name != skip_service:
            return f"service {svc.name}"
    return None


def _domain(value: Any, src: str, key: str) -> str:
    text = _str(value, src, key).strip().rstrip(".").lower()
    labels = text.split(".")
    if len(text) > 253 or not all(_DNS_LABEL.match(lb) for lb in labels):
        raise ConfigError(src, key, f"{value!r} is not a valid DNS domain")
    return text


def _parse_dns(value: Any, src: str, key: str) -> DnsSpec:
    if value is None:
        return DnsSpec()
    obj = _Obj(value, src, key, _DNS_KEYS)
    domain = (
        _domain(obj.get("domain"), src, obj.key("domain")) if obj.has("domain") else DEFAULT_DOMAIN
    )
    upstream: list[tuple[str, int]] = []
    if obj.has("upstream"):
        ukey = obj.key("upstream")
        for i, item in enumerate(_list(obj.get("upstream"), src, ukey)):
            upstream.append(
                _host_port(item, src, _index(ukey, i), default_port=53, hostname_ok=False)
            )
    resolv_conf = True
    if obj.has("resolv_conf"):
        resolv_conf = _bool(obj.get("resolv_conf"), src, obj.key("resolv_conf"))
    return DnsSpec(domain=domain, upstream=tuple(upstream), resolv_conf=resolv_conf)


def _parse_egress_allow(value: Any, src: str, key: str) -> tuple[IPv4Network, ...]:
    """``true`` -> allow everything, ``false`` -> nothing, ``{allow: [CIDR, ...]}`` -> those."""
    if value is None:
        return ALLOW_ALL
    if isinstance(value, bool):
        return ALLOW_ALL if value else ()
    if not isinstance(value, Mapping):
        raise _type_error(value, src, key, "a boolean or a mapping {allow: [CIDR, ...]}")
    obj = _Obj(value, src, key, ("allow",))
    akey = obj.key("allow")
    nets = [
        _network(item, src, _index(akey, i))
        for i, item in enumerate(_list(obj.required("allow"), src, akey))
    ]
    return tuple(nets)


def _parse_pod(
    data: Any, src: str, ns: NamespaceSpec, worker_id: str, prefix: str, replacing: bool
) -> PodSpec:
    """Parse one pod and check it against ``ns``.

    ``replacing`` lets a pod of the same name be swapped (runtime attach); otherwise a
    same-named pod is a duplicate (loading a whole namespace).
    """
    obj = _Obj(data, src, prefix, _POD_KEYS)
    name = _dns_label(obj.required("name"), src, obj.key("name"))
    ip = _ipv4(obj.required("ip"), src, obj.key("ip"))

    given = [k for k in ("netns", "interface", "worker") if obj.has(k)]
    if not given:
        raise ConfigError(src, prefix, "give exactly one of netns, interface or worker")
    if len(given) > 1:
        raise ConfigError(
            src,
            prefix,
            f"{' and '.join(given)} are mutually exclusive (give exactly one of netns, "
            "interface or worker)",
        )
    netns = interface = worker = None
    if obj.has("netns"):
        netns = _str(obj.get("netns"), src, obj.key("netns")).strip()
        bad = "\0" in netns or (
            not netns.startswith("/") and ("/" in netns or netns in (".", ".."))
        )
        if bad:
            raise ConfigError(
                src,
                obj.key("netns"),
                f"{netns!r} must be a name under {NETNS_DIR} or an absolute path",
            )
    elif obj.has("interface"):
        interface = _ifname(obj.get("interface"), src, obj.key("interface"))
    else:
        worker = _worker_id(obj.get("worker"), src, obj.key("worker"))
        if worker == worker_id:
            raise ConfigError(
                src,
                obj.key("worker"),
                f"worker {worker} is this worker: give netns or interface",
            )

    ifname = DEFAULT_IFNAME
    if obj.has("ifname"):
        if netns is None:
            raise ConfigError(src, obj.key("ifname"), "ifname is only valid with netns")
        ifname = _ifname(obj.get("ifname"), src, obj.key("ifname"))
    mac = _mac(obj.get("mac"), src, obj.key("mac")) if obj.has("mac") else None
    ready = _bool(obj.get("ready"), src, obj.key("ready")) if obj.has("ready") else True

    pod = PodSpec(
        name=name,
        ip=ip,
        netns=netns,
        interface=interface,
        worker=worker,
        mac=mac,
        ifname=ifname,
        ready=ready,
    )
    _check_pod_against(pod, ns, src, obj, replacing)
    return pod


def _check_pod_against(
    pod: PodSpec, ns: NamespaceSpec, src: str, obj: _Obj, replacing: bool
) -> None:
    """Uniqueness and address rules for a pod within its namespace."""
    existing = ns.pod(pod.name)
    if existing is not None and not replacing:
        where = _index("pods", ns.pods.index(existing))
        raise ConfigError(src, obj.key("name"), f"duplicate pod name {pod.name} (also {where})")
    if ns.service(pod.name) is not None:
        raise ConfigError(src, obj.key("name"), f"{pod.name} is already a service name")
    _check_address(pod.ip, ns, src, obj.key("ip"))
    owner = _ip_owner(pod.ip, ns, skip_pod=pod.name, skip_service=None)
    if owner:
        raise ConfigError(src, obj.key("ip"), f"{pod.ip} is already used by {owner}")
    others = [p for p in ns.pods if p.name != pod.name]
    if pod.mac is not None:
        if pod.mac == ns.gateway_mac:
            raise ConfigError(src, obj.key("mac"), f"{pod.mac} is the namespace's gateway_mac")
        for other in others:
            if other.mac == pod.mac:
                raise ConfigError(
                    src, obj.key("mac"), f"{pod.mac} is already used by pod {other.name}"
                )
    for other in others:
        if pod.interface is not None and other.interface == pod.interface:
            raise ConfigError(
                src,
                obj.key("interface"),
                f"interface {pod.interface} is already used by pod {other.name}",
            )
        if pod.netns is not None and (other.netns_path, other.ifname) == (
            pod.netns_path,
            pod.ifname,
        ):
            raise ConfigError(
                src,
                obj.key("ifname") if obj.has("ifname") else obj.key("netns"),
                f"netns {pod.netns} already has {pod.ifname} (pod {other.name}); "
                "give a different ifname",
            )


def _parse_port(data: Any, src: str, key: str) -> PortSpec:
    if isinstance(data, int) and not isinstance(data, bool):
        data = {"port": data}  # shorthand: `ports: [80, 443]`
    obj = _Obj(data, src, key, _PORT_KEYS)
    port = _int(obj.required("port"), src, obj.key("port"), 1, 65535)
    target = port
    if obj.has("target_port"):
        target = _int(obj.get("target_port"), src, obj.key("target_port"), 1, 65535)
    protocol = "tcp"
    if obj.has("protocol"):
        protocol = _str(obj.get("protocol"), src, obj.key("protocol"))
        if protocol not in ("tcp", "udp"):
            raise ConfigError(src, obj.key("protocol"), f"{protocol!r} is not tcp or udp")
    activator = "none"
    if obj.has("activator"):
        activator = _str(obj.get("activator"), src, obj.key("activator")).strip()
        if (
            activator != "none"
            and not activator.endswith(".wasm")
            and not _ACTIVATOR_NAME.match(activator)
        ):
            raise ConfigError(
                src,
                obj.key("activator"),
                f"{activator!r} is not an activator (expected none, a shipped name like tcp, "
                "or a path ending .wasm)",
            )
    config = FrozenMap()
    if obj.has("activator_config"):
        ckey = obj.key("activator_config")
        raw = obj.get("activator_config")
        if not isinstance(raw, Mapping):
            raise _type_error(raw, src, ckey, "a mapping")
        config = _json_value(raw, src, ckey)
        if config and activator == "none":
            raise ConfigError(src, ckey, "activator_config given but activator is none")
    return PortSpec(
        port=port,
        target_port=target,
        protocol=protocol,
        activator=activator,
        activator_config=config,
    )


def _parse_hold(value: Any, src: str, key: str) -> HoldSpec:
    if value is None:
        return HoldSpec()
    obj = _Obj(value, src, key, _HOLD_KEYS)
    packets = DEFAULT_HOLD_PACKETS
    if obj.has("packets"):
        packets = _int(obj.get("packets"), src, obj.key("packets"), 1, 2**31 - 1)
    size = DEFAULT_HOLD_BYTES
    if obj.has("bytes"):
        size = parse_size(obj.get("bytes"), src, obj.key("bytes"))
        if size < 1:
            raise ConfigError(src, obj.key("bytes"), "must be at least 1 byte")
    timeout = DEFAULT_HOLD_TIMEOUT
    if obj.has("timeout"):
        timeout = parse_duration(obj.get("timeout"), src, obj.key("timeout"))
    return HoldSpec(packets=packets, bytes=size, timeout=timeout)


def _parse_service(
    data: Any, src: str, ns: NamespaceSpec, prefix: str, replacing: bool
) -> ServiceSpec:
    """Parse one service and check it against ``ns`` (see ``_parse_pod`` for ``replacing``)."""
    obj = _Obj(data, src, prefix, _SERVICE_KEYS)
    name = _dns_label(obj.required("name"), src, obj.key("name"))
    existing = ns.service(name)
    if existing is not None and not replacing:
        where = _index("services", ns.services.index(existing))
        raise ConfigError(src, obj.key("name"), f"duplicate service name {name} (also {where})")
    if ns.pod(name) is not None:
        raise ConfigError(src, obj.key("name"), f"{name} is already a pod name")
    ip = _ipv4(obj.required("ip"), src, obj.key("ip"))
    _check_address(ip, ns, src, obj.key("ip"))
    owner = _ip_owner(ip, ns, skip_pod=None, skip_service=name)
    if owner:
        raise ConfigError(src, obj.key("ip"), f"{ip} is already used by {owner}")

    pkey = obj.key("ports")
    items = _list(obj.required("ports"), src, pkey)
    if not items:
        raise ConfigError(src, pkey, "must list at least one port")
    ports: list[PortSpec] = []
    seen: dict[tuple[int, str], int] = {}
    for i, item in enumerate(items):
        port = _parse_port(item, src, _index(pkey, i))
        first = seen.setdefault((port.port, port.protocol), i)
        if first != i:
            where = _index("ports", first)
            raise ConfigError(
                src,
                _key(_index(pkey, i), "port"),
                f"{port.port}/{port.protocol} is already listed in {where}",
            )
        ports.append(port)

    backends: list[str] = []
    if obj.has("backends"):
        bkey = obj.key("backends")
        for i, item in enumerate(_list(obj.get("backends"), src, bkey)):
            ikey = _index(bkey, i)
            backend = _str(item, src, ikey)
            if ns.pod(backend) is None:
                raise ConfigError(src, ikey, f"no pod named {backend} in namespace {ns.name}")
            if backend in backends:
                raise ConfigError(src, ikey, f"{backend} is listed twice")
            backends.append(backend)

    hold = _parse_hold(obj.get("hold"), src, obj.key("hold"))
    idle = DEFAULT_IDLE_TIMEOUT
    if obj.has("idle_timeout"):
        idle = parse_duration(obj.get("idle_timeout"), src, obj.key("idle_timeout"))
    readiness = "probe"
    if obj.has("readiness"):
        readiness = _str(obj.get("readiness"), src, obj.key("readiness"))
        if readiness not in ("probe", "external"):
            raise ConfigError(src, obj.key("readiness"), f"{readiness!r} is not probe or external")
    hooks: dict[str, str | None] = {}
    for hook in ("on_activate", "on_idle"):
        hooks[hook] = _str(obj.get(hook), src, obj.key(hook)) if obj.has(hook) else None
    return ServiceSpec(
        name=name,
        ip=ip,
        ports=tuple(ports),
        backends=tuple(backends),
        hold=hold,
        idle_timeout=idle,
        readiness=readiness,
        on_activate=hooks["on_activate"],
        on_idle=hooks["on_idle"],
    )


def parse_namespace(
    data: object, source: str, worker_id: str, key_prefix: str = ""
) -> NamespaceSpec:
    """Validate one namespace mapping (with its pods and services) into a NamespaceSpec.

    ``worker_id`` is this worker's id: pods naming it as their ``worker`` are an error.
    ``key_prefix`` is prepended to key paths (``namespaces[0]`` in a file, ``""`` for API).
    """
    obj = _Obj(data, source, key_prefix, _NS_KEYS)
    name = _dns_label(obj.required("name"), source, obj.key("name"))
    ns_id = None
    if obj.has("id"):
        ns_id = _int(obj.get("id"), source, obj.key("id"), 1, 2**32 - 1)
    cidr = _network(obj.required("cidr"), source, obj.key("cidr"), 8, 30)
    gateway = cidr.network_address + 1
    if obj.has("gateway"):
        given = _ipv4(obj.get("gateway"), source, obj.key("gateway"))
        if given != gateway:
            raise ConfigError(
                source,
                obj.key("gateway"),
                f"{given} is not the gateway of {cidr}: it is always the first host, {gateway}",
            )
    gateway_mac = DEFAULT_GATEWAY_MAC
    if obj.has("gateway_mac"):
        gateway_mac = _mac(obj.get("gateway_mac"), source, obj.key("gateway_mac"))
    mtu: int | None = None
    if obj.has("mtu"):
        mtu = _int(obj.get("mtu"), source, obj.key("mtu"), 576, 65535)
    dns = _parse_dns(obj.get("dns"), source, obj.key("dns"))
    egress = _parse_egress_allow(obj.get("egress"), source, obj.key("egress"))

    ns = NamespaceSpec(
        name=name,
        id=ns_id,
        cidr=cidr,
        gateway=gateway,
        gateway_mac=gateway_mac,
        mtu=mtu or DEFAULT_MTU,
        dns=dns,
        egress_allow=egress,
    )
    pods_key = obj.key("pods")
    pod_items = _list(obj.get("pods"), source, pods_key) if obj.has("pods") else []
    for i, item in enumerate(pod_items):
        pod = _parse_pod(item, source, ns, worker_id, _index(pods_key, i), replacing=False)
        ns = replace(ns, pods=ns.pods + (pod,))
    svc_key = obj.key("services")
    svc_items = _list(obj.get("services"), source, svc_key) if obj.has("services") else []
    for i, item in enumerate(svc_items):
        svc = _parse_service(item, source, ns, _index(svc_key, i), replacing=False)
        ns = replace(ns, services=ns.services + (svc,))
    if mtu is None and any(p.kind == "remote" for p in ns.pods):
        ns = replace(ns, mtu=TUNNEL_MTU)  # the namespace spans tunnels: leave room
    return ns


def parse_pod(
    data: object, source: str, namespace: NamespaceSpec, worker_id: str, key_prefix: str = ""
) -> PodSpec:
    """Validate one pod for attaching at runtime to ``namespace``.

    A pod with the same name already in ``namespace`` is treated as being replaced: its
    IP, MAC and interface do not count as taken.
    """
    return _parse_pod(data, source, namespace, worker_id, key_prefix, replacing=True)


def parse_service(
    data: object, source: str, namespace: NamespaceSpec, key_prefix: str = ""
) -> ServiceSpec:
    """Validate one service for adding at runtime to ``namespace`` (same-name = replace)."""
    return _parse_service(data, source, namespace, key_prefix, replacing=True)


def validate_namespace_set(
    namespaces: Sequence[NamespaceSpec], source: str, key_prefix: str = "namespaces"
) -> None:
    """Rules across namespaces on one worker: unique names and ids, no shared host ports.

    Key paths are ``{key_prefix}[i]....`` where i indexes ``namespaces``.
    """
    names: dict[str, int] = {}
    ids: dict[int, str] = {}
    interfaces: dict[str, str] = {}
    netns_ifs: dict[tuple[str, str], str] = {}
    for i, ns in enumerate(namespaces):
        at = _index(key_prefix, i)
        if ns.name in names:
            raise ConfigError(
                source,
                _key(at, "name"),
                f"duplicate namespace name {ns.name} (also {_index(key_prefix, names[ns.name])})",
            )
        names[ns.name] = i
        if ns.id is not None:
            if ns.id in ids:
                raise ConfigError(
                    source, _key(at, "id"), f"id {ns.id} is already used by namespace {ids[ns.id]}"
                )
            ids[ns.id] = ns.name
        for j, pod in enumerate(ns.pods):
            pat = _index(_key(at, "pods"), j)
            who = f"pod {pod.name} in namespace {ns.name}"
            if pod.interface is not None:
                if pod.interface in interfaces:
                    raise ConfigError(
                        source,
                        _key(pat, "interface"),
                        f"interface {pod.interface} is already used by {interfaces[pod.interface]}",
                    )
                interfaces[pod.interface] = who
            if pod.netns_path is not None:
                slot = (pod.netns_path, pod.ifname)
                if slot in netns_ifs:
                    raise ConfigError(
                        source,
                        _key(pat, "netns"),
                        f"netns {pod.netns} already has {pod.ifname} ({netns_ifs[slot]})",
                    )
                netns_ifs[slot] = who


# ---------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------

_WORKER_KEYS = ("id", "control", "control_mode", "egress", "tunnel")
_EGRESS_KEYS = ("tun", "pool")
_TUNNEL_KEYS = ("listen", "private_key", "private_key_file", "psk", "keepalive", "peers")
_PEER_KEYS = ("id", "endpoint", "public_key")


def _control_mode(value: Any, src: str, key: str) -> int:
    """An octal mode: a string like "0600"/"600"/"0o600", or an int (YAML reads 0600 as octal)."""
    if isinstance(value, str):
        text = value.strip().lower()
        text = text[2:] if text.startswith("0o") else text
        if not text or any(c not in "01234567" for c in text):
            raise ConfigError(src, key, f'{value!r} is not an octal mode (expected e.g. "0600")')
        mode = int(text, 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise _type_error(value, src, key, 'an octal mode string like "0600"')
    if not 0 <= mode <= 0o777:
        raise ConfigError(
            src, key, f'{value} is not a valid mode (give an octal string like "0600")'
        )
    return mode


def _parse_egress(value: Any, src: str, key: str) -> EgressSpec | None:
    if value is None or value is False:
        return None
    if value is True:
        return EgressSpec()
    obj = _Obj(value, src, key, _EGRESS_KEYS)
    tun = _ifname(obj.get("tun"), src, obj.key("tun")) if obj.has("tun") else DEFAULT_EGRESS_TUN
    pool = DEFAULT_EGRESS_POOL
    if obj.has("pool"):
        pool = _network(obj.get("pool"), src, obj.key("pool"), 8, 30)
    return EgressSpec(tun=tun, pool=pool)


def _read_key_file(path: str, src: str, key: str) -> bytes:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except OSError as e:
        raise ConfigError(src, key, f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(src, key, f"{path} does not hold a base64 32-byte key") from None
    try:
        return _key32(text, src, key)
    except ConfigError:
        raise ConfigError(src, key, f"{path} does not hold a base64 32-byte key") from None


def _parse_tunnel(
    value: Any, src: str, key: str, worker_id: str, base_dir: str | None
) -> TunnelSpec | None:
    if value is None:
        return None
    obj = _Obj(value, src, key, _TUNNEL_KEYS)
    listen = DEFAULT_LISTEN
    if obj.has("listen"):
        raw = obj.get("listen")
        if isinstance(raw, int) and not isinstance(raw, bool):
            listen = (DEFAULT_LISTEN[0], _int(raw, src, obj.key("listen"), 1, 65535))
        else:
            listen = _host_port(raw, src, obj.key("listen"), default_port=None, hostname_ok=False)
    if obj.has("private_key") == obj.has("private_key_file"):
        raise ConfigError(src, key, "give exactly one of private_key or private_key_file")
    key_file = None
    if obj.has("private_key"):
        private_key = _key32(obj.get("private_key"), src, obj.key("private_key"))
    else:
        key_file = _str(obj.get("private_key_file"), src, obj.key("private_key_file"))
        if base_dir is not None:
            key_file = os.path.join(base_dir, key_file)
        private_key = _read_key_file(key_file, src, obj.key("private_key_file"))
    psk = _key32(obj.get("psk"), src, obj.key("psk")) if obj.has("psk") else None
    keepalive = None
    if obj.has("keepalive"):
        keepalive = parse_duration(obj.get("keepalive"), src, obj.key("keepalive"))

    peers: list[TunnelPeerSpec] = []
    pkey = obj.key("peers")
    for i, item in enumerate(_list(obj.get("peers"), src, pkey) if obj.has("peers") else []):
        peers.append(parse_peer(item, src, worker_id, peers, _index(pkey, i)))
    return TunnelSpec(
        listen=listen,
        private_key=private_key,
        private_key_file=key_file,
        psk=psk,
        keepalive=keepalive,
        peers=tuple(peers),
    )


def parse_peer(data: object, source: str, worker_id: str,
               others: Sequence[TunnelPeerSpec] = (), key_prefix: str = "") -> TunnelPeerSpec:
    """One tunnel peer (a file's `worker.tunnel.peers[i]`, or a control API call): its
    id, public key and optional endpoint, unique among `others`."""
    pobj = _Obj(data, source, key_prefix, _PEER_KEYS)
    peer_id = _worker_id(pobj.required("id"), source, pobj.key("id"))
    if peer_id == worker_id:
        raise ConfigError(source, pobj.key("id"), f"{peer_id} is this worker's own id")
    if any(p.id == peer_id for p in others):
        raise ConfigError(source, pobj.key("id"), f"duplicate peer id {peer_id}")
    public_key = _key32(pobj.required("public_key"), source, pobj.key("public_key"))
    for p in others:
        if p.public_key == public_key:
            raise ConfigError(source, pobj.key("public_key"),
                              f"public key is already used by peer {p.id}")
    endpoint = None
    if pobj.has("endpoint"):
        endpoint = _host_port(pobj.get("endpoint"), source, pobj.key("endpoint"),
                              default_port=None, hostname_ok=True)
    return TunnelPeerSpec(id=peer_id, public_key=public_key, endpoint=endpoint)


def _parse_worker(value: Any, src: str, key: str, base_dir: str | None) -> WorkerSpec:
    obj = _Obj({} if value is None else value, src, key, _WORKER_KEYS)
    worker_id = (
        _worker_id(obj.get("id"), src, obj.key("id")) if obj.has("id") else socket.gethostname()
    )
    control = DEFAULT_CONTROL
    if obj.has("control"):
        control = _str(obj.get("control"), src, obj.key("control"))
        if len(os.fsencode(control)) > _SUN_PATH_MAX:
            raise ConfigError(
                src,
                obj.key("control"),
                f"socket path is too long ({len(os.fsencode(control))} bytes, max {_SUN_PATH_MAX})",
            )
    mode = DEFAULT_CONTROL_MODE
    if obj.has("control_mode"):
        mode = _control_mode(obj.get("control_mode"), src, obj.key("control_mode"))
    egress = _parse_egress(obj.get("egress"), src, obj.key("egress"))
    tunnel = _parse_tunnel(obj.get("tunnel"), src, obj.key("tunnel"), worker_id, base_dir)
    return WorkerSpec(
        id=worker_id, control=control, control_mode=mode, egress=egress, tunnel=tunnel
    )


# ---------------------------------------------------------------------------
# Whole config
# ---------------------------------------------------------------------------


def parse_config(data: object, source: str, base_dir: str | None = None) -> Config:
    """Validate a whole config mapping (as read from YAML, or built in Python).

    ``base_dir`` resolves a relative ``private_key_file`` (``load_config`` passes the
    config file's directory); otherwise it is relative to the current directory.
    A missing ``namespaces`` key means no namespaces (they can be added via the API).
    """
    if data is None:
        raise ConfigError(
            source, "", "config is empty (expected a mapping with worker and namespaces)"
        )
    if not isinstance(data, Mapping):
        raise ConfigError(source, "", f"expected a mapping at the top level, got {_describe(data)}")
    obj = _Obj(data, source, "", ("worker", "namespaces"))
    worker = _parse_worker(obj.get("worker"), source, "worker", base_dir)
    items = _list(obj.get("namespaces"), source, "namespaces") if obj.has("namespaces") else []
    namespaces = tuple(
        parse_namespace(item, source, worker.id, _index("namespaces", i))
        for i, item in enumerate(items)
    )
    validate_namespace_set(namespaces, source)
    if worker.egress is not None:
        for ns in namespaces:
            if ns.cidr.overlaps(worker.egress.pool):
                raise ConfigError(
                    source,
                    "worker.egress.pool",
                    f"{worker.egress.pool} overlaps cidr {ns.cidr} of namespace {ns.name}",
                )
    return Config(worker=worker, namespaces=namespaces, source=source)


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _value in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:
            continue  # unhashable key: the mapping constructor reports it
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {first.start_mark.line + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path: str) -> Config:
    """Read and validate a YAML config file; every failure is one ConfigError line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"cannot read: not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(path, "", f"{where}invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(path, "", f"invalid YAML: {e}") from None
    if data is None:
        raise ConfigError(path, "", "file is empty (expected a mapping with worker and namespaces)")
    return parse_config(data, path, base_dir=os.path.dirname(os.path.abspath(path)))


def default_config(worker_id: str | None = None) -> Config:
    """The embedded default: one namespace ``default`` (id 1, 10.88.0.0/24), no pods."""
    worker = WorkerSpec(id=worker_id or socket.gethostname())
    ns = parse_namespace(
        {"name": "default", "id": 1, "cidr": "10.88.0.0/24"},
        DEFAULT_CONFIG_SOURCE,
        worker.id,
        "namespaces[0]",
    )
    return Config(worker=worker, namespaces=(ns,), source=DEFAULT_CONFIG_SOURCE)


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
            }
            for p in svc.ports
        ],
        "backends": list(svc.backends),
        "hold": {"packets": svc.hold.packets, "bytes": svc.hold.bytes, "timeout": svc.hold.timeout},
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
            },
            "egress": egress,
            "pods": [pod_to_dict(p) for p in ns.pods],
            "services": [service_to_dict(s) for s in ns.services],
        }
    )
    return out
