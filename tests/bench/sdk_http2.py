"""What the C SDK costs the HTTP/2 activator: guest fuel per event and wall time per call,
http2/http2.c (written with fabricd.h, fab_http2.h, fab_hpack.h) against
testing/http2_raw.c (the same activator hand-written against the raw ABI; its .wasm is
byte-identical to the http2.wasm shipped before the SDK). Issue 11 wants the SDK within
20 % of hand-written ABI code.

Why recorded workloads: python h2 plays client and backend once, against the SDK build,
and every `process` call (events, live streams) is recorded; the same calls are then
replayed on a fresh instance of each module. Fuel is deterministic (the host's
`last_fuel` per call); wall time is the median of `reps` replays per call, host encoding
and decoding included, as the daemon pays it. The two modules must answer every call
with the same actions (checked: `identical`; the SDK build's SETTINGS toward the backend
differ by one setting, see `comparable`), so the numbers compare equal work.

`python -m tests.bench.sdk_http2` prints the dict `measure()` returns, as JSON.
"""

from __future__ import annotations

import json
import statistics
import struct
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events

from fabric.activator import abi
from fabric.activator.host import ActivatorHost

ROOT = Path(__file__).resolve().parents[2]
SDK = ROOT / "activators" / "http2" / "http2.wasm"
RAW = ROOT / "activators" / "testing" / "http2_raw.wasm"
PORT = 80
SID = 1
CONFIG = {"hold_timeout_ms": 1000}
TARGET = 1.20  # SDK / hand-written, at most

# The intended differences of the SDK build: its SETTINGS toward the backend also ask
# for a small dynamic table (HEADER_TABLE_SIZE 512, kept in the connection while it is
# idle), and its server preface announces MAX_HEADER_LIST_SIZE 32768 (where its 431
# starts); `comparable` puts the hand-written build's frames in their places.
RAW_DOWN_SETTINGS = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" b"\x00\x03\x00\x00\x00d"
SDK_DOWN_SETTINGS = (b"\x00\x00\x0c\x04\x00\x00\x00\x00\x00" b"\x00\x03\x00\x00\x00d"
                     b"\x00\x06\x00\x00\x80\x00")
RAW_UP_SETTINGS = (b"\x00\x00\x0c\x04\x00\x00\x00\x00\x00" b"\x00\x02\x00\x00\x00\x00"
                   b"\x00\x03\x00\x00\x00d")
SDK_UP_SETTINGS = (b"\x00\x00\x12\x04\x00\x00\x00\x00\x00" b"\x00\x01\x00\x00\x02\x00"
                   b"\x00\x02\x00\x00\x00\x00\x00\x03\x00\x00\x00d")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def comparable(answers: list[list[abi.Action]]) -> list[list[abi.Action]]:
    """The SDK build's answers with its preface SETTINGS, both ways, as the raw build's."""
    out = []
    for ans in answers:
        row: list[abi.Action] = []
        for a in ans:
            if isinstance(a, abi.UpstreamSend) and a.data.startswith(PREFACE + SDK_UP_SETTINGS):
                a = abi.UpstreamSend(a.stream_id, PREFACE + RAW_UP_SETTINGS
                                     + a.data[len(PREFACE + SDK_UP_SETTINGS):])
            elif isinstance(a, abi.DownstreamSend) and a.data.startswith(SDK_DOWN_SETTINGS):
                a = abi.DownstreamSend(a.stream_id, RAW_DOWN_SETTINGS
                                       + a.data[len(SDK_DOWN_SETTINGS):])
            row.append(a)
        out.append(row)
    return out


Call = tuple[list[abi.Event], int]
Run = tuple[list[int], list[float], list[list[abi.Action]]]  # fuel, seconds, actions per call


class Recorder:
    """Drives one module with real h2 peers and keeps every call it made."""

    def __init__(self, wasm: Path) -> None:
        self.host = ActivatorHost(wasm, CONFIG)
        self.calls: list[Call] = []
        self.down = bytearray()
        self.up = bytearray()

    def send(self, *events: abi.Event) -> None:
        self.calls.append((list(events), 1))
        for a in self.host.process(PORT, list(events), 1) or []:
            if isinstance(a, abi.DownstreamSend):
                self.down += a.data
            elif isinstance(a, abi.UpstreamSend):
                self.up += a.data

    def take_down(self) -> bytes:
        out = bytes(self.down)
        self.down.clear()
        return out

    def take_up(self) -> bytes:
        out = bytes(self.up)
        self.up.clear()
        return out


def _peer(client: bool) -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=client, header_encoding="utf-8"))
    c.initiate_connection()
    return c


