"""Parsers from YAML/API data to specs: namespaces, pods, services, the worker, its
tunnel and peers, and the checks across namespaces.

The same parsers serve the YAML file (``load_config``/``parse_config``) and the control
API (``parse_namespace``/``parse_pod``/``parse_service`` with a source such as
``PUT /v1/namespaces/shop`` and key paths relative to the posted object).
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from fabric.config.activator_keys import check_shipped
from fabric.config.fields import (
    ACTIVATOR_NAME,
    DNS_LABEL,
    SUN_PATH_MAX,
    Obj,
    describe,
    index_path,
    key_path,
    parse_duration,
    parse_size,
    read_bool,
    read_dns_label,
    read_host_port,
    read_ifname,
    read_int,
    read_ipv4,
    read_json,
    read_key32,
    read_list,
    read_mac,
    read_network,
    read_str,
    read_worker_id,
    type_error,
)
from fabric.config.specs import (
    ADAPTIVE_MAX,
    ALLOW_ALL,
    DEFAULT_ACTIVATOR_MEMORY,
    DEFAULT_CONTROL,
    DEFAULT_CONTROL_MODE,
    DEFAULT_DHCP_LEASE,
    DEFAULT_DOMAIN,
    DEFAULT_EGRESS_POOL,
    DEFAULT_EGRESS_TUN,
    DEFAULT_GATEWAY_MAC,
    DEFAULT_HOLD_BYTES,
    DEFAULT_HOLD_PACKETS,
    DEFAULT_HOLD_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_IFNAME,
    DEFAULT_LISTEN,
    DEFAULT_MTU,
    DEFAULT_RELEASE_BURST,
    DEFAULT_RELEASE_INTERVAL,
    DEFAULT_SERVICE_HOLD_BYTES,
    MAX_ACTIVATOR_MEMORY,
    NETNS_DIR,
    TUNNEL_MTU,
    Config,
    DhcpSpec,
    DnsSpec,
    EgressSpec,
    FrozenMap,
    HoldSpec,
    NamespaceSpec,
    PodSpec,
    PortSpec,
    ServiceSpec,
    TunnelPeerSpec,
    TunnelSpec,
    WorkerSpec,
    split_command,
)
from fabric.errors import ConfigError

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
    "dhcp",
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
_PORT_KEYS = ("port", "target_port", "protocol", "activator", "activator_config",
              "upstream", "activator_memory_mib", "max_connections_per_client")
_UPSTREAMS = ("vip", "pod-local")
_HOLD_KEYS = ("packets", "bytes", "timeout", "release_burst", "release_interval")
_DNS_KEYS = ("domain", "upstream", "resolv_conf", "cache")
MAX_DNS_CACHE = 1 << 20
_DHCP_KEYS = ("enabled", "lease")
MIN_DHCP_LEASE = 60.0
MAX_DHCP_LEASE = 365 * 86400.0
MAX_HOLD_PACKETS = 65536
MAX_HOLD_BYTES = 256 << 20
MAX_HOLD_TIMEOUT = 600.0
MAX_RELEASE_INTERVAL = 1.0
RESERVED_NAMES = frozenset({"gateway"})  # names the gateway itself answers in each zone
MAX_ZONE = 242  # the zone's SOA names hostmaster.<zone>, which must fit in 255 wire bytes


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


class _Taken:
    """What a namespace's pods and services already hold, indexed once.

    A namespace document is checked pod by pod; scanning every earlier pod for each new
    one made a 10,000-pod PUT take a minute on the event loop. Built in O(n), each check
    is O(1).
    """

    def __init__(self, ns: NamespaceSpec) -> None:
        self.pods: dict[str, int] = {}
        self.services: dict[str, int] = {}
        self.ips: dict[IPv4Address, str] = {}
        self.macs: dict[str, str] = {}
        self.interfaces: dict[str, str] = {}
        self.netns: dict[tuple[str, str], str] = {}
        self._freed: int | None = None  # the lowest address freed since take_freed()
        for pod in ns.pods:
            self.add_pod(pod)
        for svc in ns.services:
            self.add_service(svc)

    def add_pod(self, pod: PodSpec) -> None:
        self.pods[pod.name] = len(self.pods)
        self.ips[pod.ip] = f"pod {pod.name}"
        if pod.mac is not None:
            self.macs[pod.mac] = pod.name
        if pod.interface is not None:
            self.interfaces[pod.interface] = pod.name
        if pod.netns_path is not None:
            self.netns[(pod.netns_path, pod.ifname)] = pod.name

    def remove_pod(self, pod: PodSpec) -> None:
        """Forget what ``pod`` held (a runtime detach or replace), in O(1)."""
        if self.pods.pop(pod.name, None) is None:
            return
        if self.ips.get(pod.ip) == f"pod {pod.name}":
            del self.ips[pod.ip]
            n = int(pod.ip)
            if self._freed is None or n < self._freed:
                self._freed = n
        if pod.mac is not None and self.macs.get(pod.mac) == pod.name:
            del self.macs[pod.mac]
        if pod.interface is not None and self.interfaces.get(pod.interface) == pod.name:
            del self.interfaces[pod.interface]
        path = pod.netns_path
        if path is not None and self.netns.get((path, pod.ifname)) == pod.name:
            del self.netns[(path, pod.ifname)]

    def take_freed(self) -> int | None:
        """The lowest address (an int) a removal freed since the last call, for a
        caller's scan hint."""
        freed, self._freed = self._freed, None
        return freed

    def add_service(self, svc: ServiceSpec) -> None:
        self.services[svc.name] = len(self.services)
        self.ips[svc.ip] = f"service {svc.name}"

    def ip_owner(self, ip: IPv4Address, skip: str) -> str | None:
        """Who already holds ``ip`` ("pod web-1"/"service web"), ``skip`` not counted."""
        owner = self.ips.get(ip)
        return None if owner is None or owner == skip else owner


