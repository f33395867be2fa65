"""A fabric namespace's *local stack*: a private kernel network namespace behind a TUN.

The namespace's gateway address lives there, so the kernel answers ICMP echo to it, and
the fabric's own services (DNS, later L4-terminated service addresses) are ordinary
sockets opened inside it. The userspace router reaches it through the TUN fd (10-byte
virtio-net header + IPv4 packet, no Ethernet) like any other port.

Why a thread that unshare()s instead of `ip netns add`: the namespace then belongs to
nothing but this process. It needs no name under /run/netns (so two fabric namespaces
with the same CIDR never clash, and nothing is left behind when the process dies), and
it lives exactly as long as something references it: the thread, the netns fd, the TUN
fd and every socket opened in it. Network namespaces are per thread, so the rest of the
process (the data plane, asyncio) never moves.

Everything namespace-bound (netlink, /proc/sys/net, creating sockets) runs on that one
long-lived thread via `run()`. A socket keeps the namespace it was created in forever, so
once made it can be used from any thread or event loop.

Pitfalls this design avoids (see also fabric.ports.netlink):
- pyroute2's `IPRoute(netns=...)`/`NetNS` fork helpers and may *create* namespaces; a
  plain `IPRoute()` opened on the thread binds to the thread's namespace.
- /proc/sys/net follows the namespace of the thread that opens the file, but /proc/self/net
  and /sys/class/net do not (they show the process's / sysfs mount's namespace).
- Threads inherit their creator's namespace: anything spawned from the local stack's
  thread would keep the namespace alive after close(), so nothing is.
- Sockets handed out keep the namespace (and its fab0) alive until *they* are closed.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import queue
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from fabric.errors import PortError
from fabric.ports.netlink import CLONE_NEWNET, TXQLEN
from fabric.ports.tap import open_tun

T = TypeVar("T")

IFNAME = "fab0"
MIN_MTU = 576  # what IPv4 hosts must accept; the TUN itself would take down to 68
MAX_MTU = 65535
_IFREQ = "16sH22x"
_CLOSE_TIMEOUT = 10.0

# (path under /proc/sys/net, value). Written from the stack's thread, so they land in its
# namespace. IPv6 is switched off by default before fab0 exists so that it never sends a
# router solicitation or DAD probe into the fabric; the fab0 entry is belt and braces.
_SYSCTLS_BEFORE = (
    ("ipv6/conf/default/disable_ipv6", "1"),
    ("ipv4/conf/all/rp_filter", "0"),
    ("ipv4/conf/default/rp_filter", "0"),
    ("ipv4/ip_nonlocal_bind", "1"),  # bind service VIPs before their address is added
    ("ipv4/tcp_syncookies", "1"),
)
_SYSCTLS_FAB0 = (
    (f"ipv6/conf/{IFNAME}/disable_ipv6", "1"),
    (f"ipv4/conf/{IFNAME}/rp_filter", "0"),
    # Removing the gateway must not silently take extra addresses in its subnet with it.
    (f"ipv4/conf/{IFNAME}/promote_secondaries", "1"),
)

_libc: ctypes.CDLL | None = None


def _unshare_net() -> None:
    """Move the calling thread (only) into a fresh network namespace."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)  # libc symbols live in the interpreter
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _sysctl(path: str, value: str) -> None:
    with open(f"/proc/sys/net/{path}", "w") as f:
        f.write(value)


def _reason(exc: BaseException) -> str:
    """A readable reason from an OSError or a pyroute2 NetlinkError (code = errno)."""
    code = getattr(exc, "code", None)
    if not isinstance(code, int) or code <= 0:
        code = getattr(exc, "errno", None)
    if isinstance(code, int) and code > 0:
        return f"{os.strerror(code)} (errno {code})"
    return str(exc) or type(exc).__name__