def _request(path: str, **extra: str) -> list[tuple[str, str]]:
    return [(":method", "GET"), (":scheme", "http"), (":authority", "svc"), (":path", path),
            ("user-agent", "h2load nghttp2/1.52.0"), *extra.items()]


def _connected(r: Recorder) -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    """Open the client connection; the first request wakes one upstream connection."""
    c = _peer(True)
    r.send(abi.StreamOpen(SID, PORT))
    r.send(abi.StreamData(SID, c.data_to_send()))
    c.receive_data(r.take_down())
    c.send_headers(1, _request("/warm"), end_stream=True)
    r.send(abi.StreamData(SID, c.data_to_send()))
    s = _peer(False)
    # a backend sends its SETTINGS on accept: they come with the connect's result (the
    # SDK build sends no request before them, to learn the backend's stream limit)
    r.send(abi.UpstreamConnectResult(SID, 1), abi.UpstreamData(SID, s.data_to_send()))
    s.receive_data(r.take_up())
    s.send_headers(1, [(":status", "200")], end_stream=True)
    r.send(abi.UpstreamData(SID, s.data_to_send()))
    c.receive_data(r.take_down())
    _pump(r, c, s)
    return c, s


def _pump(r: Recorder, c: h2.connection.H2Connection, s: h2.connection.H2Connection) -> None:
    for _ in range(50):
        moved = False
        out = c.data_to_send()
        if out:
            r.send(abi.StreamData(SID, out))
            moved = True
        up = r.take_up()
        if up:
            for e in s.receive_data(up):
                if isinstance(e, h2.events.DataReceived):
                    s.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            moved = True
        out = s.data_to_send()
        if out:
            r.send(abi.UpstreamData(SID, out))
            moved = True
        down = r.take_down()
        if down:
            for e in c.receive_data(down):
                if isinstance(e, h2.events.DataReceived):
                    c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            moved = True
        if not moved:
            return


def get_50(r: Recorder) -> int:
    """h2load-like: 10 rounds of 50 GETs in one client write, 50 responses in one write."""
    c, s = _connected(r)
    sid = 3
    for _ in range(10):
        ids = list(range(sid, sid + 100, 2))
        sid += 100
        for i in ids:
            c.send_headers(i, _request(f"/index.html?{i}"), end_stream=True)
        r.send(abi.StreamData(SID, c.data_to_send()))
        s.receive_data(r.take_up())
        for i in ids:
            s.send_headers(i, [(":status", "200"), ("content-type", "text/html"),
                               ("content-length", "14"), ("server", "nghttpd")])
            s.send_data(i, b"hello over h2\n", end_stream=True)
        r.send(abi.UpstreamData(SID, s.data_to_send()))
        c.receive_data(r.take_down())
        _pump(r, c, s)
    return 500


def pings(r: Recorder) -> int:
    """Keep-alives while the backend sleeps: 200 PINGs, one per call, no upstream."""
    c = _peer(True)
    r.send(abi.StreamOpen(SID, PORT))
    r.send(abi.StreamData(SID, c.data_to_send()))
    c.receive_data(r.take_down())
    for i in range(200):
        c.ping(struct.pack(">Q", i))
        r.send(abi.StreamData(SID, c.data_to_send()))
        c.receive_data(r.take_down())
    return 200


def grpc_unary(r: Recorder) -> int:
    """20 rounds of 5 gRPC unary calls with 1 KiB messages each way, trailers included."""
    c, s = _connected(r)
    sid = 3
    msg = b"\x00" + struct.pack(">I", 1024) + bytes(range(256)) * 4
    grpc = {"content-type": "application/grpc", "te": "trailers", "grpc-timeout": "5S"}
    for _ in range(20):
        ids = list(range(sid, sid + 10, 2))
        sid += 10
        for i in ids:
            c.send_headers(i, [(":method", "POST"), (":scheme", "http"), (":authority", "svc"),
                               (":path", "/pkg.Svc/Call"), *grpc.items()])
            c.send_data(i, msg, end_stream=True)
        r.send(abi.StreamData(SID, c.data_to_send()))
        for e in s.receive_data(r.take_up()):
            if isinstance(e, h2.events.DataReceived):
                s.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        for i in ids:
            s.send_headers(i, [(":status", "200"), ("content-type", "application/grpc")])
            s.send_data(i, msg)
            s.send_headers(i, [("grpc-status", "0"), ("grpc-message", "")], end_stream=True)
        r.send(abi.UpstreamData(SID, s.data_to_send()))
        for e in c.receive_data(r.take_down()):
            if isinstance(e, h2.events.DataReceived):
                c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        _pump(r, c, s)
    return 100


