"""Throwaway network namespaces for end-to-end tests.

Everything a test creates must live in a namespace named with the `fbt-` prefix so that
a crashed run can be swept without touching the host's real network.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from fabric.config.specs import NETNS_DIR

CLONE_NEWNET = 0x40000000

T = TypeVar("T")

_libc: ctypes.CDLL | None = None


def is_root() -> bool:
    return os.geteuid() == 0


def missing_prerequisites() -> str | None:
    """Why e2e tests cannot run here, or None; used as a pytest skip reason."""
    if not is_root():
        return "needs root (creates network namespaces and TAP devices)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    if shutil.which("ip") is None:
        return "iproute2 `ip` is not installed"
    return None


def ns_path(ns: str) -> str:
    return ns if ns.startswith("/") else os.path.join(NETNS_DIR, ns)


def run_in(
    ns: str | None,
    *cmd: str,
    check: bool = True,
    timeout: float = 10.0,
) -> subprocess.CompletedProcess[str]:
    """Run a command inside `ns` (or the current namespace if None), capturing text output."""
    argv = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def popen_in(ns: str, *cmd: str) -> subprocess.Popen[str]:
    """Start a background command in `ns`; the caller must wait()/kill() it."""
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def create_netns(prefix: str = "fbt") -> str:
    name = f"{prefix}-{secrets.token_hex(4)}"
    run_in(None, "ip", "netns", "add", name)
    try:
        run_in(name, "ip", "link", "set", "lo", "up")
    except BaseException:
        delete_netns(name)
        raise
    return name


def delete_netns(name: str) -> None:
    run_in(None, "ip", "netns", "delete", name, check=False)


@contextmanager
def test_netns(prefix: str = "fbt") -> Iterator[str]:
    """A fresh namespace `prefix-XXXXXXXX` that is deleted even if the test fails."""
    name = create_netns(prefix)
    try:
        yield name
    finally:
        delete_netns(name)


# Not a test, despite the name.
test_netns.__test__ = False  # type: ignore[attr-defined]


def sweep(prefix: str = "fbt-") -> list[str]:
    """Delete namespaces left behind by crashed runs; returns their names."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    gone = [n for n in names if n.startswith(prefix)]
    for name in gone:
        delete_netns(name)
    return gone


def _setns(path: str) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)  # libc symbols live in the interpreter
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in(ns: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` in a short-lived thread that joined `ns`.

    setns(CLONE_NEWNET) is per thread, so the test process itself never changes namespace;
    sockets and fds created by `fn` keep their namespace after the thread exits. This is
    how tests act as a fabric worker living in its own namespace.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            _setns(ns_path(ns))
            result.append(fn(*args, **kwargs))
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
