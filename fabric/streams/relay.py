"""A spliced stream's bytes, moved by the kernel: socket -> pipe -> socket with splice(2).

Once a stream is spliced (the guest asked, or the fallback made it a proxy) neither
Python nor the guest needs to see its bytes; ``os.splice`` moves them between the two
sockets through a pipe per direction without copying them into the process. One
direction is a ``Pipe``: it reads from its source only while its pipe is empty, and
stops reading while the destination cannot take more (the pipe then holds at most one
read's worth, 64 KiB), so a stalled side stops the other instead of growing memory.
"""

from __future__ import annotations

import os
import socket

CHUNK = 64 << 10
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class Pipe:
    """One direction of a spliced pair (see module docstring). The shell calls
    ``pump()`` when the source is readable or the destination writable; it returns what
    the shell should watch next."""

    __slots__ = ("src", "dst", "r", "w", "held", "eof", "moved")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.held = 0  # bytes in the pipe, not yet in dst
        self.eof = False  # src ended and everything it sent is in dst
        self.moved = 0

    def pump(self) -> tuple[bool, bool]:
        """Move what can be moved now: (watch src for reading, watch dst for writing).
        Raises OSError when a side failed (the pair is then closed)."""
        src, dst = self.src.fileno(), self.dst.fileno()
        while True:
            if self.held:
                try:
                    n = os.splice(self.r, dst, self.held, flags=_FLAGS)
                except BlockingIOError:
                    return False, True
                self.held -= n
                self.moved += n
                if self.held:
                    return False, True
            if self.eof:
                return False, False
            try:
                n = os.splice(src, self.w, CHUNK, flags=_FLAGS)
            except BlockingIOError:
                return True, False
            if n == 0:
                self.eof = True
                try:
                    self.dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return False, False
            self.held = n

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.r = self.w = -1

