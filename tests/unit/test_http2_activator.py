"""The HTTP/2 activator (activators/http2/) through the real wasm host.

The python ``h2`` library plays both peers: a real client on the downstream side and a
real server as the backend, each with its own HPACK and flow-control state, so any byte
the activator gets wrong (a header block against the wrong table, a window credited
twice, a frame out of order) makes one of them raise.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from hyperframe.frame import Frame, PingFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.activator import abi
from tests.support.streamguest import StreamGuest

WASM = Path(__file__).resolve().parents[2] / "activators" / "http2" / "http2.wasm"
SID = 1  # the host's id of the client connection
NONE, ACTIVE = 0, 2


def client_conn() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    return c


def server_conn() -> h2.connection.H2Connection:
    s = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding="utf-8"))
    s.initiate_connection()
    return s


def req(path: str = "/", method: str = "GET", **extra: str) -> list[tuple[str, str]]:
    h = [(":method", method), (":scheme", "http"), (":authority", "svc"), (":path", path)]
    return h + [(k.replace("_", "-"), v) for k, v in extra.items()]


class Rig:
    """One activator instance, one h2 client connection, and (once connected) a backend."""

    def __init__(self, config: dict[str, Any] | None = None, sid: int = SID) -> None:
        self.g = StreamGuest(WASM, config or {"hold_timeout_ms": 1000})
        self.sid = sid
        self.c = client_conn()
        self.s: h2.connection.H2Connection | None = None
        self.cev: list[h2.events.Event] = []
        self.sev: list[h2.events.Event] = []
        self.g.open(sid)
        self.pump()

    def close(self) -> None:
        self.g.close()

    def connect_backend(self) -> None:
        """Answer the activator's upstream_connect with a fresh h2 server."""
        assert self.g.streams[self.sid].connects, "no upstream_connect asked for"
        self.s = server_conn()
        self.g.connected(self.sid)
        self.pump()

    def pump(self) -> None:
        """Move bytes both ways until nobody has anything to say."""
        for _ in range(1000):
            moved = False
            out = self.c.data_to_send()
            if out:
                self.g.client(self.sid, out)
                moved = True
            down = self.g.to_client(self.sid)
            if down:
                self.cev += self.c.receive_data(down)
                moved = True
            if self.s is not None:
                up = self.g.to_backend(self.sid)
                if up:
                    self.sev += self.s.receive_data(up)
                    moved = True
                out = self.s.data_to_send()
                if out:
                    self.g.backend(self.sid, out)
                    moved = True
            if not moved:
                return
        raise AssertionError("bytes kept moving")

    def of(self, side: list[h2.events.Event], kind: type) -> list[Any]:
        return [e for e in side if isinstance(e, kind)]

    def respond(self, stream_id: int, status: str = "200", body: bytes = b"",
                extra: list[tuple[str, str]] | None = None) -> None:
        assert self.s is not None
        self.s.send_headers(stream_id, [(":status", status), *(extra or [])],
                            end_stream=not body)
        if body:
            self.s.send_data(stream_id, body, end_stream=True)
        self.pump()

    def responses(self) -> dict[int, dict[str, str]]:
        return {e.stream_id: dict(e.headers) for e in self.of(self.cev, h2.events.ResponseReceived)}


def test_settings_at_once_and_ping_answered_without_a_wake() -> None:
    r = Rig()
    try:
        assert r.of(r.cev, h2.events.RemoteSettingsChanged), "no server SETTINGS"
        assert r.of(r.cev, h2.events.SettingsAcknowledged), "client SETTINGS not ACKed"
        r.c.ping(b"12345678")
        r.pump()
        acks = r.of(r.cev, h2.events.PingAckReceived)
        assert [a.ping_data for a in acks] == [b"12345678"]
        counted = [a for a in r.g.actions if isinstance(a, abi.Count)]
        assert [(a.name, a.n) for a in counted] == [("pings_answered", 1)]
        assert r.g.need in (None, NONE)
        assert r.g.streams[SID].connects == []
        assert not r.g.streams[SID].upstream
        assert r.g.failed == 0
    finally:
        r.close()


def test_request_held_until_available_then_relayed() -> None:
    r = Rig()
    try:
        r.c.send_headers(1, req("/a"), end_stream=True)
        r.pump()
        assert r.g.need == ACTIVE
        assert r.g.streams[SID].connects == [0]
        r.g.connected(SID, ok=False)  # no backend yet
        r.g.tick(100)
        r.c.ping(b"whilewak")
        r.pump()
        assert r.of(r.cev, h2.events.PingAckReceived)
        assert not r.responses()
        r.g.tick(200)
        r.g.available()
        assert r.g.streams[SID].connects == [0, 0]
        r.connect_backend()
        got = r.of(r.sev, h2.events.RequestReceived)
        assert [dict(e.headers)[":path"] for e in got] == ["/a"]
        assert not r.of(r.sev, h2.events.PingReceived), "a client PING reached the backend"
        r.respond(1, body=b"hello")
        assert r.responses()[1][":status"] == "200"
        assert b"".join(e.data for e in r.of(r.cev, h2.events.DataReceived)) == b"hello"
        assert r.of(r.cev, h2.events.StreamEnded)
        assert r.g.need == NONE
    finally:
        r.close()


