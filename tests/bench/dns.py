"""`dns`: queries per second for local names, the fabric's gateway DNS against dnsmasq
serving the same names on the same machine, both measured with dnsperf.

fabric:  namespace `bench` (10.50.0.0/24) with 50 pods p00..p49 that live on another
         worker (`worker: other`: in the table, so resolvable, but nothing to attach) and
         one attached pod `client` whose namespace runs dnsperf against the gateway
         10.50.0.1 (pod -> TAP -> fabricd's data plane, which answers local names itself).
dnsmasq: the same 50 names (`--host-record`, `--local-ttl=5`, `--no-resolv`,
         `--local=/bench.fabric.internal/`) on 10.52.0.1 in one namespace, dnsperf in
         another joined to it by a veth.

The query file is the 50 names' A records and every fifth name's AAAA (NODATA), 60
lines that dnsperf cycles through. Each round runs, per side, a throughput run (as fast
as dnsperf's clients go with a bounded number of queries outstanding; its qps and
average latency) and a latency run at a fixed, moderate rate with `-v`, whose per-query
times give p50/p99 (dnsperf 2.10 itself only prints average, min, max and stddev, and
`-v` slows dnsperf, so it is not used for the throughput). Target (issue 12): the fabric
answers at least as many queries per second as dnsmasq (medians, interleaved runs).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Any

from fabric.tools.sandbox import Daemon
from tests.bench.common import Report, Settings, fmt, interleaved, median, percentile, progress
from tests.bench.cpu import ThreadCpu
from tests.bench.topo import FABRIC, Side, Topology

NAME = "dns"
DNSMASQ = "dnsmasq"
SIDES = (FABRIC, DNSMASQ)
TARGET = 1.00  # issue 12: local names at least as fast as dnsmasq
PODS = 50
AAAA_EVERY = 5
ZONE = "bench.fabric.internal"
CLIENTS = 4  # dnsperf -c: UDP sockets
OUTSTANDING = 50  # dnsperf -q: queries in flight at most
TIMEOUT = 1  # dnsperf -t: a lost query frees its slot after this many seconds
LATENCY_QPS = 5000  # dnsperf -Q for the latency run
FABRIC_SERVER = "10.50.0.1"
DNSMASQ_SERVER = "10.52.0.1"


def pod_ip(i: int) -> str:
    return f"10.50.0.{10 + i}"


def query_lines() -> list[str]:
    lines = []
    for i in range(PODS):
        lines.append(f"p{i:02d}.{ZONE} A")
        if i % AAAA_EVERY == 0:
            lines.append(f"p{i:02d}.{ZONE} AAAA")
    return lines


_NUM = r"([\d.]+)"
_PATTERNS = {
    "sent": re.compile(r"Queries sent:\s+(\d+)"),
    "completed": re.compile(r"Queries completed:\s+(\d+)"),
    "lost": re.compile(r"Queries lost:\s+(\d+)"),
    "run_time": re.compile(r"Run time \(s\):\s+" + _NUM),
    "qps": re.compile(r"Queries per second:\s+" + _NUM),
    "avg_latency": re.compile(r"Average Latency \(s\):\s+" + _NUM),
    "min_latency": re.compile(r"Average Latency \(s\):\s+[\d.]+ \(min " + _NUM),
    "max_latency": re.compile(r"Average Latency \(s\):.*max " + _NUM + r"\)"),
    "stddev_latency": re.compile(r"Latency StdDev \(s\):\s+" + _NUM),
}
_RCODES = re.compile(r"Response codes:\s+(.*)")
_VERBOSE = re.compile(r"^> (\S+) \S+ \S+ ([\d.]+)$", re.M)


def parse_dnsperf(out: str) -> dict[str, Any]:
    """dnsperf's summary as numbers (latencies in µs), plus response codes and, with -v,
    the per-query latencies."""
    res: dict[str, Any] = {}
    for key, rx in _PATTERNS.items():
        m = rx.search(out)
        if m is None:
            raise RuntimeError(f"dnsperf output has no {key}:\n{out[-1500:]}")
        v = float(m.group(1))
        res[key] = v * 1e6 if key.endswith("latency") else v
    m = _RCODES.search(out)
    res["rcodes"] = {k: int(v) for k, v in re.findall(r"([A-Z]+) (\d+)", m.group(1))} if m else {}
    samples = [(rc, float(t) * 1e6) for rc, t in _VERBOSE.findall(out)]
    res["samples_us"] = [t for _, t in samples]
    return res


class DnsTopology(Topology):
    """The fabric's namespace with its 50 names and a client pod; dnsmasq and its client."""

    def __init__(self) -> None:
        for tool in ("dnsperf", "dnsmasq", "dig"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"`{tool}` is not installed")
        super().__init__()
        self.dnsmasq: subprocess.Popen[Any] | None = None
        self.query_file = ""

    def _build(self) -> None:
        sb = self.sb
        worker, client = sb.netns("worker"), sb.netns("client")
        srv, kc = sb.netns("dnsmasq"), sb.netns("kc")
        pods: list[dict[str, Any]] = [{"name": f"p{i:02d}", "ip": pod_ip(i), "worker": "other"}
                                      for i in range(PODS)]
        pods.append({"name": "client", "ip": "10.50.0.2", "netns": client})
        cfg = {"worker": {"id": "bench"}, "namespaces": [{
            "name": "bench", "id": 50, "cidr": "10.50.0.0/24", "dns": {"upstream": []},
            "pods": pods}]}
        self.daemon = Daemon(sb, worker, cfg).start()
        self.daemon.wait_attached(1)

        sb.veth(kc, "eth0", srv, "eth0")
        for ns, ip in ((srv, DNSMASQ_SERVER), (kc, "10.52.0.2")):
            sb.run(ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            sb.run(ns, "ip", "link", "set", "eth0", "up")
        records = [f"--host-record=p{i:02d}.{ZONE},{pod_ip(i)}" for i in range(PODS)]
        self.dnsmasq = sb.popen(
            srv, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
            "--no-dhcp-interface=eth0", f"--listen-address={DNSMASQ_SERVER}",
            "--bind-interfaces", "--pid-file=", "--user=root", "--local-ttl=5",
            f"--local=/{ZONE}/", *records,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        sb.wait_port(srv, 53)

        self.sides = {FABRIC: Side(FABRIC, client, worker, FABRIC_SERVER),
                      DNSMASQ: Side(DNSMASQ, kc, srv, DNSMASQ_SERVER)}
        self.query_file = os.path.join(sb.tmp, "queries")
        with open(self.query_file, "w") as f:
            f.write("\n".join(query_lines()) + "\n")
        for side in self.sides.values():  # both serve the same answers
            for i in (0, PODS - 1):
                a = self.dig(side, f"p{i:02d}.{ZONE}", "A")
                if a.split() != [pod_ip(i)]:
                    raise RuntimeError(f"{side.name}: p{i:02d} A is {a!r}, not {pod_ip(i)}")
            if self.dig(side, f"p00.{ZONE}", "AAAA").strip():
                raise RuntimeError(f"{side.name}: p00 has an AAAA record")

    def dig(self, side: Side, name: str, qtype: str) -> str:
        return self.run(side.client, "dig", f"@{side.server_ip}", "+time=3", "+tries=2",
                        "+short", name, qtype)

    def server_pid(self, side: str) -> int | None:
        proc = self.dnsmasq if side == DNSMASQ else (self.daemon and self.daemon.proc)
        return proc.pid if proc is not None and proc.poll() is None else None

    def dnsperf(self, side: Side, *args: str, seconds: int) -> dict[str, Any]:
        self.check_daemon()
        if self.dnsmasq is not None and self.dnsmasq.poll() is not None:
            raise RuntimeError(f"dnsmasq exited with {self.dnsmasq.returncode}")
        out = self.run(side.client, "dnsperf", "-s", side.server_ip, "-d", self.query_file,
                       "-l", str(seconds), "-t", str(TIMEOUT), "-c", str(CLIENTS), *args,
                       timeout=seconds + TIMEOUT + 30)
        return parse_dnsperf(out)


def run(s: Settings) -> Report:
    r = Report(NAME, f"dnsperf, {PODS} local names (A + {100 // AAAA_EVERY} % AAAA NODATA), "
                     f"{s.seconds} s x {s.runs} runs, fabric gateway vs dnsmasq "
                     "(interleaved)")
    throughput: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    latency: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    with DnsTopology() as topo:

        def measure(side: str, i: int) -> float:
            sd = topo.sides[side]
            with ThreadCpu(topo.server_pid(side), python=side == FABRIC) as cpu:
                res = topo.dnsperf(sd, "-q", str(OUTSTANDING), seconds=s.seconds)
            res["server_cpu_percent"] = cpu.total
            res["server_threads"] = cpu.busiest()
            throughput[side].append(res)
            lat = topo.dnsperf(sd, "-q", str(OUTSTANDING), "-Q", str(LATENCY_QPS), "-v",
                               seconds=s.seconds)
            samples = lat.pop("samples_us")
            lat.update(p50_us=percentile(samples, 50), p99_us=percentile(samples, 99),
                       n_samples=len(samples))
            latency[side].append(lat)
            threads = ", ".join(f"{n} {p:.0f}% (sys {sy:.0f}%)" for n, p, sy in cpu.busiest())
            progress(NAME, f"run {i + 1}/{s.runs} {side}: {res['qps'] / 1e3:.1f} kqps, "
                           f"avg {res['avg_latency']:.0f} µs, lost {res['lost']:.0f}; "
                           f"server CPU {cpu.total:.0f}% ({threads}); @{LATENCY_QPS} qps: "
                           f"p50 {lat['p50_us'] or 0:.0f} µs, p99 {lat['p99_us'] or 0:.0f} µs")
            return float(res["qps"])

        got = interleaved(s.runs, {side: (lambda i, side=side: measure(side, i))
                                   for side in SIDES})
        topo.check_daemon()
        drops = topo.fabric_drops()

    def col(data: dict[str, list[dict[str, Any]]], side: str, key: str,
            scale: float = 1.0) -> list[float | None]:
        return [None if m.get(key) is None else m[key] / scale for m in data[side]]

    for side in SIDES:
        r.add(f"{side}", "kqps", col(throughput, side, "qps", 1e3))
    for side in SIDES:
        r.add(f"{side} avg latency (saturated)", "µs", col(throughput, side, "avg_latency"))
    for side in SIDES:
        r.add(f"{side} lost", "queries", col(throughput, side, "lost"))
    for side in SIDES:
        r.add(f"{side} server CPU", "%", col(throughput, side, "server_cpu_percent"))
    for side in SIDES:
        r.add(f"{side} p50 @{LATENCY_QPS // 1000}k qps", "µs", col(latency, side, "p50_us"))
        r.add(f"{side} p99 @{LATENCY_QPS // 1000}k qps", "µs", col(latency, side, "p99_us"))

    f, d = median(got[FABRIC]), median(got[DNSMASQ])
    ratio = f / d * 100 if f is not None and d else None
    r.check("fabric / dnsmasq qps (medians)", ratio, "%", f">= {TARGET * 100:.0f} %",
            ratio is not None and ratio >= TARGET * 100)
    for side in SIDES:
        r.check(f"{side}: qps per CPU-second of the server",
                _per_cpu(median(got[side]), median(col(throughput, side,
                                                       "server_cpu_percent"))),
                "q/cpu-s", "", None)
    fp99 = median(col(latency, FABRIC, "p99_us"))
    dp99 = median(col(latency, DNSMASQ, "p99_us"))
    r.check(f"fabric - dnsmasq p99 @{LATENCY_QPS} qps", None if fp99 is None or dp99 is None
            else fp99 - dp99, "µs", "", None)

    rows = []
    for side in SIDES:
        threads: dict[str, list[float]] = {}
        for m in throughput[side]:
            for n, p, sy in m["server_threads"]:
                threads.setdefault(n, []).append(p)
                threads.setdefault(f"{n} (sys)", []).append(sy)
        rows.append([side, "; ".join(f"{n} {fmt(median(v))}" for n, v in threads.items())])
    r.tables.append(("server CPU by thread during the throughput runs (median % of one CPU; "
                     "sys: of which in the kernel)",
                     ["side", "threads"], rows))

    rcodes = {side: sorted({k for m in throughput[side] for k in m["rcodes"]})
              for side in SIDES}
    bad = {side: [c for c in codes if c != "NOERROR"] for side, codes in rcodes.items()}
    if any(bad.values()):
        r.notes.append("answers other than NOERROR: " + ", ".join(
            f"{side} {'/'.join(c)}" for side, c in bad.items() if c))
    r.notes.append(f"dnsperf -c {CLIENTS} -q {OUTSTANDING} -t {TIMEOUT} for throughput; "
                   f"p50/p99 come from a separate `-v` run at -Q {LATENCY_QPS} (dnsperf "
                   "2.10 prints only average/min/max/stddev, and -v slows it down)")
    r.notes.append("the fabric's NODATA answers carry the zone's SOA (for negative caching), "
                   "dnsmasq's do not: its responses are a few bytes smaller")
    shown = {k: v for k, v in drops.items() if k != "ipv6"}
    if shown:
        r.notes.append("fabricd drops: " + ", ".join(f"{k}={v:.0f}" for k, v in shown.items()))
    r.extra = {
        "pods": PODS, "queries": query_lines(), "clients": CLIENTS, "outstanding": OUTSTANDING,
        "latency_qps": LATENCY_QPS,
        "throughput": throughput, "latency": latency, "fabric_drops": drops,
    }
    return r


def _per_cpu(qps: float | None, cpu_percent: float | None) -> float | None:
    if qps is None or not cpu_percent:
        return None
    return qps / (cpu_percent / 100)
