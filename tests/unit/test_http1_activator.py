"""The HTTP/1.1 activator (activators/http1/) through the real wasm host.

Real HTTP/1.1 implementations play the peers: ``h11`` as the client and as the backend
(each parses every byte the activator hands it, so a response out of order, a body cut
short or a header block mangled makes it raise), and ``http.client.HTTPResponse`` reads
the activator's own answers. The test plays the host's side of the sockets only.
"""

from __future__ import annotations

import io
import socket
from http.client import HTTPResponse
from pathlib import Path
from typing import Any

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.activator import abi
from tests.support.streamguest import StreamGuest

WASM = Path(__file__).resolve().parents[2] / "activators" / "http1" / "http1.wasm"
SID = 1
NONE, ACTIVE = 0, 2


class KeptOpen(io.BytesIO):
    """HTTPResponse closes its file at a response's end; the next one reads on."""

    def close(self) -> None:
        pass


class FakeSock:
    """Enough of a socket for http.client.HTTPResponse to read bytes from."""

    def __init__(self, data: bytes) -> None:
        self.f = KeptOpen(data)

    def makefile(self, mode: str) -> io.BytesIO:
        return self.f


def responses(data: bytes, n: int, method: str | list[str] = "GET"
              ) -> list[tuple[int, dict[str, str], bytes]]:
    """Read n responses from data with http.client, the way a real client would."""
    sock = FakeSock(data)
    out = []
    methods = [method] * n if isinstance(method, str) else method
    for i in range(n):
        r = HTTPResponse(sock, method=methods[i])  # type: ignore[arg-type]
        r.begin()
        out.append((r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()))
    assert sock.f.read() == b"", "bytes after the last response"
    return out


def request(method: str = "GET", target: str = "/", body: bytes | None = None,
            **headers: str) -> bytes:
    """A request as h11's client writes it."""
    c = h11.Connection(h11.CLIENT)
    hs = [("Host", "svc")] + [(k.replace("_", "-"), v) for k, v in headers.items()]
    if body is not None and "Transfer-Encoding" not in dict(hs) and \
            "transfer-encoding" not in {k.lower() for k, _ in hs}:
        hs.append(("Content-Length", str(len(body))))
    out = c.send(h11.Request(method=method, target=target, headers=hs))
    if body is not None:
        out += c.send(h11.Data(data=body)) if body else b""
        out += c.send(h11.EndOfMessage())
    else:
        out += c.send(h11.EndOfMessage())
    return out


class Backend:
    """An h11 server on the upstream side of one stream."""

    def __init__(self) -> None:
        self.h = h11.Connection(h11.SERVER)
        self.requests: list[tuple[h11.Request, bytes]] = []
        self._body = b""
        self._req: h11.Request | None = None

    def feed(self, data: bytes) -> None:
        self.h.receive_data(data)
        self._drain()

    def _drain(self) -> None:
        while True:
            ev = self.h.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return
            if isinstance(ev, h11.Request):
                self._req, self._body = ev, b""
            elif isinstance(ev, h11.Data):
                self._body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                assert self._req is not None
                self.requests.append((self._req, self._body))
            elif isinstance(ev, h11.ConnectionClosed):
                return

    def respond(self, body: bytes, status: int = 200, chunked: bool = False,
                close: bool = False) -> bytes:
        hs = [("X-Backend", "yes")]
        hs.append(("Transfer-Encoding", "chunked") if chunked
                  else ("Content-Length", str(len(body))))
        if close:
            hs.append(("Connection", "close"))
        out = self.h.send(h11.Response(status_code=status, headers=hs))
        if body:
            out += self.h.send(h11.Data(data=body))
        out += self.h.send(h11.EndOfMessage())
        if self.h.our_state is h11.DONE and self.h.their_state is h11.DONE:
            self.h.start_next_cycle()
            self._drain()  # pipelined requests it paused on
        return out


@pytest.fixture
def g() -> Any:
    guest = StreamGuest(WASM, {"hold_timeout_ms": 2000})
    yield guest
    assert guest.failed == 0
    guest.close()