def test_backend_ping_answered_by_the_activator() -> None:
    r = Rig()
    try:
        r.c.send_headers(1, req(), end_stream=True)
        r.pump()
        r.connect_backend()
        assert r.s is not None
        r.s.ping(b"backend!")
        r.pump()
        assert [e.ping_data for e in r.of(r.sev, h2.events.PingAckReceived)] == [b"backend!"]
        assert not r.of(r.cev, h2.events.PingReceived)
    finally:
        r.close()


def test_many_concurrent_streams() -> None:
    r = Rig()
    try:
        ids = [1 + 2 * i for i in range(60)]
        for i in ids:
            r.c.send_headers(i, req(f"/x{i}", x_n=str(i)), end_stream=True)
        r.pump()
        r.connect_backend()
        got = r.of(r.sev, h2.events.RequestReceived)
        assert sorted(e.stream_id for e in got) == ids
        assert all(dict(e.headers)[":path"] == f"/x{e.stream_id}" for e in got)
        for i in reversed(ids):
            r.respond(i, body=b"b%d" % i, extra=[("x-n", str(i))])
        resp = r.responses()
        assert sorted(resp) == ids
        assert all(resp[i]["x-n"] == str(i) for i in ids)
        assert r.g.need == NONE
    finally:
        r.close()


def test_dynamic_table_across_a_locally_answered_stream() -> None:
    """Blocks that use the client's dynamic table before and after a 503 still decode."""
    r = Rig({"hold_timeout_ms": 300})
    try:
        big = "v" * 300
        r.c.send_headers(1, req("/first", x_custom=big, cookie="a=1"), end_stream=True)
        r.pump()
        r.g.connected(SID, ok=False)
        r.g.tick(0)
        r.g.tick(400)  # the hold runs out: 503 for stream 1
        r.pump()
        assert r.responses()[1][":status"] == "503"
        # this block indexes entries inserted by the block of the answered stream
        r.c.send_headers(3, req("/second", x_custom=big, cookie="a=1"), end_stream=True)
        r.c.send_headers(5, req("/third", x_custom=big, cookie="b=2"), end_stream=True)
        r.pump()
        r.g.available()
        r.connect_backend()
        got = {e.stream_id: dict(e.headers) for e in r.of(r.sev, h2.events.RequestReceived)}
        assert sorted(got) == [3, 5]
        assert got[3]["x-custom"] == big and got[3][":path"] == "/second"
        assert got[5]["cookie"] == "b=2"
        # responses using the backend's dynamic table reach the client in order
        for i in (3, 5):
            r.respond(i, extra=[("x-resp", "r" * 200)])
        r.respond_extra = None
        assert {i: h["x-resp"] for i, h in r.responses().items() if i != 1} == \
            {3: "r" * 200, 5: "r" * 200}
    finally:
        r.close()


def test_grpc_trailers_only_on_hold_timeout_honouring_grpc_timeout() -> None:
    r = Rig({"hold_timeout_ms": 5000})
    try:
        grpc = {"content_type": "application/grpc", "te": "trailers"}
        r.c.send_headers(1, req("/svc/Slow", "POST", **grpc))
        r.c.send_data(1, b"\x00\x00\x00\x00\x00", end_stream=True)
        r.c.send_headers(3, req("/svc/Fast", "POST", grpc_timeout="200m", **grpc),
                         end_stream=True)
        r.c.send_headers(5, req("/plain"), end_stream=True)
        r.pump()
        r.g.connected(SID, ok=False)
        r.g.tick(1000)
        r.g.tick(1300)  # 300 ms: past grpc-timeout of stream 3 only
        r.pump()
        resp = r.responses()
        assert list(resp) == [3]
        assert resp[3]["grpc-status"] == "4" and resp[3][":status"] == "200"
        ended = {e.stream_id for e in r.of(r.cev, h2.events.StreamEnded)}
        assert ended == {3}
        r.g.tick(6100)  # the hold runs out for the others
        r.pump()
        resp = r.responses()
        assert resp[1]["grpc-status"] == "14"
        assert resp[1]["content-type"] == "application/grpc"
        assert resp[5][":status"] == "503"
        assert r.g.need == NONE
        assert r.g.failed == 0
    finally:
        r.close()



