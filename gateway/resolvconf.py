"""resolv.conf for pods in named network namespaces.

`ip netns exec` (and anything using the same convention) bind-mounts
/etc/netns/<name>/resolv.conf over /etc/resolv.conf, so writing that file points the
pod's resolver at its namespace's gateway. Only files the fabric wrote are replaced or
removed: an operator's own file is left alone (and said so in the log). A file names the
pod it was written for (``namespace/pod``), so when two pods share a netns name the one
that detaches does not take the other's file with it.

A daemon killed with SIGKILL removes nothing. `sweep_stale()` (run when a `Fabric`
starts, and by `make sweep` as `python -m gateway.resolvconf --sweep`) removes our files
whose netns is gone: such a file only ever mattered to that netns, so it is stale
whoever wrote it, while one whose netns still exists may belong to another daemon on
the host and stays.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import stat
import sys
from collections.abc import Sequence

from fabric.config.specs import NETNS_DIR

log = logging.getLogger("fabricd.dns")

ETC_NETNS = "/etc/netns"
RUN_NETNS = NETNS_DIR  # where `ip netns` keeps the named namespaces' mount points
MARKER = "# written by fabricd for pod "
FILES = ("resolv.conf", "resolv.conf.fabricd-tmp")  # the file, and a write cut short
_HEAD = 4096  # the marker is on the first line; nothing past this is read


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


def sweep_stale(etc_netns: str | None = None, run_netns: str | None = None) -> list[str]:
    """Remove fabricd's files (the marker on their first line) under /etc/netns/<name>
    whose netns <name> no longer exists, and the directory when that leaves it empty.
    Returns the paths removed. Symlinks are never followed (a directory or file that is
    one is skipped), files without the marker are never touched, and what cannot be read
    or removed is logged and skipped: this runs at start and must not stop it."""
    etc = ETC_NETNS if etc_netns is None else etc_netns
    run = RUN_NETNS if run_netns is None else run_netns
    try:
        names = sorted(os.listdir(etc))
    except OSError:
        return []  # no /etc/netns (or not ours to read): nothing was written there
    removed: list[str] = []
    for name in names:
        if not _netns_gone(run, name):
            continue  # the netns exists: its file may be a live daemon's
        try:
            dfd = os.open(os.path.join(etc, name),
                          os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # a file, a symlink, or unreadable: not a directory we wrote
        took = False
        try:
            for file in FILES:
                path = os.path.join(etc, name, file)
                try:
                    pod = _unlink_if_ours(dfd, file)
                except OSError as e:
                    log.warning("stale %s: cannot remove it: %s", path, e.strerror)
                    continue
                if pod is not None:
                    log.info("removed stale %s (written by fabricd for pod %s; netns %s "
                             "is gone)", path, pod, name)
                    removed.append(path)
                    took = True
        finally:
            os.close(dfd)
        if took:
            try:
                os.rmdir(os.path.join(etc, name))
            except OSError:
                pass  # not empty: the other files are someone else's
    return removed


def _netns_gone(run: str, name: str) -> bool:
    """Whether `run`/<name> is certainly absent: anything there (a symlink, a file that
    is no mount point), or an error other than "no such file", counts as present."""
    try:
        os.lstat(os.path.join(run, name))
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def _unlink_if_ours(dfd: int, file: str) -> str | None:
    """Unlink `file` in the directory `dfd` if it is a regular file (not a symlink) with
    our marker; returns the pod its marker names, or None if it was left alone."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dfd)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ELOOP):
            return None  # absent, or a symlink: never ours
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None  # a FIFO or a device is never read, let alone removed
        head = os.read(fd, _HEAD).split(b"\n", 1)[0].decode("utf-8", "replace")
    finally:
        os.close(fd)
    if not head.startswith(MARKER):
        return None
    now = os.stat(file, dir_fd=dfd, follow_symlinks=False)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        return None  # replaced since we read it: whoever did so owns it
    os.unlink(file, dir_fd=dfd)
    return head[len(MARKER):].split(";", 1)[0]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m gateway.resolvconf --sweep`: what `make sweep` runs after the sandbox's
    sweep (fabric.tools may not import gateway/, so the sweep has its own entry)."""
    ap = argparse.ArgumentParser(prog="python -m gateway.resolvconf")
    ap.add_argument("--sweep", action="store_true",
                    help=f"remove fabricd's files under {ETC_NETNS} whose netns is gone")
    args = ap.parse_args(argv)
    if not args.sweep:
        ap.print_help()
        return 2
    for path in sweep_stale():
        print(f"removed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
