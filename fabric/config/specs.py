"""Frozen specs of everything the fabric acts on, and their defaults.

Specs are frozen dataclasses made of tuples (and ``FrozenMap`` for free-form activator
config), so a reload is an ``==`` diff of old and new. This module imports nothing of the
project and no YAML: the sans-IO cores take their specs from here.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from ipaddress import IPv4Address, IPv4Network
from typing import Any

DEFAULT_CONTROL = "/run/fabricd/control.sock"
# `busy_poll: adaptive`'s cap, and the default: covers ping's 2 ms and request/response
# periods shorter than that (docs/performance.md, "Adaptive busy-poll")
ADAPTIVE_MAX = 3e-3
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
# What all services of a worker hold together (`worker.service_hold_bytes`): each holds
# up to its own hold.bytes, and a flood to many dormant VIPs would otherwise hold that
# many times over (fabric.services.core.HoldBudget).
DEFAULT_SERVICE_HOLD_BYTES = 64 * 1024 * 1024
# Release pacing: new flows handed to the ready backends per step, per backend, and the
# time between steps (a burst of 1,000 SYNs into a backlog of 128 loses SYNs to a
# full accept queue, and each lost one costs its client a 1 s retransmit).
DEFAULT_RELEASE_BURST = 128
DEFAULT_RELEASE_INTERVAL = 0.001
# The activators this version ships (activators/<name>/<name>.wasm), by name: read from
# the package, so adding one needs no edit here.
SHIPPED_ACTIVATORS = tuple(sorted(
    d.name for d in resources.files("activators").iterdir()
    if d.is_dir() and (d / f"{d.name}.wasm").is_file()))
DEFAULT_IDLE_TIMEOUT = 300.0
# An activator instance's linear memory: the default cap, and the most a port may ask
# (`activator_memory_mib`); the host recycles an instance that reaches its cap.
DEFAULT_ACTIVATOR_MEMORY = 16 << 20
MAX_ACTIVATOR_MEMORY = 1024 << 20
DEFAULT_DHCP_LEASE = 86400.0  # static bindings: a long lease, renewals answered
DEFAULT_CONFIG_SOURCE = "<default>"
NETNS_DIR = "/run/netns"
ALLOW_ALL: tuple[IPv4Network, ...] = (IPv4Network("0.0.0.0/0"),)

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
        return {k: thaw(v) for k, v in self._data.items()}


def freeze(value: Any) -> Any:
    """Deep-freeze JSON-like data: mappings become FrozenMap, lists become tuples."""
    if isinstance(value, Mapping):
        return FrozenMap({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Undo ``freeze`` so the result is JSON-serialisable."""
    if isinstance(value, FrozenMap):
        return value.to_dict()
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
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
    # Where a stream port's upstream connections leave from: "vip" (the local stack) or
    # "pod-local" (inside the backend pod's namespace, to its own IP; fabric.streams.podlocal)
    upstream: str = "vip"
    # The linear memory its activator's instance may grow to, in bytes (a store limit):
    # the shipped http2 and http1 activators turn what is past the default into more
    # connections busy at once.
    activator_memory: int = DEFAULT_ACTIVATOR_MEMORY
    # A stream port's live connections from one client address, at most (0: no cap).
    max_connections_per_client: int = 0


@dataclass(frozen=True)
class HoldSpec:
    """How much traffic to hold while a service's backends are starting."""

    packets: int = DEFAULT_HOLD_PACKETS
    bytes: int = DEFAULT_HOLD_BYTES
    timeout: float = DEFAULT_HOLD_TIMEOUT
    release_burst: int = DEFAULT_RELEASE_BURST
    release_interval: float = DEFAULT_RELEASE_INTERVAL


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
    cache: int = 4096  # forwarded answers kept within their TTL; 0: none


@dataclass(frozen=True)
class DhcpSpec:
    """DHCPv4 on the gateway for the namespace's pods (their configured addresses)."""

    enabled: bool = True
    lease: float = DEFAULT_DHCP_LEASE


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
    dhcp: DhcpSpec = DhcpSpec()
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
    # Where the daemon keeps what must outlive it (the addresses it handed out);
    # None: the control socket's directory.
    state_dir: str | None = None
    # Seconds the data plane keeps polling after frames before it sleeps (0: never polls;
    # see fabric.runtime.spin); adaptive: the most it polls, the window follows the gaps.
    busy_poll: float = ADAPTIVE_MAX
    busy_poll_adaptive: bool = True
    # Bytes all services of the worker hold at most, together.
    service_hold_bytes: int = DEFAULT_SERVICE_HOLD_BYTES

    @property
    def state_path(self) -> str:
        """The state directory in force: `state_dir`, else the control socket's directory."""
        return self.state_dir or os.path.dirname(self.control) or "."


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



def split_command(cmd: str) -> list[str]:
    """A hook's argv (`on_activate`, `on_idle`): split with shell quoting, run without a
    shell. ValueError if the quoting is broken or nothing is left."""
    argv = shlex.split(cmd)
    if not argv or not argv[0]:
        raise ValueError("it is empty")
    return argv