Taken = _Taken


def _record_name(value: Any, ns: NamespaceSpec, src: str, key: str) -> str:
    """A pod or service name: a DNS label that is not reserved and fits in the zone."""
    name = read_dns_label(value, src, key)
    if name in RESERVED_NAMES:
        raise ConfigError(src, key, f"{name!r} is reserved (the gateway answers to it in DNS)")
    full = len(name) + 1 + len(ns.name) + 1 + len(ns.dns.domain)
    if full > 253:
        raise ConfigError(src, key, f"{name}.{ns.name}.{ns.dns.domain} is {full} characters "
                          "long (DNS names are at most 253)")
    return name


def _domain(value: Any, src: str, key: str) -> str:
    text = read_str(value, src, key).strip().rstrip(".").lower()
    labels = text.split(".")
    if len(text) > 253 or not all(DNS_LABEL.match(lb) for lb in labels):
        raise ConfigError(src, key, f"{value!r} is not a valid DNS domain")
    return text


def _parse_dns(value: Any, src: str, key: str) -> DnsSpec:
    if value is None:
        return DnsSpec()
    obj = Obj(value, src, key, _DNS_KEYS)
    domain = (
        _domain(obj.get("domain"), src, obj.key("domain")) if obj.has("domain") else DEFAULT_DOMAIN
    )
    upstream: list[tuple[str, int]] = []
    if obj.has("upstream"):
        ukey = obj.key("upstream")
        for i, item in enumerate(read_list(obj.get("upstream"), src, ukey)):
            upstream.append(
                read_host_port(item, src, index_path(ukey, i), default_port=53, hostname_ok=False)
            )
    resolv_conf = True
    if obj.has("resolv_conf"):
        resolv_conf = read_bool(obj.get("resolv_conf"), src, obj.key("resolv_conf"))
    cache = DnsSpec.cache
    if obj.has("cache"):
        cache = read_int(obj.get("cache"), src, obj.key("cache"), 0, MAX_DNS_CACHE)
    return DnsSpec(domain=domain, upstream=tuple(upstream), resolv_conf=resolv_conf,
                   cache=cache)


def _parse_busy_poll(value: Any, src: str, key: str) -> tuple[float, bool]:
    """(window or cap in seconds, adaptive) from a duration (fixed; 0 is off), ``adaptive``
    (up to ADAPTIVE_MAX, also the default) or ``{max: DURATION}`` (adaptive up to that)."""
    if value is None:
        return ADAPTIVE_MAX, True
    if value == "adaptive":
        return ADAPTIVE_MAX, True
    if isinstance(value, Mapping):
        obj = Obj(value, src, key, ("max",))
        cap = parse_duration(obj.required("max"), src, obj.key("max"))
        if cap > MAX_BUSY_POLL:
            raise ConfigError(src, obj.key("max"),
                              f"{cap * 1000:g} ms is more than {MAX_BUSY_POLL * 1000:g} ms")
        return cap, True
    try:
        seconds = parse_duration(value, src, key)
    except ConfigError:
        if isinstance(value, str):
            raise ConfigError(src, key, f"{value!r} is neither a duration nor adaptive "
                                        "(use 2.5ms, adaptive or {max: 3ms})") from None
        raise
    if seconds > MAX_BUSY_POLL:
        raise ConfigError(src, key,
                          f"{seconds * 1000:g} ms is more than {MAX_BUSY_POLL * 1000:g} ms")
    return seconds, False


def _parse_dhcp(value: Any, src: str, key: str) -> DhcpSpec:
    """``true``/``false``, or ``{enabled: BOOL, lease: DURATION}``."""
    if value is None:
        return DhcpSpec()
    if isinstance(value, bool):
        return DhcpSpec(enabled=value)
    if not isinstance(value, Mapping):
        raise type_error(value, src, key, "a boolean or a mapping {enabled: BOOL, lease: DURATION}")
    obj = Obj(value, src, key, _DHCP_KEYS)
    enabled = read_bool(obj.get("enabled"), src, obj.key("enabled")) if obj.has("enabled") \
        else True
    lease = DEFAULT_DHCP_LEASE
    if obj.has("lease"):
        lease = parse_duration(obj.get("lease"), src, obj.key("lease"))
        if not MIN_DHCP_LEASE <= lease <= MAX_DHCP_LEASE:
            raise ConfigError(src, obj.key("lease"),
                              f"{obj.get('lease')!r} is outside 60s .. 8760h (a year)")
    return DhcpSpec(enabled=enabled, lease=lease)


