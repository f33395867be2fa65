"""Stream-level replay: real client sessions (pcaps/h2_*/session.pcap, captured with
tshark from h2load, nghttp, a grpcio client and a PING client against real servers;
pcaps/make_h2_pcaps.py) replayed through the HTTP/2 activator and the real wasm host,
segment by segment as captured, with python h2 as the backend. Checked: the actions the
activator answers (SETTINGS first, every PING answered and none forwarded, each captured
request at the backend with its headers, a response for each at the client, the need
level, no upstream at all for a session that only pings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    SettingsFrame,
)
from scapy.layers.inet import TCP
from scapy.utils import rdpcap

from fabric.activator import abi
from tests.support.streamguest import StreamGuest

ROOT = Path(__file__).resolve().parents[2]
WASM = ROOT / "activators" / "http2" / "http2.wasm"
PCAPS = ROOT / "pcaps"
SERVER_PORT = 8080
SID = 1
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def client_segments(pcap: Path) -> list[bytes]:
    """The client's TCP payloads toward the server, in sequence order, once each."""
    seen: dict[int, bytes] = {}
    for pkt in rdpcap(str(pcap)):
        if TCP in pkt and pkt[TCP].dport == SERVER_PORT and bytes(pkt[TCP].payload):
            seen.setdefault(pkt[TCP].seq, bytes(pkt[TCP].payload))
    return [seen[k] for k in sorted(seen)]


def frames(data: bytes) -> list[Any]:
    out = []
    while len(data) >= 9:
        f, n = Frame.parse_frame_header(memoryview(data[:9]))
        f.parse_body(memoryview(data[9:9 + n]))
        out.append(f)
        data = data[9 + n:]
    return out


def requests(client_bytes: bytes) -> dict[int, dict[str, str]]:
    """Stream id -> request headers, decoded from the client's own stream."""
    dec = hpack.Decoder()
    out: dict[int, dict[str, str]] = {}
    block, sid = b"", 0
    for f in frames(client_bytes[len(PREFACE):]):
        if isinstance(f, HeadersFrame | ContinuationFrame):
            block += f.data
            sid = f.stream_id
            if "END_HEADERS" in f.flags:
                hs = dict((k.decode() if isinstance(k, bytes) else k,
                           v.decode() if isinstance(v, bytes) else v) for k, v in dec.decode(block))
                if ":method" in hs:
                    out.setdefault(sid, hs)
                block = b""
    return out


class Backend:
    """A python h2 server that answers every request (gRPC the gRPC way)."""

    def __init__(self) -> None:
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.seen: dict[int, dict[str, str]] = {}
        self.pings = 0

    def feed(self, data: bytes) -> bytes:
        for e in self.h2.receive_data(data):
            if isinstance(e, h2.events.RequestReceived):
                self.seen[e.stream_id] = dict(e.headers)
            elif isinstance(e, h2.events.DataReceived):
                self.h2.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, h2.events.PingReceived):
                self.pings += 1
            if isinstance(e, h2.events.StreamEnded):
                self.answer(e.stream_id)
        return self.h2.data_to_send()

    def answer(self, sid: int) -> None:
        h = self.seen.get(sid, {})
        if h.get("content-type", "").startswith("application/grpc"):
            self.h2.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
            self.h2.send_data(sid, b"\x00\x00\x00\x00\x02ok")
            self.h2.send_headers(sid, [("grpc-status", "0")], end_stream=True)
        else:
            self.h2.send_headers(sid, [(":status", "200"), ("content-length", "3")])
            self.h2.send_data(sid, b"ok\n", end_stream=True)


def replay(name: str) -> tuple[StreamGuest, Backend | None, bytes, bytes]:
    segs = client_segments(PCAPS / f"h2_{name}" / "session.pcap")
    g = StreamGuest(WASM, {"hold_timeout_ms": 5000})
    backend: Backend | None = None
    g.open(SID)
    for seg in segs:
        g.client(SID, seg)
        if backend is None and g.streams[SID].connects:
            backend = Backend()
            g.connected(SID)
            g.backend(SID, backend.h2.data_to_send())
        for _ in range(20):
            if backend is None:
                break
            up = g.to_backend(SID)
            if not up:
                break
            answer = backend.feed(up)
            if answer:
                g.backend(SID, answer)
    return g, backend, b"".join(segs), g.to_client(SID)


@pytest.mark.parametrize("name", ["h2load", "nghttp", "grpc"])
def test_captured_requests_reach_the_backend_and_are_answered(name: str) -> None:
    g, backend, sent, got = replay(name)
    try:
        want = requests(sent)
        assert want, "the capture holds no request"
        assert backend is not None and g.streams[SID].connects == [0]
        assert sorted(backend.seen) == sorted(want)
        for sid, hs in want.items():
            assert backend.seen[sid] == hs, sid  # every header, decoded at the backend
        out = frames(got)
        assert isinstance(out[0], SettingsFrame) and "ACK" not in out[0].flags
        assert any(isinstance(f, SettingsFrame) and "ACK" in f.flags for f in out)
        dec = hpack.Decoder()
        answered: dict[int, str] = {}
        block = b""
        for f in out:
            if isinstance(f, HeadersFrame | ContinuationFrame):
                block += f.data
                if "END_HEADERS" in f.flags:
                    hs = dict(dec.decode(block))
                    block = b""
                    if ":status" in hs:
                        answered[f.stream_id] = hs[":status"]
        assert answered == {sid: "200" for sid in want}
        assert any(isinstance(f, DataFrame) for f in out)
        assert backend.pings == 0, "a client PING reached the backend"
        sent_pings = [f.opaque_data for f in frames(sent[len(PREFACE):])
                      if isinstance(f, PingFrame) and "ACK" not in f.flags]
        acks = [f.opaque_data for f in out if isinstance(f, PingFrame) and "ACK" in f.flags]
        assert acks == sent_pings
        assert g.failed == 0 and g.host.stats.traps == 0
        needs = [a.need for a in g.actions if isinstance(a, abi.SetBackendNeed)]
        assert 2 in needs
    finally:
        g.close()


def test_captured_ping_session_wakes_nothing() -> None:
    g, backend, sent, got = replay("ping")
    try:
        assert backend is None and g.streams[SID].connects == []
        out = frames(got)
        pings = [f.opaque_data for f in frames(sent[len(PREFACE):])
                 if isinstance(f, PingFrame) and "ACK" not in f.flags]
        assert len(pings) == 3
        assert [f.opaque_data for f in out if isinstance(f, PingFrame)] == pings
        assert g.need in (None, 0)
        assert g.streams[SID].downstream_closed  # the client's GOAWAY, nothing open
        assert g.failed == 0
    finally:
        g.close()