def counters(g: StreamGuest, now: int = 10**6) -> dict[str, int]:
    """The guest's counters (it sends them at a tick: one is given first)."""
    g.tick(now)
    out: dict[str, int] = {}
    for a in g.actions:
        if isinstance(a, abi.Count):
            out[a.name] = out.get(a.name, 0) + a.n
    return out


def wake(g: StreamGuest, sid: int = SID) -> Backend:
    """The backend comes up and the stream's upstream connects."""
    g.available()
    assert g.streams[sid].connects == [0]
    g.connected(sid)
    return Backend()


# ---------------------------------------------------------------- health checks


def test_healthz_is_answered_locally_and_wakes_nothing(g: StreamGuest) -> None:
    g.open(SID)
    g.client(SID, request("GET", "/healthz"))
    (st1, h1, b1), = responses(g.to_client(SID), 1)
    assert st1 == 200 and b1 == b"ok\n" and h1["content-type"] == "text/plain"
    g.client(SID, request("HEAD", "/healthz?probe=1") + request("GET", "/healthz"))
    (st2, h2, b2), (st3, _, b3) = responses(g.to_client(SID), 2, method=["HEAD", "GET"])
    assert st2 == 200 and b2 == b"" and h2["content-length"] == "3" and b3 == b"ok\n"
    assert g.need in (None, NONE) and not g.streams[SID].connects
    assert counters(g)["health_answered"] == 3
    assert not g.streams[SID].downstream_closed  # keep-alive