def _errno(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    return getattr(exc, "errno", None)


class LocalStack:
    """The local stack of one fabric namespace; `fd` is its TUN port for the data plane."""

    fd: int
    netns_fd: int
    name: str
    ifname: str
    mtu: int
    vnet: bool = True
    gso: bool = True
    l3: bool = True  # IPv4 packets, no Ethernet header

    def __init__(
        self, name: str, cidr: ipaddress.IPv4Network, gateway: ipaddress.IPv4Address, mtu: int
    ) -> None:
        """Use `create()`: this only records the parameters."""
        self.name = name
        self.cidr = cidr
        self.gateway = gateway
        self.mtu = mtu
        self.ifname = IFNAME
        self.fd = -1
        self.netns_fd = -1
        self.netns_inode = 0
        self._ifindex = 0
        self._queue: queue.SimpleQueue[
            tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], Future[Any]] | None
        ] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._thread_ident: int | None = None
        self.thread_native_id: int | None = None

    # --- life cycle ----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        cidr: ipaddress.IPv4Network | str,
        gateway: ipaddress.IPv4Address | str,
        mtu: int,
    ) -> LocalStack:
        """Start the stack's thread, which makes and configures the namespace and fab0.

        Returns once everything is up; on failure the thread has exited and nothing is
        left (the namespace dies with its last reference).
        """
        try:
            net = ipaddress.IPv4Network(cidr)
            gw = ipaddress.IPv4Address(gateway)
        except ValueError as exc:
            raise PortError(f"local stack {name!r}: {exc}") from None
        if gw not in net:
            raise PortError(f"local stack {name!r}: gateway {gw} is outside {net}")
        if net.prefixlen < 31 and gw in (net.network_address, net.broadcast_address):
            raise PortError(
                f"local stack {name!r}: gateway {gw} is the network or broadcast address of {net}"
            )
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise PortError(f"local stack {name!r}: MTU {mtu} is outside {MIN_MTU}..{MAX_MTU}")
        stack = cls(name, net, gw, mtu)
        ready: Future[None] = Future()
        thread = threading.Thread(
            target=stack._serve, args=(ready,), name=f"localstack-{name}", daemon=True
        )
        stack._thread = thread
        thread.start()
        try:
            ready.result()
        except BaseException:
            thread.join(_CLOSE_TIMEOUT)
            stack._closed = True
            raise
        return stack

    def _serve(self, ready: Future[None]) -> None:
        """The thread's body: set the namespace up, then run requests until close()."""
        self._thread_ident = threading.get_ident()
        self.thread_native_id = threading.get_native_id()
        try:
            self._setup()
        except BaseException as exc:
            self._close_fds()
            if isinstance(exc, PortError):
                ready.set_exception(exc)
            else:
                ready.set_exception(PortError(f"local stack {self.name!r}: {_reason(exc)}"))
            return
        ready.set_result(None)
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args, kwargs, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to the caller's thread
                fut.set_exception(exc)

    def _setup(self) -> None:
        """Runs on the stack's thread: namespace, sysctls, TUN, addresses, routes."""
        where = f"local stack {self.name!r}"
        step = "unshare(CLONE_NEWNET)"
        try:
            _unshare_net()
            step = "opening /proc/thread-self/ns/net"
            self.netns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            self.netns_inode = os.fstat(self.netns_fd).st_ino
            for path, value in _SYSCTLS_BEFORE:
                step = f"sysctl net/{path}={value}"
                try:
                    _sysctl(path, value)
                except FileNotFoundError:
                    if not path.startswith("ipv6/"):  # IPv6 compiled out is fine
                        raise
            step = f"creating TUN {IFNAME}"
            self.fd = open_tun(IFNAME)
            for path, value in _SYSCTLS_FAB0:
                step = f"sysctl net/{path}={value}"
                try:
                    _sysctl(path, value)
                except FileNotFoundError:
                    if not path.startswith("ipv6/"):
                        raise
            step = "opening rtnetlink"
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                step = "bringing lo up"
                lo = ipr.link_lookup(ifname="lo")
                if lo:
                    ipr.link("set", index=lo[0], state="up")
                step = f"looking up {IFNAME}"
                found = ipr.link_lookup(ifname=IFNAME)
                if not found:
                    raise PortError(f"{where}: {IFNAME} vanished after creation")
                self._ifindex = found[0]
                step = f"setting {IFNAME} MTU {self.mtu}"
                ipr.link("set", index=self._ifindex, mtu=self.mtu, txqlen=TXQLEN)
                step = f"adding {self.gateway}/{self.cidr.prefixlen} to {IFNAME}"
                ipr.addr(
                    "add",
                    index=self._ifindex,
                    address=str(self.gateway),
                    prefixlen=self.cidr.prefixlen,
                )
                step = f"bringing {IFNAME} up"
                ipr.link("set", index=self._ifindex, state="up")
                # The connected route sends the CIDR to fab0; the default route sends
                # replies to anything else (other namespaces' pods, the outside) there too.
                step = f"adding default route dev {IFNAME}"
                ipr.route("add", dst="0.0.0.0/0", oif=self._ifindex)
        except PortError:
            raise
        except Exception as exc:
            raise PortError(f"{where}: {step}: {_reason(exc)}") from None

    def close(self) -> None:
        """Stop the thread and close the TUN and netns fds. Idempotent.

        The namespace (and fab0 in it) disappears once sockets opened by this stack are
        closed too. Unregister `fd` from the data plane first: closing it under a reader
        would let the number be reused for something else.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        thread = self._thread
        if thread is not None and thread.ident != threading.get_ident():
            thread.join(_CLOSE_TIMEOUT)
        self._close_fds()

    def _close_fds(self) -> None:
        for attr in ("fd", "netns_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                try:
                    os.close(fd)
                except OSError:
                    pass

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return self.fd

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self.fd}"
        return (
            f"LocalStack({self.name!r}, {state}, {self.gateway}/{self.cidr.prefixlen}, "
            f"mtu={self.mtu})"
        )

    # --- requests ------------------------------------------------------------------------

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call `fn` on the stack's thread (inside its namespace); return or raise its result.

        Called from that thread itself (e.g. from within another `run`), `fn` runs inline
        instead of queueing behind the caller, which would deadlock.
        """
        if threading.get_ident() == self._thread_ident:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Queue `fn` for the stack's thread without waiting: its future."""
        fut: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise PortError(f"local stack {self.name!r} is closed")
            self._queue.put((fn, args, kwargs, fut))
        return fut

    def tcp_sockets_later(self, src_ip: ipaddress.IPv4Address | str,
                          count: int) -> Future[list[socket.socket]]:
        """``tcp_sockets`` without waiting (for the probe pool on the data-plane thread)."""
        return self.submit(lambda: [_client_tcp(str(src_ip)) for _ in range(count)])

    def _do(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """`run` with OSError/NetlinkError turned into a PortError naming `what` failed."""
        try:
            return self.run(fn, *args)
        except PortError:
            raise
        except Exception as exc:
            raise PortError(f"local stack {self.name!r}: {what}: {_reason(exc)}") from None

    # --- addresses -----------------------------------------------------------------------

    def add_address(self, ip: ipaddress.IPv4Address | str, prefixlen: int = 32) -> None:
        """Add `ip/prefixlen` to fab0 (e.g. a service VIP); already present is fine."""
        addr = self._check_addr(ip, prefixlen)
        self._do(f"adding {addr}/{prefixlen}", self._addr_here, "add", addr, prefixlen)

    def remove_address(self, ip: ipaddress.IPv4Address | str, prefixlen: int = 32) -> None:
        """Remove `ip/prefixlen` from fab0; already absent is fine."""
        addr = self._check_addr(ip, prefixlen)
        self._do(f"removing {addr}/{prefixlen}", self._addr_here, "del", addr, prefixlen)

    def addresses(self) -> list[tuple[str, int]]:
        """The (address, prefixlen) pairs on fab0, for diagnostics and tests."""
        return self._do("listing addresses", self._list_here)

    def _check_addr(self, ip: ipaddress.IPv4Address | str, prefixlen: int) -> str:
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError as exc:
            raise PortError(f"local stack {self.name!r}: {exc}") from None
        if not 0 < prefixlen <= 32:
            raise PortError(f"local stack {self.name!r}: prefix length {prefixlen} is invalid")
        return str(addr)

    def _addr_here(self, op: str, addr: str, prefixlen: int) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            try:
                ipr.addr(op, index=self._ifindex, address=addr, prefixlen=prefixlen)
            except Exception as exc:
                code = _errno(exc)
                if op == "add" and code == errno.EEXIST:
                    return
                if op == "del" and code in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                    return
                raise

    def _list_here(self) -> list[tuple[str, int]]:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            return [
                (str(m.get_attr("IFA_ADDRESS")), int(m["prefixlen"]))
                for m in ipr.get_addr(family=socket.AF_INET, index=self._ifindex)
            ]

    # --- sockets -------------------------------------------------------------------------

    def listen_udp(
        self, ip: ipaddress.IPv4Address | str, port: int, reuse_addr: bool = False
    ) -> socket.socket:
        """A non-blocking UDP socket bound to ip:port inside the stack.

        No SO_REUSEADDR unless asked: on UDP it lets a second socket bind the same ip:port
        and silently take all unicast traffic from the first (measured: last bind wins),
        so a duplicate listener would hide instead of failing with EADDRINUSE.
        """
        return self._do(
            f"UDP listen on {ip}:{port}", _bound, socket.SOCK_DGRAM, str(ip), port, None,
            reuse_addr,
        )  # fmt: skip

    def listen_tcp(
        self, ip: ipaddress.IPv4Address | str, port: int, backlog: int = 1024
    ) -> socket.socket:
        """A non-blocking listening TCP socket on ip:port (SO_REUSEADDR: a restarted
        listener must not wait for TIME_WAIT connections) inside the stack."""
        return self._do(
            f"TCP listen on {ip}:{port}", _bound, socket.SOCK_STREAM, str(ip), port, backlog,
            True,
        )  # fmt: skip

    def udp_socket(self, src_ip: ipaddress.IPv4Address | str) -> socket.socket:
        """A non-blocking UDP socket bound to src_ip with an ephemeral port."""
        return self._do(
            f"UDP socket on {src_ip}", _bound, socket.SOCK_DGRAM, str(src_ip), 0, None, False
        )

    def tcp_sockets(self, src_ip: ipaddress.IPv4Address | str, count: int) -> list[socket.socket]:
        """Non-blocking TCP sockets bound to src_ip, made in the stack's namespace, for
        connects done elsewhere (an event loop's sock_connect): probes need no thread."""
        socks = self._do("TCP sockets", lambda: [_client_tcp(str(src_ip))
                                                 for _ in range(count)])
        for s in socks:
            s.setblocking(False)
        return socks

    def connect_tcp(
        self,
        src_ip: ipaddress.IPv4Address | str,
        dst_ip: ipaddress.IPv4Address | str,
        dst_port: int,
        timeout: float,
    ) -> socket.socket:
        """A TCP connection from src_ip (ephemeral port) to dst_ip:dst_port, non-blocking.

        Only creating and binding the socket needs the stack's thread; the blocking
        connect happens in the caller's thread, so a slow peer does not stall other
        requests (the socket is already bound to the namespace).
        """
        what = f"TCP connect {src_ip} -> {dst_ip}:{dst_port}"
        sock = self._do(what, _client_tcp, str(src_ip))
        try:
            sock.settimeout(timeout)
            sock.connect((str(dst_ip), dst_port))
            sock.setblocking(False)
        except TimeoutError:
            sock.close()
            raise PortError(
                f"local stack {self.name!r}: {what}: timed out after {timeout}s"
            ) from None
        except OSError as exc:
            sock.close()
            raise PortError(f"local stack {self.name!r}: {what}: {_reason(exc)}") from None
        return sock


def _bound(kind: int, ip: str, port: int, backlog: int | None, reuse_addr: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind | socket.SOCK_CLOEXEC)
    try:
        if reuse_addr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        if backlog is not None:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _client_tcp(src_ip: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind((src_ip, 0))
    except BaseException:
        sock.close()
        raise
    return sock
