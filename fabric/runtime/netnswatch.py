"""Noticing that a pod's network namespace was deleted, when its TAP holds it alive.

A TAP made inside the pod's namespace (TapPort.create_inside, the fast way) keeps that
namespace alive: `ip netns del` only removes its name, reads never fail, and the pod
would never be seen to go. So the directories holding those names (/run/netns) are
watched with inotify: one fd on the event loop, woken only when a name comes or goes
(nothing per pod, nothing per tick), and then only the pods at that one path are
checked: is the namespace there still the one their TAP lives in?

Paths that cannot be watched (/proc/PID/ns/net, or no inotify) are not for this: their
pods get a TAP made in the worker and moved (TapPort.create), which dies with the
namespace.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fabricd.netnswatch")

IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_DELETE_SELF = 0x400
IN_Q_OVERFLOW = 0x4000
MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len

NetnsId = tuple[int, int]
Gone = Callable[[], None]


def identity(path: str) -> NetnsId | None:
    """The (st_dev, st_ino) of the namespace file at `path`, None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class NetnsWatch:
    """Calls a pod's `gone` once the namespace at its path is not the one it was given."""

    def __init__(self) -> None:
        self._libc: Any = None
        self.fd = -1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            self._libc, self.fd = libc, fd
        except (OSError, AttributeError) as e:
            log.warning("no inotify (%s): TAPs are made in the worker and moved", e)
        self._dirs: dict[str, int] = {}  # directory -> watch descriptor
        self._wd: dict[int, str] = {}
        # path -> token -> (the namespace's identity, what to call when it is not there)
        self._pods: dict[str, dict[int, tuple[NetnsId, Gone]]] = {}
        self._token = 0
        self.events = 0

    @property
    def available(self) -> bool:
        return self.fd >= 0

    def can_watch(self, path: str) -> bool:
        """Whether the deletion of `path` would be seen: a directory inotify can watch
        (not procfs, where /proc/PID/ns/net goes with its process, unseen)."""
        if not self.available or path.startswith("/proc/"):
            return False
        d = os.path.dirname(path)
        return d in self._dirs or self._add_dir(d)

    def _add_dir(self, d: str) -> bool:
        wd = self._libc.inotify_add_watch(self.fd, d.encode(), MASK)
        if wd < 0:
            err = ctypes.get_errno()
            if err not in (errno.ENOENT, errno.ENOTDIR):
                log.warning("cannot watch %s: %s", d, os.strerror(err))
            return False
        self._dirs[d] = wd
        self._wd[wd] = d
        return True

    def add(self, path: str, ident: NetnsId, gone: Gone) -> int:
        """Watch `path` for a pod whose TAP lives in namespace `ident`; a token for
        remove(). If the namespace is already gone, `gone` is called now."""
        self._token += 1
        self._pods.setdefault(path, {})[self._token] = (ident, gone)
        if identity(path) != ident:
            self._check(path)
        return self._token

    def remove(self, path: str, token: int) -> None:
        pods = self._pods.get(path)
        if pods is not None:
            pods.pop(token, None)
            if not pods:
                del self._pods[path]

    def readable(self) -> None:
        """Read the events (on the event loop) and check the pods at the paths named."""
        paths: set[str] = set()
        overflow = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            off = 0
            while off + _EVENT.size <= len(data):
                wd, mask, _, n = _EVENT.unpack_from(data, off)
                name = data[off + _EVENT.size:off + _EVENT.size + n].split(b"\0", 1)[0]
                off += _EVENT.size + n
                self.events += 1
                if mask & IN_Q_OVERFLOW:
                    overflow = True
                d = self._wd.get(wd)
                if d is None:
                    continue
                if mask & IN_DELETE_SELF:
                    overflow = True  # the directory went: check everything under it
                elif name:
                    paths.add(os.path.join(d, os.fsdecode(name)))
        for path in list(self._pods) if overflow else paths:
            self._check(path)

    def _check(self, path: str) -> None:
        pods = self._pods.get(path)
        if not pods:
            return
        now = identity(path)
        for token, (ident, gone) in list(pods.items()):
            if ident != now:
                pods.pop(token, None)
                try:
                    gone()
                except Exception:
                    log.exception("netns %s: handling its deletion failed", path)
        if not pods:
            self._pods.pop(path, None)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