def held_503(r: Recorder) -> int:
    """50 requests held with no backend, answered 503 locally when the hold runs out."""
    c = _peer(True)
    r.send(abi.StreamOpen(SID, PORT))
    r.send(abi.StreamData(SID, c.data_to_send()))
    c.receive_data(r.take_down())
    r.send(abi.Tick(0))
    for i in range(1, 101, 2):
        c.send_headers(i, _request(f"/h{i}", cookie="session=" + "x" * 40), end_stream=True)
    r.send(abi.StreamData(SID, c.data_to_send()))
    r.send(abi.UpstreamConnectResult(SID, 0))
    for t in range(100, 1300, 100):
        r.send(abi.Tick(t))
    c.receive_data(r.take_down())
    return 50


WORKLOADS: dict[str, Callable[[Recorder], int]] = {
    "get_50_per_call": get_50, "pings": pings, "grpc_unary": grpc_unary,
    "held_503": held_503,
}


def _run(wasm: Path, calls: Sequence[Call]) -> Run:
    """One replay on a fresh instance: fuel, wall time (s) and actions of every call."""
    fuel: list[int] = []
    times: list[float] = []
    answers: list[list[abi.Action]] = []
    host = ActivatorHost(wasm, CONFIG)
    try:
        host.process(PORT, [], 0)  # instantiate and init outside the timed calls
        inst = host.instance(PORT)
        for events, live in calls:
            t0 = time.perf_counter()
            out = host.process(PORT, events, live)
            times.append(time.perf_counter() - t0)
            fuel.append(inst.last_fuel)
            answers.append(out if out is not None else [abi.Log(3, "FAILED")])
    finally:
        host.close()
    return fuel, times, answers


def replay(calls: Sequence[Call], reps: int) -> dict[str, Run]:
    """Both modules, `reps` replays each, interleaved (the machine's load falls on both
    alike): per module the fuel and the median wall time of every call, and its actions."""
    sides = {"sdk": SDK, "raw": RAW}
    runs: dict[str, list[Run]] = {side: [] for side in sides}
    for rep in range(reps):
        for side in (sides if rep % 2 == 0 else reversed(list(sides))):
            runs[side].append(_run(sides[side], calls))
    out = {}
    for side, rs in runs.items():
        times = [statistics.median(t) for t in zip(*(r[1] for r in rs), strict=True)]
        out[side] = (rs[0][0], times, rs[0][2])
    return out


def measure(reps: int = 5) -> dict[str, Any]:
    """Per workload: fuel per event and µs per call for both modules, and their ratios."""
    out: dict[str, Any] = {"target_ratio": TARGET, "workloads": {}}
    fuel_all = {"sdk": 0, "raw": 0}
    time_all = {"sdk": 0.0, "raw": 0.0}
    events_all = calls_all = 0
    identical_all = True
    for name, work in WORKLOADS.items():
        rec = Recorder(SDK)
        try:
            units = work(rec)
        finally:
            rec.host.close()
        calls = rec.calls
        nev = sum(len(e) for e, _ in calls)
        got = replay(calls, reps)
        identical = comparable(got["sdk"][2]) == got["raw"][2]
        identical_all &= identical
        w: dict[str, Any] = {"calls": len(calls), "events": nev, "units": units,
                             "identical": identical}
        for side, (fuel, times, _) in got.items():
            w[f"{side}_fuel_per_event"] = round(sum(fuel) / nev, 1)
            w[f"{side}_fuel_per_unit"] = round(sum(fuel) / units, 1)
            w[f"{side}_us_per_call"] = round(sum(times) / len(calls) * 1e6, 2)
            fuel_all[side] += sum(fuel)
            time_all[side] += sum(times)
        w["fuel_ratio"] = round(w["sdk_fuel_per_event"] / w["raw_fuel_per_event"], 3)
        w["time_ratio"] = round(w["sdk_us_per_call"] / w["raw_us_per_call"], 3)
        out["workloads"][name] = w
        events_all += nev
        calls_all += len(calls)
    out["fuel_ratio"] = round(fuel_all["sdk"] / fuel_all["raw"], 3)
    out["time_ratio"] = round(time_all["sdk"] / time_all["raw"], 3)
    out["sdk_fuel_per_event"] = round(fuel_all["sdk"] / events_all, 1)
    out["raw_fuel_per_event"] = round(fuel_all["raw"] / events_all, 1)
    out["sdk_us_per_call"] = round(time_all["sdk"] / calls_all * 1e6, 2)
    out["raw_us_per_call"] = round(time_all["raw"] / calls_all * 1e6, 2)
    out["identical"] = identical_all
    out["within_target"] = out["fuel_ratio"] <= TARGET and out["time_ratio"] <= TARGET
    return out


if __name__ == "__main__":
    json.dump(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 5), sys.stdout, indent=2)
    sys.stdout.write("\n")