def test_request_sent_to_a_backend_that_never_answers_times_out() -> None:
    """A backend that took the request and froze for good: the hold timeout still ends it,
    natively (503; gRPC UNAVAILABLE, or DEADLINE_EXCEEDED for a shorter grpc-timeout),
    and the backend gets RST_STREAM(CANCEL)."""
    r = Rig({"hold_timeout_ms": 2000})
    try:
        grpc = {"content_type": "application/grpc", "te": "trailers"}
        r.g.tick(1000)
        r.c.send_headers(1, req("/plain"), end_stream=True)
        r.c.send_headers(3, req("/svc/Call", "POST", **grpc))
        r.c.send_data(3, b"\x00\x00\x00\x00\x00", end_stream=True)
        r.c.send_headers(5, req("/svc/Fast", "POST", grpc_timeout="500m", **grpc),
                         end_stream=True)
        r.pump()
        r.connect_backend()
        assert {e.stream_id for e in r.of(r.sev, h2.events.RequestReceived)} == {1, 3, 5}
        r.g.tick(1400)
        r.pump()
        assert not r.responses()
        r.g.tick(1600)  # 600 ms: past stream 5's grpc-timeout only
        r.pump()
        assert list(r.responses()) == [5]
        assert r.responses()[5]["grpc-status"] == "4"
        r.g.tick(3100)  # the hold (2 s from arrival) runs out for 1 and 3
        r.pump()
        resp = r.responses()
        assert resp[1][":status"] == "503"
        assert resp[3]["grpc-status"] == "14" and resp[3][":status"] == "200"
        resets = {e.stream_id: e.error_code for e in r.of(r.sev, h2.events.StreamReset)}
        assert resets == {1: h2.errors.ErrorCodes.CANCEL, 3: h2.errors.ErrorCodes.CANCEL,
                          5: h2.errors.ErrorCodes.CANCEL}
        assert r.g.need == NONE
        # the backend thaws: the connection still serves
        r.c.send_headers(7, req("/after"), end_stream=True)
        r.pump()
        r.respond(7, extra=[("x-late", "yes")])
        assert r.responses()[7][":status"] == "200"
        assert r.g.failed == 0
    finally:
        r.close()


def test_backend_max_concurrent_streams_kept_and_excess_queued_in_order() -> None:
    """A backend that allows 2 streams and a client with 10 at once: the backend never
    sees more than 2 open (h2 would raise), gets them in order, and all 10 succeed."""
    r = Rig()
    try:
        for i in range(1, 21, 2):
            r.c.send_headers(i, req(f"/{i}"), end_stream=True)
        r.pump()
        s = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8"))
        s.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2})
        s.initiate_connection()
        r.s = s
        r.g.connected(SID)
        r.pump()
        answered: list[int] = []
        peak = 0
        for _ in range(30):
            peak = max(peak, s.open_inbound_streams)
            todo = [e.stream_id for e in r.of(r.sev, h2.events.RequestReceived)
                    if e.stream_id not in answered]
            if not todo:
                break
            for i in todo:
                answered.append(i)
                r.respond(i, body=b"ok")
        assert peak == 2
        assert answered == list(range(1, 21, 2))
        assert sorted(r.responses()) == list(range(1, 21, 2))
        assert all(h[":status"] == "200" for h in r.responses().values())
        assert not r.of(r.cev, h2.events.StreamReset)
        assert r.g.need == NONE
    finally:
        r.close()


def test_client_half_close_finishes_the_streams_in_flight() -> None:
    """The client's FIN after its last request (stream_close): responses still in flight,
    held or at the backend, are delivered; an unfinished request is cancelled; then the
    connection closes."""
    r = Rig()
    try:
        r.c.send_headers(1, req("/a"), end_stream=True)
        r.pump()
        r.connect_backend()
        r.c.send_headers(3, req("/b"), end_stream=True)
        r.c.send_headers(5, req("/upload", "POST"))  # body never finished
        r.pump()
        r.c.send_headers(7, req("/held"), end_stream=True)
        r.g.client(SID, r.c.data_to_send())
        r.g.client_close(SID)  # FIN
        assert not r.g.streams[SID].downstream_closed
        r.pump()
        resets = {e.stream_id: e.error_code for e in r.of(r.sev, h2.events.StreamReset)}
        assert resets == {5: h2.errors.ErrorCodes.CANCEL}
        r.respond(3, body=b"bee")
        r.respond(1, body=b"a" * 16000)
        assert not r.g.streams[SID].downstream_closed
        r.respond(7, body=b"seven")
        resp = r.responses()
        assert sorted(resp) == [1, 3, 7] and all(h[":status"] == "200" for h in resp.values())
        got = {e.stream_id: 0 for e in r.of(r.cev, h2.events.DataReceived)}
        for e in r.of(r.cev, h2.events.DataReceived):
            got[e.stream_id] += len(e.data)
        assert got == {1: 16000, 3: 3, 7: 5}
        assert r.g.streams[SID].downstream_closed and r.g.streams[SID].upstream_closed
        assert r.g.need == NONE
    finally:
        r.close()



def test_a_work_block_left_busy_is_clean_for_its_next_connection() -> None:
    """A connection closed in the middle of a stream gives its work block back with that
    stream still in it: the next connection on the block must not see it."""
    r = Rig({"hold_timeout_ms": 1000})
    try:
        r.c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 10})
        r.c.send_headers(1, req("/slow"), end_stream=True)
        r.pump()
        r.connect_backend()
        r.respond(1, body=b"x" * 1000)  # 10 bytes go, the rest waits for the window
        r.g.client_close(SID)  # FIN, and the client never reads again
        r.g.tick(100)
        r.g.tick(2200)  # twice the hold without progress: closed with bytes queued
        assert r.g.streams[SID].downstream_closed
        r2 = Rig.__new__(Rig)  # a second client on the same activator instance
        r2.g, r2.sid, r2.c, r2.s, r2.cev, r2.sev = r.g, 2, client_conn(), None, [], []
        r2.g.open(2)
        r2.pump()
        r2.c.send_headers(1, req("/next"), end_stream=True)
        r2.pump()
        r2.connect_backend()
        assert [dict(e.headers)[":path"] for e in r2.of(r2.sev, h2.events.RequestReceived)
                ] == ["/next"]
        r2.respond(1, body=b"fine")
        assert r2.responses()[1][":status"] == "200"
        assert b"".join(e.data for e in r2.of(r2.cev, h2.events.DataReceived)) == b"fine"
        assert r.g.need == NONE and r.g.failed == 0
    finally:
        r.close()