def _parse_egress_allow(value: Any, src: str, key: str) -> tuple[IPv4Network, ...]:
    """``true`` -> allow everything, ``false`` -> nothing, ``{allow: [CIDR, ...]}`` -> those."""
    if value is None:
        return ALLOW_ALL
    if isinstance(value, bool):
        return ALLOW_ALL if value else ()
    if not isinstance(value, Mapping):
        raise type_error(value, src, key, "a boolean or a mapping {allow: [CIDR, ...]}")
    obj = Obj(value, src, key, ("allow",))
    akey = obj.key("allow")
    nets = [
        read_network(item, src, index_path(akey, i))
        for i, item in enumerate(read_list(obj.required("allow"), src, akey))
    ]
    return tuple(nets)


def _parse_pod(
    data: Any,
    src: str,
    ns: NamespaceSpec,
    taken: _Taken,
    worker_id: str,
    prefix: str,
    replacing: bool,
) -> PodSpec:
    """Parse one pod and check it against ``ns``.

    ``replacing`` lets a pod of the same name be swapped (runtime attach); otherwise a
    same-named pod is a duplicate (loading a whole namespace).
    """
    obj = Obj(data, src, prefix, _POD_KEYS)
    name = _record_name(obj.required("name"), ns, src, obj.key("name"))
    ip = read_ipv4(obj.required("ip"), src, obj.key("ip"))

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
        netns = read_str(obj.get("netns"), src, obj.key("netns")).strip()
        bad = not netns.isprintable() or (
            not netns.startswith("/") and ("/" in netns or netns in (".", ".."))
        )
        if bad:
            raise ConfigError(
                src,
                obj.key("netns"),
                f"{netns!r} must be a name under {NETNS_DIR} or an absolute path",
            )
    elif obj.has("interface"):
        interface = read_ifname(obj.get("interface"), src, obj.key("interface"))
    else:
        worker = read_worker_id(obj.get("worker"), src, obj.key("worker"))
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
        ifname = read_ifname(obj.get("ifname"), src, obj.key("ifname"))
    mac = read_mac(obj.get("mac"), src, obj.key("mac")) if obj.has("mac") else None
    ready = read_bool(obj.get("ready"), src, obj.key("ready")) if obj.has("ready") else True

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
    _check_pod_against(pod, ns, taken, src, obj, replacing)
    return pod


def _check_pod_against(
    pod: PodSpec, ns: NamespaceSpec, taken: _Taken, src: str, obj: Obj, replacing: bool
) -> None:
    """Uniqueness and address rules for a pod within its namespace."""
    at = taken.pods.get(pod.name)
    if at is not None and not replacing:
        where = index_path("pods", at)
        raise ConfigError(src, obj.key("name"), f"duplicate pod name {pod.name} (also {where})")
    if pod.name in taken.services:
        raise ConfigError(src, obj.key("name"), f"{pod.name} is already a service name")
    _check_address(pod.ip, ns, src, obj.key("ip"))
    owner = taken.ip_owner(pod.ip, skip=f"pod {pod.name}")
    if owner:
        raise ConfigError(src, obj.key("ip"), f"{pod.ip} is already used by {owner}")
    if pod.mac is not None:
        if pod.mac == ns.gateway_mac:
            raise ConfigError(src, obj.key("mac"), f"{pod.mac} is the namespace's gateway_mac")
        other = taken.macs.get(pod.mac)
        if other is not None and other != pod.name:
            raise ConfigError(src, obj.key("mac"), f"{pod.mac} is already used by pod {other}")
    if pod.interface is not None:
        other = taken.interfaces.get(pod.interface)
        if other is not None and other != pod.name:
            raise ConfigError(
                src,
                obj.key("interface"),
                f"interface {pod.interface} is already used by pod {other}",
            )
    if pod.netns_path is not None:
        other = taken.netns.get((pod.netns_path, pod.ifname))
        if other is not None and other != pod.name:
            raise ConfigError(
                src,
                obj.key("ifname") if obj.has("ifname") else obj.key("netns"),
                f"netns {pod.netns} already has {pod.ifname} (pod {other}); "
                "give a different ifname",
            )