def test_configured_health_checks_and_http10() -> None:
    g = StreamGuest(WASM, {"health": [
        {"method": "OPTIONS", "path": "/ping", "status": 204, "body": ""},
        {"path": "/status", "status": 200, "body": "{\"up\":true}",
         "content_type": "application/json"}]})
    g.open(SID)
    g.client(SID, b"OPTIONS /ping HTTP/1.1\r\nHost: a\r\n\r\n")
    (s, _, b), = responses(g.to_client(SID), 1)
    assert s == 204 and b == b""
    g.client(SID, b"GET /status HTTP/1.0\r\n\r\n")  # HTTP/1.0: closed after the answer
    (s, h, b), = responses(g.to_client(SID), 1)
    assert s == 200 and b == b'{"up":true}' and h["connection"] == "close"
    assert h["content-type"] == "application/json"
    assert g.streams[SID].downstream_closed and g.need in (None, NONE)
    g.open(2)
    g.client(2, b"GET /status HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    (s, h, _), = responses(g.to_client(2), 1)
    assert s == 200 and h["connection"] == "keep-alive" and not g.streams[2].downstream_closed
    g.client(2, request("GET", "/healthz"))  # not configured any more: a real request
    assert g.need == ACTIVE and g.to_client(2) == b""
    g.close()


@pytest.mark.parametrize("cfg", [
    {"health": "nope"}, {"health": [{"path": "healthz"}]},
    {"health": [{"path": "/x", "status": 99}]}, {"health": [{"path": "/" + "x" * 300}]},
    {"health": [{"path": "/x", "method": "G T"}]}])
def test_bad_health_config_is_refused(cfg: dict[str, Any]) -> None:
    from fabric.activator.host import ActivatorHost

    h = ActivatorHost(WASM, cfg)
    try:
        assert h.process(80, [abi.StreamOpen(1, 80)], 0) is None  # init failed: unusable
    finally:
        h.close()


def test_health_checks_go_to_the_backend_once_it_is_up(g: StreamGuest) -> None:
    g.available()
    g.open(SID)
    g.client(SID, request("GET", "/healthz"))
    assert g.streams[SID].connects == [0] and g.to_client(SID) == b""
    g.connected(SID)
    be = Backend()
    be.feed(g.to_backend(SID))
    assert be.requests[0][0].target == b"/healthz"
    g.backend(SID, be.respond(b"backend says ok"))
    (s, h, b), = responses(g.to_client(SID), 1)
    assert b == b"backend says ok" and h["x-backend"] == "yes"
    assert g.need in (None, NONE)  # a relayed health check pins nothing
    assert counters(g)["health_relayed"] == 1


# ---------------------------------------------------------------- real requests


def test_real_request_wakes_is_held_and_relayed(g: StreamGuest) -> None:
    g.open(SID)
    g.client(SID, request("GET", "/real"))
    assert g.need == ACTIVE and not g.streams[SID].connects  # no backend yet: wake
    assert g.to_client(SID) == b""
    be = wake(g)
    be.feed(g.to_backend(SID))
    assert [r.target for r, _ in be.requests] == [b"/real"]
    g.backend(SID, be.respond(b"hello", chunked=True))
    (s, h, b), = responses(g.to_client(SID), 1)
    assert s == 200 and b == b"hello"
    assert g.need == ACTIVE  # debounced: none at the next tick
    g.tick(100)
    g.tick(200)
    assert g.need == NONE  # an idle keep-alive connection pins nothing
    # the next request on the same connection goes straight up
    g.client(SID, request("POST", "/again", body=b"x" * 5000))
    assert g.need == ACTIVE
    be.feed(g.to_backend(SID))
    assert be.requests[1][1] == b"x" * 5000
    g.backend(SID, be.respond(b""))
    assert responses(g.to_client(SID), 1)[0][0] == 200


def test_pipelined_requests_keep_their_order_around_local_answers() -> None:
    g = StreamGuest(WASM, {"health_local_when_ready": True})
    g.open(SID)
    pipe = (request("GET", "/a") + request("GET", "/healthz") + request("GET", "/b")
            + request("GET", "/healthz", Connection="close"))
    g.client(SID, pipe)
    assert g.to_client(SID) == b""  # /healthz waits behind /a
    be = wake(g)
    raw = g.to_backend(SID)
    assert raw.count(b"GET /") == 2 and b"/healthz" not in raw  # both sent on at once
    be.feed(raw)
    g.backend(SID, be.respond(b"A"))
    assert [r.target for r, _ in be.requests] == [b"/a", b"/b"]
    got = g.to_client(SID)
    assert [r[2] for r in responses(got, 2)] == [b"A", b"ok\n"]  # the local one after A
    g.backend(SID, be.respond(b"B"))
    got = g.to_client(SID)
    assert [r[2] for r in responses(got, 2)] == [b"B", b"ok\n"]
    assert g.streams[SID].downstream_closed  # Connection: close on the last one
    assert g.failed == 0
    g.close()


def test_pipelined_bytes_split_at_every_offset(g: StreamGuest) -> None:
    pipe = (request("GET", "/healthz") + request("POST", "/p", body=b"q" * 300)
            + request("POST", "/c", body=b"chunky", Transfer_Encoding="chunked"))
    g.available()
    for cut in range(1, len(pipe), 7):
        sid = 100 + cut
        g.open(sid)
        g.client(sid, pipe[:cut])
        g.client(sid, pipe[cut:])
        g.connected(sid)
        be = Backend()
        be.feed(g.to_backend(sid))
        g.backend(sid, be.respond(b"1") + be.respond(b"2"))
        g.backend(sid, be.respond(b"3"))
        assert [(r.target, b) for r, b in be.requests] == [
            (b"/healthz", b""), (b"/p", b"q" * 300), (b"/c", b"chunky")], cut
        assert [r[2] for r in responses(g.to_client(sid), 3)] == [b"1", b"2", b"3"]


def test_chunked_body_with_trailers_passes_byte_for_byte(g: StreamGuest) -> None:
    g.open(SID)
    body = (b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n0\r\nX-Sum: 42\r\n\r\n")
    g.client(SID, body)
    be = wake(g)
    sent = g.to_backend(SID)
    assert sent == body
    be.feed(sent)
    assert be.requests[0][1] == b"hello"


def test_expect_100_continue_while_held(g: StreamGuest) -> None:
    """No 100 from the activator while the backend sleeps: the client sends its body
    after its own wait (curl: 1 s), it is held, and the backend's 100 is relayed."""
    g.open(SID)
    head = (b"PUT /f HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
            b"Expect: 100-continue\r\n\r\n")
    g.client(SID, head)
    assert g.to_client(SID) == b"" and g.need == ACTIVE
    g.client(SID, b"data")
    wake(g)
    assert g.to_backend(SID) == head + b"data"
    g.backend(SID, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n"
              b"Content-Length: 0\r\n\r\n")
    out = g.to_client(SID)
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert responses(out[len(b"HTTP/1.1 100 Continue\r\n\r\n"):], 1)[0][0] == 201


def test_hold_timeout_is_a_503_with_retry_after_and_close() -> None:
    g = StreamGuest(WASM, {"hold_timeout_ms": 1000, "retry_after_s": 7})
    g.tick(1)
    g.open(SID)
    g.client(SID, request("GET", "/slow"))
    g.tick(500)
    assert g.to_client(SID) == b""
    g.tick(1001)
    (s, h, b), = responses(g.to_client(SID), 1)
    assert s == 503 and h["retry-after"] == "7" and h["connection"] == "close"
    assert g.streams[SID].downstream_closed
    g.tick(1200)
    assert g.need == NONE and counters(g)["hold_timeouts"] == 1
    g.close()


def test_backend_connection_close_and_backend_going_away(g: StreamGuest) -> None:
    g.open(SID)
    g.client(SID, request("GET", "/a"))
    be = wake(g)
    be.feed(g.to_backend(SID))
    g.backend(SID, be.respond(b"bye", close=True))
    (s, h, b), = responses(g.to_client(SID), 1)
    assert b == b"bye" and g.streams[SID].downstream_closed
    # an idle connection whose backend closes stays open and reconnects for the next
    g.open(2)
    g.client(2, request("GET", "/x"))
    g.connected(2)
    be2 = Backend()
    be2.feed(g.to_backend(2))
    g.backend(2, be2.respond(b"x"))
    g.to_client(2)
    g.backend_close(2)
    assert not g.streams[2].downstream_closed
    g.client(2, request("GET", "/y"))
    assert g.streams[2].connects == [0, 0]
    g.connected(2)
    assert b"/y" in g.to_backend(2)
    g.backend_close(2)  # ... and one cut before its answer is a 502
    (s, _, _), = responses(g.to_client(2), 1)
    assert s == 502 and g.streams[2].downstream_closed


def test_unsolicited_backend_bytes_on_an_idle_connection_drop_only_the_upstream(
        g: StreamGuest) -> None:
    g.open(SID)
    g.client(SID, request("GET", "/a"))
    be = wake(g)
    be.feed(g.to_backend(SID))
    g.backend(SID, be.respond(b"a"))
    g.to_client(SID)
    g.backend(SID, b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n")
    assert g.to_client(SID) == b"" and g.streams[SID].upstream_closed
    assert not g.streams[SID].downstream_closed
    g.client(SID, request("GET", "/b"))  # a new upstream for the next request
    assert g.streams[SID].connects == [0, 0]


def test_client_pause_when_its_hold_is_full(g: StreamGuest) -> None:
    g.open(SID)
    g.client(SID, b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n")
    g.client(SID, b"z" * 20000)
    assert g.streams[SID].paused
    wake(g)
    assert not g.streams[SID].paused
    g.client(SID, b"z" * 80000)
    sent = g.to_backend(SID)
    assert sent.endswith(b"z" * 100000)


def test_upgrade_is_spliced_after_101(g: StreamGuest) -> None:
    g.open(SID)
    g.client(SID, b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket"
             b"\r\n\r\n\x81\x05hello")
    wake(g)
    assert g.to_backend(SID).endswith(b"\r\n\r\n")
    g.backend(SID, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    assert g.streams[SID].spliced and g.to_backend(SID) == b"\x81\x05hello"


# ---------------------------------------------------------------- malformed input


@pytest.mark.parametrize("raw,status", [
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
     400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\nHost: a\n\n\r\n\r\n", 400),
    (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 501),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 17000 + b"\r\n\r\n", 431),
])
def test_ambiguous_or_malformed_requests_get_an_error_and_close(
        g: StreamGuest, raw: bytes, status: int) -> None:
    g.open(SID)
    g.client(SID, raw + request("GET", "/smuggled"))
    (s, h, _), = responses(g.to_client(SID), 1)
    assert s == status and h["connection"] == "close"
    assert g.streams[SID].downstream_closed
    assert g.need in (None, NONE) and not g.streams[SID].connects  # nothing relayed


def test_bad_chunk_framing_after_relaying_closes_both_sides(g: StreamGuest) -> None:
    g.available()
    g.open(SID)
    g.connected(SID) if g.streams[SID].connects else None
    g.client(SID, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    g.connected(SID)
    g.client(SID, b"zz\r\n")
    assert g.streams[SID].upstream_closed and g.streams[SID].downstream_closed
    (s, _, _), = responses(g.to_client(SID), 1)
    assert s == 400


# ---------------------------------------------------------------- fuzz


def _mutate(data: bytes, pos: int, byte: int) -> bytes:
    if not data:
        return bytes([byte])
    pos %= len(data)
    return data[:pos] + bytes([byte]) + data[pos + 1:]


SAMPLES = [request("GET", "/healthz"), request("POST", "/p", body=b"abc"),
           request("POST", "/c", body=b"xyz", Transfer_Encoding="chunked"),
           b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: x\r\n\r\n"]
RESP = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\nto the end"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 3), st.integers(0, 4000),
                          st.integers(0, 255), st.binary(max_size=64)), max_size=14))
def test_fuzz_no_trap_no_malformed_batch(steps: list[tuple[int, int, int, int, bytes]]
                                         ) -> None:
    g = StreamGuest(WASM, {"hold_timeout_ms": 300})
    try:
        g.open(SID)
        now = 0
        for op, which, pos, byte, blob in steps:
            if op == 0:
                g.client(SID, _mutate(SAMPLES[which], pos, byte))
            elif op == 1:
                g.client(SID, blob)
            elif op == 2:
                g.backend(SID, _mutate(RESP[which], pos, byte))
            elif op == 3:
                g.available() if which else g.unavailable()
            elif op == 4:
                g.connected(SID, ok=bool(which))
            elif op == 5:
                now += 150
                g.tick(now)
            elif op == 6:
                (g.client_close if which % 2 else g.backend_close)(SID)
            else:
                g.client(SID, SAMPLES[which] * (1 + byte % 40))
            assert g.failed == 0
    finally:
        g.close()


def test_http_client_over_a_socketpair_gets_the_local_answer(g: StreamGuest) -> None:
    """http.client, unmodified, on one end of a socketpair; the test relays its bytes."""
    import http.client

    a, b = socket.socketpair()
    try:
        conn = http.client.HTTPConnection("svc")
        conn.sock = a
        conn.request("GET", "/healthz")
        g.open(SID)
        g.client(SID, b.recv(65536))
        b.sendall(g.to_client(SID))
        r = conn.getresponse()
        assert r.status == 200 and r.read() == b"ok\n"
    finally:
        a.close()
        b.close()


def test_a_flood_of_pipelined_health_checks_is_answered_in_full(g: StreamGuest) -> None:
    """Each 36-byte request earns a ~100-byte answer: at most 512 local answers per call
    (bounded fuel and answer size), the rest waits in the connection's hold (the client
    paused) and is answered at the next ticks."""
    g.open(SID)
    one = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
    n = 60000 // len(one)
    g.client(SID, one * n)
    assert g.streams[SID].paused
    g.client(SID, one * n)  # a read the pause came too late for
    sent, got = 2 * n, g.to_client(SID)
    for t in range(1, 80):
        if not g.streams[SID].paused and sent < 4 * n:  # the host reads again
            g.client(SID, one * n)
            sent += n
        g.tick(100 * t)
        got += g.to_client(SID)
    assert len(responses(got, 4 * n)) == 4 * n
    assert g.need in (None, NONE) and not g.logs and not g.streams[SID].paused


SMUGGLE = SAMPLES[:3] + [
    b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
    b"\r\n0\r\n\r\n",
    b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\nTrailer: x\r\n\r\n",
    b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Length: 26\r\n\r\n"
    b"GET /hidden HTTP/1.1\r\nH: \r\n",
    b"GET /d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"\r\nGET /e HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(SMUGGLE) - 1), st.integers(0, 400),
                          st.integers(0, 511)), min_size=1, max_size=6),
       st.integers(1, 300))
