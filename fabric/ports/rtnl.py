"""The four rtnetlink requests that configure a pod's fresh TAP, built by hand and sent in
one datagram: MAC, MTU, queue length and up; the address; the default route; `lo` up.

pyroute2 spent about 8 ms of Python per pod on them (a socket object, marshalling, a
dump per name lookup), most of an attach's budget at 100 pods/s; these are a few struct
packs and one round trip. The socket must be opened by a thread inside the pod's
namespace (netlink sockets belong to the namespace they were made in).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

from fabric.errors import PortError

NETLINK_ROUTE = 0
RTM_NEWLINK = 16
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
IFF_UP = 0x1
IFLA_ADDRESS = 1
IFLA_MTU = 4
IFLA_TXQLEN = 13
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTA_GATEWAY = 5
RTA_OIF = 4
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBi")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg


def _attr(kind: int, value: bytes) -> bytes:
    n = 4 + len(value)
    return struct.pack("=HH", n, kind) + value + bytes(-n % 4)


def _msg(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return _HDR.pack(_HDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags, seq,
                     0) + body


def link_up(index: int, mac: bytes | None = None, mtu: int | None = None,
            txqlen: int | None = None) -> bytes:
    """RTM_NEWLINK (a change, not a creation): up, and the MAC/MTU/queue given."""
    attrs = b""
    if mac is not None:
        attrs += _attr(IFLA_ADDRESS, mac)
    if mtu is not None:
        attrs += _attr(IFLA_MTU, struct.pack("=I", mtu))
    if txqlen is not None:
        attrs += _attr(IFLA_TXQLEN, struct.pack("=I", txqlen))
    return _IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP) + attrs


def address(index: int, ip: ipaddress.IPv4Address, prefixlen: int) -> bytes:
    return (_IFADDR.pack(socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
            + _attr(IFA_LOCAL, ip.packed) + _attr(IFA_ADDRESS, ip.packed))


def default_route(index: int, gateway: ipaddress.IPv4Address) -> bytes:
    return (_RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT,
                        RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
            + _attr(RTA_GATEWAY, gateway.packed) + _attr(RTA_OIF, struct.pack("=i", index)))


def configure_here(where: str, index: int, mac: bytes, mtu: int, txqlen: int,
                   ip: ipaddress.IPv4Address, prefixlen: int,
                   gateway: ipaddress.IPv4Address | None, lo: int | None) -> None:
    """In the calling thread's namespace: the pod's link up with its MAC, MTU and queue,
    its address, its default route, and `lo` up. The first refusal is a PortError
    naming `where` and the step."""
    steps: list[tuple[str, int, int, bytes]] = [
        (f"setting MAC, MTU {mtu} and up", RTM_NEWLINK, 0, link_up(index, mac, mtu, txqlen)),
        (f"adding address {ip}/{prefixlen}", RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL,
         address(index, ip, prefixlen)),
    ]
    if gateway is not None:
        steps.append((f"adding default route via {gateway}", RTM_NEWROUTE,
                      NLM_F_CREATE | NLM_F_EXCL, default_route(index, gateway)))
    if lo is not None:
        steps.append(("bringing lo up", RTM_NEWLINK, 0, link_up(lo)))
    data = b"".join(_msg(kind, flags, seq, body)
                    for seq, (_, kind, flags, body) in enumerate(steps, 1))
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                          NETLINK_ROUTE)
    except OSError as exc:
        raise PortError(f"{where}: cannot open rtnetlink: {exc.strerror}") from None
    try:
        s.settimeout(5.0)
        s.bind((0, 0))
        s.send(data)
        pending = set(range(1, len(steps) + 1))
        while pending:
            buf = s.recv(65536)
            off = 0
            while off + _HDR.size <= len(buf):
                length, kind, _, seq, _ = _HDR.unpack_from(buf, off)
                if kind == NLMSG_ERROR and seq in pending:
                    err = -struct.unpack_from("=i", buf, off + _HDR.size)[0]
                    pending.discard(seq)
                    if err:
                        raise PortError(f"{where}: {steps[seq - 1][0]}: "
                                        f"{os.strerror(err)} (errno {err})")
                off += max(length + (-length % 4), _HDR.size)
    except OSError as exc:
        raise PortError(f"{where}: rtnetlink: {exc.strerror or exc}") from None
    finally:
        s.close()