def _parse_port(data: Any, src: str, key: str) -> PortSpec:
    if isinstance(data, int) and not isinstance(data, bool):
        data = {"port": data}  # shorthand: `ports: [80, 443]`
    obj = Obj(data, src, key, _PORT_KEYS)
    port = read_int(obj.required("port"), src, obj.key("port"), 1, 65535)
    target = port
    if obj.has("target_port"):
        target = read_int(obj.get("target_port"), src, obj.key("target_port"), 1, 65535)
    protocol = "tcp"
    if obj.has("protocol"):
        protocol = read_str(obj.get("protocol"), src, obj.key("protocol"))
        if protocol not in ("tcp", "udp"):
            raise ConfigError(src, obj.key("protocol"), f"{protocol!r} is not tcp or udp")
    activator = "none"
    if obj.has("activator"):
        activator = read_str(obj.get("activator"), src, obj.key("activator")).strip()
        if (
            activator != "none"
            and not activator.endswith(".wasm")
            and not ACTIVATOR_NAME.match(activator)
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
            raise type_error(raw, src, ckey, "a mapping")
        config = read_json(raw, src, ckey)
        if config and activator == "none":
            raise ConfigError(src, ckey, "activator_config given but activator is none")
        config = check_shipped(activator, config, src, ckey)
    upstream = "vip"
    if obj.has("upstream"):
        ukey = obj.key("upstream")
        upstream = read_str(obj.get("upstream"), src, ukey).strip()
        if upstream not in _UPSTREAMS:
            raise ConfigError(src, ukey, f"{upstream!r} is not vip or pod-local")
        if upstream != "vip" and (activator == "none" or protocol != "tcp"):
            raise ConfigError(src, ukey, "upstream: pod-local needs a stream activator on "
                                         "a tcp port")
    memory = DEFAULT_ACTIVATOR_MEMORY
    if obj.has("activator_memory_mib"):
        mkey = obj.key("activator_memory_mib")
        memory = read_int(obj.get("activator_memory_mib"), src, mkey, 1,
                          MAX_ACTIVATOR_MEMORY >> 20) << 20
        if activator == "none":
            raise ConfigError(src, mkey, "activator_memory_mib given but activator is none")
    per_client = 0
    if obj.has("max_connections_per_client"):
        ckey = obj.key("max_connections_per_client")
        per_client = read_int(obj.get("max_connections_per_client"), src, ckey, 1, 65535)
        if activator == "none" or protocol != "tcp":
            raise ConfigError(src, ckey, "max_connections_per_client needs a stream "
                                         "activator on a tcp port")
    return PortSpec(
        port=port,
        target_port=target,
        protocol=protocol,
        activator=activator,
        activator_config=config,
        upstream=upstream,
        activator_memory=memory,
        max_connections_per_client=per_client,
    )


def _parse_hold(value: Any, src: str, key: str) -> HoldSpec:
    if value is None:
        return HoldSpec()
    obj = Obj(value, src, key, _HOLD_KEYS)
    packets = DEFAULT_HOLD_PACKETS
    if obj.has("packets"):
        packets = read_int(obj.get("packets"), src, obj.key("packets"), 1, MAX_HOLD_PACKETS)
    size = DEFAULT_HOLD_BYTES
    if obj.has("bytes"):
        size = parse_size(obj.get("bytes"), src, obj.key("bytes"))
        if size < 1:
            raise ConfigError(src, obj.key("bytes"), "must be at least 1 byte")
        if size > MAX_HOLD_BYTES:
            raise ConfigError(src, obj.key("bytes"), f"{size} bytes is more than "
                              f"{MAX_HOLD_BYTES >> 20}MiB (held packets live in memory)")
    timeout = DEFAULT_HOLD_TIMEOUT
    if obj.has("timeout"):
        timeout = parse_duration(obj.get("timeout"), src, obj.key("timeout"))
        if timeout > MAX_HOLD_TIMEOUT:
            raise ConfigError(src, obj.key("timeout"), f"{timeout:g}s is longer than "
                              f"{MAX_HOLD_TIMEOUT:g}s (clients give up long before)")
    burst = DEFAULT_RELEASE_BURST
    if obj.has("release_burst"):
        burst = read_int(obj.get("release_burst"), src, obj.key("release_burst"), 1,
                         MAX_HOLD_PACKETS)
    interval = DEFAULT_RELEASE_INTERVAL
    if obj.has("release_interval"):
        interval = parse_duration(obj.get("release_interval"), src, obj.key("release_interval"))
        if interval > MAX_RELEASE_INTERVAL:
            raise ConfigError(src, obj.key("release_interval"), f"{interval:g}s is longer "
                              f"than {MAX_RELEASE_INTERVAL:g}s (held clients wait for it)")
    return HoldSpec(packets=packets, bytes=size, timeout=timeout, release_burst=burst,
                    release_interval=interval)


def _parse_service(
    data: Any, src: str, ns: NamespaceSpec, taken: _Taken, prefix: str, replacing: bool
) -> ServiceSpec:
    """Parse one service and check it against ``ns`` (see ``_parse_pod`` for ``replacing``)."""
    obj = Obj(data, src, prefix, _SERVICE_KEYS)
    name = _record_name(obj.required("name"), ns, src, obj.key("name"))
    at = taken.services.get(name)
    if at is not None and not replacing:
        where = index_path("services", at)
        raise ConfigError(src, obj.key("name"), f"duplicate service name {name} (also {where})")
    if name in taken.pods:
        raise ConfigError(src, obj.key("name"), f"{name} is already a pod name")
    ip = read_ipv4(obj.required("ip"), src, obj.key("ip"))
    _check_address(ip, ns, src, obj.key("ip"))
    owner = taken.ip_owner(ip, skip=f"service {name}")
    if owner:
        raise ConfigError(src, obj.key("ip"), f"{ip} is already used by {owner}")

    pkey = obj.key("ports")
    items = read_list(obj.required("ports"), src, pkey)
    if not items:
        raise ConfigError(src, pkey, "must list at least one port")
    ports: list[PortSpec] = []
    seen: dict[tuple[int, str], int] = {}
    for i, item in enumerate(items):
        port = _parse_port(item, src, index_path(pkey, i))
        first = seen.setdefault((port.port, port.protocol), i)
        if first != i:
            where = index_path("ports", first)
            raise ConfigError(
                src,
                key_path(index_path(pkey, i), "port"),
                f"{port.port}/{port.protocol} is already listed in {where}",
            )
        ports.append(port)

    backends: list[str] = []
    if obj.has("backends"):
        bkey = obj.key("backends")
        for i, item in enumerate(read_list(obj.get("backends"), src, bkey)):
            ikey = index_path(bkey, i)
            backend = read_str(item, src, ikey)
            if backend not in taken.pods:
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
        readiness = read_str(obj.get("readiness"), src, obj.key("readiness"))
        if readiness not in ("probe", "external"):
            raise ConfigError(src, obj.key("readiness"), f"{readiness!r} is not probe or external")
    hooks: dict[str, str | None] = {}
    for hook in ("on_activate", "on_idle"):
        cmd = read_str(obj.get(hook), src, obj.key(hook)) if obj.has(hook) else None
        if cmd is not None:
            try:
                split_command(cmd)
            except ValueError as e:
                raise ConfigError(src, obj.key(hook), f"{cmd!r} is not a command: {e} (it "
                                  "is split like a shell would, but no shell runs it)") from None
        hooks[hook] = cmd
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
    data: object, source: str, worker_id: str, key_prefix: str = "",
    problems: list[ConfigError] | None = None,
) -> NamespaceSpec:
    """Validate one namespace mapping (with its pods and services) into a NamespaceSpec.

    ``worker_id`` is this worker's id: pods naming it as their ``worker`` are an error.
    ``key_prefix`` is prepended to key paths (``namespaces[0]`` in a file, ``""`` for API).
    With ``problems`` (`fabricd check`), a bad pod or service is appended there and
    skipped, so one pass reports them all; its name stays taken, so services naming it
    as a backend are not reported as well.
    """
    obj = Obj(data, source, key_prefix, _NS_KEYS)
    name = read_dns_label(obj.required("name"), source, obj.key("name"))
    ns_id = None
    if obj.has("id"):
        ns_id = read_int(obj.get("id"), source, obj.key("id"), 1, 2**32 - 1)
    cidr = read_network(obj.required("cidr"), source, obj.key("cidr"), 8, 30)
    gateway = cidr.network_address + 1
    if obj.has("gateway"):
        given = read_ipv4(obj.get("gateway"), source, obj.key("gateway"))
        if given != gateway:
            raise ConfigError(
                source,
                obj.key("gateway"),
                f"{given} is not the gateway of {cidr}: it is always the first host, {gateway}",
            )
    gateway_mac = DEFAULT_GATEWAY_MAC
    if obj.has("gateway_mac"):
        gateway_mac = read_mac(obj.get("gateway_mac"), source, obj.key("gateway_mac"))
    mtu: int | None = None
    if obj.has("mtu"):
        mtu = read_int(obj.get("mtu"), source, obj.key("mtu"), 576, 65535)
    dns = _parse_dns(obj.get("dns"), source, obj.key("dns"))
    dhcp = _parse_dhcp(obj.get("dhcp"), source, obj.key("dhcp"))
    egress = _parse_egress_allow(obj.get("egress"), source, obj.key("egress"))

    ns = NamespaceSpec(
        name=name,
        id=ns_id,
        cidr=cidr,
        gateway=gateway,
        gateway_mac=gateway_mac,
        mtu=mtu or DEFAULT_MTU,
        dns=dns,
        dhcp=dhcp,
        egress_allow=egress,
    )
    zone = f"{name}.{dns.domain}"
    if len(zone) > MAX_ZONE:
        raise ConfigError(
            source,
            obj.key("dns") if obj.has("dns") else obj.key("name"),
            f"the namespace's DNS zone {zone[:40]}... is {len(zone)} characters "
            f"(at most {MAX_ZONE}: longer zones leave no room for names in them)",
        )
    taken = _Taken(ns)
    pods_key = obj.key("pods")
    pod_items = read_list(obj.get("pods"), source, pods_key) if obj.has("pods") else []
    pods: list[PodSpec] = []
    for i, item in enumerate(pod_items):
        try:
            pod = _parse_pod(
                item, source, ns, taken, worker_id, index_path(pods_key, i), replacing=False
            )
        except ConfigError as e:
            if problems is None:
                raise
            problems.append(e)
            _reserve_name(taken.pods, item, i)
            continue
        taken.add_pod(pod)
        taken.pods[pod.name] = i  # its index in the file, also when others were skipped
        pods.append(pod)
    ns = replace(ns, pods=tuple(pods))
    svc_key = obj.key("services")
    svc_items = read_list(obj.get("services"), source, svc_key) if obj.has("services") else []
    services: list[ServiceSpec] = []
    for i, item in enumerate(svc_items):
        try:
            svc = _parse_service(item, source, ns, taken, index_path(svc_key, i),
                                 replacing=False)
        except ConfigError as e:
            if problems is None:
                raise
            problems.append(e)
            _reserve_name(taken.services, item, i)
            continue
        taken.add_service(svc)
        taken.services[svc.name] = i
        services.append(svc)
    ns = replace(ns, services=tuple(services))
    if mtu is None and any(p.kind == "remote" for p in ns.pods):
        ns = replace(ns, mtu=TUNNEL_MTU)  # the namespace spans tunnels: leave room
    return ns


