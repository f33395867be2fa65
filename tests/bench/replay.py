"""`replay`: how long `fabricd activator test` takes to replay a 10,000-packet capture.

The capture is made here (not at import): 1,000 HTTP/1.1 connections of ten
packets each (handshake, a request, its reply, both FINs and their ACKs), one opened
every millisecond. It is replayed, in process, through the shipped TCP activator (packet
mode, no backend ever ready: every client packet is a guest call) and the shipped stream
activator (stream mode: every connection reassembled, held, relayed once the simulated
backend is ready at 50 ms, replies paced by the client's bytes). Target: under 2 s each
(issue 11). The module is compiled once before the runs, as the daemon's cache would.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from fabric.net.pcap import write_pcap
from tests.bench.common import Report, Settings, median, progress

NAME = "replay"
ROOT = Path(__file__).resolve().parents[2]
CONNECTIONS = 1000
TARGET_S = 2.0
REQ = b"GET /index.html HTTP/1.1\r\nHost: bench\r\nUser-Agent: curl/7.88.1\r\n\r\n"
REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 64\r\n\r\n" + b"x" * 64


def make_capture(path: Path, connections: int = CONNECTIONS) -> int:
    """Write the capture; returns its packet count. Built with the fabric's own packet
    builders (checksums included): scapy takes ~30 s for these 10,000 frames on a busy
    machine, which the smoke run in `make test` would pay."""
    from fabric.net import packets as P

    c, s = P.ip_bytes("10.0.0.2"), P.ip_bytes("10.0.0.100")
    eth = bytes.fromhex("020000000002" "020000000001" "0800")  # no ARP lookup
    flag_bits = {"S": P.TCP_SYN, "A": P.TCP_ACK, "P": P.TCP_PSH, "F": P.TCP_FIN}
    frames: list[tuple[float, bytes]] = []
    for i in range(connections):
        t, sport = 1.0 + i * 0.001, 20000 + i
        cseq, sseq = 1000 + i, 50000 + i

        def pkt(dt: float, to_server: bool, flags: str, seq: int, ack: int,
                data: bytes = b"", t: float = t, sport: int = sport) -> None:
            bits = sum(flag_bits[f] for f in flags)
            ip = (P.tcp_packet(c, s, sport, 80, seq, ack, bits, data) if to_server
                  else P.tcp_packet(s, c, 80, sport, seq, ack, bits, data))
            frames.append((t + dt, eth + ip))

        q, r = len(REQ), len(REPLY)
        pkt(0.0000, True, "S", cseq, 0)
        pkt(0.0001, False, "SA", sseq, cseq + 1)
        pkt(0.0002, True, "A", cseq + 1, sseq + 1)
        pkt(0.0003, True, "PA", cseq + 1, sseq + 1, REQ)
        pkt(0.0004, False, "A", sseq + 1, cseq + 1 + q)
        pkt(0.0005, False, "PA", sseq + 1, cseq + 1 + q, REPLY)
        pkt(0.0006, True, "A", cseq + 1 + q, sseq + 1 + r)
        pkt(0.0007, True, "FA", cseq + 1 + q, sseq + 1 + r)
        pkt(0.0008, False, "FA", sseq + 1 + r, cseq + 2 + q)
        pkt(0.0009, True, "A", cseq + 2 + q, sseq + 2 + r)
    frames.sort(key=lambda f: f[0])
    path.write_bytes(write_pcap(frames))
    return len(frames)


def run(s: Settings) -> Report:
    from fabric.activator.harness.replay import replay

    r = Report(NAME, f"`fabricd activator test`: replay time of a "
                     f"{CONNECTIONS * 10:,}-packet capture ({CONNECTIONS} HTTP connections)")
    with tempfile.TemporaryDirectory(prefix="fbb-replay-") as tmp:
        pcap = Path(tmp) / "bench.pcap"
        t0 = time.perf_counter()
        n = make_capture(pcap)
        progress(NAME, f"{n} packets generated in {time.perf_counter() - t0:.1f} s")
        cases = [("packet: tcp.wasm, no backend", ROOT / "activators/tcp/tcp.wasm", "never"),
                 ("stream: stream.wasm, ready at 50 ms", ROOT / "activators/stream/stream.wasm",
                  "0.05")]
        for label, wasm, ready in cases:
            replay(wasm, pcap, backend_ready_at=ready)  # compile once, as the cache would
            times: list[float | None] = []
            result = None
            for run_no in range(s.runs):
                t1 = time.perf_counter()
                result = replay(wasm, pcap, backend_ready_at=ready)
                times.append(time.perf_counter() - t1)
                progress(NAME, f"{label}: run {run_no + 1}/{s.runs}: {times[-1]:.2f} s")
            assert result is not None
            if not result.ok:
                raise RuntimeError(f"{label}: {result.failure_line()}")
            r.add(f"{label}: replay time", "s", times)
            m = median(times)
            r.check(f"{label}: {n} packets, {result.host_stats['calls']} guest calls", m, "s",
                    f"< {TARGET_S:g} s", None if m is None else m < TARGET_S)
    r.notes.append("python -m tests.bench replay; in process, the module compiled once")
    return r
