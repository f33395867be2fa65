"""`reopen_upstream`: an HTTP/2 client session that outlives its upstream connection.

With it, a backend that closes or sends GOAWAY while nothing it accepted is unfinished (a
stop, a restart, the backend's own idle timeout) leaves the client's connection open, and
the next request opens a new upstream. Without it, the default: the two-step GOAWAY.
The python ``h2`` library plays the client and each backend connection, so a header block
sent against a table the new backend never saw, or a window carried over from the old
connection, makes one of them raise.
"""

from __future__ import annotations

import h2.events
from hyperframe.frame import GoAwayFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.activator import abi
from tests.support.streamguest import StreamGuest, fuzz_step
from tests.unit.test_http2_activator import (
    ACTIVE,
    NONE,
    SID,
    WASM,
    Rig,
    client_conn,
    frames_of,
    req,
    server_conn,
)

REOPEN = {"hold_timeout_ms": 1000, "reopen_upstream": True}


def counted(r: Rig, name: str) -> int:
    return sum(a.n for a in r.g.actions if isinstance(a, abi.Count) and a.name == name)


def new_backend(r: Rig) -> None:
    """The host's answer to a second upstream_connect: a new h2 server."""
    r.s = server_conn()
    r.sev = []
    view = r.g.streams[SID]
    view.upstream.clear()  # what the old connection was sent and never read
    view.upstream_closed = False
    r.g.connected(SID)
    r.pump()


def test_backend_closing_an_idle_connection_keeps_the_client_session() -> None:
    r = Rig(REOPEN)
    try:
        r.c.send_headers(1, req("/one", x_trace="abc"), end_stream=True)
        r.pump()
        r.connect_backend()
        r.respond(1, body=b"first", extra=[("x-served-by", "old")])
        assert r.g.need == NONE
        r.g.backend_close(SID)  # the backend stops: nothing of this client was in flight
        assert not any(isinstance(f, GoAwayFrame) for f in frames_of(r.g.to_client(SID)))
        assert not r.g.streams[SID].downstream_closed
        assert counted(r, "upstreams_reopened") == 1
        # the client's next request, with the same headers (now indexed in the client's
        # table): held, a new upstream asked for, and it reaches a fresh backend whole
        r.c.send_headers(3, req("/one", x_trace="abc"), end_stream=True)
        r.pump()
        assert r.g.need == ACTIVE
        assert len(r.g.streams[SID].connects) == 2
        new_backend(r)
        got = [e for e in r.sev if isinstance(e, h2.events.RequestReceived)]
        assert [(e.stream_id, dict(e.headers)[":path"], dict(e.headers)["x-trace"])
                for e in got] == [(3, "/one", "abc")]
        r.respond(3, body=b"second", extra=[("x-served-by", "new")])
        resp = r.responses()
        assert resp[1]["x-served-by"] == "old" and resp[3]["x-served-by"] == "new"
        data = {e.stream_id: e.data for e in r.of(r.cev, h2.events.DataReceived)}
        assert data == {1: b"first", 3: b"second"}
        assert not r.of(r.cev, h2.events.ConnectionTerminated)
        assert r.g.need == NONE and r.g.failed == 0
    finally:
        r.close()


def test_backend_goaway_on_an_idle_connection_keeps_the_client_session() -> None:
    r = Rig(REOPEN)
    try:
        r.c.send_headers(1, req("/a"), end_stream=True)
        r.pump()
        r.connect_backend()
        r.respond(1, body=b"a")
        assert r.s is not None
        r.s.close_connection(last_stream_id=1)  # a graceful shutdown, or its idle timeout
        r.pump()
        assert not r.of(r.cev, h2.events.ConnectionTerminated)
        assert r.g.streams[SID].upstream_closed, "the old upstream is closed"
        r.c.send_headers(3, req("/b"), end_stream=True)
        r.pump()
        assert len(r.g.streams[SID].connects) == 2
        new_backend(r)
        r.respond(3, body=b"b")
        assert sorted(r.responses()) == [1, 3]
        assert counted(r, "backend_goaways") == 1 and counted(r, "upstreams_reopened") == 1
        assert r.g.failed == 0
    finally:
        r.close()