def _reserve_name(names: dict[str, int], item: Any, index: int) -> None:
    """A skipped item's name (when it has a usable one) still counts as taken."""
    name = item.get("name") if isinstance(item, Mapping) else None
    if isinstance(name, str) and name not in names:
        names[name] = index


def parse_pod(
    data: object, source: str, namespace: NamespaceSpec, worker_id: str, key_prefix: str = "",
    taken: Taken | None = None,
) -> PodSpec:
    """Validate one pod for attaching at runtime to ``namespace``.

    A pod with the same name already in ``namespace`` is treated as being replaced: its
    IP, MAC and interface do not count as taken. ``taken`` is ``Taken(namespace)`` kept by
    the caller (attaching pods one by one must not re-index the namespace each time).
    """
    if taken is None:
        taken = _Taken(namespace)
    return _parse_pod(data, source, namespace, taken, worker_id, key_prefix, replacing=True)


def parse_service(
    data: object, source: str, namespace: NamespaceSpec, key_prefix: str = ""
) -> ServiceSpec:
    """Validate one service for adding at runtime to ``namespace`` (same-name = replace)."""
    return _parse_service(data, source, namespace, _Taken(namespace), key_prefix, replacing=True)


def validate_namespace_set(
    namespaces: Sequence[NamespaceSpec], source: str, key_prefix: str = "namespaces",
    problems: list[ConfigError] | None = None,
    indices: Sequence[int] | None = None,
    pod_index: Callable[[int, int, PodSpec], int] | None = None,
) -> None:
    """Rules across namespaces on one worker: unique names and ids, no shared host ports.

    Key paths are ``{key_prefix}[i]....`` where i indexes ``namespaces``. For
    `fabricd check`, which skips what it reported: ``indices`` and ``pod_index`` give the
    index in the file of a namespace and of a pod, and ``problems`` collects every
    violation instead of raising the first.
    """

    def bad(key: str, problem: str) -> None:
        err = ConfigError(source, key, problem)
        if problems is None:
            raise err
        problems.append(err)

    names: dict[str, int] = {}
    ids: dict[int, str] = {}
    interfaces: dict[str, str] = {}
    netns_ifs: dict[tuple[str, str], str] = {}
    for i, ns in zip(indices if indices is not None else range(len(namespaces)), namespaces,
                     strict=True):
        at = index_path(key_prefix, i)
        if ns.name in names:
            bad(key_path(at, "name"), f"duplicate namespace name {ns.name} "
                f"(also {index_path(key_prefix, names[ns.name])})")
            continue
        names[ns.name] = i
        if ns.id is not None:
            if ns.id in ids:
                bad(key_path(at, "id"), f"id {ns.id} is already used by namespace {ids[ns.id]}")
            else:
                ids[ns.id] = ns.name
        for j, pod in enumerate(ns.pods):
            pat = index_path(key_path(at, "pods"), pod_index(i, j, pod) if pod_index else j)
            who = f"pod {pod.name} in namespace {ns.name}"
            if pod.interface is not None:
                if pod.interface in interfaces:
                    bad(key_path(pat, "interface"), f"interface {pod.interface} is already "
                        f"used by {interfaces[pod.interface]}")
                else:
                    interfaces[pod.interface] = who
            if pod.netns_path is not None:
                slot = (pod.netns_path, pod.ifname)
                if slot in netns_ifs:
                    bad(key_path(pat, "netns"),
                        f"netns {pod.netns} already has {pod.ifname} ({netns_ifs[slot]})")
                else:
                    netns_ifs[slot] = who


