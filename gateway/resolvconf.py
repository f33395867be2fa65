"""resolv.conf for pods in named network namespaces.

`ip netns exec` (and anything using the same convention) bind-mounts
/etc/netns/<name>/resolv.conf over /etc/resolv.conf, so writing that file points the
pod's resolver at its namespace's gateway. Only files the fabric wrote are replaced or
removed: an operator's own file is left alone (and said so in the log). A file names the
pod it was written for (``namespace/pod``), so when two pods share a netns name the one
that detaches does not take the other's file with it.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("fabricd.dns")

ETC_NETNS = "/etc/netns"
MARKER = "# written by fabricd for pod "


def path_for(netns: str) -> str | None:
    """The resolv.conf path for a netns given by name; None for a path (no convention)."""
    if "/" in netns:
        return None
    return os.path.join(ETC_NETNS, netns, "resolv.conf")


def render(pod: str, nameserver: str, search: list[str]) -> str:
    return (f"{MARKER}{pod}; removed when it detaches\n"
            f"nameserver {nameserver}\n"
            f"search {' '.join(search)}\n"
            "options ndots:2 timeout:2 attempts:2\n")


def write(netns: str, pod: str, nameserver: str, search: list[str]) -> str | None:
    """Write the pod's resolv.conf; returns the path written, or None if skipped."""
    path = path_for(netns)
    if path is None:
        return None
    if os.path.exists(path) and not _ours(path):
        log.warning("pod %s: %s exists and was not written by fabricd; leaving it alone",
                    pod, path)
        return None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".fabricd-tmp"
    try:
        os.unlink(tmp)  # a leftover (or a planted symlink): never written through
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(render(pod, nameserver, search))
    os.replace(tmp, path)
    return path


def remove(netns: str, pod: str | None = None) -> None:
    """Remove the file if the fabric wrote it (for `pod`, when given)."""
    path = path_for(netns)
    if path is None or not os.path.exists(path) or not _ours(path, pod):
        return
    os.unlink(path)
    try:
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass  # not empty: other files belong to someone else


def _ours(path: str, pod: str | None = None) -> bool:
    want = MARKER if pod is None else f"{MARKER}{pod};"
    try:
        with open(path) as f:
            return f.readline().startswith(want)
    except OSError:
        return False