def test_a_request_sent_but_not_processed_is_refused_and_the_session_kept() -> None:
    """GOAWAY(last 1) while stream 3 was sent: the backend says it never processed it, so
    the client gets REFUSED_STREAM (safe to retry), not a GOAWAY, and its retry works."""
    r = Rig(REOPEN)
    try:
        r.c.send_headers(1, req("/a"), end_stream=True)
        r.pump()
        r.connect_backend()
        r.respond(1, body=b"a")
        r.c.send_headers(3, req("/b"), end_stream=True)
        r.pump()
        assert r.s is not None
        r.s.close_connection(last_stream_id=1)
        r.pump()
        resets = {e.stream_id: e.error_code for e in r.of(r.cev, h2.events.StreamReset)}
        assert resets == {3: 7}  # REFUSED_STREAM
        assert not r.of(r.cev, h2.events.ConnectionTerminated)
        r.c.send_headers(5, req("/b"), end_stream=True)
        r.pump()
        new_backend(r)
        r.respond(5, body=b"b")
        assert r.responses()[5][":status"] == "200"
    finally:
        r.close()


def test_a_backend_gone_with_a_request_in_flight_still_gets_the_two_step_goaway() -> None:
    r = Rig(REOPEN)
    try:
        r.c.send_headers(1, req("/slow"), end_stream=True)
        r.pump()
        r.connect_backend()
        r.g.backend_close(SID)  # stream 1 was accepted and is unfinished
        kinds = [type(f).__name__ for f in frames_of(r.g.to_client(SID))]
        assert kinds == ["RstStreamFrame", "GoAwayFrame", "PingFrame"], kinds
        assert counted(r, "upstreams_reopened") == 0
    finally:
        r.close()


def test_the_default_is_the_two_step_goaway_on_an_idle_connection() -> None:
    r = Rig()
    try:
        r.c.send_headers(1, req("/a"), end_stream=True)
        r.pump()
        r.connect_backend()
        r.respond(1)
        r.g.backend_close(SID)
        kinds = [type(f).__name__ for f in frames_of(r.g.to_client(SID))]
        assert kinds == ["GoAwayFrame", "PingFrame"], kinds
    finally:
        r.close()


def test_an_upstream_closed_before_its_settings_is_retried_a_second_later() -> None:
    """A server on its way down that still accepts and closes at once: the held request
    is connected again once a second, not in a loop, and served when one stays up."""
    r = Rig({**REOPEN, "hold_timeout_ms": 5000})
    try:
        r.g.tick(0)
        r.c.send_headers(1, req("/a"), end_stream=True)
        r.pump()
        assert len(r.g.streams[SID].connects) == 1
        r.g.connected(SID)
        r.g.backend_close(SID)  # closed before any SETTINGS
        r.pump()
        assert len(r.g.streams[SID].connects) == 1, "reconnected at once"
        r.g.tick(500)
        assert len(r.g.streams[SID].connects) == 1
        r.g.tick(1100)
        r.pump()
        assert len(r.g.streams[SID].connects) == 2
        new_backend(r)
        assert [e.stream_id for e in r.sev if isinstance(e, h2.events.RequestReceived)] == [1]
    finally:
        r.close()


def _pieces() -> list[bytes]:
    c = client_conn()
    c.send_headers(1, req("/x", x_k="v" * 40), end_stream=True)
    c.send_headers(3, req("/x", x_k="v" * 40), end_stream=False)
    s = server_conn()
    goaway = GoAwayFrame(0)
    goaway.last_stream_id = 1
    return [c.data_to_send(), s.data_to_send(), goaway.serialize(), b"\x00" * 9,
            b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"]  # a SETTINGS ACK


PIECES = _pieces()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 9), st.lists(st.integers(0, len(PIECES) - 1),
                                                       max_size=3), st.booleans()),
                max_size=40))
def test_fuzz_reopen_no_trap(steps: list[tuple[int, list[int], bool]]) -> None:
    """Random host events (connects that fail or succeed, backends that close, speak or
    send GOAWAY, ticks, availability) with `reopen_upstream`: no trap, ever."""
    g = StreamGuest(WASM, {"hold_timeout_ms": 300, "reopen_upstream": True})
    try:
        now = 0
        g.tick(now)
        for op, idx, ok in steps:
            now = fuzz_step(g, op, 1, [PIECES[i] for i in idx], ok, now)
        assert g.failed == 0
        assert g.host.stats.traps == 0 and g.host.stats.malformed == 0
    finally:
        g.close()
