"""What a namespace's router is made of: its attachments (the router's view of a port),
its pods, the drop reasons and the framing constants. No logic beyond bookkeeping, so
shells (data plane, uplink, capture) can use these without importing the router."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Final

from fabric.net.vnet import VNET_HDR_LEN

L3_OFF: Final = 14  # where an L3 port's frame starts in the shell's buffer

# Kinds of attachment. A "tunnel" attachment stands for a peer worker: frames queued
# for it are bare IPv4 packets that the data plane sends through the tunnel link.
KIND_TUNNEL: Final = "tunnel"

# Drop reasons, named once so counters, metrics and docs agree.
DROP_MALFORMED: Final = "malformed"
DROP_BAD_CHECKSUM: Final = "bad_checksum"
DROP_SPOOFED: Final = "spoofed_source"
DROP_IPV6: Final = "ipv6"
DROP_ETHERTYPE: Final = "ethertype"
DROP_TTL: Final = "ttl_expired"
DROP_NO_ROUTE: Final = "no_route"
DROP_BROADCAST: Final = "broadcast"
DROP_MULTICAST: Final = "multicast"
DROP_TOO_BIG: Final = "too_big"
DROP_HOLD_OVERFLOW: Final = "hold_overflow"
DROP_HOLD_TIMEOUT: Final = "hold_timeout"
DROP_NO_TUNNEL: Final = "no_tunnel"
DROP_GATEWAY_PORT: Final = "gateway_port_closed"
DROP_BAD_OFFLOAD: Final = "bad_offload"
DROP_ICMP_RATELIMIT: Final = "icmp_ratelimited"
DROP_TX_FULL: Final = "tx_full"
DROP_TX_ERROR: Final = "tx_error"
DROP_POD_REMOVED: Final = "pod_removed"
DROP_EGRESS_DENIED: Final = "egress_denied"
DROP_EGRESS_FULL: Final = "egress_table_full"
DROP_EGRESS_UNSUPPORTED: Final = "egress_unsupported"
DROP_NO_FLOW: Final = "no_flow"
DROP_SERVICE_HOLD_FULL: Final = "service_hold_full"
DROP_SERVICE_HOLD_BUDGET: Final = "service_hold_budget"
DROP_SERVICE_NO_BACKEND: Final = "service_no_backend"
DROP_SERVICE_PORT: Final = "service_port_closed"
DROP_SERVICE_TABLE_FULL: Final = "service_table_full"
DROP_SERVICE_CLIENT_QUOTA: Final = "service_client_quota"
DROP_ACTIVATOR: Final = "activator_drop"
DROP_NO_NAMESPACE: Final = "no_namespace"  # on the uplink: for no namespace's address


class Port:
    """The router's view of an attached port, with its counters. `fd` is an opaque
    handle for the shell; `peer` names the worker a tunnel attachment stands for and
    `ns_id` the namespace id its packets carry on the tunnel wire."""

    __slots__ = ("pod", "hlen", "l3", "mtu", "fd", "kind", "rx_packets", "rx_bytes",
                 "tx_packets", "tx_bytes", "drops", "ndrops", "last_drop", "capture", "peer",
                 "ns_id", "icmp")

    def __init__(self, *, vnet: bool, mtu: int, fd: int = -1, kind: str = "test",
                 l3: bool = False) -> None:
        self.pod: Pod | None = None
        self.hlen = VNET_HDR_LEN if vnet else 0
        # An L3 port (a TUN: the local stack, the egress uplink) carries IPv4 packets with
        # no Ethernet header. The fast path leaves its frames at buf[L3_OFF:n], and the
        # shell reads L3 ports into buf[L3_OFF:] so the router can put an Ethernet header
        # in front in place.
        self.l3 = l3
        self.mtu = mtu
        self.fd = fd
        self.kind = kind
        self.rx_packets = 0
        self.rx_bytes = 0
        self.tx_packets = 0
        self.tx_bytes = 0
        self.drops: dict[str, int] = {}
        # The shell compares ndrops around each frame: a change means that frame was
        # dropped, for last_drop, and goes to the namespace's drop log with its headers.
        self.ndrops = 0
        self.last_drop = ""
        # Called as capture(now, ethernet_frame, outgoing) when someone captures this port.
        self.capture: Callable[[float, bytes, bool], None] | None = None
        self.peer: str | None = None
        self.ns_id = 0
        # This port's own ICMP error budget (fabric.router.icmp), made on first use.
        self.icmp: Any = None

    @property
    def vnet(self) -> bool:
        return self.hlen != 0

    def drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        self.ndrops += 1
        self.last_drop = reason


def tunnel_port(peer: str, ns_id: int, mtu: int) -> Port:
    """The attachment standing for a peer worker (see KIND_TUNNEL)."""
    port = Port(vnet=False, mtu=mtu, kind=KIND_TUNNEL, l3=True)
    port.peer = peer
    port.ns_id = ns_id
    return port


class Pod:
    """A table entry: a pod's address, its MAC once known, and its port once attached."""

    __slots__ = ("name", "ip", "_mac", "l2", "gw_mac", "mac_fixed", "port", "remote",
                 "pending", "arp_due")

    def __init__(self, name: str, ip: bytes, mac: bytes | None, remote: str | None,
                 gw_mac: bytes) -> None:
        self.name = name
        self.ip = ip
        self.gw_mac = gw_mac
        # The 12 bytes of Ethernet addresses a frame toward this pod starts with (one slice
        # assignment on the fast path), None while the pod's MAC is unknown.
        self.l2: bytes | None = None
        self.mac = mac
        self.mac_fixed = mac is not None
        self.port: Port | None = None
        self.remote = remote
        # Frames held until the pod can take them (see fabric.router.hold):
        # (arrival time, header length, frame with its virtio-net header if any)
        self.pending: deque[tuple[float, int, bytes]] = deque()
        self.arp_due = 0.0

    @property
    def mac(self) -> bytes | None:
        return self._mac

    @mac.setter
    def mac(self, mac: bytes | None) -> None:
        self._mac = mac
        self.l2 = None if mac is None else mac + self.gw_mac
