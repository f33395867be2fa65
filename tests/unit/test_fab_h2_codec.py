"""The SDK's HTTP/2 codec (activators/sdk/c/fab_http2.h, fab_hpack.h) through the HTTP/2
activator that is built on it, with hypothesis.

Property tests: header blocks encoded by the pinned ``hpack`` (random fields, Huffman or
not, incremental indexing or never-indexed, table size updates, split over HEADERS and
CONTINUATION at random points, delivered in random TCP-like pieces) reach the other peer
with exactly the same fields, both directions. Fuzz tests: the same blocks mutated, and
whole valid sessions mutated byte-wise and re-split, never trap, never produce a
malformed answer, and everything the guest sends each peer is a well-formed frame
sequence (frames within 16,384 octets, upstream after the preface).
Also: the rewritten activator answers every call of the bench workloads exactly like the
hand-written one (testing/http2_raw.wasm) within 20 % of its fuel (deterministic).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import hpack
from hpack import NeverIndexedHeaderTuple
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.activator import abi
from tests.bench import sdk_http2
from tests.support.streamguest import StreamGuest

WASM = Path(__file__).resolve().parents[2] / "activators" / "http2" / "http2.wasm"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SID = 1
MAXF = 16384

names = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=24).filter(
    lambda s: s not in ("te", "connection", "keep-alive", "upgrade", "transfer-encoding",
                        "content-length"))
values = st.text("".join(chr(c) for c in range(0x20, 0x7f)), max_size=80).map(str.strip)
# (no content-length: a request whose body does not match it is malformed, RFC 9113 8.1.1,
# and answered by the guest; test_http2_rfc.py covers that)
STATIC_NAMES = ["accept", "accept-encoding", "cookie", "user-agent", "content-type",
                "cache-control", "x-forwarded-for", "content-encoding", "etag"]
fields = st.lists(st.tuples(names | st.sampled_from(STATIC_NAMES), values,
                            st.booleans()), max_size=12)


def frame(t: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([t, flags]) + struct.pack(">I", sid) \
        + payload


def header_frames(sid: int, block: bytes, cuts: list[int], end_stream: bool) -> bytes:
    """HEADERS + CONTINUATION carrying `block`, cut at the given offsets."""
    points = sorted({c % (len(block) + 1) for c in cuts} | {0, len(block)})
    pieces = [block[a:b] for a, b in zip(points, points[1:], strict=False)] or [b""]
    out = b""
    for i, p in enumerate(pieces):
        last = i == len(pieces) - 1
        flags = (4 if last else 0) | (1 if end_stream and i == 0 else 0)
        out += frame(1 if i == 0 else 9, flags, sid, p)
    return out


def encode(enc: hpack.Encoder, hs: list[tuple[str, str, bool]], huffman: bool) -> bytes:
    tuples: list[Any] = [NeverIndexedHeaderTuple(n, v) if never else (n, v)
                         for n, v, never in hs]
    return enc.encode(tuples, huffman=huffman)


def reference(dec: hpack.Decoder, block: bytes) -> list[tuple[str, str, bool]]:
    """What the sender's block means to a decoder of its own (the pinned hpack)."""
    return [(h[0], h[1], not h.indexable) for h in dec.decode(block, raw=False)]


