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
  flooder (tests/support/flood.py) in worker 2's namespace sends initiations to worker
  1's tunnel port from 64 source ports at the rate. Measured on worker 1, without and
  with the flood, in four phases (the flood alone; 40 pings a -> b; iperf3 TCP a -> b;
  b -> a with ``-R``): datagrams read, datagrams the kernel dropped for a full socket
  buffer, cookie replies and budget drops per second, the data-plane thread's CPU and
  the machine's. ``--kind junk`` floods with datagrams of no known type instead: the
  control, which costs no crypto in any version.

Prints a table and one JSON object. Nothing here touches the machine's own network
namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from typing import Any

from tests.support.flood import initiations

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


# -- e2e ---------------------------------------------------------------------------------


def _tunnel_counters(daemon: Any) -> dict[str, float]:
    from tests.support.procstat import scrape

    try:
        return scrape(daemon.control).tunnel()
    except Exception as e:  # a data plane too busy to answer is a result too
        print(f"metrics: {e}", file=sys.stderr)
        return {}


def _rcvbuf_errors(sb: Any, ns: str) -> int:
    """UDP datagrams the kernel dropped for full receive buffers in `ns`."""
    lines = [x.split() for x in sb.run(ns, "cat", "/proc/net/snmp").stdout.splitlines()
             if x.startswith("Udp:")]
    return int(dict(zip(lines[0], lines[1], strict=True))["RcvbufErrors"])


def _ping(sb: Any, c: Any) -> str:
    """40 pings a -> b through the tunnel, 50 ms apart: loss and round-trip times."""
    out = sb.run(c.a, "ping", "-q", "-c", "40", "-i", "0.05", "-W", "2", "10.40.0.3",
                 check=False, timeout=60).stdout
    loss = next((w for w in out.split(",") if "loss" in w), "?").strip().split()[0]
    rtt = next((x.split("=")[1].split()[0] for x in out.splitlines() if "rtt" in x), "-")
    return f"loss {loss}, rtt min/avg/max/mdev {rtt} ms"


def _iperf(sb: Any, c: Any, seconds: float, reverse: bool) -> float:
    args = ["iperf3", "-c", "10.40.0.3", "-t", str(seconds), "-J"] + (["-R"] if reverse else [])
    p = sb.run(c.a, *args, check=False, timeout=seconds + 40)
    try:
        return json.loads(p.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
    except (ValueError, KeyError):
        return 0.0


def _phase(sb: Any, c: Any, run: Any) -> dict[str, Any]:
    """Run `run()` and measure worker 1 meanwhile: datagrams read and dropped by the
    kernel for a full socket buffer, cookies, budget drops (per second), its data-plane
    thread's CPU and the whole machine's."""
    from tests.bench.cpu import ThreadCpu
    from tests.bench.tunnel import machine_cpu

    before = _tunnel_counters(c.d1)
    drops = _rcvbuf_errors(sb, c.w1)
    busy0, total0 = machine_cpu()
    t0 = time.monotonic()
    assert c.d1.proc is not None
    with ThreadCpu(c.d1.proc.pid) as cpu:
        result = run()
    wall = time.monotonic() - t0
    busy1, total1 = machine_cpu()
    after = _tunnel_counters(c.d1)

    def rate(name: str) -> int:
        return round((after.get(name, 0) - before.get(name, 0)) / wall)

    return {"result": result, "read_per_s": rate("datagrams_in"),
            "rcvbuf_drops_per_s": round((_rcvbuf_errors(sb, c.w1) - drops) / wall),
            "cookies_per_s": rate("cookie_sent"),
            "over_budget_per_s": rate("handshake_over_budget"),
            "dataplane_cpu": round(cpu.percent.get("fabric-dataplane", 0.0), 1),
            "dataplane_kernel": round(cpu.system_percent.get("fabric-dataplane", 0.0), 1),
            "machine_busy": round((busy1 - busy0) / max(1, total1 - total0) * 100, 1)}


def bench_e2e(rates: list[int], seconds: float, kind: str) -> list[dict[str, Any]]:
    from fabric.tools.sandbox import Sandbox
    from tests.e2e.test_tunnel import W1, Cluster

    rows = []
    sb = Sandbox("fbb")
    try:
        c = Cluster(sb, keepalive=None).start()
        assert "1 received" in sb.run(c.a, "ping", "-c", "1", "-W", "3", "10.40.0.3").stdout
        srv = sb.popen(c.b, "iperf3", "-s")
        sb.wait_port(c.b, 5201)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        length = 3 * seconds + 15
        for rate in [0, *rates]:
            row: dict[str, Any] = {"rate": rate, "kind": kind}
            flooder = None
            if rate:
                flooder = sb.popen(c.w2, sys.executable, "-m", "tests.support.flood",
                                   f"{W1}:51820", c.k1[1], str(rate), str(length),
                                   kind, cwd=root, text=True, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            row["idle"] = _phase(sb, c, lambda: time.sleep(seconds))
            row["ping"] = _phase(sb, c, lambda: _ping(sb, c))
            row["a_to_b"] = _phase(sb, c, lambda: round(_iperf(sb, c, seconds, False)))
            row["b_to_a"] = _phase(sb, c, lambda: round(_iperf(sb, c, seconds, True)))
            row["sent_per_s"] = 0
            if flooder is not None:
                out, _ = flooder.communicate(timeout=length + 30)
                row["sent_per_s"] = round(int(out.split()[-1]) / length)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        sb.stop(srv)
    finally:
        sb.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.handshake_flood")
    ap.add_argument("what", nargs="*", default=["core"], choices=["core", "e2e"])
    ap.add_argument("--rates", default="20000,50000")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--kind", choices=["init", "junk"], default="init",
                    help="what the flood sends (junk: a control that costs no crypto)")
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
        result["e2e"] = bench_e2e(rates, args.seconds, args.kind)
        for r in result["e2e"]:
            cells = []
            for phase in ("idle", "ping", "a_to_b", "b_to_a"):
                p = r[phase]
                cells.append(f"{phase}: read {p['read_per_s']}/s, dropped "
                             f"{p['rcvbuf_drops_per_s']}/s, cookies {p['cookies_per_s']}/s, "
                             f"data plane {p['dataplane_cpu']} %, machine "
                             f"{p['machine_busy']} %"
                             + ("" if phase == "idle" else f", {p['result']}")
                             + (" Mbit/s" if phase.endswith("_b") or phase.endswith("_a")
                                else ""))
            print(f"e2e {r['kind']} {r['rate']:>6}/s (sent {r['sent_per_s']}/s)\n    "
                  + "\n    ".join(cells))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
