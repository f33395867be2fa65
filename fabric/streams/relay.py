"""A spliced stream's bytes, moved by the kernel: socket -> pipe -> socket with splice(2).

Once a stream is spliced (the guest asked, or the fallback made it a proxy) neither
Python nor the guest needs to see its bytes; ``os.splice`` moves them between the two
sockets through a pipe per direction without copying them into the process (the pipe
holds references to the socket buffers' pages). One direction is a ``Pipe``.

Each call asks for all the room the pipe has, and a pipe that a read filled grows
(F_SETPIPE_SZ, doubling up to ``PIPE_SIZE``): a default pipe has 16 slots (64 KiB), so
a bulk transfer cost two system calls under the GIL per 64 KiB; grown, one pass of the
shell moves what the socket holds. Only streams that fill their pipe grow it, so a pool
of mostly idle connections keeps default pipes (pipe capacity counts against the
user's pipe-user-pages quota even when empty; a refused growth just keeps the size it
has). The bound stays: a direction reads from its source only while its pipe has room,
so a stalled side holds at most one pipe's worth (``capacity`` bytes) and then stops
the other.
"""

from __future__ import annotations

import fcntl
import os
import socket

PIPE_SIZE = 1 << 20  # bytes a direction may hold in its pipe (kernel rounds to pages)
DEFAULT_PIPE = 64 << 10
# A read shorter than this (and than asked) drained its source: the pass ends without
# another read to see EAGAIN. Bulk reads are larger and keep looping (a pipe short of
# slots also cuts a read short).
SMALL_READ = 16 << 10
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _resize(fd: int, size: int) -> int | None:
    """Ask for a pipe of `size` bytes: what it got, or None when refused (the user's
    pipe page quota or fs.pipe-max-size may say no; a smaller pipe still works)."""
    try:
        return int(fcntl.fcntl(fd, _SETPIPE_SZ, size))
    except OSError:
        return None


class Pipe:
    """One direction of a spliced pair (see module docstring). The shell calls
    ``pump()`` when the source is readable or the destination writable; it returns what
    the shell should watch next."""

    __slots__ = ("src", "dst", "r", "w", "held", "ended", "eof", "moved", "capacity",
                 "limit")

    def __init__(self, src: socket.socket, dst: socket.socket,
                 limit: int = PIPE_SIZE) -> None:
        self.src = src
        self.dst = dst
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.capacity = DEFAULT_PIPE
        if limit < DEFAULT_PIPE:  # (tests) a smaller bound than the default
            self.capacity = _resize(self.w, limit) or DEFAULT_PIPE
        self.limit = max(limit, self.capacity)  # how far the pipe may grow
        self.held = 0  # bytes in the pipe, not yet in dst
        self.ended = False  # src sent its FIN
        self.eof = False  # ... and everything it sent is in dst, which was shut for writing
        self.moved = 0

    def pump(self) -> tuple[bool, bool]:
        """Move what can be moved now: (watch src for reading, watch dst for writing).
        Raises OSError when a side failed (the pair is then closed).

        Writes while the pipe holds bytes and reads while it has room, and returns once
        neither can go on: the destination full (watch it), the source drained (watch
        it), both, or the pipe full (watch only the destination: the bound)."""
        r, w, cap = self.r, self.w, self.capacity
        src, dst = self.src.fileno(), self.dst.fileno()
        held = self.held
        splice = os.splice
        drained = False  # a small read came back short: the source had no more then
        try:
            while True:
                while held:
                    try:
                        n = splice(r, dst, held, flags=_FLAGS)
                    except BlockingIOError:
                        break
                    held -= n
                    self.moved += n
                if self.ended:
                    if held:
                        return False, True
                    if not self.eof:
                        self.eof = True
                        try:
                            self.dst.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                    return False, False
                if drained:
                    # No read to see EAGAIN: readiness is level-triggered, so bytes
                    # that came meanwhile are reported again (a query and its answer
                    # are one splice each way, not two).
                    return True, held > 0
                if held >= cap:
                    if cap < self.limit:  # a bulk stream: room for more per call
                        got = _resize(w, min(cap * 2, self.limit))
                        if got is not None and got > cap:
                            cap = self.capacity = got
                            continue
                        self.limit = cap  # refused: do not ask again
                    return False, True
                want = cap - held
                try:
                    n = splice(src, w, want, flags=_FLAGS)
                except BlockingIOError:
                    return True, held > 0
                if n == 0:
                    self.ended = True
                else:
                    held += n
                    drained = n < want and n < SMALL_READ
        finally:
            self.held = held

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.r = self.w = -1