def frames_of(data: bytes) -> list[Any]:
    """Split raw bytes into hyperframe frames (for what h2 refuses to read after GOAWAY)."""
    out = []
    while data:
        f, n = Frame.parse_frame_header(memoryview(data[:9]))
        f.parse_body(memoryview(data[9:9 + n]))
        out.append(f)
        data = data[9 + n:]
    return out


def test_goaway_in_two_steps_when_the_backend_closes() -> None:
    r = Rig()
    try:
        r.c.send_headers(1, req("/done"), end_stream=True)
        r.c.send_headers(3, req("/inflight"), end_stream=True)
        r.pump()
        r.connect_backend()
        r.respond(1)
        r.g.backend_close(SID)
        # python h2 closes its state machine on any GOAWAY, so read the frames raw
        got = frames_of(r.g.to_client(SID))
        kinds = [type(f).__name__ for f in got]
        assert kinds == ["RstStreamFrame", "GoAwayFrame", "PingFrame"], kinds
        assert got[0].stream_id == 3 and got[0].error_code == 2  # processed, unfinished
        assert got[1].last_stream_id == 2**31 - 1
        assert "ACK" not in got[2].flags
        # a stream opened before the client saw GOAWAY: never processed, REFUSED_STREAM
        r.c.send_headers(5, req("/late"), end_stream=True)
        r.g.client(SID, r.c.data_to_send())
        late = frames_of(r.g.to_client(SID))
        assert [(f.stream_id, f.error_code) for f in late] == [(5, 7)]
        ack = PingFrame(0, got[2].opaque_data)
        ack.flags.add("ACK")
        r.g.client(SID, ack.serialize())
        final = frames_of(r.g.to_client(SID))
        assert [type(f).__name__ for f in final] == ["GoAwayFrame"]
        assert final[0].last_stream_id == 5 and final[0].error_code == 0
        assert r.g.streams[SID].downstream_closed
        assert r.g.need == NONE
    finally:
        r.close()


def test_refused_stream_for_streams_never_processed() -> None:
    r = Rig()
    try:
        r.c.send_headers(1, req("/a"), end_stream=True)
        r.pump()
        r.connect_backend()
        assert r.s is not None
        r.s.close_connection(last_stream_id=0)  # graceful GOAWAY: stream 1 not processed
        r.g.backend(SID, r.s.data_to_send())
        got = frames_of(r.g.to_client(SID))
        assert [type(f).__name__ for f in got] == ["RstStreamFrame", "GoAwayFrame", "PingFrame"]
        assert (got[0].stream_id, got[0].error_code) == (1, 7)
        r.c.send_headers(3, req("/b"), end_stream=True)
        r.g.client(SID, r.c.data_to_send())
        late = frames_of(r.g.to_client(SID))
        assert [(f.stream_id, f.error_code) for f in late] == [(3, 7)]
        assert r.g.need == NONE
    finally:
        r.close()


def test_large_bodies_both_ways_within_windows() -> None:
    r = Rig()
    try:
        up = bytes(range(256)) * 1200  # 300 KiB, several times every window
        down = bytes(reversed(range(256))) * 1600
        r.c.send_headers(1, req("/up", "POST"))
        r.pump()
        r.connect_backend()
        assert r.s is not None
        sent = 0
        got_up = bytearray()
        got_down = bytearray()
        for _ in range(10000):
            while sent < len(up):
                room = min(r.c.local_flow_control_window(1), r.c.max_outbound_frame_size)
                if room <= 0:
                    break
                chunk = up[sent:sent + room]
                r.c.send_data(1, chunk, end_stream=sent + len(chunk) == len(up))
                sent += len(chunk)
            r.pump()
            for e in r.sev:
                if isinstance(e, h2.events.DataReceived):
                    got_up += e.data
                    r.s.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            r.sev.clear()
            if len(got_up) == len(up):
                break
        assert bytes(got_up) == up
        r.s.send_headers(1, [(":status", "200")])
        done = 0
        for _ in range(10000):
            while done < len(down):
                room = min(r.s.local_flow_control_window(1), r.s.max_outbound_frame_size)
                if room <= 0:
                    break
                chunk = down[done:done + room]
                r.s.send_data(1, chunk, end_stream=done + len(chunk) == len(down))
                done += len(chunk)
            r.pump()
            for e in r.cev:
                if isinstance(e, h2.events.DataReceived):
                    got_down += e.data
                    r.c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            r.cev = [e for e in r.cev if not isinstance(e, h2.events.DataReceived)]
            if len(got_down) == len(down):
                break
        assert bytes(got_down) == down
        assert r.g.need == NONE
        assert r.g.failed == 0
    finally:
        r.close()


