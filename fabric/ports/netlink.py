"""The one place that talks rtnetlink (via pyroute2).

Only the control path (creating and configuring ports) lands here, so pyroute2 is imported
lazily inside the functions: the data plane can import the port classes without paying for
pyroute2. Every failure surfaces as `PortError` with a message naming the namespace and the
interface, because that is what an operator needs to fix a pod.

Namespaces are always handled by absolute path (not name) so that `/run/netns/NAME` and
`/proc/PID/ns/net` behave the same. Work inside a pod's namespace runs in a short-lived
thread that setns()-es there (network namespaces are per thread) instead of pyroute2's
`IPRoute(netns=...)`, which forks a helper per call: forking a multi-threaded daemon with a
big data-plane heap is slow and risky, and pyroute2's default flags (O_CREAT) would silently
*create* a namespace that does not exist.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from fabric.config.specs import NETNS_DIR
from fabric.errors import PortError

if TYPE_CHECKING:
    from pyroute2 import IPRoute

IFNAMSIZ = 16
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)
CLONE_NEWNET = 0x40000000

T = TypeVar("T")

# A pod's TAP queue absorbs bursts while the data-plane thread is descheduled; the
# default 1000 frames overflowed under 100k packets/s of small datagrams.
TXQLEN = 4096


def check_ifname(ifname: str) -> None:
    """Reject names the kernel would refuse, before touching any state."""
    if (
        not ifname
        or len(ifname) >= IFNAMSIZ
        or ifname in (".", "..")
        or any(c in ifname for c in "/: \t\n")
    ):
        raise PortError(f"invalid interface name {ifname!r} (1-15 chars, no '/', ':' or spaces)")


NETNS_TIMEOUT = 10.0  # seconds a call inside a pod's namespace may take (netlink: ms)

_PROC_NS = "/proc/self/ns/net"  # on nsfs; this process's (main thread's) network namespace
# The initial network namespace's inode on recent kernels (PROC_NET_INIT_INO; older ones
# number it like the rest); others are numbered from 0xF0000000 up, so none can have it.
INIT_NET_INO = 0xEFFFFFF9


class NetnsCounters:
    """What went wrong with pods' namespaces, for /metrics (called from worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, key: str) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


#: refused_<why> per refusal reason, timeouts for calls given up on (fabric_netns_total)
counters = NetnsCounters()


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "a regular file"


def _refuse(why: str, netns: str, message: str) -> PortError:
    counters.add(f"refused_{why}")
    return PortError(f"netns {netns!r}: {message}")


def _netns_path(netns: str) -> str:
    if not netns:
        raise _refuse("invalid", netns, "empty")
    if "\0" in netns:
        raise _refuse("invalid", netns, "contains a NUL byte")
    if netns.startswith("/"):
        return netns
    if "/" in netns or netns in (".", ".."):
        raise _refuse("invalid", netns,
                      f"must be a name under {NETNS_DIR} or an absolute path")
    return os.path.join(NETNS_DIR, netns)


def _own_namespace(st: os.stat_result) -> str | None:
    """Why no pod may be plumbed into the namespace `st` is, or None: it is the daemon's own
    (its main thread's, or the calling thread's, where the fabric makes its TAPs) or the
    host's (the initial namespace, which recent kernels number INIT_NET_INO, or pid 1's
    where that can be read)."""
    if st.st_ino == INIT_NET_INO:
        return "the host's initial network namespace"
    for path, what in (("/proc/thread-self/ns/net", "the fabric's own network namespace"),
                       (_PROC_NS, "the fabric's own network namespace"),
                       ("/proc/1/ns/net", "the host's network namespace (pid 1's)")):
        try:
            own = os.stat(path)
        except OSError:
            continue  # pid 1's needs privileges to read; then it cannot be opened either
        if (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino):
            return what
    return None


def _is_netns(fd: int) -> bool:
    """NS_GET_NSTYPE (Linux 4.11); before it, the name nsfs gives the file (net:[ino])."""
    try:
        return bool(fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET)
    except OSError as exc:
        if exc.errno not in (errno.ENOTTY, errno.EINVAL):
            raise
    return os.readlink(f"/proc/self/fd/{fd}").startswith("net:[")


