"""A pod's port as an AF_PACKET socket on an existing interface (e.g. our end of a veth).

Used when the pod's interface is made by someone else (a CNI, a test harness). With
PACKET_VNET_HDR the socket carries the same 10-byte virtio_net_hdr as our TAPs, so the data
plane handles both kinds of port identically, GSO super-frames included.
"""

from __future__ import annotations

import socket
import struct

from fabric.errors import PortError
from fabric.ports import netlink
from fabric.ports.portfd import PortFd

SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
ETH_P_ALL = 0x0003
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

BUF_BYTES = 4 << 20
VNET_HDR_LEN = 10


def _set_buffer(sock: socket.socket, force_opt: int, opt: int, size: int) -> None:
    """Ask for a big buffer; FORCE bypasses net.core.*mem_max as root, else take what we get."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, size)
    except OSError:
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        except OSError:
            pass


class PacketPort(PortFd):
    """A pod port backed by an AF_PACKET socket bound to one interface of this namespace."""

    fd: int
    vnet: bool
    gso: bool
    name: str
    mtu: int
    ifindex: int

    def __init__(self, sock: socket.socket, name: str, ifindex: int, mtu: int,
                 ipv6_before: str | None = None) -> None:
        self._sock = sock
        self._ipv6_before = ipv6_before
        self.fd = sock.fileno()
        self.vnet = True
        self.gso = True
        self.name = name
        self.ifindex = ifindex
        self.mtu = mtu
        self._closed = False

    @classmethod
    def open(cls, ifname: str, refuse: frozenset[str] = frozenset()) -> PacketPort:
        """Bind to an existing `ifname` in the current namespace and bring it up.

        Refused: the interfaces in `refuse` (the fabric's own, such as the egress TUN) and
        any interface that carries this host's addresses or routes (its uplink, a bridge) or is
        a port of a bridge or bond (docker's veths in docker0):
        a typo must never hand a tenant the host's traffic. IPv6 is disabled on it (best
        effort) so the host stack does not chatter (RS, MLD, DAD) or answer on a port that
        belongs to the fabric; close() gives back what was there.
        """
        netlink.check_ifname(ifname)
        if ifname in refuse:
            raise PortError(f"interface {ifname!r} belongs to the fabric itself")
        try:
            ifindex = socket.if_nametoindex(ifname)
        except OSError:
            raise PortError(f"interface {ifname!r} does not exist") from None
        role = netlink.host_role(ifname)
        if role is not None:
            raise PortError(f"interface {ifname!r} cannot be a pod's port: {role}")
        ipv6_before = netlink.disable_ipv6(ifname)
        mtu = netlink.set_link(ifname, up=True)
        # Protocol 0 until bind: a socket created with ETH_P_ALL would queue frames from
        # every interface in the namespace until it is bound.
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except OSError as exc:
            raise PortError(f"AF_PACKET socket for {ifname!r}: {exc.strerror}") from None
        step = "PACKET_VNET_HDR"
        try:
            sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            step = "PACKET_IGNORE_OUTGOING"
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, BUF_BYTES)
            _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, BUF_BYTES)
            step = "bind"
            sock.bind((ifname, ETH_P_ALL))
            step = "PACKET_MR_PROMISC"
            mreq = struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b"")
            sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if ipv6_before is not None:
                netlink.disable_ipv6(ifname, ipv6_before)
            raise PortError(f"AF_PACKET on {ifname!r}: {step}: {exc.strerror}") from None
        return cls(sock, ifname, ifindex, mtu, ipv6_before)

    def close(self) -> None:
        """Close the socket (drops promiscuous membership) and give the interface back its
        IPv6 setting if it is still the one we took."""
        if self._closed:
            return
        self._closed = True
        self._sock.close()
        if self._ipv6_before is not None:
            try:
                if socket.if_nametoindex(self.name) == self.ifindex:
                    netlink.disable_ipv6(self.name, self._ipv6_before)
            except OSError:
                pass  # gone with its VMM

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self.fd}"
        return f"PacketPort({self.name!r}, {state}, mtu={self.mtu})"
