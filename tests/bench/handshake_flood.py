"""What a flood of spoofed, mac1-valid handshake initiations costs the data plane:
``python -m tests.bench.handshake_flood [core] [e2e] [--rates 20000,50000] [--seconds S]``.

mac1 only needs the worker's public key, which every peer has, so anyone who learns it
can send initiations that get past mac1 from any source address. Under load (more than
``handshake_load_threshold`` a second) each one is answered with a cookie reply, which
costs a BLAKE2s, an XChaCha20-Poly1305 and a send on the data-plane thread.

* ``core`` (no root): the review's underload.py, at a given rate: initiations from random
  sources handed to ``TunnelCore.receive`` with timestamps ``i / rate``; the CPU this
  takes per simulated second is the share of one core the flood would take.
* ``e2e`` (root): the two workers of tests/e2e/test_tunnel.py, each running fabricd. A
  flooder in worker 2's namespace sends initiations to worker 1's tunnel port from 64
  source ports at the rate. Measured: worker 1's data-plane thread CPU with only the
  flood, and iperf3 TCP between the pods both ways (a -> b, and b -> a with ``-R``)
  without and with the flood.

Prints a table and one JSON object. Nothing here touches the machine's own network
namespace.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import socket
import subprocess
import sys
import time
from typing import Any

from tunnels import messages
from tunnels.cookie import hash32, mac16

SOURCES = 64  # the flooder's source ports


def initiations(public_key: bytes, n: int = 4096) -> list[bytes]:
    """`n` initiations with a valid mac1 for `public_key` and garbage Noise inside."""
    key = hash32(messages.LABEL_MAC1 + public_key)
    out = []
    for i in range(n):
        body = messages.INDEX_HEADER.pack(messages.TYPE_INITIATION, i + 1)
        body += os.urandom(messages.NOISE_MSG1_LEN)
        out.append(body + mac16(key, body) + bytes(messages.MAC_LEN))
    return out


# -- core --------------------------------------------------------------------------------


def bench_core(rate: int, seconds: float) -> dict[str, Any]:
    """CPU of the core for `seconds` of flood at `rate`, as % of one core."""
    from tunnels.core import TunnelCore

    core = TunnelCore(os.urandom(32))
    msgs = initiations(core.public_key)
    rng = random.Random(1)
    srcs = [(f"198.51.{rng.randrange(256)}.{rng.randrange(256)}", rng.randrange(1024, 65536))
            for _ in range(8192)]
    n = int(rate * seconds)
    receive = core.receive
    start = 1000.0
    t = time.process_time()
    for i in range(n):
        receive(msgs[i & 4095], srcs[i & 8191], start + i / rate)
    cpu = time.process_time() - t
    c = core.counters
    return {"rate": rate, "seconds": seconds, "cpu_percent": round(cpu / seconds * 100, 1),
            "us_per_message": round(cpu / n * 1e6, 2), "cookie_sent": c["cookie_sent"],
            "handshake_over_budget": c.get("handshake_over_budget")}


# -- the flooder (runs inside a namespace) --------------------------------------------------


def flood(target: tuple[str, int], public_key: bytes, rate: int, seconds: float) -> int:
    """Send initiations to `target` at `rate` for `seconds`; returns how many went."""
    msgs = initiations(public_key)
    socks = []
    for _ in range(SOURCES):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind(("0.0.0.0", 0))
        socks.append(s)
    sent = 0
    t0 = time.monotonic()
    while True:
        elapsed = time.monotonic() - t0
        if elapsed >= seconds:
            break
        due = int(elapsed * rate)
        while sent < due:
            try:
                socks[sent % SOURCES].sendto(msgs[sent & 4095], target)
            except (BlockingIOError, ConnectionRefusedError):
                pass
            sent += 1
        time.sleep(0.0005)
    return sent


# -- e2e ---------------------------------------------------------------------------------


def _tunnel_counters(daemon: Any) -> dict[str, float]:
    from fabric.control.client import ControlClient

    out: dict[str, float] = {}
    try:
        text = ControlClient(daemon.control).get_text("/metrics")
    except Exception as e:  # a data plane too busy to answer is a result too
        print(f"metrics: {e}", file=sys.stderr)
        return out
    for line in text.splitlines():
        if line.startswith("fabric_tunnel_total{"):
            name = line.split('counter="', 1)[1].split('"', 1)[0]
            out[name] = float(line.split()[-1])
    return out


def _rcvbuf_errors(sb: Any, ns: str) -> int:
    """UDP datagrams the kernel dropped for full receive buffers in `ns`."""
    lines = [x.split() for x in sb.run(ns, "cat", "/proc/net/snmp").stdout.splitlines()
             if x.startswith("Udp:")]
    return int(dict(zip(lines[0], lines[1], strict=True))["RcvbufErrors"])


def _iperf(sb: Any, c: Any, seconds: float, reverse: bool) -> float:
    args = ["iperf3", "-c", "10.40.0.3", "-t", str(seconds), "-J"] + (["-R"] if reverse else [])
    p = sb.run(c.a, *args, check=False, timeout=seconds + 40)
    try:
        return json.loads(p.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
    except (ValueError, KeyError):
        return 0.0


def bench_e2e(rates: list[int], seconds: float) -> list[dict[str, Any]]:
    from fabric.tools.sandbox import Sandbox
    from tests.bench.cpu import ThreadCpu
    from tests.e2e.test_tunnel import W1, Cluster

    rows = []
    sb = Sandbox("fbb")
    try:
        c = Cluster(sb, keepalive=None).start()
        assert "1 received" in sb.run(c.a, "ping", "-c", "1", "-W", "3", "10.40.0.3").stdout
        srv = sb.popen(c.b, "iperf3", "-s")
        sb.wait_port(c.b, 5201)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        for rate in [0, *rates]:
            row: dict[str, Any] = {"rate": rate}
            flooder = None
            if rate:
                flooder = sb.popen(c.w2, sys.executable, "-m", "tests.bench.handshake_flood",
                                   "flood", f"{W1}:51820", c.k1[1], str(rate),
                                   str(3 * seconds + 8), cwd=root, text=True,
                                   stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            before = _tunnel_counters(c.d1)
            drops = _rcvbuf_errors(sb, c.w1)
            t0 = time.monotonic()
            assert c.d1.proc is not None
            with ThreadCpu(c.d1.proc.pid) as cpu:
                time.sleep(seconds)
            after = _tunnel_counters(c.d1)
            wall = time.monotonic() - t0
            row["rcvbuf_drops_per_s"] = round((_rcvbuf_errors(sb, c.w1) - drops) / wall)
            row["received_per_s"] = round(
                (after.get("datagrams_in", 0) - before.get("datagrams_in", 0)) / wall)
            row["dataplane_cpu_percent"] = round(cpu.percent.get("fabric-dataplane", 0.0), 1)
            row["dataplane_kernel_percent"] = round(
                cpu.system_percent.get("fabric-dataplane", 0.0), 1)
            row["cookie_sent_per_s"] = round(
                (after.get("cookie_sent", 0) - before.get("cookie_sent", 0)) / wall)
            row["over_budget_per_s"] = round(
                (after.get("handshake_over_budget", 0)
                 - before.get("handshake_over_budget", 0)) / wall)
            row["iperf_a_to_b_mbit"] = round(_iperf(sb, c, seconds, reverse=False))
            row["iperf_b_to_a_mbit"] = round(_iperf(sb, c, seconds, reverse=True))
            row["sent_per_s"] = 0
            if flooder is not None:
                out, _ = flooder.communicate(timeout=3 * seconds + 30)
                row["sent_per_s"] = round(int(out.split()[-1]) / (3 * seconds + 8))
            ping = sb.run(c.a, "ping", "-c", "3", "-i", "0.2", "-W", "1", "10.40.0.3",
                          check=False).stdout
            row["ping_after"] = "3 received" in ping
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        sb.stop(srv)
    finally:
        sb.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["flood"]:
        host, port = argv[1].rsplit(":", 1)
        sent = flood((host, int(port)), base64.b64decode(argv[2]), int(argv[3]),
                     float(argv[4]))
        print(sent)
        return 0
    ap = argparse.ArgumentParser(prog="python -m tests.bench.handshake_flood")
    ap.add_argument("what", nargs="*", default=["core"], choices=["core", "e2e"])
    ap.add_argument("--rates", default="20000,50000")
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",")]
    result: dict[str, Any] = {}
    if "core" in args.what:
        result["core"] = [bench_core(r, min(args.seconds, 2.0)) for r in rates]
        for r in result["core"]:
            print(f"core  {r['rate']:>6}/s: {r['cpu_percent']:6.1f} % of a core "
                  f"({r['us_per_message']} us each), cookies {r['cookie_sent']}, "
                  f"over budget {r['handshake_over_budget']}")
    if "e2e" in args.what:
        result["e2e"] = bench_e2e(rates, args.seconds)
        for r in result["e2e"]:
            print(f"e2e   {r['rate']:>6}/s: sent {r['sent_per_s']}/s, read "
                  f"{r['received_per_s']}/s, socket drops {r['rcvbuf_drops_per_s']}/s, data "
                  f"plane {r['dataplane_cpu_percent']} % ({r['dataplane_kernel_percent']} % "
                  f"kernel), cookies {r['cookie_sent_per_s']}/s, "
                  f"over budget {r['over_budget_per_s']}/s, iperf a->b "
                  f"{r['iperf_a_to_b_mbit']} Mbit/s, b->a {r['iperf_b_to_a_mbit']} Mbit/s, "
                  f"ping after {r['ping_after']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