def test_client_reset_is_relayed_and_need_falls() -> None:
    r = Rig()
    try:
        r.c.send_headers(1, req("/slow"), end_stream=True)
        r.pump()
        r.connect_backend()
        assert r.g.need == ACTIVE
        assert r.s is not None
        # the backend answers while the client's RST_STREAM is on its way
        r.s.send_headers(1, [(":status", "200"), ("x-late", "l" * 100)], end_stream=True)
        late = r.s.data_to_send()
        r.c.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
        r.g.client(SID, r.c.data_to_send())
        up = r.g.to_backend(SID)
        assert [(f.stream_id, f.error_code) for f in frames_of(up)] == [(1, 8)]  # CANCEL
        r.sev += r.s.receive_data(up)
        assert r.g.need == NONE
        # decoded for the backend's table and dropped: the next block still decodes
        r.g.backend(SID, late)
        r.pump()
        r.c.send_headers(3, req("/next"), end_stream=True)
        r.pump()
        r.respond(3, extra=[("x-late", "l" * 100)])
        assert r.responses()[3]["x-late"] == "l" * 100
    finally:
        r.close()


def test_blocked_trailers_hold_back_no_other_stream() -> None:
    """Stream 1's body waits for the client's window, its trailers behind it; stream 3's
    response (headers indexing the backend's table) still goes through."""
    r = Rig()
    try:
        r.c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
        r.c.send_headers(1, req("/slow"), end_stream=True)
        r.c.send_headers(3, req("/fast"), end_stream=True)
        r.pump()
        r.connect_backend()
        assert r.s is not None
        r.s.send_headers(1, [(":status", "200"), ("x-t", "t" * 50)])
        r.s.send_data(1, b"a" * 5000)
        r.s.send_headers(1, [("grpc-status", "0"), ("x-t", "t" * 50)], end_stream=True)
        r.pump()
        r.respond(3, body=b"b" * 500, extra=[("x-t", "t" * 50)])
        ended = {e.stream_id for e in r.of(r.cev, h2.events.StreamEnded)}
        assert ended == {3}
        got1 = sum(len(e.data) for e in r.of(r.cev, h2.events.DataReceived) if e.stream_id == 1)
        assert got1 == 1000
        for _ in range(10):  # the client reads stream 1 now
            for e in r.of(r.cev, h2.events.DataReceived):
                if e.stream_id == 1 and not getattr(e, "acked", False):
                    r.c.acknowledge_received_data(e.flow_controlled_length, 1)
                    e.acked = True
            r.pump()
        trailers = r.of(r.cev, h2.events.TrailersReceived)
        assert [dict(t.headers)["grpc-status"] for t in trailers] == ["0"]
        assert {e.stream_id for e in r.of(r.cev, h2.events.StreamEnded)} == {1, 3}
    finally:
        r.close()


