"""Pod-local upstreams of stream ports (`upstream: pod-local`): the upstream socket of a
stream is made inside the backend pod's own network namespace and connects to the pod's
own IP there, so its bytes go over the pod's loopback instead of crossing the router a
second time (local stack -> router -> pod, and back; docs/performance.md, "Spliced
streams"). The backend then sees the pod's own IP as the peer.

Only a pod attached here through a netns (a TAP the fabric made for it) has a namespace
the fabric can enter. Anything else (a pod on another worker, an `interface:` pod such as
a microVM, a pod not attached, a namespace that is no longer the one it was attached in)
falls back to the VIP path for that connection, counted by reason.

The registry (``PodLocal``) lives on the thread of the stream fronts (the data plane):
the namespace posts `attach`/`detach` there as pods come and go. Nothing is opened for a
pod until a pod-local port first connects to it: then its namespace file is opened and
checked to be the namespace it was attached in, the fd held, and a small pool of sockets
made there by a short-lived thread that joins it (network namespaces are per thread; the
data-plane thread never moves); those two edges are fabric.ports.podsockets, handed
in. A detach, or an attach of the same IP anew, closes the fd and the pooled sockets, so
no later connection goes into the old namespace. Live streams keep their sockets (they
die with that namespace anyway).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from fabric.net.sockpool import SocketPool

log = logging.getLogger("fabricd.streams")

UPSTREAMS = ("vip", "pod-local")
POOL_SIZE = 16  # sockets kept ready per pod
BATCH = 16  # made at once (and waited for) when a pod's pool ran dry
BATCH_TIMEOUT = 1.0  # seconds the front waits for that batch before falling back

# Per connect of a pod-local port: made in the pod, or fallen back to the VIP and why.
CONNECTS = "pod_local_connects"
NOT_LOCAL = "pod_local_fallback_not_local"  # not a netns pod attached on this worker
NETNS = "pod_local_fallback_netns"  # its namespace could not be opened or has changed
NO_SOCKET = "pod_local_fallback_socket"  # no socket could be made in it
COUNTERS = (CONNECTS, NOT_LOCAL, NETNS, NO_SOCKET)

NetnsId = tuple[int, int]
# (path, identity) -> a held fd of that very namespace (OSError when it is not it)
OpenNetns = Callable[[str, NetnsId], int]
# (pod, count) -> a future of `count` sockets made in the pod's namespace
MakeSockets = Callable[["PodNs", int], "Future[list[socket.socket]]"]


class PodNs:
    """One attached netns pod as pod-local upstreams see it; its fd once opened."""

    __slots__ = ("name", "ip", "path", "ident", "fd", "pool", "broken", "lock")

    def __init__(self, name: str, ip: str, path: str, ident: NetnsId | None) -> None:
        self.name = name
        self.ip = ip
        self.path = path
        self.ident = ident
        self.fd = -1
        self.pool: SocketPool | None = None
        # its namespace cannot be entered (see PodLocal.attach) or could not be opened:
        # the VIP until it is attached again
        self.broken = ident is None
        # Held by a thread between reading `fd` and its setns, and by close(): the fd
        # is never closed (and its number reused) under a setns.
        self.lock = threading.Lock()

    def close(self) -> None:
        """Drop the pooled sockets and the namespace fd (idempotent)."""
        if self.pool is not None:
            self.pool.close()
        with self.lock:
            fd, self.fd = self.fd, -1
            self.broken = True
        if fd >= 0:
            os.close(fd)


class PodLocal:
    """The netns pods of one fabric namespace by IP, and their upstream sockets."""

    def __init__(self, open_netns: OpenNetns, make: MakeSockets) -> None:
        """The I/O edges (fabric.ports.podsockets in the daemon): `open_netns` opens
        and checks a pod's namespace, `make` makes sockets in it off this thread."""
        self._open = open_netns
        self._make = make
        self.pods: dict[str, PodNs] = {}

    def attach(self, name: str, ip: str, path: str, ident: NetnsId | None) -> None:
        """A netns pod was attached (again): connections go into this namespace now.
        `ident` None: one the fabric must not hold (a TAP moved into a namespace that
        is not watched, such as /proc/PID/ns/net: a held fd would keep it, and the TAP,
        alive after its process exits or its file is deleted, and the pod would never
        be seen gone), so its connections go through the VIP (counted as
        `pod_local_fallback_netns`)."""
        old = self.pods.pop(ip, None)
        if old is not None:
            old.close()
        self.pods[ip] = PodNs(name, ip, path, ident)

    def detach(self, name: str, ip: str) -> None:
        """The pod's port went (lost, removed): no new connection goes into it."""
        pod = self.pods.get(ip)
        if pod is not None and pod.name == name:
            del self.pods[ip]
            pod.close()

    def close(self) -> None:
        for pod in self.pods.values():
            pod.close()
        self.pods.clear()

    def socket(self, ip: str) -> tuple[socket.socket | None, str]:
        """A socket made in the namespace of the pod with address `ip`, and the counter
        this connect goes to; None with a fallback reason when it cannot be."""
        pod = self.pods.get(ip)
        if pod is None:
            return None, NOT_LOCAL
        if pod.broken:
            return None, NETNS
        if pod.pool is None:
            try:
                fd = self._open(pod.path, pod.ident)
            except OSError as e:
                pod.broken = True
                log.warning("pod %s: cannot enter its network namespace %s (%s); its "
                            "pod-local upstreams go through the VIP", pod.name, pod.path, e)
                return None, NETNS
            pod.fd = fd
            pod.pool = SocketPool(lambda n, p=pod: self._make(p, n), POOL_SIZE,
                                  "pod-local upstreams")
        sock = pod.pool.take()
        if sock is None:  # a burst: one batch, waited for
            fut: Future[list[socket.socket]] | None = None
            try:
                fut = self._make(pod, BATCH)
                socks = fut.result(BATCH_TIMEOUT)
            except Exception as e:  # noqa: BLE001 - any failure means the VIP path
                if fut is not None and not fut.done():  # made later: closed, not leaked
                    fut.add_done_callback(_close_result)
                log.warning("pod %s: no socket in its network namespace (%s)", pod.name, e)
                return None, NO_SOCKET
            if not socks:
                return None, NO_SOCKET
            sock = socks.pop()
            sock.setblocking(False)
            pod.pool.add(socks)
        return sock, CONNECTS

    def status(self) -> dict[str, Any]:
        return {ip: {"pod": p.name, "held": p.fd >= 0, "broken": p.broken,
                     "ready": len(p.pool) if p.pool is not None else 0}
                for ip, p in self.pods.items()}


def _close_result(fut: Future[list[socket.socket]]) -> None:
    try:
        socks = fut.result()
    except BaseException:  # noqa: BLE001 - nothing was made
        return
    for s in socks:
        s.close()
