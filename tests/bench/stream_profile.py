"""Where a stream port's time goes: `python -m tests.bench.stream_profile postgres|http2`.

Builds the `postgres` or `http2` benchmark's topology, runs the load through the
activator's VIP (pgbench -S -c 20 or h2load -c 10 -m 50) for `--seconds`, and meanwhile
reads every fabricd thread's CPU from /proc and samples the daemon with py-spy
(`--threads --idle --nonblocking`, raw stacks). Prints each thread's CPU per request
(CPU µs over the requests the load reported), and for the busiest threads the innermost
frames and the inclusive functions by share of that thread's samples. `--direct` loads
the pod directly instead (the reference), `--side stream` the spliced reference.
`--perf` also counts syscalls per thread with `perf stat`. `--keep FILE` saves the raw
stacks for flame graphs.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

from tests.bench.cpu import ThreadCpu, _py_spy, python_thread_names

PERF_EVENTS = ("raw_syscalls:sys_enter", "context-switches", "task-clock")


def _parse(text: str) -> dict[str, list[tuple[list[str], int]]]:
    """py-spy raw lines -> thread name -> [(frames outermost first, count)]."""
    out: dict[str, list[tuple[list[str], int]]] = collections.defaultdict(list)
    for ln in text.splitlines():
        stack, _, n = ln.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        m = re.match(r'thread \(0x[0-9a-fA-F]+\)|process \d+:"[^"]*"', frames[0])
        name = frames[0]
        tm = re.search(r'"([^"]+)"', frames[0]) if m is None else None
        if frames and frames[0].startswith("process"):
            frames = frames[1:]
        if frames and frames[0].startswith("thread"):
            tm = re.search(r'"([^"]+)"', frames[0])
            name = tm.group(1) if tm else frames[0]
            frames = frames[1:]
        out[name].append((frames, int(n)))
    return out


def _short(frame: str) -> str:
    m = re.match(r"(.*) \((.*?)(?::(\d+))?\)$", frame)
    if not m:
        return frame
    func, path, line = m.groups()
    path = path.split("/fabric/")[-1] if "/fabric/" in path else os.path.basename(path)
    return f"{func} ({path}:{line})" if line else f"{func} ({path})"


def _machine() -> tuple[float, float, int]:
    """/proc/stat now: (busy CPU seconds, idle CPU seconds, context switches), all CPUs."""
    tick = os.sysconf("SC_CLK_TCK")
    busy = idle = 0.0
    ctxt = 0
    with open("/proc/stat") as f:
        for ln in f:
            parts = ln.split()
            if parts[0] == "cpu":
                v = [int(x) for x in parts[1:9]]  # user nice system idle iowait irq softirq steal
                idle = (v[3] + v[4]) / tick
                busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / tick
            elif parts[0] == "ctxt":
                ctxt = int(parts[1])
    return busy, idle, ctxt


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.stream_profile")
    ap.add_argument("bench", choices=("postgres", "http2"))
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--side", choices=("vip", "direct", "stream", "pod-local"), default="vip",
                    help="pod-local: postgres only, the activator's port with upstream: "
                         "pod-local")
    ap.add_argument("--hz", type=int, default=250)
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--perf", action="store_true")
    ap.add_argument("--no-spy", action="store_true")
    ap.add_argument("--keep")
    ap.add_argument("--gil", action="store_true", help="py-spy --gil: only the GIL holder")
    a = ap.parse_args(argv)
    spy = _py_spy()
    result: dict[str, float] = {}
    if a.bench == "postgres":
        from tests.bench import postgres as P

        topo_cls = P.PgTopology
        host = {"vip": P.VIP, "direct": P.DB_IP, "stream": P.VIP, "pod-local": P.VIP}[a.side]
        port = {"stream": 5433, "pod-local": 5434}.get(a.side, 5432)

        def load(topo: P.PgTopology) -> None:
            out = topo.pgbench(host, "-n", "-S", "-c", str(P.CLIENTS), "-j", "2", "-T",
                               str(a.seconds), timeout=a.seconds + 120, port=port)
            m = P._TPS.search(out)
            result["rate"] = float(m.group(1)) if m else 0.0
    else:
        from tests.bench import http2 as H

        topo_cls = H.H2Topology  # type: ignore[assignment]
        if a.side == "pod-local":
            ap.error("--side pod-local is for postgres")
        url = {"vip": f"http://{H.VIP}/", "direct": f"http://{H.POD}:8080/",
               "stream": f"http://{H.SPLICE_VIP}/"}[a.side]

        def load(topo: H.H2Topology) -> None:  # type: ignore[misc]
            result["rate"] = topo.h2load(url, a.seconds)

    with topo_cls() as topo:
        if a.bench == "postgres":
            topo.pgbench(P.VIP, "-i", "-q", "-s", "1", timeout=180)
        assert topo.daemon is not None and topo.daemon.proc is not None
        pid = topo.daemon.proc.pid
        names = python_thread_names(pid)
        raw = a.keep or tempfile.mktemp(suffix=".txt")
        t = threading.Thread(target=load, args=(topo,))
        t.start()
        time.sleep(1.5)  # past the warm-up
        window = max(a.seconds - 3, 1)
        perfs = []
        if a.perf:
            for tid, n in names.items():
                perfs.append((n, subprocess.Popen(
                    ["perf", "stat", "-x", ",", "-e", ",".join(PERF_EVENTS), "-t", str(tid),
                     "--", "sleep", str(window)], stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, text=True)))
        m0 = _machine()
        t0 = time.monotonic()
        with ThreadCpu(pid) as cpu:
            if a.no_spy or spy is None:
                time.sleep(window)
            else:
                cmd = [spy, "record", "--pid", str(pid), "--duration", str(window),
                       "--rate", str(a.hz), "--format", "raw", "--threads", "--idle",
                       "--nonblocking", "-o", raw]
                subprocess.run(cmd + (["--gil"] if a.gil else []), check=True,
                               capture_output=True)
        m1 = _machine()
        elapsed = time.monotonic() - t0
        counted = [(n, p.communicate()[1]) for n, p in perfs]
        t.join()
        topo.check_daemon()
    rate = result.get("rate", 0.0)
    print(f"{a.bench} {a.side}: {rate:,.0f} requests/s over {a.seconds} s")
    if rate:  # the whole machine: the load, the servers and the fabric together
        busy, idle = m1[0] - m0[0], m1[1] - m0[1]
        print(f"  machine: {busy / elapsed / rate * 1e6:6.1f} µs busy CPU/request, "
              f"{idle / max(busy + idle, 1e-9) * 100:4.1f} % idle, "
              f"{(m1[2] - m0[2]) / elapsed / rate:5.2f} context switches/request")
    for n, pct, syspct in cpu.busiest(8):
        per = pct / 100 / rate * 1e6 if rate else 0.0
        print(f"  {n:28s} {pct:5.1f} % CPU (kernel {syspct:4.1f} %)  {per:6.1f} µs/request")
    for n, text in counted:
        for ln in text.splitlines():
            f = ln.split(",")
            if len(f) > 2 and f[0].replace(".", "").isdigit():
                print(f"  perf {n:20s} {f[2]:28s} {float(f[0]) / window / max(rate, 1):8.3f}"
                      " per request")
    if a.no_spy or spy is None:
        return 0
    with open(raw) as f:
        threads = _parse(f.read())
    if not a.keep:
        os.unlink(raw)
    for name, stacks in sorted(threads.items(), key=lambda kv: -sum(c for _, c in kv[1])):
        total = sum(c for _, c in stacks)
        busy = [(fr, c) for fr, c in stacks
                if fr and not any(x in fr[-1] for x in ("select (selectors", "poll (",
                                                         "wait (threading", "get (queue",
                                                         "sleep"))]
        nb = sum(c for _, c in busy)
        if nb < total * 0.02 or nb < 10:
            continue
        print(f"\n== {name}: {total} samples, {nb} busy ({nb / total * 100:.1f} %)")
        selfc: collections.Counter[str] = collections.Counter()
        incl: collections.Counter[str] = collections.Counter()
        for fr, c in busy:
            selfc[_short(fr[-1])] += c
            for x in {re.sub(r":\d+\)$", ")", _short(y)) for y in fr}:
                incl[x] += c
        print("  self:")
        for k, v in selfc.most_common(a.top):
            print(f"    {v / nb * 100:5.1f} %  {k}")
        print("  inclusive:")
        for k, v in incl.most_common(a.top + 10):
            print(f"    {v / nb * 100:5.1f} %  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