def _path_fd(path: str) -> int:
    """An O_PATH fd of `path` itself: no driver's open() runs and nothing blocks (a FIFO
    does not wait for a writer). A symbolic link is followed only if procfs made it
    (/proc/PID/ns/net); anyone can plant any other kind."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISLNK(st.st_mode) or st.st_dev != os.lstat(_PROC_NS).st_dev:
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return os.open(path, os.O_PATH | os.O_CLOEXEC)


def open_netns(netns: str) -> tuple[int, str]:
    """Open a pod's network namespace (a name under /run/netns or an absolute path):
    a read-only fd (the caller closes it) and the path.

    Whatever the path is, this has no side effect and cannot block: the path is opened
    with O_PATH, checked to be a regular file on nsfs, and only then is that same inode
    opened for real, through /proc/self/fd (the path cannot be swapped in between), with
    O_NONBLOCK, and checked again. nsfs is recognised by its device: the kernel has one
    internal nsfs, so every namespace file (/proc/PID/ns/*, a bind mount under /run/netns)
    has the st_dev of /proc/self/ns/net; that needs no struct statfs, whose layout differs
    between architectures (os.statvfs has no f_type). Then it must be a network namespace
    (NS_GET_NSTYPE) and neither the daemon's own nor the host's. A symbolic link is
    refused unless procfs made it. Every refusal is a one-line PortError, counted.
    """
    path = _netns_path(netns)
    try:
        nsfs = os.stat(_PROC_NS).st_dev
    except OSError as exc:
        raise _refuse("no_proc", netns, f"cannot check {path}: {_PROC_NS}: "
                                        f"{exc.strerror} (is /proc mounted?)") from None
    try:
        pfd = _path_fd(path)
    except FileNotFoundError:
        raise _refuse("missing", netns, f"does not exist ({path} not found)") from None
    except OSError as exc:
        raise _refuse("open", netns, f"cannot open {path}: {exc.strerror}") from None
    try:
        st = os.fstat(pfd)
        if stat.S_ISLNK(st.st_mode):
            raise _refuse("symlink", netns, f"{path} is a symbolic link; give the "
                                            "namespace file itself")
        if not stat.S_ISREG(st.st_mode) or st.st_dev != nsfs:
            raise _refuse("not_namespace", netns, f"{path} is {_kind(st.st_mode)}, not a "
                                                  "namespace file")
        fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _refuse("open", netns, f"cannot open {path}: {exc.strerror}") from None
    finally:
        os.close(pfd)
    try:
        again = os.fstat(fd)
        if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
            raise _refuse("changed", netns, f"{path} changed while it was opened")
        if not _is_netns(fd):
            raise _refuse("not_network", netns, f"{path} is a namespace, but not a "
                                                "network namespace")
        own = _own_namespace(st)
        if own is not None:
            raise _refuse("own", netns, f"{path} is {own}; a pod needs a namespace of "
                                        "its own")
    except OSError as exc:
        os.close(fd)
        raise _refuse("open", netns, f"checking {path}: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd, path


def resolve_netns(netns: str) -> str:
    """Turn a pod's `netns` into a path, checked as `open_netns` does, so a typo or a
    dangerous path fails here with a clear message instead of deep inside netlink."""
    fd, path = open_netns(netns)
    os.close(fd)
    return path


def _setns(fd: int) -> None:
    # os.setns only exists from Python 3.12; libc's symbols are in the interpreter itself.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def join_netns(fd: int) -> None:
    """Move the calling thread (only) into the network namespace `fd` refers to: for a
    thread that only makes sockets there and exits (fabric.ports.podsockets)."""
    _setns(fd)


def run_in_netns(netns: str, fn: Callable[..., T], *args: Any,
                 timeout: float = NETNS_TIMEOUT, **kwargs: Any) -> T:
    """Call `fn` in a throwaway thread that joined `netns`; returns or raises what it did.

    Only that thread changes namespace, so the caller (and the data plane) never does, and
    sockets opened by `fn` stay bound to `netns` (ifindex lookups, /proc/sys/net too).
    A call still running after `timeout` seconds is given up on (PortError, counted as
    `timeouts`): the caller, who may hold the fabric's lock, is never stuck behind it.
    """
    nsfd, _ = open_netns(netns)
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            _setns(nsfd)
        except OSError as exc:
            error.append(PortError(f"netns {netns!r}: setns failed: {exc.strerror}"))
            return
        finally:
            os.close(nsfd)  # this thread's: the caller may have stopped waiting
        try:
            result.append(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=body, name="fabric-netns", daemon=True)
    try:
        thread.start()
    except BaseException:
        os.close(nsfd)
        raise
    thread.join(timeout)
    if thread.is_alive():
        counters.add("timeouts")
        what = getattr(fn, "__name__", "a call")
        raise PortError(f"netns {netns!r}: {what} did not finish within {timeout:g}s "
                        "(given up on; is the system overloaded or netlink stuck?)")
    if error:
        raise error[0]
    return result[0]


@contextmanager
def _ipr() -> Iterator[IPRoute]:
    """An IPRoute bound to the calling thread's namespace, always closed."""
    from pyroute2 import IPRoute

    try:
        ipr = IPRoute()
    except OSError as exc:
        raise PortError(f"cannot open rtnetlink: {exc.strerror or exc}") from None
    with ipr:
        yield ipr


def _nl_error(exc: Exception) -> str:
    """A readable reason from a pyroute2 NetlinkError or OSError."""
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code > 0:
        return f"{os.strerror(code)} (errno {code})"
    return str(exc) or type(exc).__name__


def _lookup(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _exists_here(name: str) -> bool:
    with _ipr() as ipr:
        return _lookup(ipr, name) is not None


def link_exists(name: str, netns: str | None = None) -> bool:
    """Whether an interface `name` exists in the current namespace or in `netns`."""
    if netns is None:
        return _exists_here(name)
    return run_in_netns(netns, _exists_here, name)


def link_index(name: str) -> int:
    """Interface index in the current namespace; PortError if it is missing."""
    with _ipr() as ipr:
        index = _lookup(ipr, name)
    if index is None:
        raise PortError(f"interface {name!r} does not exist")
    return index


def move_link(index: int, netns: str) -> None:
    """Move interface `index` from the current namespace into `netns`.

    We pass our own fd rather than the name so the namespace cannot change between the
    check in open_netns and the move, and the fd is closed right away.
    """
    fd, _ = open_netns(netns)
    try:
        with _ipr() as ipr:
            ipr.link("set", index=index, net_ns_fd=fd)
    except PortError:
        raise
    except Exception as exc:
        reason = _nl_error(exc)
        raise PortError(f"moving interface #{index} into netns {netns!r}: {reason}") from None
    finally:
        os.close(fd)


def configure_pod_link(
    netns: str,
    current_name: str,
    ifname: str,
    mac: str,
    ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
    prefixlen: int,
    gateway: str | ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    mtu: int,
) -> None:
    """Inside `netns`: rename `current_name` to `ifname`, set MAC/MTU, address, up, default
    route via `gateway`, and bring `lo` up.

    Refuses (PortError) if `ifname` already exists there rather than guessing which of the
    two the pod should use. A half-configured link is left for the caller to delete (closing
    a TAP's fd does it).
    """
    check_ifname(ifname)
    try:
        addr = ipaddress.ip_address(str(ip))
        gw = ipaddress.ip_address(str(gateway)) if gateway is not None else None
    except ValueError as exc:
        raise PortError(f"pod interface {ifname!r}: {exc}") from None
    if not 0 <= prefixlen <= addr.max_prefixlen:
        raise PortError(f"prefix length {prefixlen} is out of range for {addr}")
    if gw is not None and gw.version != addr.version:
        raise PortError(f"gateway {gw} and address {addr} are of different IP versions")
    run_in_netns(netns, _configure_here, netns, current_name, ifname, mac, addr, prefixlen,
                 gw, mtu)  # fmt: skip


def _configure_here(
    netns: str,
    current_name: str,
    ifname: str,
    mac: str,
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
    prefixlen: int,
    gw: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    mtu: int,
) -> None:
    """configure_pod_link's body, run by a thread already inside the pod's namespace."""
    step = "opening rtnetlink"
    try:
        with _ipr() as ipr:
            step = f"looking up {current_name!r}"
            index = _lookup(ipr, current_name)
            if index is None:
                raise PortError(f"netns {netns!r}: interface {current_name!r} not found")
            if ifname != current_name and _lookup(ipr, ifname) is not None:
                raise PortError(f"netns {netns!r}: an interface named {ifname!r} already exists")
            step = f"setting name {ifname!r}, MAC {mac}, MTU {mtu}"
            ipr.link("set", index=index, state="down")  # renaming needs the link down
            ipr.link("set", index=index, ifname=ifname, address=mac, mtu=mtu, txqlen=TXQLEN)
            step = f"adding address {addr}/{prefixlen}"
            ipr.addr("add", index=index, address=str(addr), prefixlen=prefixlen)
            step = "bringing the link up"
            ipr.link("set", index=index, state="up")
            if gw is not None:
                step = f"adding default route via {gw}"
                dst = "0.0.0.0/0" if gw.version == 4 else "::/0"
                route: dict[str, Any] = {"dst": dst, "gateway": str(gw), "oif": index}
                ipr.route("add", **route)
            step = "bringing lo up"
            lo = _lookup(ipr, "lo")
            if lo is not None:
                ipr.link("set", index=lo, state="up")
    except PortError:
        raise
    except Exception as exc:
        raise PortError(f"netns {netns!r}, {ifname!r}: {step}: {_nl_error(exc)}") from None


def set_link(name: str, up: bool = True, mtu: int | None = None) -> int:
    """Set state (and optionally MTU) of `name` in the current namespace; returns its MTU.

    Returning the MTU saves callers a second netlink round trip (and /sys/class/net would
    show the namespace sysfs was mounted in, not the calling thread's).
    """
    try:
        with _ipr() as ipr:
            index = _lookup(ipr, name)
            if index is None:
                raise PortError(f"interface {name!r} does not exist")
            changes: dict[str, Any] = {"state": "up" if up else "down"}
            if mtu is not None:
                changes["mtu"] = mtu
            ipr.link("set", index=index, **changes)
            (msg,) = ipr.link("get", index=index)
            return int(msg.get_attr("IFLA_MTU"))
    except PortError:
        raise
    except Exception as exc:
        raise PortError(f"setting interface {name!r}: {_nl_error(exc)}") from None


def disable_ipv6(name: str, value: str = "1") -> str | None:
    """Best effort: stop the host stack from speaking IPv6 (RS, MLD, DAD) on a fabric port
    (`value` "0" gives it back). The value it had before, or None if it could not be done
    (IPv6 compiled out, interface gone); callers ignore that on purpose.

    /proc/sys/net follows the calling thread's namespace.
    """
    check_ifname(name)
    path = f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6"
    try:
        with open(path) as f:
            before = f.read().strip()
        if before != value:
            with open(path, "w") as f:
                f.write(value)
        return before
    except OSError:
        return None


def host_role(name: str) -> str | None:
    """Why an interface of this namespace must not become a pod port, or None: it carries
    addresses of its own or a route (the host's uplink, a bridge, the egress TUN), it is
    the loopback, or it is enslaved to a bridge or bond (docker's host end of a container's
    veth in docker0): that interface's traffic is the master's, and taking it would steal
    it from whoever is behind it."""
    try:
        with _ipr() as ipr:
            index = _lookup(ipr, name)
            if index is None:
                return None
            link = ipr.get_links(index)[0]
            if link.get("flags", 0) & 0x8:  # IFF_LOOPBACK
                return "it is the loopback interface"
            master = link.get_attr("IFLA_MASTER")
            if master:
                return f"it is a port of {_describe_link(ipr, master)}"
            addrs = [str(m.get_attr("IFA_ADDRESS")) for m in ipr.get_addr(index=index)
                     if m.get("scope", 0) == 0]  # global scope: link-local IPv6 is harmless
            if addrs:
                return f"it has addresses of this host ({', '.join(addrs[:3])})"
            for fam in (socket.AF_INET, socket.AF_INET6):
                for r in ipr.get_routes(family=fam, oif=index):
                    dst = r.get_attr("RTA_DST")
                    if r.get("table", 254) != 254 or r.get("type", 1) != 1:
                        continue  # local/broadcast entries and policy tables are not uses
                    if dst is not None and ipaddress.ip_address(dst).is_link_local:
                        continue  # IPv6's fe80::/64 comes with every interface that is up
                    return f"this host routes {dst or 'its default route'} through it"
    except Exception as exc:
        return f"it cannot be checked ({_nl_error(exc)})"
    return None


def _describe_link(ipr: IPRoute, index: int) -> str:
    """"bridge docker0", "bond bond0": a master by kind and name, for a refusal's text."""
    try:
        link = ipr.get_links(index)[0]
    except Exception:
        return f"the interface with index {index}"
    name = link.get_attr("IFLA_IFNAME") or f"index {index}"
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    return f"{kind} {name}" if kind else str(name)


def local_ipv4() -> tuple[ipaddress.IPv4Address, ...]:
    """Every IPv4 address of this namespace, sorted: what the host stack answers for."""
    try:
        with _ipr() as ipr:
            found = {ipaddress.IPv4Address(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS"))
                     for m in ipr.get_addr(family=socket.AF_INET)}
    except Exception as exc:
        raise PortError(f"reading this host's addresses: {_nl_error(exc)}") from None
    return tuple(sorted(found))


def replace_route(dst: str, ifname: str) -> None:
    """Route `dst` (a prefix) out of `ifname` in the current namespace (create or replace)."""
    try:
        with _ipr() as ipr:
            index = _lookup(ipr, ifname)
            if index is None:
                raise PortError(f"interface {ifname!r} does not exist")
            ipr.route("replace", dst=dst, oif=index)
    except PortError:
        raise
    except Exception as exc:
        raise PortError(f"routing {dst} to {ifname!r}: {_nl_error(exc)}") from None
