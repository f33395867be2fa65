"""Sockets made inside a pod's network namespace, for pod-local stream upstreams
(fabric.streams.podlocal): the namespace opened and checked to be the one the pod was
attached in, and sockets made there by a short-lived thread that joins it.

Network namespaces are per thread and a socket keeps the one it was created in, so the
thread that joins the pod only makes sockets and exits: nothing of the process stays
in the pod's namespace, and the caller (the data plane) never moves.
"""

from __future__ import annotations

import os
import socket
import threading
from concurrent.futures import Future
from typing import Protocol

from fabric.errors import PortError
from fabric.ports.netlink import join_netns, open_netns

NetnsId = tuple[int, int]


class Holder(Protocol):
    """What holds the pod's namespace fd: `fd` (-1 once closed), read and closed under
    `lock`, so the fd is never closed (and its number reused) under a setns."""

    name: str
    fd: int
    lock: threading.Lock


def open_exact(path: str, ident: NetnsId) -> int:
    """Open the namespace file at `path` (checked as for attaching: open_netns) and make
    sure it is still the namespace the pod was attached in: a pod whose netns was
    deleted and made anew under the same name must not get connections into either by
    mistake. OSError otherwise."""
    try:
        fd, _ = open_netns(path)
    except PortError as e:
        raise OSError(str(e)) from None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != ident:
        os.close(fd)
        raise OSError(f"{path} is not the namespace the pod was attached in")
    return fd


def _make_here(holder: Holder, count: int) -> list[socket.socket]:
    """In a fresh thread: join the pod's namespace, make `count` TCP sockets there."""
    with holder.lock:
        if holder.fd < 0:
            raise OSError(f"pod {holder.name}: detached")
        join_netns(holder.fd)
    out: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            s.setblocking(False)
            out.append(s)
    except OSError:
        for s in out:
            s.close()
        raise
    return out


def sockets_in(holder: Holder, count: int) -> Future[list[socket.socket]]:
    """`count` non-blocking TCP sockets made in the holder's namespace by a thread that
    joins it and then exits."""
    fut: Future[list[socket.socket]] = Future()
    fut.set_running_or_notify_cancel()

    def body() -> None:
        try:
            fut.set_result(_make_here(holder, count))
        except BaseException as e:  # handed to whoever waits
            fut.set_exception(e)

    threading.Thread(target=body, name="fabric-podlocal", daemon=True).start()
    return fut
