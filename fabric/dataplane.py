"""The I/O shell of the packet path: reads frames from port fds on the asyncio loop,
hands them to their namespace's router and writes what it returns.

One preallocated buffer serves every read (frames are routed to completion before the
next read), each wakeup drains a port until EAGAIN or a batch limit (fairness), and
router outputs are flushed right after the frame that made them, so order is kept.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time

from fabric.router import DROP_TX_ERROR, DROP_TX_FULL, Port, Router

log = logging.getLogger("fabricd.dataplane")

BATCH = 256
BUF_SIZE = 256 * 1024
TICK = 0.1


class DataPlane:
    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.buf = bytearray(BUF_SIZE)
        self.mv = memoryview(self.buf)
        self.routers: set[Router] = set()
        self.rx_errors = 0
        self._ticker: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._ticker = self.loop.call_later(TICK, self._tick)

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    def add_router(self, router: Router) -> None:
        self.routers.add(router)

    def remove_router(self, router: Router) -> None:
        self.routers.discard(router)

    def add_port(self, router: Router, port: Port) -> None:
        self.loop.add_reader(port.fd, self._readable, router, port)

    def remove_port(self, port: Port) -> None:
        try:
            self.loop.remove_reader(port.fd)
        except (ValueError, OSError):
            pass

    def _readable(self, router: Router, port: Port) -> None:
        buf = self.buf
        mv = self.mv
        bufs = [buf]
        readv = os.readv
        write = os.write
        receive = router.receive
        fd = port.fd
        now = time.monotonic()
        for _ in range(BATCH):
            try:
                n = readv(fd, bufs)
            except BlockingIOError:
                break
            except OSError as e:
                # A port whose device went away (ENETDOWN, EBADFD): stop reading it;
                # the namespace notices on detach.
                self.rx_errors += 1
                if e.errno in (errno.EBADF, errno.EBADFD, errno.ENODEV):
                    self.remove_port(port)
                break
            if n <= 0:
                break
            out = receive(port, buf, n, now)
            if out is not None:
                try:
                    write(out.fd, mv[:n])
                except BlockingIOError:
                    out.drop(DROP_TX_FULL)
                except OSError as e:
                    out.drop(DROP_TX_FULL if e.errno == errno.ENOBUFS else DROP_TX_ERROR)
            if router.outputs:
                self.flush(router)

    def flush(self, router: Router) -> None:
        outputs = router.outputs
        write = os.write
        for out, frame in outputs:
            if out.fd < 0:
                continue
            try:
                write(out.fd, frame)
            except BlockingIOError:
                out.drop(DROP_TX_FULL)
            except OSError as e:
                out.drop(DROP_TX_FULL if e.errno == errno.ENOBUFS else DROP_TX_ERROR)
        outputs.clear()

    def _tick(self) -> None:
        now = time.monotonic()
        try:
            for r in self.routers:
                t = r.next_timer()
                if t is not None and t <= now:
                    r.handle_timer(now)
                    if r.outputs:
                        self.flush(r)
        except Exception:  # never let a timer bug stop the ticker
            log.exception("router timer failed")
        self._ticker = self.loop.call_later(TICK, self._tick)
