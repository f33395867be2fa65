"""`sdk`: what the activator SDKs cost per event, against the same logic without them.

Through the real host (ActivatorHost, the wasmtime sandbox the daemon runs), no network:
- the TCP activator on the C SDK (activators/tcp/tcp.wasm) and on the Zig SDK
  (activators/sdk/zig/examples/tcp_hold.wasm) vs the same activator written against the
  raw ABI (activators/testing/tcp_raw.wasm), for a batch of SYNs to distinct flows with
  no backend (each held, a wake each) and for packets with a ready backend (each passed);
- the Zig SDK's stream_hold.wasm vs the C stream activator (activators/stream), for a
  batch of connections through their life with a ready backend (open, connect result,
  close: pause, connect, resume, splice).
Guest fuel per event is deterministic (wasmtime counts instructions); wall time per
event is the whole host call (encoding, copy, guest, decoding), medians of interleaved
runs. Target: SDK within 20 % of the hand-written code in fuel per event.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from fabric.activator import abi as A
from fabric.activator.host import ActivatorHost, ActivatorInstance
from fabric.net import packets as P
from tests.bench.common import Report, Settings, interleaved, median, progress

NAME = "sdk"
ACT = Path(__file__).resolve().parents[2] / "activators"
TCP_SDK, TCP_RAW = ACT / "tcp" / "tcp.wasm", ACT / "testing" / "tcp_raw.wasm"
STREAM_C = ACT / "stream" / "stream.wasm"
STREAM_ZIG = ACT / "sdk" / "zig" / "examples" / "stream_hold.wasm"
TCP_ZIG = ACT / "sdk" / "zig" / "examples" / "tcp_hold.wasm"
TARGET = 1.20
BATCH = 256
CLIENT, VIP = P.ip_bytes("10.0.0.7"), P.ip_bytes("10.96.0.10")


def _syn(sport: int) -> bytes:
    return P.tcp_packet(CLIENT, VIP, sport, 80, 1000, 0, P.TCP_SYN, b"")


SYNS = [A.Packet(i + 1, (i * 2654435761) & 0xFFFFFFFF, _syn(20000 + i)) for i in range(BATCH)]
DATA = [A.Packet(i + 1, i, P.tcp_packet(CLIENT, VIP, 20000 + i, 80, 1, 1, P.TCP_ACK,
                                          b"x" * 1000)) for i in range(BATCH)]

# A scenario: (set-up batches, the measured batches, tear-down batches) for one round.
Scenario = Callable[[], tuple[list[list[A.Event]], list[list[A.Event]], list[list[A.Event]]]]


def syn_no_backend() -> tuple[list[list[A.Event]], list[list[A.Event]], list[list[A.Event]]]:
    # replay and forget what was held, then hold again: the next round starts empty
    return [], [SYNS], [[A.BackendAvailable()], [A.BackendUnavailable()]]


def ready_backend() -> tuple[list[list[A.Event]], list[list[A.Event]], list[list[A.Event]]]:
    return [[A.BackendAvailable()]], [DATA], []


def streams_through() -> tuple[list[list[A.Event]], list[list[A.Event]], list[list[A.Event]]]:
    ids = range(1, BATCH + 1)
    return ([[A.BackendAvailable()]],
            [[A.StreamOpen(i, 80) for i in ids], [A.UpstreamConnectResult(i, 1) for i in ids],
             [A.StreamClose(i) for i in ids]],
            [])


def measure(inst: ActivatorInstance, scenario: Scenario, rounds: int
            ) -> tuple[float, float]:
    """(guest fuel per event, wall us per event) of the measured batches, the best of
    `rounds` for wall time (fuel is the same every round)."""
    fuel, walls = 0.0, []
    for _ in range(rounds):
        setup, measured, teardown = scenario()
        for b in setup:
            assert inst.process(b) is not None
        f, w, n = 0, 0.0, 0
        for b in measured:
            before = inst.stats.fuel_used  # summed over calls: the host may split a batch
            t = time.perf_counter()
            out = inst.process(b, BATCH)
            w += time.perf_counter() - t
            assert out is not None, inst.last_failure
            f += inst.stats.fuel_used - before
            n += len(b)
        for b in teardown:
            assert inst.process(b) is not None
        fuel = f / n
        walls.append(w / n * 1e6)
    return fuel, min(walls)


def compare(r: Report, s: Settings, title: str, sdk: tuple[str, Path], ref: tuple[str, Path],
            scenario: Scenario, config: dict[str, object]) -> None:
    hosts = {label: ActivatorHost(path, config, max_held=8192) for label, path in (sdk, ref)}
    try:
        insts = {label: h.instance(80) for label, h in hosts.items()}
        for inst in insts.values():  # warm: compiled, buffers grown, tables touched
            measure(inst, scenario, 2)
        rounds = max(3, s.seconds * 2)
        got = interleaved(s.runs, {label: (lambda i, label=label: measure(
            insts[label], scenario, rounds)) for label in insts})
    finally:
        for h in hosts.values():
            h.close()
    for label in (sdk[0], ref[0]):
        fuel = [g[0] for g in got[label]]
        wall = [g[1] for g in got[label]]
        r.add(f"{title}: {label}, guest fuel", "/event", fuel)
        r.add(f"{title}: {label}, host call", "us/event", wall)
        progress(NAME, f"{title}: {label}: {median(fuel):.0f} fuel/event, "
                       f"{median(wall):.2f} us/event")
    fs, fr = (median([g[0] for g in got[k]]) for k in (sdk[0], ref[0]))
    ws, wr = (median([g[1] for g in got[k]]) for k in (sdk[0], ref[0]))
    fuel_ratio = fs / fr if fs is not None and fr else None
    r.check(f"{title}: fuel {sdk[0]} / {ref[0]}", fuel_ratio, "x", f"<= {TARGET:.2f}",
            fuel_ratio is not None and fuel_ratio <= TARGET)
    r.check(f"{title}: wall {sdk[0]} / {ref[0]}", ws / wr if ws is not None and wr else None,
            "x", "", None)


def run(s: Settings) -> Report:
    r = Report(NAME, f"guest fuel and host-call time per event, SDK vs hand-written, "
                     f"batches of {BATCH} events, {s.runs} interleaved runs")
    tcp = {"hold_timeout_ms": 30000, "max_flows": 4096}
    compare(r, s, "TCP SYNs, no backend", ("C SDK", TCP_SDK), ("raw ABI", TCP_RAW),
            syn_no_backend, tcp)
    compare(r, s, "TCP data, ready backend", ("C SDK", TCP_SDK), ("raw ABI", TCP_RAW),
            ready_backend, tcp)
    compare(r, s, "TCP SYNs, no backend", ("Zig SDK", TCP_ZIG), ("raw ABI", TCP_RAW),
            syn_no_backend, tcp)
    compare(r, s, "TCP data, ready backend", ("Zig SDK", TCP_ZIG), ("raw ABI", TCP_RAW),
            ready_backend, tcp)
    compare(r, s, "streams open/connect/close", ("Zig SDK", STREAM_ZIG),
            ("C (stream.c)", STREAM_C), streams_through, {})
    protocols(r, s)
    r.notes.append("fuel is wasmtime's instruction count: the same on every machine; "
                   "wall time includes the host's encoding and decoding")
    return r


def protocols(r: Report, s: Settings) -> None:
    """The HTTP/2 and PostgreSQL activators on the SDK against their hand-written builds
    (testing/http2_raw, testing/postgres_raw) on recorded workloads, answers compared."""
    from tests.bench import sdk_http2, sdk_postgres

    h2 = sdk_http2.measure(max(1, s.runs))
    for name, w in h2["workloads"].items():
        r.check(f"HTTP/2 {name}: fuel per event, SDK / hand-written", w["fuel_ratio"], "x",
                "<= 1.2", w["fuel_ratio"] <= 1.2 and w["identical"])
    r.check("HTTP/2 all workloads: us per call, SDK / hand-written", h2["time_ratio"], "x",
            "", None)
    pg = sdk_postgres.measure(seconds=max(0.5, s.seconds / 2))
    for name, w in pg.items():
        if isinstance(w, dict):
            r.check(f"PostgreSQL {name}: fuel per call, SDK / hand-written", w["fuel_ratio"],
                    "x", "<= 1.2", w["fuel_ratio"] <= 1.2)
    r.extra = {**(r.extra or {}), "http2": h2, "postgres": pg}

