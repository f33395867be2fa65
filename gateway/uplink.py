"""The worker's egress TUN, shared by every namespace.

Namespaces' egress NAT writes translated packets into it; the host routes (and, for a
real uplink, masquerades) them onward. Packets coming back for the pool are handed to
the namespace whose egress address they are addressed to. Each namespace gets its own
egress address from the pool, so overlapping pod CIDRs never clash and host firewalls
can tell namespaces apart.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import Protocol

from fabric.errors import FabricError, PortError
from fabric.ports import netlink
from fabric.ports.tap import open_tun
from fabric.router.model import DROP_MALFORMED, DROP_NO_NAMESPACE, L3_OFF, Port
from gateway.egress import ALWAYS_PROTECTED

log = logging.getLogger("fabricd.egress")

UPLINK_MTU = 1500


class EgressReceiver(Protocol):
    """A namespace's router, as far as packets from the uplink go."""

    def receive_egress(self, port: Port, buf: bytearray, n: int,
                       now: float) -> Port | None: ...


class Uplink:
    """Owns the TUN; demultiplexes its packets to namespaces by destination address."""

    name = "uplink"

    def __init__(self, tun: str, pool: ipaddress.IPv4Network) -> None:
        self.tun = tun
        self.pool = pool
        self.fd = -1
        self.port: Port | None = None
        self.routers: dict[bytes, EgressReceiver] = {}
        self.addresses: dict[str, ipaddress.IPv4Address] = {}  # namespace -> address
        self.host: tuple[ipaddress.IPv4Address, ...] = ()  # this worker's own addresses

    def open(self) -> Port:
        """Create the TUN in this (the worker's) namespace and route the pool into it."""
        try:
            fd = open_tun(self.tun)
        except OSError as e:
            raise PortError(f"egress TUN {self.tun!r}: {e.strerror}") from None
        try:
            mtu = netlink.set_link(self.tun, up=True, mtu=UPLINK_MTU)
            netlink.replace_route(str(self.pool), self.tun)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.port = Port(vnet=True, mtu=mtu, fd=fd, kind="uplink", l3=True)
        self.refresh_host()
        return self.port

    def refresh_host(self) -> bool:
        """Read this worker's addresses again (DHCP, an operator); True if they changed.
        Blocking netlink: call it off the event loop."""
        host = netlink.local_ipv4()
        if host == self.host:
            return False
        self.host = host
        return True

    @property
    def protected(self) -> tuple[ipaddress.IPv4Network, ...]:
        """What egress refuses unless a namespace names it: the fixed ranges, the pool
        (other namespaces' egress addresses) and this worker's own addresses."""
        return ALWAYS_PROTECTED + (self.pool,) + tuple(
            ipaddress.IPv4Network(a) for a in self.host)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # the device and its route go with it
            self.fd = -1

    # --- addresses -----------------------------------------------------------------------

    def allocate(self, namespace: str, ns_id: int | None) -> ipaddress.IPv4Address:
        """The namespace's egress address: pool base + its id when it has one (stable
        across restarts), else the lowest free one above the ids in use."""
        if namespace in self.addresses:
            return self.addresses[namespace]
        used = set(self.addresses.values())
        size = self.pool.num_addresses
        if ns_id is not None and 0 < ns_id < size - 1:
            addr = self.pool.network_address + ns_id
            if addr in used:
                raise FabricError(f"egress address {addr} of namespace {namespace} (id "
                                  f"{ns_id}) is taken")
        else:
            for i in range(size - 2, 0, -1):  # from the top, away from id-based ones
                addr = self.pool.network_address + i
                if addr not in used:
                    break
            else:
                raise FabricError(f"egress pool {self.pool} is exhausted")
        self.addresses[namespace] = addr
        return addr

    def add(self, namespace: str, addr: ipaddress.IPv4Address, router: EgressReceiver) -> None:
        self.routers[addr.packed] = router

    def remove(self, namespace: str) -> None:
        addr = self.addresses.pop(namespace, None)
        if addr is not None:
            self.routers.pop(addr.packed, None)

    # --- the packet path -----------------------------------------------------------------

    def route(self, port: Port, buf: bytearray, n: int) -> EgressReceiver | None:
        """The router a packet from the TUN (in buf[L3_OFF:n]) is for, by its destination
        (the namespace's egress address); counts it on the uplink's port."""
        port.rx_packets += 1
        port.rx_bytes += n - L3_OFF
        ip = L3_OFF + port.hlen
        if n < ip + 20:
            port.drop(DROP_MALFORMED)
            return None
        r = self.routers.get(bytes(buf[ip + 16:ip + 20]))
        if r is None:
            port.drop(DROP_NO_NAMESPACE)
        return r