# ---------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------

_WORKER_KEYS = ("id", "control", "control_mode", "state_dir", "egress", "tunnel", "busy_poll",
                "service_hold_bytes")
# The services' hold budget: less than a MiB is a typo (a few thousand SYNs), more than
# 4 GiB would let dormant services take the host's memory.
MIN_SERVICE_HOLD_BYTES = 1 << 20
MAX_SERVICE_HOLD_BYTES = 4 << 30
MAX_BUSY_POLL = 0.1  # longer is a typo: the data plane would spin for most of a second
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
        raise type_error(value, src, key, 'an octal mode string like "0600"')
    if not 0 <= mode <= 0o777:
        raise ConfigError(
            src, key, f'{value} is not a valid mode (give an octal string like "0600")'
        )
    if mode & 0o002:
        raise ConfigError(src, key, f"{mode:04o} lets every local user drive the fabric (the"
                          " API runs hooks and opens devices as root); give a group instead,"
                          ' e.g. "0660"')
    if not mode & 0o200:
        raise ConfigError(src, key, f"{mode:04o} leaves the owner unable to connect")
    return mode


def _parse_egress(value: Any, src: str, key: str) -> EgressSpec | None:
    if value is None or value is False:
        return None
    if value is True:
        return EgressSpec()
    obj = Obj(value, src, key, _EGRESS_KEYS)
    tun = read_ifname(obj.get("tun"), src, obj.key("tun")) if obj.has("tun") else DEFAULT_EGRESS_TUN
    pool = DEFAULT_EGRESS_POOL
    if obj.has("pool"):
        pool = read_network(obj.get("pool"), src, obj.key("pool"), 8, 30)
    return EgressSpec(tun=tun, pool=pool)