def test_protocol_errors_answered_with_goaway() -> None:
    g = StreamGuest(WASM, {})
    try:
        g.open(1)
        g.client(1, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        out = g.to_client(1)
        assert out[9 + 6 + 3] == 7 or b"\x00\x00\x08\x07" in out  # a GOAWAY frame
        g.client_close(1)  # it lingers (no reset to destroy the GOAWAY) until the client goes
        assert g.streams[1].downstream_closed
        # an oversized frame: FRAME_SIZE_ERROR
        g.open(3)
        c = client_conn()
        g.client(3, c.data_to_send() + struct.pack(">I", 20000)[1:] + b"\x00\x00\x00\x00\x00\x01")
        out = g.to_client(3)
        i = out.find(b"\x00\x00\x08\x07")
        assert i >= 0 and struct.unpack(">I", out[i + 13:i + 17])[0] == 6
        assert g.failed == 0
    finally:
        g.close()


def test_unknown_frames_and_priority_are_tolerated() -> None:
    r = Rig()
    try:
        # PRIORITY_UPDATE (0x10) and an unknown extension frame type 0xfa on stream 0
        r.g.client(SID, b"\x00\x00\x05\x10\x00\x00\x00\x00\x00" + b"\x00\x00\x00\x01u")
        r.g.client(SID, b"\x00\x00\x03\xfa\x00\x00\x00\x00\x00abc")
        r.c.send_headers(1, req("/p"), end_stream=True, priority_weight=10)
        r.c.prioritize(1, weight=20)
        r.pump()
        r.connect_backend()
        r.respond(1)
        assert r.responses()[1][":status"] == "200"
        assert r.g.failed == 0
    finally:
        r.close()


def test_continuation_both_ways() -> None:
    r = Rig()
    try:
        huge = [(f"x-h{i}", "z" * 400) for i in range(60)]  # ~25 KiB: HEADERS + CONTINUATION
        r.c.send_headers(1, req("/c") + huge, end_stream=True)
        r.pump()
        r.connect_backend()
        got = r.of(r.sev, h2.events.RequestReceived)
        assert dict(got[0].headers)["x-h59"] == "z" * 400
        r.respond(1, extra=huge)
        assert r.responses()[1]["x-h59"] == "z" * 400
    finally:
        r.close()


def test_idle_connections_do_not_pin_a_backend() -> None:
    r = Rig()
    try:
        r.c.send_headers(1, req(), end_stream=True)
        r.pump()
        r.connect_backend()
        r.respond(1)
        assert r.g.need == NONE
        for t in range(0, 3000, 100):
            r.g.tick(t)
            r.c.ping(struct.pack(">Q", t))
            r.pump()
        assert r.g.need == NONE
        assert not r.of(r.sev, h2.events.PingReceived)
        assert r.g.streams[SID].connects == [0]
    finally:
        r.close()


def refused_by_goaway(g: StreamGuest, sid: int) -> None:
    """The connection was refused the RFC 9113 way: server preface, GOAWAY(0, NO_ERROR)."""
    c = client_conn()
    g.client(sid, c.data_to_send())
    ev = c.receive_data(g.to_client(sid))
    gone = [e for e in ev if isinstance(e, h2.events.ConnectionTerminated)]
    assert gone and gone[0].error_code == 0 and gone[0].last_stream_id == 0
    assert not g.streams[sid].downstream_closed


def test_connection_limit_and_memory() -> None:
    g = StreamGuest(WASM, {"max_connections": 4})
    try:
        for sid in range(1, 5):
            g.open(sid)
            c = client_conn()
            # connection 2's request stays unfinished: its FIN below ends it (a finished
            # request would keep the half-closed connection until its response)
            c.send_headers(1, req("/"), end_stream=sid != 2)
            g.client(sid, c.data_to_send())
            assert g.to_client(sid)[3] == 4  # SETTINGS first
        g.open(5)
        refused_by_goaway(g, 5)
        assert any("connection limit" in m for _, m in g.logs)
        g.client_close(5)  # the refused client closes: so does the activator
        assert g.streams[5].downstream_closed
        g.open(7)
        g.tick(100)
        g.tick(1000)
        assert not g.streams[7].downstream_closed
        g.tick(1100)  # or a second after the GOAWAY
        assert g.streams[7].downstream_closed
        g.client_close(2)
        g.open(6)  # a freed connection is reused
        assert not g.streams[6].downstream_closed
        assert g.failed == 0
    finally:
        g.close()


def test_1024_idle_connections_fit_the_memory_limit_and_the_next_is_refused() -> None:
    """An idle connection keeps only its bookkeeping and the client's HPACK table (the
    rest comes from a pool while busy): 1,024 of them, every one answering a PING, plus
    every work block in use, stay under the 16 MiB limit; the 1,025th is refused."""
    g = StreamGuest(WASM, {})
    try:
        g.tick(1)
        cs = {}
        for sid in range(1, 1025):
            g.open(sid)
            c = cs[sid] = client_conn()
            c.ping(b"idle%04d" % sid)
            g.client(sid, c.data_to_send())
            ev = c.receive_data(g.to_client(sid))
            assert any(isinstance(e, h2.events.PingAckReceived) for e in ev), sid
        for sid in range(1, 41):  # busy (held requests): 18 blocks, the rest wait paused
            cs[sid].send_headers(1, req("/"), end_stream=True)
            g.client(sid, cs[sid].data_to_send())
        assert sum(g.streams[sid].paused for sid in range(1, 41)) == 40 - 18
        g.open(1025)
        refused_by_goaway(g, 1025)
        counters: dict[str, int] = {}
        for a in g.actions:
            if isinstance(a, abi.Count):
                counters[a.name] = counters.get(a.name, 0) + a.n
        assert counters.get("connections_refused") == 1
        assert g.failed == 0 and g.host.stats.memory_cap == 0
        assert g.host.instance(80)._size < 15 * 2**20
    finally:
        g.close()


def _busy_at_once(memory_mib: int, config: dict) -> tuple[int, dict[str, int], StreamGuest]:
    g = StreamGuest(WASM, {"hold_timeout_ms": 60000, **config}, memory_limit=memory_mib << 20)
    g.tick(1)
    for sid in range(1, 201):  # each with a held request: busy
        g.open(sid)
        c = client_conn()
        c.send_headers(1, req("/"), end_stream=True)
        g.client(sid, c.data_to_send())
    counters: dict[str, int] = {}
    for a in g.actions:
        if isinstance(a, abi.Count):
            counters[a.name] = counters.get(a.name, 0) + a.n
    return 200 - sum(g.streams[sid].paused for sid in range(1, 201)), counters, g


@pytest.mark.parametrize(("mib", "config", "busy"), [
    (16, {}, 18),                               # the default: 18 work blocks
    (64, {}, 178),                              # + one per 306 KiB past 16 MiB
    (64, {"max_busy_connections": 50}, 50),     # fewer on request
    (16, {"max_busy_connections": 500}, 18),    # never more than fit
])
def test_connections_busy_at_once_follow_the_memory_limit(mib: int, config: dict,
                                                          busy: int) -> None:
    """A port whose clients hold streams open (gRPC watches, long polls) keeps a work block
    per connection; the memory the port is given (activator_memory_mib, told to the guest
    as memory_limit) sets how many may be busy at once. The rest wait, counted."""
    got, counters, g = _busy_at_once(mib, config)
    try:
        assert got == busy
        assert counters.get("work_block_waits") == 200 - busy, counters
        assert g.failed == 0 and g.host.stats.memory_cap == 0
        assert g.host.instance(80)._size < (mib << 20) - (1 << 20)
    finally:
        g.close()


def test_500_concurrent_connections_all_served() -> None:
    """500 client connections with a request each, at once, each with its own backend:
    at most 18 are busy at a time (the others paused, their first bytes kept) and every
    request gets its response."""
    g = StreamGuest(WASM, {"hold_timeout_ms": 60000})
    n = 500
    try:
        g.tick(1)
        cs: dict[int, h2.connection.H2Connection] = {}
        ss: dict[int, h2.connection.H2Connection] = {}
        got: dict[int, str] = {}
        for sid in range(1, n + 1):
            g.open(sid)
            c = cs[sid] = client_conn()
            c.send_headers(1, req(f"/{sid}"), end_stream=True)
            g.client(sid, c.data_to_send())
        for _ in range(200):
            moved = False
            for sid in range(1, n + 1):
                v = g.streams[sid]
                if v.connects and sid not in ss:
                    ss[sid] = server_conn()
                    g.connected(sid)
                    moved = True
                down = g.to_client(sid)
                if down:
                    for e in cs[sid].receive_data(down):
                        if isinstance(e, h2.events.ResponseReceived):
                            got[sid] = dict(e.headers)[":status"]
                    moved = True
                out = cs[sid].data_to_send()
                if out and not v.paused:
                    g.client(sid, out)
                    moved = True
                if sid in ss:
                    up = g.to_backend(sid)
                    if up:
                        for e in ss[sid].receive_data(up):
                            if isinstance(e, h2.events.RequestReceived):
                                ss[sid].send_headers(e.stream_id, [(":status", "200")],
                                                     end_stream=True)
                        moved = True
                    out = ss[sid].data_to_send()
                    if out:
                        g.backend(sid, out)
                        moved = True
            if not moved:
                break
        assert len(got) == n and set(got.values()) == {"200"}
        assert not any(g.streams[sid].downstream_closed for sid in range(1, n + 1))
        assert g.failed == 0 and g.need == NONE
    finally:
        g.close()


FRAME_TYPES = st.integers(0, 12) | st.integers(0, 255)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    t = draw(FRAME_TYPES)
    flags = draw(st.integers(0, 255))
    sid = draw(st.sampled_from([0, 1, 3, 5, 2, 0x7fffffff]))
    payload = draw(st.binary(max_size=64))
    return struct.pack(">I", len(payload))[1:] + bytes([t, flags]) + struct.pack(">I", sid) \
        + payload


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames(), max_size=12), st.lists(frames(), max_size=12),
       st.binary(max_size=200), st.integers(0, 3))
