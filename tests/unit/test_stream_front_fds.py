"""A stream front out of descriptors (found by the hostile campaign: 1,000 connections
to a daemon a few hundred fds short of its limit made it spin, 133,660 failed accepts
in 2 s): connections it cannot accept are shed on a spare descriptor and counted, with
no spare it stops watching the listener for a while, and it accepts again once
descriptors are free. The process's own RLIMIT_NOFILE is lowered for the test (and
restored), so the failures are the kernel's."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fabric.streams import front as fr
from tests.unit.test_stream_front_thread import Guest, _exchange, _front


@contextmanager
def no_new_fds() -> Iterator[None]:
    """RLIMIT_NOFILE at the lowest free descriptor: no new one can be made."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest = os.dup(0)
    os.close(lowest)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def _spin(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def test_connections_past_the_fd_limit_are_shed_and_counted() -> None:
    async def main() -> None:
        front = _front(Guest(), None)
        port = front.listener.getsockname()[1]
        try:
            clients = [socket.create_connection(("127.0.0.1", port), timeout=5)
                       for _ in range(5)]  # in the backlog: the loop has not run yet
            with no_new_fds():
                await _spin(0.1)
            c = front.status()["counters"]
            assert c["accept_shed"] == 5 and c["streams_opened"] == 0, c
            for s in clients:
                assert s.recv(10) == b""  # closed, not left hanging
                s.close()
            # descriptors again: served as before
            assert await asyncio.to_thread(_exchange, port, b"hello") == b"hello"
        finally:
            front.close()

    asyncio.run(main())


def test_with_no_spare_the_listener_waits_instead_of_spinning() -> None:
    async def main() -> None:
        front = _front(Guest(), None)
        port = front.listener.getsockname()[1]
        try:
            clients = [socket.create_connection(("127.0.0.1", port), timeout=5)
                       for _ in range(3)]
            with no_new_fds():
                assert front._spare is not None
                os.close(front._spare)
                front._spare = None
                blocker = os.open(os.devnull, os.O_RDONLY)  # takes the spare's number
                try:
                    t0 = time.monotonic()
                    await _spin(0.3)
                    turns = (time.monotonic() - t0) / fr.ACCEPT_BACKOFF
                    c = front.status()["counters"]
                    # one failed accept per back-off, not one per loop turn
                    assert 1 <= c["accept_errors"] <= 2 * (turns + 1), (c, turns)
                    assert c["accept_shed"] == 0 and c["streams_opened"] == 0, c
                finally:
                    os.close(blocker)
            # descriptors again: the waiting connections are taken at the next turn
            deadline = time.monotonic() + 5
            while front.status()["counters"]["streams_opened"] < 3:
                assert time.monotonic() < deadline, front.status()["counters"]
                await asyncio.sleep(0.01)
            for s in clients:
                s.close()
        finally:
            front.close()

    asyncio.run(main())