def _read_key_file(path: str, src: str, key: str) -> bytes:
    """The key, from a file only its owner's group may read at most (as ``wg`` asks)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, encoding="ascii", closefd=True) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(src, key, f"{path} is not a regular file")
            if st.st_mode & 0o007:
                raise ConfigError(src, key, f"{path} is readable by every user (mode "
                                  f"{st.st_mode & 0o777:04o}): chmod 600 it, and make a new "
                                  "key if others may have read it")
            if st.st_size > 4096:
                raise ConfigError(src, key, f"{path} does not hold a base64 32-byte key")
            text = f.read(4096).strip()
    except OSError as e:
        raise ConfigError(src, key, f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(src, key, f"{path} does not hold a base64 32-byte key") from None
    try:
        return read_key32(text, src, key)
    except ConfigError:
        raise ConfigError(src, key, f"{path} does not hold a base64 32-byte key") from None


def _parse_tunnel(
    value: Any, src: str, key: str, worker_id: str, base_dir: str | None
) -> TunnelSpec | None:
    if value is None:
        return None
    obj = Obj(value, src, key, _TUNNEL_KEYS)
    listen = DEFAULT_LISTEN
    if obj.has("listen"):
        raw = obj.get("listen")
        if isinstance(raw, int) and not isinstance(raw, bool):
            listen = (DEFAULT_LISTEN[0], read_int(raw, src, obj.key("listen"), 1, 65535))
        else:
            listen = read_host_port(raw, src, obj.key("listen"), default_port=None,
                                    hostname_ok=False)
    if obj.has("private_key") == obj.has("private_key_file"):
        raise ConfigError(src, key, "give exactly one of private_key or private_key_file")
    key_file = None
    if obj.has("private_key"):
        private_key = read_key32(obj.get("private_key"), src, obj.key("private_key"))
    else:
        key_file = read_str(obj.get("private_key_file"), src, obj.key("private_key_file"))
        if base_dir is not None:
            key_file = os.path.join(base_dir, key_file)
        private_key = _read_key_file(key_file, src, obj.key("private_key_file"))
    psk = read_key32(obj.get("psk"), src, obj.key("psk")) if obj.has("psk") else None
    keepalive = None
    if obj.has("keepalive"):
        keepalive = parse_duration(obj.get("keepalive"), src, obj.key("keepalive"))

    peers: list[TunnelPeerSpec] = []
    pkey = obj.key("peers")
    for i, item in enumerate(read_list(obj.get("peers"), src, pkey) if obj.has("peers") else []):
        peers.append(parse_peer(item, src, worker_id, peers, index_path(pkey, i)))
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
    pobj = Obj(data, source, key_prefix, _PEER_KEYS)
    peer_id = read_worker_id(pobj.required("id"), source, pobj.key("id"))
    if peer_id == worker_id:
        raise ConfigError(source, pobj.key("id"), f"{peer_id} is this worker's own id")
    if any(p.id == peer_id for p in others):
        raise ConfigError(source, pobj.key("id"), f"duplicate peer id {peer_id}")
    public_key = read_key32(pobj.required("public_key"), source, pobj.key("public_key"))
    for p in others:
        if p.public_key == public_key:
            raise ConfigError(source, pobj.key("public_key"),
                              f"public key is already used by peer {p.id}")
    endpoint = None
    if pobj.has("endpoint"):
        endpoint = read_host_port(pobj.get("endpoint"), source, pobj.key("endpoint"),
                              default_port=None, hostname_ok=True)
    return TunnelPeerSpec(id=peer_id, public_key=public_key, endpoint=endpoint)


def _parse_worker(value: Any, src: str, key: str, base_dir: str | None) -> WorkerSpec:
    obj = Obj({} if value is None else value, src, key, _WORKER_KEYS)
    worker_id = (
        read_worker_id(obj.get("id"), src, obj.key("id")) if obj.has("id") else socket.gethostname()
    )
    control = DEFAULT_CONTROL
    if obj.has("control"):
        control = read_str(obj.get("control"), src, obj.key("control"))
        if len(os.fsencode(control)) > SUN_PATH_MAX:
            raise ConfigError(
                src,
                obj.key("control"),
                f"socket path is too long ({len(os.fsencode(control))} bytes, max {SUN_PATH_MAX})",
            )
    mode = DEFAULT_CONTROL_MODE
    if obj.has("control_mode"):
        mode = _control_mode(obj.get("control_mode"), src, obj.key("control_mode"))
    state_dir = None
    if obj.has("state_dir"):
        state_dir = read_str(obj.get("state_dir"), src, obj.key("state_dir"))
        if not state_dir.startswith("/") or not state_dir.isprintable():
            raise ConfigError(src, obj.key("state_dir"), f"{state_dir!r} is not an absolute path")
    busy_poll, adaptive = _parse_busy_poll(obj.get("busy_poll"), src, obj.key("busy_poll"))
    hold_bytes = DEFAULT_SERVICE_HOLD_BYTES
    if obj.has("service_hold_bytes"):
        key = obj.key("service_hold_bytes")
        hold_bytes = parse_size(obj.get("service_hold_bytes"), src, key)
        if not MIN_SERVICE_HOLD_BYTES <= hold_bytes <= MAX_SERVICE_HOLD_BYTES:
            raise ConfigError(src, key, f"{hold_bytes} bytes is not between 1MiB and 4GiB")
    egress = _parse_egress(obj.get("egress"), src, obj.key("egress"))
    tunnel = _parse_tunnel(obj.get("tunnel"), src, obj.key("tunnel"), worker_id, base_dir)
    return WorkerSpec(
        id=worker_id, control=control, control_mode=mode, egress=egress, tunnel=tunnel,
        state_dir=state_dir, busy_poll=busy_poll, busy_poll_adaptive=adaptive,
        service_hold_bytes=hold_bytes,
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
        raise ConfigError(source, "", f"expected a mapping at the top level, got {describe(data)}")
    obj = Obj(data, source, "", ("worker", "namespaces"))
    worker = _parse_worker(obj.get("worker"), source, "worker", base_dir)
    items = read_list(obj.get("namespaces"), source, "namespaces") if obj.has("namespaces") else []
    namespaces = tuple(
        parse_namespace(item, source, worker.id, index_path("namespaces", i))
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



def config_problems(data: object, source: str, base_dir: str | None = None) -> list[ConfigError]:
    """Every problem of a whole config (see `check_config_data`)."""
    return check_config_data(data, source, base_dir)[1]


def check_config_data(data: object, source: str,
                      base_dir: str | None = None) -> tuple[Config | None, list[ConfigError]]:
    """Every problem of a whole config, for `fabricd check`: what `parse_config` would
    refuse, collected instead of stopping at the first; with none, the Config itself
    (what `parse_config` returns), so a good file is read once.

    The units are the top-level keys, the worker, each namespace's own keys, each pod
    and each service, and the rules across namespaces: a unit with a problem is reported
    once (its first problem) and left out of the checks that depend on it, so one
    mistake does not show up as several.
    """
    problems: list[ConfigError] = []
    if data is None or not isinstance(data, Mapping):
        try:
            return parse_config(data, source, base_dir), []
        except ConfigError as e:
            return None, [e]
    known = ("worker", "namespaces")
    for k in data:
        try:
            Obj({k: None}, source, "", known)
        except ConfigError as e:
            problems.append(e)
    top = {k: v for k, v in data.items() if k in known}
    try:
        worker = _parse_worker(top.get("worker"), source, "worker", base_dir)
    except ConfigError as e:
        problems.append(e)
        raw = top.get("worker")
        raw_id = raw.get("id") if isinstance(raw, Mapping) else None
        try:
            wid = read_worker_id(raw_id, source, "worker.id")
        except ConfigError:
            wid = socket.gethostname()
        worker = WorkerSpec(id=wid)
    items: list[Any] = []
    if top.get("namespaces") is not None:
        try:
            items = read_list(top["namespaces"], source, "namespaces")
        except ConfigError as e:
            problems.append(e)
    good: list[NamespaceSpec] = []
    indices: list[int] = []
    pod_names: dict[int, dict[str, int]] = {}  # namespace index -> pod name -> its index
    for i, item in enumerate(items):
        try:
            ns = parse_namespace(item, source, worker.id, index_path("namespaces", i),
                                 problems)
        except ConfigError as e:
            problems.append(e)
            continue
        good.append(ns)
        indices.append(i)
        raw_pods = item.get("pods") if isinstance(item, Mapping) else None
        names: dict[str, int] = {}
        for j, p in enumerate(raw_pods if isinstance(raw_pods, list) else []):
            _reserve_name(names, p, j)
        pod_names[i] = names
    validate_namespace_set(good, source, problems=problems, indices=indices,
                           pod_index=lambda i, j, pod: pod_names[i].get(pod.name, j))
    if worker.egress is not None:
        for ns in good:
            if ns.cidr.overlaps(worker.egress.pool):
                problems.append(ConfigError(
                    source, "worker.egress.pool",
                    f"{worker.egress.pool} overlaps cidr {ns.cidr} of namespace {ns.name}"))
    if problems:
        return None, problems
    return Config(worker=worker, namespaces=tuple(good), source=source), []