def test_fuzz_no_trap(cli: list[bytes], back: list[bytes], noise: bytes, mode: int) -> None:
    g = StreamGuest(WASM, {"hold_timeout_ms": 200})
    try:
        c = client_conn()
        c.send_headers(1, req("/f", x_a="b" * 50), end_stream=False)
        g.open(7)
        g.client(7, c.data_to_send())
        if mode & 1:
            g.connected(7)
            s = server_conn()
            g.backend(7, s.data_to_send())
            for f in back:
                g.backend(7, f)
        for f in cli:
            g.client(7, f)
        if mode & 2:
            g.client(7, noise)
            g.backend(7, noise)
        g.tick(0)
        g.tick(500)
        g.available()
        g.backend_close(7)
        g.client_close(7)
        assert g.failed == 0
        assert g.host.stats.traps == 0 and g.host.stats.malformed == 0
    finally:
        g.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=300), st.integers(0, 400))
def test_fuzz_mutated_client_bytes(junk: bytes, at: int) -> None:
    g = StreamGuest(WASM, {})
    try:
        c = client_conn()
        c.send_headers(1, req("/m", cookie="k=" + "v" * 40), end_stream=True)
        c.send_headers(3, req("/m", cookie="k=" + "v" * 40), end_stream=True)
        data = bytearray(c.data_to_send())
        at %= len(data)
        data[at:at + len(junk)] = junk
        g.open(1)
        g.client(1, bytes(data))
        g.connected(1)
        g.backend(1, server_conn().data_to_send())
        g.tick(10)
        assert g.failed == 0
        assert g.host.stats.traps == 0 and g.host.stats.malformed == 0
    finally:
        g.close()


def test_header_table_size_changes_from_either_side_keep_hpack_in_step() -> None:
    """Both peers shrink and grow SETTINGS_HEADER_TABLE_SIZE (their decoders) and their
    encoders' own tables (size updates) between requests: every block still decodes on
    both sides, and what the guest sends never exceeds what a peer allows."""
    r = Rig({"hold_timeout_ms": 60000})
    try:
        size = h2.settings.SettingCodes.HEADER_TABLE_SIZE
        r.c.send_headers(1, req("/0", x_k="v" * 100), end_stream=True)
        r.pump()
        r.connect_backend()
        assert r.s is not None
        r.respond(1, extra=[("x-r", "w" * 100)])
        for i, (csize, ssize) in enumerate([(0, 0), (256, 4096), (4096, 100), (0, 4096)]):
            r.c.update_settings({size: csize})
            r.s.update_settings({size: ssize})
            r.c.encoder.header_table_size = [4096, 0, 200, 4096][i]
            r.s.encoder.header_table_size = [0, 4096, 50, 300][i]
            r.pump()
            sid = 3 + 2 * i
            r.c.send_headers(sid, req(f"/{sid}", x_k="v" * 100), end_stream=True)
            r.pump()
            r.respond(sid, body=b"ok", extra=[("x-r", "w" * 100)])
        got = {e.stream_id: dict(e.headers) for e in r.of(r.sev, h2.events.RequestReceived)}
        assert sorted(got) == [1, 3, 5, 7, 9]
        assert all(h["x-k"] == "v" * 100 for h in got.values())
        resp = r.responses()
        assert sorted(resp) == [1, 3, 5, 7, 9]
        assert all(h["x-r"] == "w" * 100 for h in resp.values())
        assert r.g.failed == 0
    finally:
        r.close()