def split_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Frames of a byte stream, asserting it is well formed (whole frames, sizes bounded)."""
    out = []
    while data:
        assert len(data) >= 9, f"a partial frame header: {data!r}"
        n = int.from_bytes(data[:3], "big")
        assert n <= MAXF and len(data) >= 9 + n, (n, len(data))
        sid = int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
        out.append((data[3], data[4], sid, data[9:9 + n]))
        data = data[9 + n:]
    return out


def blocks(data: bytes) -> dict[int, list[list[tuple[str, str, bool]]]]:
    """Decode every header block in a frame stream with a fresh hpack decoder: (name,
    value, never indexed) per field."""
    dec = hpack.Decoder()
    out: dict[int, list[list[tuple[str, str, bool]]]] = {}
    buf, sid = b"", 0
    for t, flags, s, p in split_frames(data):
        if t == 1:
            off = 0
            if flags & 0x8:
                off, p = 1, p[:len(p) - p[0]]
            if flags & 0x20:
                off += 5
            buf, sid = p[off:], s
        elif t == 9:
            buf += p
        else:
            continue
        if flags & 0x4:
            out.setdefault(sid, []).append([(h[0], h[1], not h.indexable)
                                            for h in dec.decode(buf, raw=False)])
    return out


def settled(g: StreamGuest) -> None:
    assert g.failed == 0
    assert g.host.stats.traps == 0 and g.host.stats.malformed == 0


def client_prelude() -> bytes:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    return c.data_to_send()


def server_prelude() -> bytes:
    s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    s.initiate_connection()
    return s.data_to_send()


def deliver(g: StreamGuest, to_guest: bytes, sizes: list[int], upstream: bool) -> None:
    """Hand bytes to the guest in pieces of the given sizes (then the rest)."""
    i = 0
    for n in sizes:
        if i >= len(to_guest):
            break
        piece = to_guest[i:i + max(1, n)]
        (g.backend if upstream else g.client)(SID, piece)
        i += len(piece)
    if i < len(to_guest):
        (g.backend if upstream else g.client)(SID, to_guest[i:])


REQ = [(":method", "GET", False), (":scheme", "http", False), (":authority", "svc", False),
       (":path", "/p", False)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(fields, min_size=1, max_size=4), st.lists(fields, min_size=1, max_size=4),
       st.booleans(), st.lists(st.integers(0, 5000), max_size=4),
       st.lists(st.integers(1, 700), max_size=30), st.sampled_from([None, 0, 256, 4096]))
def test_header_blocks_reach_the_other_peer_unchanged(
        reqs: list[list[tuple[str, str, bool]]], resps: list[list[tuple[str, str, bool]]],
        huffman: bool, cuts: list[int], sizes: list[int], table: int | None) -> None:
    g = StreamGuest(WASM, {"hold_timeout_ms": 60000})
    try:
        enc, ref = hpack.Encoder(), hpack.Decoder()
        out = client_prelude()
        sent: dict[int, list[tuple[str, str, bool]]] = {}
        for i, hs in enumerate(reqs):
            if table is not None and i == 1:
                enc.header_table_size = table  # a size update at the start of the block
            sid = 1 + 2 * i
            block = encode(enc, REQ + hs, huffman)
            sent[sid] = reference(ref, block)
            out += header_frames(sid, block, cuts, True)
        g.open(SID)
        deliver(g, out, sizes, upstream=False)
        g.connected(SID)
        g.backend(SID, server_prelude())
        up = g.to_backend(SID)
        assert up.startswith(PREFACE)
        got = {sid: bs[0] for sid, bs in blocks(up[len(PREFACE):]).items()}
        assert got == sent
        benc, bref = hpack.Encoder(), hpack.Decoder()
        back = b""
        answered: dict[int, list[tuple[str, str, bool]]] = {}
        for i, sid in enumerate(sorted(sent)):
            block = encode(benc, [(":status", "200", False), *resps[i % len(resps)]],
                           not huffman)
            answered[sid] = reference(bref, block)
            back += header_frames(sid, block, cuts, True)
        deliver(g, back, sizes, upstream=True)
        down = g.to_client(SID)
        got_down = {sid: bs[0] for sid, bs in blocks(down).items()}
        assert got_down == answered
        assert g.need == 0
        settled(g)
    finally:
        g.close()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields, st.booleans(), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)),
                                       min_size=1, max_size=6),
       st.booleans(), st.lists(st.integers(0, 400), max_size=3))
def test_mutated_header_blocks_never_trap(hs: list[tuple[str, str, bool]], huffman: bool,
                                          flips: list[tuple[int, int]], toward_client: bool,
                                          cuts: list[int]) -> None:
    enc = hpack.Encoder()
    block = bytearray(encode(enc, REQ + hs, huffman))
    block += encode(enc, REQ + hs, huffman)  # a second copy: indexes the first's entries
    for at, b in flips:
        block[at % len(block)] = b
    g = StreamGuest(WASM, {"hold_timeout_ms": 500})
    try:
        g.open(SID)
        ok = encode(hpack.Encoder(), REQ, False)
        if toward_client:
            g.client(SID, client_prelude() + header_frames(1, ok, [], True))
            g.connected(SID)
            g.backend(SID, server_prelude())
            g.backend(SID, header_frames(1, bytes(block), cuts, True))
        else:
            g.client(SID, client_prelude() + header_frames(1, bytes(block), cuts, True))
            g.connected(SID)
            g.backend(SID, server_prelude())
        g.tick(0)
        g.tick(1000)
        split_frames(g.to_client(SID))
        up = g.to_backend(SID)
        if up:
            assert up.startswith(PREFACE)
            split_frames(up[len(PREFACE):])
        settled(g)
    finally:
        g.close()


def session() -> tuple[bytes, bytes]:
    """A valid session's bytes from each side: requests with bodies, responses, PINGs,
    WINDOW_UPDATEs, trailers, a reset (what mutations start from)."""
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    c.initiate_connection()
    s.initiate_connection()
    hs = [(":method", "POST"), (":scheme", "http"), (":authority", "svc"), (":path", "/m"),
          ("content-type", "application/grpc"), ("x-k", "v" * 30)]
    for sid in (1, 3, 5):
        c.send_headers(sid, hs)
        c.send_data(sid, b"\x00\x00\x00\x00\x04abcd", end_stream=sid != 5)
    c.reset_stream(5)
    c.ping(b"pingpong")
    c.increment_flow_control_window(1000)
    cli = c.data_to_send()
    s.receive_data(cli)
    for sid in (1, 3):
        s.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        s.send_data(sid, b"\x00\x00\x00\x00\x02ok", pad_length=7)
        s.send_headers(sid, [("grpc-status", "0")], end_stream=True)
    s.ping(b"backping")
    return cli, s.data_to_send()


CLI, BACK = session()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255), st.sampled_from(
    ["set", "insert", "delete"])), max_size=5), st.booleans(),
       st.lists(st.integers(1, 300), max_size=20), st.integers(0, 3))
def test_mutated_sessions_never_trap(muts: list[tuple[int, int, str]], on_client: bool,
                                     sizes: list[int], mode: int) -> None:
    data = bytearray(CLI if on_client else BACK)
    for at, b, op in muts:
        at %= len(data)
        if op == "set":
            data[at] = b
        elif op == "insert":
            data[at:at] = bytes([b])
        else:
            del data[at]
    g = StreamGuest(WASM, {"hold_timeout_ms": 200})
    try:
        g.open(SID)
        if on_client:
            deliver(g, bytes(data), sizes, upstream=False)
        else:
            g.client(SID, CLI)
        if mode & 1 or not on_client:
            g.connected(SID)
            if on_client:
                g.backend(SID, BACK)
            else:
                deliver(g, bytes(data), sizes, upstream=True)
        g.tick(0)
        g.tick(300)
        if mode & 2:
            g.backend_close(SID)
        down = g.to_client(SID)
        split_frames(down)
        up = g.to_backend(SID)
        if up:
            assert up.startswith(PREFACE)
            split_frames(up[len(PREFACE):])
        g.client_close(SID)
        settled(g)
    finally:
        g.close()


def test_answers_like_the_hand_written_activator_within_the_fuel_target() -> None:
    """Every call of the bench workloads gets the same actions from the SDK build as from
    testing/http2_raw.wasm (the activator before the SDK), for at most 20 % more fuel."""
    for name, work in sdk_http2.WORKLOADS.items():
        rec = sdk_http2.Recorder(sdk_http2.SDK)
        try:
            work(rec)
        finally:
            rec.host.close()
        got = sdk_http2.replay(rec.calls, 1)
        sdk, raw = got["sdk"], got["raw"]
        assert sdk_http2.comparable(sdk[2]) == raw[2], name
        assert not any(isinstance(a, abi.Log) and a.message == "FAILED" for ans in sdk[2]
                       for a in ans), name
        assert sum(sdk[0]) <= sdk_http2.TARGET * sum(raw[0]), (name, sum(sdk[0]), sum(raw[0]))
