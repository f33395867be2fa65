"""A PostgreSQL CancelRequest reaches the replica that runs its session.

A cancel arrives on a connection of its own, so the host, which picks a backend per
connection by a hash of the client's address and port, would send it to any replica;
one that never had the session drops it and the query runs on. The activator sees
each session's BackendKeyData go by and asks for the backend of the session a cancel
names (``upstream_connect_like``, ABI.md; the host's side of it is checked in
tests/unit/test_stream_connect_like.py). Checked on the guest alone and on the host's
core with the real postgres.wasm and two backends.
"""

from __future__ import annotations

import struct

from fabric.activator import abi
from fabric.activator.host import ActivatorHost
from fabric.streams import core as sc
from fabric.streams.core import StreamCore
from tests.support import pgwire as W
from tests.support.streamguest import StreamGuest
from tests.unit import test_postgres_activator as pa
from tests.unit.test_postgres_activator import WASM, rfq

guest = pa.guest  # the fixture

BACKENDS = ["10.0.0.3", "10.0.0.4"]


def cancel(pid: int, key: bytes) -> bytes:
    return struct.pack("!iii", 12 + len(key), 80877102, pid) + key


def greeting(pid: int, key: bytes) -> bytes:
    return (W.msg(b"R", struct.pack("!i", 0)) + W.msg(b"K", struct.pack("!i", pid) + key)
            + rfq())


def connect_of(core: StreamCore, sid: int) -> str:
    (cmd,) = [c for c in core.commands() if c[0] == sc.CONNECT and c[1] == sid]
    return cmd[2][0]  # type: ignore[index]


# ---- the guest: which session a cancel names --------------------------------------------


def _session(g: StreamGuest, sid: int, pid: int, key: bytes, cut: int = 0) -> None:
    g.open(sid)
    g.client(sid, W.startup())
    g.connected(sid)
    greet = greeting(pid, key)
    if cut:
        for i in range(0, len(greet), cut):
            g.backend(sid, greet[i:i + cut])
    else:
        g.backend(sid, greet)


def test_a_cancel_asks_for_the_backend_of_the_session_it_names(guest) -> None:
    g = guest()
    _session(g, 1, 4242, b"\0\0\0\x4d")
    _session(g, 2, 4242, b"\0\0\0\x4e")  # the same pid on another replica, another key
    _session(g, 3, 77, bytes(range(32)), cut=3)  # protocol 3.2: a 32-byte key, in pieces
    for sid, data, like in ((10, cancel(4242, b"\0\0\0\x4e"), [2]),
                            (11, cancel(4242, b"\0\0\0\x4d"), [1]),
                            (12, cancel(77, bytes(range(32))), [3]),
                            (13, cancel(77, bytes(32)), []),        # no session has that key
                            (14, cancel(4243, b"\0\0\0\x4d"), [])):
        g.open(sid)
        g.client(sid, data)
        assert g.streams[sid].connects == [0] and g.streams[sid].connects_like == like, sid
        g.connected(sid)
        assert g.to_backend(sid) == data and g.streams[sid].downstream_closed
    counts = {a.name: 0 for a in g.actions if isinstance(a, abi.Count)}
    for a in g.actions:
        if isinstance(a, abi.Count):
            counts[a.name] += a.n
    assert counts["cancels_matched"] == 3 and counts["cancels_forwarded"] == 5


def test_a_closed_session_is_no_cancels_target(guest) -> None:
    g = guest()
    _session(g, 1, 5, b"abcd")
    g.client_close(1)
    g.open(2)
    g.client(2, cancel(5, b"abcd"))
    assert g.streams[2].connects_like == []


# ---- both: the real activator on the core, two replicas -----------------------------------


def test_a_cancel_from_any_client_port_reaches_its_sessions_replica() -> None:
    core = StreamCore(ActivatorHost(WASM, {}), 5432, 5432)
    core.backends(BACKENDS, 0.0)
    sess = core.accepted(("10.0.0.2", 40000), 0.0)
    assert sess is not None
    core.client_data(sess, W.startup(), 0.01)
    backend = connect_of(core, sess)
    core.upstream_result(sess, True, 0.02)
    core.upstream_data(sess, greeting(31337, b"k3y!"), 0.03)
    core.client_data(sess, W.query("SELECT pg_sleep(60)"), 0.04)
    core.commands()
    for port in range(41000, 41020):
        sid = core.accepted(("10.0.0.2", port), 0.1)
        assert sid is not None
        core.client_data(sid, cancel(31337, b"k3y!"), 0.11)
        assert connect_of(core, sid) == backend, port
        core.upstream_result(sid, True, 0.12)
        cmds = core.commands()
        assert (sc.SEND_UPSTREAM, sid, cancel(31337, b"k3y!")) in cmds