def _data_by_stream(r: Rig) -> dict[int, int]:
    got: dict[int, int] = {}
    for e in r.of(r.cev, h2.events.DataReceived):
        got[e.stream_id] = got.get(e.stream_id, 0) + len(e.data)
    return got


def test_half_close_then_the_response_arrives() -> None:
    """Request, FIN, and only then the backend's response: all of it reaches the client,
    then the connection closes."""
    r = Rig()
    try:
        r.c.send_headers(1, req("/late"), end_stream=True)
        r.pump()
        r.connect_backend()
        assert [dict(e.headers)[":path"] for e in r.of(r.sev, h2.events.RequestReceived)
                ] == ["/late"]
        r.g.client_close(SID)  # FIN before any response
        assert not r.g.streams[SID].downstream_closed
        r.respond(1, body=b"L" * 5000)
        assert r.responses()[1][":status"] == "200"
        assert _data_by_stream(r) == {1: 5000}
        assert r.of(r.cev, h2.events.StreamEnded)
        assert r.g.streams[SID].downstream_closed and r.g.streams[SID].upstream_closed
        assert r.g.need == NONE and r.g.failed == 0
    finally:
        r.close()


def test_half_close_in_the_call_that_completes_the_response() -> None:
    """The backend's complete response and the client's FIN in one call: the response is
    still queued in the guest when the FIN comes (no stream is open any more); it must be
    written before the close, not dropped with the connection."""
    r = Rig()
    try:
        r.c.send_headers(1, req("/both"), end_stream=True)
        r.pump()
        r.connect_backend()
        assert r.s is not None
        r.s.send_headers(1, [(":status", "200")])
        r.s.send_data(1, b"B" * 3000, end_stream=True)
        r.g.send(abi.UpstreamData(SID, r.s.data_to_send()), abi.StreamClose(SID))
        r.pump()
        assert r.responses()[1][":status"] == "200"
        assert _data_by_stream(r) == {1: 3000}
        assert [e.stream_id for e in r.of(r.cev, h2.events.StreamEnded)] == [1]
        assert r.g.streams[SID].downstream_closed and r.g.streams[SID].upstream_closed
        assert r.g.need == NONE and r.g.failed == 0
    finally:
        r.close()


def test_half_close_with_the_response_queued_behind_a_zero_window() -> None:
    """A response waiting for the client's window; the client opens it and sends its FIN
    in the same read: what the window now allows (all of it) reaches the client before
    the close."""
    r = Rig()
    try:
        r.c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        r.c.send_headers(1, req("/slow"), end_stream=True)
        r.c.send_headers(3, req("/slow2"), end_stream=True)
        r.pump()
        r.connect_backend()
        r.respond(1, body=b"x" * 1000)  # headers go, the body waits for the window
        r.respond(3, body=b"y" * 700)
        assert r.responses()[1][":status"] == "200" and _data_by_stream(r) == {}
        r.c.increment_flow_control_window(1000, stream_id=1)
        r.c.increment_flow_control_window(700, stream_id=3)
        r.g.send(abi.StreamData(SID, r.c.data_to_send()), abi.StreamClose(SID))
        r.cev += r.c.receive_data(r.g.to_client(SID))
        assert _data_by_stream(r) == {1: 1000, 3: 700}
        assert sorted(e.stream_id for e in r.of(r.cev, h2.events.StreamEnded)) == [1, 3]
        assert r.g.streams[SID].downstream_closed and r.g.streams[SID].upstream_closed
        assert r.g.need == NONE and r.g.failed == 0
    finally:
        r.close()


def test_half_close_with_no_stream_closes_at_once() -> None:
    """A FIN on a connection with no request: closed in the same call, no backend woken,
    need stays none."""
    r = Rig()
    try:
        r.c.ping(b"12345678")
        r.pump()
        r.g.client_close(SID)
        assert r.g.streams[SID].downstream_closed
        assert not r.g.streams[SID].connects
        assert r.g.need in (None, NONE) and r.g.failed == 0
    finally:
        r.close()


def test_half_close_with_the_preface_in_the_same_read() -> None:
    """Preface, a request and the FIN in one call (a client that writes everything and
    shuts down): the server's SETTINGS are not lost, the request still gets its answer."""
    g = StreamGuest(WASM, {"hold_timeout_ms": 1000})
    try:
        c = client_conn()
        c.send_headers(1, req("/once"), end_stream=True)
        g.send(abi.StreamOpen(SID, 80), abi.StreamData(SID, c.data_to_send()),
               abi.StreamClose(SID))
        ev = c.receive_data(g.to_client(SID))
        assert any(isinstance(e, h2.events.RemoteSettingsChanged) for e in ev)
        assert not g.streams[SID].downstream_closed and g.streams[SID].connects
        assert g.need == ACTIVE
    finally:
        g.close()
