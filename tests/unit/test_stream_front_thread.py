"""The stream front on either thread (fabric.streams.front): on the data plane (its
default) and on the asyncio loop, relaying through a guest and splicing, over loopback
TCP; and the per-wakeup budget that bounds what guests take from the data plane."""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
from collections.abc import Sequence

import pytest

from fabric.activator import abi
from fabric.runtime.dataplane import DataPlane
from fabric.streams import front as fr
from fabric.streams.core import StreamCore
from fabric.streams.front import StreamFront


class Guest:
    """Echoes client bytes, or (splice=True) connects upstream and splices; records
    the thread of every call."""

    def __init__(self, splice: bool = False) -> None:
        self.splice = splice
        self.threads: set[str] = set()
        self.calls: list[list[abi.Event]] = []

    def process(self, port: int, events: Sequence[abi.Event], streams: int = 0
                ) -> list[abi.Action] | None:
        self.threads.add(threading.current_thread().name)
        self.calls.append(list(events))
        out: list[abi.Action] = []
        for e in events:
            if self.splice and isinstance(e, abi.StreamOpen):
                out.append(abi.UpstreamConnect(e.stream_id, 0))
            elif self.splice and isinstance(e, abi.UpstreamConnectResult) and e.ok:
                out.append(abi.Splice(e.stream_id))
            elif isinstance(e, abi.StreamData):
                out.append(abi.DownstreamSend(e.stream_id, e.data))
        return out


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def _front(guest: Guest, dp: DataPlane | None, backend_port: int = 0
           ) -> StreamFront:
    core = StreamCore(guest, 80, backend_port)
    return StreamFront(core, _listener(), socket.socket, lambda need: None, "test", dp)


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        return _send_recv(c, data)


def _send_recv(c: socket.socket, data: bytes) -> bytes:
    c.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = c.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


async def _ready(front: StreamFront) -> int:
    """Start the front with a ready backend; its port. On the data plane the backends are
    posted: a call after them returns once they are in, so the client's connection is
    never accepted first (its upstream_connect then finds none ready, answered ok=0, and
    the test guest, which does not retry, never splices)."""
    await front.start()
    front.backends(["127.0.0.1"])
    if front.dataplane is not None:
        await front.dataplane.acall(lambda: None)
    return front.listener.getsockname()[1]


async def _serve(front: StreamFront, data: bytes) -> bytes:
    port = await _ready(front)
    return await asyncio.to_thread(_exchange, port, data)


@pytest.mark.parametrize("on_dataplane", [True, False])
def test_a_guest_relays_on_the_thread_the_front_runs_on(on_dataplane: bool) -> None:
    dp = DataPlane()
    dp.start()
    guest = Guest()

    async def main() -> bytes:
        front = _front(guest, dp if on_dataplane else None)
        try:
            return await _serve(front, b"ping" * 1000)
        finally:
            front.close()
            await dp.acall(lambda: None)  # the posted close ran

    try:
        assert asyncio.run(main()) == b"ping" * 1000
    finally:
        dp.close()
    assert guest.threads == {"fabric-dataplane" if on_dataplane else "MainThread"}
    assert not dp.handlers  # a closed front leaves nothing registered


class _Echo(threading.Thread):
    """A loopback backend that echoes one connection."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = _listener()
        self.port = self.sock.getsockname()[1]

    def run(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            while chunk := conn.recv(65536):
                conn.sendall(chunk)
        self.sock.close()


@pytest.mark.parametrize("on_dataplane", [True, False])
def test_a_spliced_pair_relays_through_the_fronts_epoll(on_dataplane: bool) -> None:
    backend = _Echo()
    backend.start()
    dp = DataPlane()
    dp.start()
    guest = Guest(splice=True)
    data = bytes(range(256)) * 4096  # 1 MiB: bulk passes and their timer

    async def main() -> tuple[bytes, int]:
        front = _front(guest, dp if on_dataplane else None, backend.port)
        try:
            port = await _ready(front)
            c = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", port), 10)
            with c:
                # The bytes go once the pair is spliced: sent at once, they race the
                # upstream's connect, and the guest echoes what comes before its splice
                # itself (a client that read all of it back and closed first would see
                # no splice at all).
                deadline = time.monotonic() + 10
                while not (await front.astatus())["counters"]["spliced"]:
                    assert time.monotonic() < deadline, "the pair was never spliced"
                    await asyncio.sleep(0.01)
                got = await asyncio.to_thread(_send_recv, c, data)
            return got, (await front.astatus())["counters"]["spliced"]
        finally:
            front.close()
            await dp.acall(lambda: None)

    try:
        got, spliced = asyncio.run(main())
    finally:
        dp.close()
    assert got == data
    assert spliced == 1
    backend.join(10)


@pytest.mark.parametrize("on_dataplane", [True, False])
def test_a_bulk_pair_moves_to_the_splicer_and_a_closing_front_takes_it_back(
        on_dataplane: bool) -> None:
    """A pass that moved a bulk's worth hands the pair to the splicer thread (counted
    splices_handed); the bytes keep flowing from there, and a front that closes while
    the pair is live takes it back first: the client sees its connection end."""
    backend = _Echo()
    backend.start()
    dp = DataPlane()
    dp.start()
    guest = Guest(splice=True)
    data = bytes(range(256)) * 4096

    async def main() -> tuple[bytes, dict, bytes]:
        front = _front(guest, dp if on_dataplane else None, backend.port)
        try:
            port = await _ready(front)
            c = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", port), 10)
            deadline = time.monotonic() + 10
            while not (await front.astatus())["counters"]["spliced"]:
                assert time.monotonic() < deadline, "the pair was never spliced"
                await asyncio.sleep(0.01)
            got = await asyncio.to_thread(_send_recv, c, data)
            counters = dict((await front.astatus())["counters"])
            assert front.splicer is not None and front.splicer.owned() >= 1
        finally:
            front.close()
            await dp.acall(lambda: None)
        c.settimeout(10)
        try:
            tail = await asyncio.to_thread(c.recv, 65536)  # b"" (FIN) or a reset
        except ConnectionResetError:
            tail = b""
        c.close()
        return got, counters, tail

    try:
        got, counters, tail = asyncio.run(main())
    finally:
        dp.close()
    assert got == data
    assert counters["spliced"] == 1 and counters["splices_handed"] == 1, counters
    assert tail == b""
    backend.join(10)


def test_a_wakeup_past_its_budget_leaves_the_other_streams_to_the_next_turn(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Level-triggered readiness: what a wakeup did not reach is reported again, so a
    slow guest costs routing one call (bounded by its deadline) per turn, not one per
    ready stream."""
    monkeypatch.setattr(fr, "TURN_BUDGET", -1.0)  # always spent after one socket
    dp = DataPlane()  # not started: calls run inline, the test drives the wakeups
    guest = Guest()

    async def main() -> list[int]:
        front = _front(guest, dp)
        await front.start()
        port = front.listener.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            while len(front.pairs) < 3:  # one accept per wakeup: the budget is spent
                select.select([front.listener], [], [], 10)
                front._accept()
            for c in clients:
                c.sendall(b"x")
            while len(front._ep.poll(0)) < 3:  # all three readable
                select.select([front._ep.fileno()], [], [], 0.01)
            guest.calls.clear()
            sizes = []
            for _ in range(3):
                front._events()
                sizes.append(sum(isinstance(e, abi.StreamData) for e in guest.calls[-1]))
            return sizes
        finally:
            for c in clients:
                c.close()
            front.close()

    try:
        assert asyncio.run(main()) == [1, 1, 1]
    finally:
        dp.close()
