"""A pod's port as a TAP device whose fd stays in the worker and whose netdev lives in the pod.

Two ways to make one. `create_inside` (the fabric's default for netns names it can watch)
makes it inside the pod's namespace, by a thread that joined it: fast, but the TAP's file
then holds that namespace, so the caller watches for its deletion. `create` makes it in the
worker's namespace and moves it into the pod's: the fd keeps working across the move and
the TAP dies with the namespace, but the move waits for RCU (~20 ms under the rtnl lock).
Either way closing the fd deletes the netdev wherever it is, so the fd is the single
owner of the port's lifetime.

The fd carries a 10-byte `struct virtio_net_hdr` before every frame and offloads are on, so
TCP moves as GSO super-frames of up to 64 KiB instead of MTU-sized packets.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import secrets
import socket
import struct

from fabric.errors import PortError
from fabric.ports import netlink, rtnl
from fabric.ports.portfd import PortFd

TUN_PATH = "/dev/net/tun"

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8

IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN

VNET_HDR_LEN = 10
_IFREQ = "16sH22x"  # struct ifreq: name, flags, padding to 40 bytes
_TEMP_PREFIX = "fbp"
_NAME_TRIES = 4

NetnsId = tuple[int, int]  # (st_dev, st_ino) of a network namespace's nsfs file


def _set_nonblocking(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


def _set_vnet(fd: int) -> None:
    """Fix the header size at 10 (no num_buffers) and accept checksum/TSO offloads."""
    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
    fcntl.ioctl(fd, TUNSETOFFLOAD, OFFLOADS)


def _open_tap() -> tuple[int, str]:
    """Open a fresh non-persistent TAP with a random temporary name in this namespace."""
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise PortError(f"cannot open {TUN_PATH}: {exc.strerror}") from None
    try:
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        for attempt in range(_NAME_TRIES):
            name = _TEMP_PREFIX + secrets.token_hex(4)
            try:
                fcntl.ioctl(fd, TUNSETIFF, struct.pack(_IFREQ, name.encode(), flags))
                break
            except OSError as exc:
                # A name clash (astronomically unlikely) shows up as EBUSY/EEXIST/EINVAL.
                retry = exc.errno in (errno.EBUSY, errno.EEXIST, errno.EINVAL)
                if not retry or attempt == _NAME_TRIES - 1:
                    raise PortError(f"TUNSETIFF {name}: {exc.strerror}") from None
        try:
            _set_vnet(fd)
        except OSError as exc:
            raise PortError(f"TAP {name}: enabling vnet header/offloads: {exc.strerror}") from None
        _set_nonblocking(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, name


class TapPort(PortFd):
    """A pod port backed by a TAP fd; the data plane reads/writes frames on `fd` itself."""

    fd: int
    vnet: bool
    gso: bool
    name: str
    mac: str | None
    mtu: int

    def __init__(
        self,
        fd: int,
        *,
        vnet: bool = True,
        gso: bool = True,
        name: str = "",
        mac: str | None = None,
        mtu: int = 1500,
    ) -> None:
        self.fd = fd
        self.vnet = vnet
        self.gso = gso
        self.name = name
        self.mac = mac
        self.mtu = mtu
        self._closed = False

    @classmethod
    def create(
        cls,
        pod_name: str,
        netns: str,
        ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
        prefixlen: int,
        gateway: str | ipaddress.IPv4Address | ipaddress.IPv6Address | None,
        mac: str,
        mtu: int,
        ifname: str = "eth0",
    ) -> TapPort:
        """Create the TAP here (the worker's namespace) and hand its netdev to the pod.

        The netns and ifname are validated before anything is created. On any later failure
        the fd is closed, which deletes the TAP wherever it has got to.

        Made here and moved, not made inside the pod's namespace (which would save the
        move, the slowest step of an attach): a TAP's file keeps a reference to the
        namespace /dev/net/tun was opened in, so one opened in there would keep a deleted
        pod namespace alive, answering for the pod, instead of letting its port be lost.
        """
        where = f"pod {pod_name!r}"
        try:
            netlink.check_ifname(ifname)
            netlink.resolve_netns(netns)
        except PortError as exc:
            raise PortError(f"{where}: {exc.message}") from None
        fd, temp = _open_tap()
        try:
            index = netlink.link_index(temp)
            netlink.move_link(index, netns)
            netlink.configure_pod_link(netns, temp, ifname, mac, ip, prefixlen, gateway, mtu)
        except PortError as exc:
            os.close(fd)
            raise PortError(f"{where}: {exc.message}") from None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, vnet=True, gso=True, name=ifname, mac=mac, mtu=mtu)

    @classmethod
    def create_inside(
        cls,
        pod_name: str,
        netns: str,
        ip: ipaddress.IPv4Address,
        prefixlen: int,
        gateway: ipaddress.IPv4Address | None,
        mac: str,
        mtu: int,
        ifname: str = "eth0",
    ) -> tuple[TapPort, NetnsId]:
        """Create and configure the TAP inside the pod's namespace, by a thread that joined
        it: no move (a move waits for RCU under the rtnl lock, about 20 ms, which capped
        attaching at 50 pods/s whatever the fabric did) and no rename.

        The TAP's file then holds the pod's namespace: deleting its name does not delete
        it. The caller must watch the path and close the port when the namespace goes
        (fabric.runtime.netnswatch); hence the identity of the namespace it joined."""
        where = f"pod {pod_name!r}"
        try:
            netlink.check_ifname(ifname)
            path = netlink.resolve_netns(netns)
        except PortError as exc:
            raise PortError(f"{where}: {exc.message}") from None
        try:
            port, ident = netlink.run_in_netns(path, _tap_here, f"{where}: netns {netns!r}",
                                               ifname, packed_mac(mac), mtu, ip, prefixlen,
                                               gateway)
        except PortError as exc:
            if exc.message.startswith(where):
                raise
            raise PortError(f"{where}: {exc.message}") from None
        port.mac = mac
        return port, ident

    @classmethod
    def from_fd(
        cls,
        fd: int,
        vnet: bool,
        *,
        mtu: int = 1500,
        name: str | None = None,
        mac: str | None = None,
    ) -> TapPort:
        """Adopt a ready fd handed in by an embedding worker; the port then owns it.

        For a real TUN/TAP fd, TUNGETIFF lets us refuse what would misparse every frame (an
        L3 TUN, or a vnet header setting that contradicts `vnet`), and with a vnet header we
        pin its size to 10 and enable offloads, as for ports we create. Any other open fd
        (e.g. a datagram socketpair from a VMM shim or a test) is taken as declared.
        """
        try:
            raw = fcntl.ioctl(fd, TUNGETIFF, bytes(struct.calcsize(_IFREQ)))
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise PortError(f"fd {fd} is not an open file descriptor") from None
            _set_nonblocking(fd)
            return cls(fd, vnet=vnet, gso=vnet, name=name or f"fd{fd}", mac=mac, mtu=mtu)
        rawname, flags = struct.unpack(_IFREQ, raw)
        if not flags & IFF_TAP:
            raise PortError(f"fd {fd} is a TUN (L3) device; a TAP (Ethernet) one is required")
        if bool(flags & IFF_VNET_HDR) != vnet:
            have = "has" if flags & IFF_VNET_HDR else "lacks"
            raise PortError(f"fd {fd} {have} IFF_VNET_HDR but vnet={vnet} was given")
        gso = False
        if vnet:
            try:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            except OSError as exc:
                raise PortError(f"fd {fd}: TUNSETVNETHDRSZ: {exc.strerror}") from None
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, OFFLOADS)
                gso = True
            except OSError:
                gso = False  # still correct, just slower: the kernel segments for us
        _set_nonblocking(fd)
        ifname = name if name is not None else rawname.rstrip(b"\0").decode(errors="replace")
        return cls(fd, vnet=vnet, gso=gso, name=ifname, mac=mac, mtu=mtu)

    def close(self) -> None:
        """Close the fd, which also deletes a non-persistent TAP from the pod. Idempotent."""
        if self._closed:
            return
        self._closed = True
        os.close(self.fd)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self.fd}"
        return f"TapPort({self.name!r}, {state}, mac={self.mac}, mtu={self.mtu})"


def open_tun(ifname: str) -> int:
    """A non-blocking L3 TUN in the calling thread's namespace with vnet header + offloads."""
    fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    try:
        flags = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR
        fcntl.ioctl(fd, TUNSETIFF, struct.pack(_IFREQ, ifname.encode(), flags))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        fcntl.ioctl(fd, TUNSETOFFLOAD, OFFLOADS)
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def packed_mac(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def _tap_here(where: str, ifname: str, mac: bytes, mtu: int, ip: ipaddress.IPv4Address,
              prefixlen: int, gateway: ipaddress.IPv4Address | None
              ) -> tuple[TapPort, NetnsId]:
    """create_inside's body, in a thread inside the pod's namespace."""
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        pass
    else:
        raise PortError(f"{where}: an interface named {ifname!r} already exists")
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise PortError(f"{where}: cannot open {TUN_PATH}: {exc.strerror}") from None
    try:
        try:
            flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
            fcntl.ioctl(fd, TUNSETIFF, struct.pack(_IFREQ, ifname.encode(), flags))
            _set_vnet(fd)
            _set_nonblocking(fd)
            index = socket.if_nametoindex(ifname)
        except OSError as exc:
            raise PortError(f"{where}: TAP {ifname}: {exc.strerror}") from None
        try:
            lo: int | None = socket.if_nametoindex("lo")
        except OSError:
            lo = None
        rtnl.configure_here(where, index, mac, mtu, netlink.TXQLEN, ip, prefixlen, gateway,
                            lo)
        st = os.stat("/proc/thread-self/ns/net")
    except BaseException:
        os.close(fd)
        raise
    port = TapPort(fd, vnet=True, gso=True, name=ifname, mac=None, mtu=mtu)
    return port, (st.st_dev, st.st_ino)
