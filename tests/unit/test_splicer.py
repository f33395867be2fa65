"""The splicer thread (fabric.streams.splicer) with real loopback TCP sockets: a bulk
pair moves every byte both ways and comes back once both directions ended; a reclaimed
pair is let go at once and never handed back."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

from fabric.streams.relay import Pipe
from fabric.streams.splicer import Splicer


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        a = socket.create_connection(lst.getsockname())
        b, _ = lst.accept()
    return a, b


def spliced() -> tuple[socket.socket, socket.socket, socket.socket, socket.socket,
                       tuple[Pipe, Pipe]]:
    """client <-> front_c (spliced) front_u <-> server."""
    client, front_c = tcp_pair()
    front_u, server = tcp_pair()
    for s in (front_c, front_u):
        s.setblocking(False)
    return client, front_c, front_u, server, (Pipe(front_c, front_u), Pipe(front_u, front_c))


def test_a_bulk_pair_moves_every_byte_and_comes_back_when_both_ends_are_done() -> None:
    client, front_c, front_u, server, pipes = spliced()
    sp = Splicer("test-splicer")
    back: list[bool] = []
    done = threading.Event()
    payload = os.urandom(8 << 20)

    def finished(failed: bool) -> None:
        back.append(failed)
        done.set()

    assert sp.adopt("k", front_c, front_u, pipes, finished)

    def serve() -> None:
        server.sendall(payload)
        server.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := server.recv(65536):
            got += chunk
        assert got == b"upload"

    t = threading.Thread(target=serve)
    t.start()
    client.sendall(b"upload")
    client.shutdown(socket.SHUT_WR)
    h, n = hashlib.sha256(), 0
    while chunk := client.recv(1 << 20):
        h.update(chunk)
        n += len(chunk)
    t.join(10)
    assert n == len(payload) and h.digest() == hashlib.sha256(payload).digest()
    assert done.wait(5) and back == [False]
    assert pipes[1].moved == len(payload) and pipes[0].moved == 6
    assert sp.owned() == 0 and sp.passes > 0
    for s in (client, front_c, front_u, server):
        s.close()
    for p in pipes:
        p.close()


def test_a_reclaimed_pair_is_let_go_at_once_and_never_handed_back() -> None:
    client, front_c, front_u, server, pipes = spliced()
    sp = Splicer("test-splicer")
    back: list[bool] = []
    assert sp.adopt("k", front_c, front_u, pipes, back.append)
    server.sendall(b"x" * 100_000)
    deadline = time.monotonic() + 5
    got = 0
    while got < 100_000 and time.monotonic() < deadline:
        got += len(client.recv(65536))
    t0 = time.monotonic()
    sp.reclaim("k")
    assert time.monotonic() - t0 < 1.0
    assert sp.owned() == 0
    for s in (front_c, front_u):  # the front may close them now
        s.close()
    for p in pipes:
        p.close()
    server.sendall(b"more")
    time.sleep(0.05)
    assert back == []
    sp.reclaim("unknown")  # a key it does not hold returns at once
    client.close()
    server.close()


def test_a_failed_side_hands_the_pair_back_as_failed() -> None:
    client, front_c, front_u, server, pipes = spliced()
    sp = Splicer("test-splicer")
    back: list[bool] = []
    done = threading.Event()
    assert sp.adopt("k", front_c, front_u, pipes,
                    lambda failed: (back.append(failed), done.set()))
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    server.close()  # a reset toward the front's upstream socket
    assert done.wait(5)
    assert back == [True] and sp.owned() == 0
    for s in (client, front_c, front_u):
        s.close()
    for p in pipes:
        p.close()
