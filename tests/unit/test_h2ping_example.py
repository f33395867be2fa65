"""The SDK's HTTP/2 example (activators/sdk/c/examples/h2ping.c) through the real wasm host.

Python ``h2`` is the client, so the frames and header blocks the example builds with
fab_http2.h and fab_hpack.h are checked by a real HTTP/2 implementation: SETTINGS
exchanged, PINGs answered locally, every request answered 503 (its block decoded, so
later blocks that index the client's dynamic table still decode), never a backend.
"""

from __future__ import annotations

from pathlib import Path

import h2.config
import h2.connection
import h2.events

from fabric.activator import abi
from tests.support.streamguest import StreamGuest

WASM = Path(__file__).resolve().parents[2] / "activators" / "sdk" / "c" / "examples" / "h2ping.wasm"


def client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    return c


def exchange(g: StreamGuest, c: h2.connection.H2Connection, sid: int) -> list[h2.events.Event]:
    g.client(sid, c.data_to_send())
    return c.receive_data(g.to_client(sid))


def test_pings_answered_requests_refused_locally() -> None:
    g = StreamGuest(WASM, {})
    try:
        g.open(1)
        c = client()
        ev = exchange(g, c, 1)
        assert any(isinstance(e, h2.events.RemoteSettingsChanged) for e in ev)
        assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in ev)
        for payload in (b"12345678", b"abcdefgh"):
            c.ping(payload)
            ev = exchange(g, c, 1)
            assert [e.ping_data for e in ev if isinstance(e, h2.events.PingAckReceived)] \
                == [payload]
        hs = [(":method", "GET"), (":scheme", "http"), (":authority", "svc"),
              (":path", "/x"), ("x-big", "v" * 200)]
        for stream in (1, 3):  # the second block indexes entries the first inserted
            c.send_headers(stream, hs, end_stream=True)
            ev = exchange(g, c, 1)
            got = [dict(e.headers) for e in ev if isinstance(e, h2.events.ResponseReceived)]
            assert got == [{":status": "503"}]
            assert any(isinstance(e, h2.events.StreamEnded) for e in ev)
        counted = sum(a.n for a in g.actions if isinstance(a, abi.Count))
        assert counted == 2
        assert g.streams[1].connects == [] and not g.streams[1].upstream
        assert g.need is None
        assert g.failed == 0 and g.host.stats.traps == 0
    finally:
        g.close()


def test_garbage_gets_goaway_and_close() -> None:
    g = StreamGuest(WASM, {})
    try:
        g.open(5)
        g.client(5, b"GET / HTTP/1.1\r\n\r\n")
        out = g.to_client(5)
        assert out[9:12] == b"\x00\x00\x08" and out[12] == 7  # SETTINGS, then GOAWAY
        assert out[-4:] == b"\x00\x00\x00\x01"  # PROTOCOL_ERROR
        assert g.streams[5].downstream_closed
        assert g.failed == 0
    finally:
        g.close()