def test_fuzz_what_reaches_the_backend_is_framed_as_the_activator_framed_it(
        reqs: list[tuple[int, int, int]], cut: int) -> None:
    """Request smuggling, differentially: mutated pipelines go through the activator with
    a backend up; whatever it relays, an independent parser (h11) must read as exactly
    the requests the activator counted, none more (no request hidden in another's body),
    with nothing left over but an unfinished last one."""
    g = StreamGuest(WASM, {})
    try:
        g.available()
        g.open(SID)
        pipe = b"".join(SMUGGLE[w] if byte > 255 else _mutate(SMUGGLE[w], pos, byte)
                        for w, pos, byte in reqs)
        g.client(SID, pipe[:cut])
        if g.streams[SID].connects:
            g.connected(SID)
        g.client(SID, pipe[cut:])
        assert g.failed == 0
        sent = g.to_backend(SID)
        c = counters(g)
        relayed = c.get("requests", 0) + c.get("health_relayed", 0)
        h = h11.Connection(h11.SERVER)
        h.receive_data(sent)
        seen = 0
        while True:
            ev = h.next_event()
            if ev is h11.NEED_DATA:
                break
            if isinstance(ev, h11.EndOfMessage) and h.their_state is h11.MUST_CLOSE:
                rest = bytes(h.trailing_data[0])  # h11 has no HTTP/1.0 keep-alive:
                h = h11.Connection(h11.SERVER)    # read on with a fresh parser
                h.receive_data(rest)
                continue
            if ev is h11.PAUSED:
                h.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                h.send(h11.EndOfMessage())
                h.start_next_cycle()
                continue
            if isinstance(ev, h11.Request):
                seen += 1
            if isinstance(ev, h11.InformationalResponse | h11.ConnectionClosed):
                break
        assert seen == relayed, (sent, relayed, seen)
    finally:
        g.close()


