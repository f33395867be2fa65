"""fabric.streams.relay.Pipe on real loopback TCP sockets: bytes arrive whole and in
order, a destination that does not read holds the pipe at its capacity and stops the
source being read, and the end of the source reaches the destination as a FIN."""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator

import pytest

from fabric.streams.relay import DEFAULT_PIPE, Pipe


def _pair() -> tuple[socket.socket, socket.socket]:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    a = socket.create_connection(lst.getsockname())
    b, _ = lst.accept()
    lst.close()
    return a, b


@pytest.fixture
def chain() -> Iterator[tuple[socket.socket, socket.socket, socket.socket, socket.socket]]:
    """writer -> src ... dst -> reader: the pipe moves src to dst."""
    writer, src = _pair()
    dst, reader = _pair()
    for s in (writer, src, dst, reader):
        s.setblocking(False)
    yield writer, src, dst, reader
    for s in (writer, src, dst, reader):
        s.close()


def _run(p: Pipe, writer: socket.socket, reader: socket.socket, data: bytes,
         read: bool = True) -> bytes:
    """Feed `data` into writer and pump until the pipe is stuck or done; what reader got."""
    got = bytearray()
    sent = 0
    for _ in range(100000):
        if sent < len(data):
            try:
                sent += writer.send(data[sent:sent + (256 << 10)])
            except BlockingIOError:
                pass
            if sent == len(data):
                writer.shutdown(socket.SHUT_WR)
        want_r, want_w = p.pump()
        if read:
            while True:
                try:
                    chunk = reader.recv(1 << 20)
                except BlockingIOError:
                    break
                if not chunk:
                    return bytes(got)
                got += chunk
        elif not want_r and want_w and sent < len(data):
            return bytes(got)  # stuck on a destination that does not read
        if p.eof and not read:
            break
        select.select([p.src] if want_r else [], [p.dst] if want_w else [], [], 0.05)
    return bytes(got)


def test_bytes_arrive_in_order_and_the_end_becomes_a_fin(chain) -> None:
    writer, src, dst, reader = chain
    p = Pipe(src, dst)
    assert p.capacity >= DEFAULT_PIPE
    data = os.urandom(8 << 20)
    try:
        got = _run(p, writer, reader, data)
    finally:
        p.close()
    assert got == data
    assert p.eof and p.moved == len(data) and p.held == 0


def test_a_bulk_stream_grows_its_pipe_up_to_the_limit_and_no_further(chain) -> None:
    writer, src, dst, reader = chain
    limit = 256 << 10
    p = Pipe(src, dst, limit=limit)
    assert p.capacity == DEFAULT_PIPE  # an idle stream keeps a default pipe
    try:
        _run(p, writer, reader, os.urandom(64 << 20), read=False)
        assert p.pump() == (False, True)
        assert p.capacity == limit and p.held == limit
    finally:
        p.close()


def test_a_destination_that_does_not_read_bounds_the_pipe(chain) -> None:
    writer, src, dst, reader = chain
    small = 64 << 10
    p = Pipe(src, dst, limit=small)
    for s in (dst, reader):  # small socket buffers so that dst fills up soon
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    try:
        _run(p, writer, reader, os.urandom(64 << 20), read=False)
        assert p.pump() == (False, True)  # src not watched while the pipe is full
        assert 0 < p.held <= p.capacity
        assert not p.eof
    finally:
        p.close()


def test_a_tiny_pipe_still_moves_everything(chain) -> None:
    writer, src, dst, reader = chain
    p = Pipe(src, dst, limit=4096)  # a pipe of one page
    data = os.urandom(1 << 20)
    try:
        assert _run(p, writer, reader, data) == data
    finally:
        p.close()