# --- slowloris (found by tests/e2e/test_hostile_streams.py) ----------------------------------


def test_a_head_that_never_completes_is_answered_408_and_closed() -> None:
    """A byte a second of a head kept a connection (of the 1,024) for ever: past
    head_timeout_ms from the tick that first saw it, 408 and a close, counted; the
    timer starts again with each head, and a held request is left to the hold timeout."""
    g = StreamGuest(WASM, {"hold_timeout_ms": 60000, "head_timeout_ms": 3000})
    try:
        g.available()
        g.open(1)
        g.open(2)
        g.open(3)
        t = 10_000
        g.tick(t)
        g.client(1, b"GET / HTTP/1.1\r\nHo")
        g.client(2, b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\nGET /b HT")  # one relayed first
        g.unavailable()
        g.client(3, request())  # held for a backend, not slow
        for _ in range(29):
            t += 100
            g.tick(t)
            g.client(1, b"s")  # a byte now and then changes nothing
        assert not g.streams[1].downstream_closed and g.to_client(1) == b""
        t += 3000
        g.tick(t)
        st = responses(g.to_client(1), 1)[0][0]
        assert st == 408 and g.streams[1].downstream_closed
        assert not g.streams[2].downstream_closed  # its head waits behind /a's answer
        assert not g.streams[3].downstream_closed and g.to_client(3) == b""
        assert counters(g, t + 100).get("head_timeouts") == 1
        assert g.failed == 0
    finally:
        g.close()


# ---------------------------------------------------------------- the host's promises broken


def test_more_than_an_answer_holds_closes_the_stream_with_an_error_not_a_hole() -> None:
    """The host reads at most 64 KiB of stream bytes a call, so a relay's answer (640 KiB)
    never fills. A host that breaks that (here: 700 KiB from the client in one event)
    makes a send not fit: the bytes that did not fit cannot reach the backend, so its
    request has a hole. The upstream is closed, the client gets 503 and a close, and it
    is counted (answer_overflows); nothing more of the request goes on."""
    guest = StreamGuest(WASM, {"hold_timeout_ms": 2000}, max_batch_bytes=4 << 20)
    try:
        guest.open(SID)
        guest.client(SID, request("GET", "/first"))  # connects the upstream
        be = wake(guest)
        be.feed(guest.to_backend(SID))
        guest.backend(SID, be.respond(b"first"))
        assert responses(guest.to_client(SID), 1)[0][2] == b"first"
        body = b"b" * 700_000
        guest.client(SID, request("POST", "/big", body=body))
        up = guest.to_backend(SID)
        assert up.startswith(b"POST /big HTTP/1.1\r\n") and len(up) < len(body)
        assert guest.streams[SID].upstream_closed
        (st, h, _), = responses(guest.to_client(SID), 1, "POST")
        assert st == 503 and h["connection"] == "close"
        assert guest.streams[SID].downstream_closed
        guest.client(SID, b"more")  # a late read is dropped
        assert guest.to_backend(SID) == b""
        assert counters(guest)["answer_overflows"] == 1
        assert guest.failed == 0
    finally:
        guest.close()


def test_a_response_larger_than_an_answer_is_cut_with_a_close() -> None:
    """The same from the backend's side: 700 KiB of a response in one event. The part
    that did not fit never reaches the client, so the response is cut the HTTP/1 way
    (the connection closed before its Content-Length is complete), both sides closed,
    counted; nothing after the hole is sent."""
    guest = StreamGuest(WASM, {"hold_timeout_ms": 2000}, max_batch_bytes=4 << 20)
    try:
        guest.open(SID)
        guest.client(SID, request("GET", "/big"))
        be = wake(guest)
        be.feed(guest.to_backend(SID))
        body = b"r" * 700_000
        guest.backend(SID, be.respond(body))
        down = guest.to_client(SID)
        head, _, got = down.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 700000" in head
        assert len(got) < len(body) and body.startswith(got)
        assert guest.streams[SID].downstream_closed and guest.streams[SID].upstream_closed
        assert counters(guest)["answer_overflows"] == 1
        assert guest.failed == 0
    finally:
        guest.close()


@pytest.mark.parametrize(("mib", "held_at_least"), [(16, 70), (32, 170)])
def test_uploads_held_at_once_follow_the_memory_limit(mib: int, held_at_least: int) -> None:
    """Request bodies held while the backend wakes take a 160 KiB block each past 2 KiB;
    blocks are made as needed up to what the instance's memory_limit leaves room for (36
    were a static pool before: the 37th upload of a wake got a 503). Past that, 503."""
    g = StreamGuest(WASM, {"hold_timeout_ms": 60000}, memory_limit=mib << 20)
    try:
        g.tick(1)
        n = 300
        for sid in range(1, n + 1):
            g.open(sid)
            g.client(sid, b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 3000\r\n\r\n"
                     + b"x" * 3000)
        refused = [sid for sid in range(1, n + 1) if bytes(g.streams[sid].client)]
        assert n - len(refused) >= held_at_least
        assert all(bytes(g.streams[sid].client).startswith(b"HTTP/1.1 503") for sid in refused)
        assert g.failed == 0 and g.host.stats.memory_cap == 0
        assert g.host.instance(80)._size <= (mib << 20) - (1 << 20)
    finally:
        g.close()
