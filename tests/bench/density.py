"""`density`: N real pods on one worker, each a network namespace with a TAP the daemon
makes, attached one by one through the control API as a runtime does.

Reports the attach rate over the whole run and per segment (1,000 pods, or a fifth of a
smaller run), the daemon's RSS, fds and idle CPU as pods pile up, pod-to-pod iperf3 TCP
and ping between two pods with N attached against the same two with only them attached
(ratios; target: within 10 %), then the rate of detaching them all. Targets: attach
>= 100 pods/s, RSS <= 500 MB.

The pods' namespaces are made before and removed after with `ip -batch` (not timed), all
under the run's unique `fbb-<runid>-` prefix, also on failure. The only limit raised is
this process's RLIMIT_NOFILE (the daemon inherits it: one fd per TAP); nothing on the host
is changed. `python -m tests.bench density --pods 10000` (root), or
`python -m tests.bench.density --pods N` for this benchmark alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from fabric.control.client import ControlClient
from fabric.tools.sandbox import Daemon, Sandbox, prerequisites
from tests.bench.common import Report, Settings, median, percentile, progress, render
from tests.bench.ping import parse_rtts
from tests.bench.topo import IPERF_PORT, PREFIX

NAME = "density"
DEFAULT_PODS = 1000
NS = "dense"
CIDR = "10.64.0.0/16"
TARGET_RATE = 100.0
TARGET_RSS_MB = 500.0
TARGET_RATIO = 0.90  # throughput with N pods at least 90 % of with 2; RTT at most 110 %
PING_COUNT = 200
IDLE_SECONDS = 3.0


def pod_ip(i: int) -> str:
    return f"10.64.{(i + 2) // 256}.{(i + 2) % 256}"


def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def rss_mb(pid: int) -> float:
    return _status(pid, "VmRSS") / 1024


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(pid: int, seconds: float = IDLE_SECONDS) -> float:
    """The daemon's CPU use (% of one core) while no pod sends anything."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return 100 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def ip_batch(lines: list[str], check: bool = True) -> None:
    if lines:
        subprocess.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n", text=True,
                       check=check, capture_output=True, timeout=600 + len(lines) / 10)


def _raise_nofile(n: int) -> int:
    """This process's fd limit, raised for the daemon it starts (one fd per TAP)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n * 2 + 4096
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return int(soft)


class Pods:
    """The daemon, the pods' namespaces and what was measured on them."""

    def __init__(self, sb: Sandbox, n: int) -> None:
        self.sb = sb
        self.n = n
        self.names = [sb.name(f"d{i}") for i in range(n)]
        self.made: list[str] = []
        self.worker = sb.netns("worker")
        self.daemon = Daemon(sb, self.worker, {"namespaces": [
            {"name": NS, "id": 9, "cidr": CIDR, "pods": []}]}).start()
        assert self.daemon.proc is not None
        self.pid = self.daemon.proc.pid
        self.client = ControlClient(self.daemon.control)

    def make_namespaces(self) -> float:
        t0 = time.monotonic()
        for k in range(0, self.n, 1000):
            chunk = self.names[k:k + 1000]
            self.made.extend(chunk)  # before: a failed batch may have made some
            ip_batch([f"netns add {x}" for x in chunk])
        return time.monotonic() - t0

    def remove_namespaces(self) -> None:
        """Every pod namespace we made, in bulk (Sandbox.close does the worker's)."""
        ip_batch([f"netns del {x}" for x in self.made], check=False)
        self.made.clear()

    def attach(self, i: int) -> None:
        self.client.put(f"/v1/namespaces/{NS}/pods/p{i}",
                        {"name": f"p{i}", "ip": pod_ip(i), "netns": self.names[i]})

    def detach(self, i: int) -> None:
        self.client.delete(f"/v1/namespaces/{NS}/pods/p{i}")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def alive(self) -> None:
        if self.daemon.proc is not None and self.daemon.proc.poll() is not None:
            raise RuntimeError(f"fabricd exited with {self.daemon.proc.returncode}:\n"
                               f"{self.daemon.log()[-2000:]}")

    def iperf3(self, seconds: int) -> float:
        """Gbit/s of one TCP stream from pod 0 to pod 1."""
        self.alive()
        a, b = self.names[0], self.names[1]
        self.sb.popen(b, "iperf3", "-s", "-1", "-p", str(IPERF_PORT),
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.sb.wait_port(b, IPERF_PORT)
        p = self.sb.run(a, "iperf3", "-c", pod_ip(1), "-p", str(IPERF_PORT), "-J", "-t",
                        str(seconds), "--connect-timeout", "3000", check=False,
                        timeout=seconds + 30)
        res: dict[str, Any] = json.loads(p.stdout or "{}")
        if p.returncode != 0 or "error" in res:
            raise RuntimeError(f"iperf3 pod 0 -> 1: {res.get('error') or p.stderr[-500:]}")
        return float(res["end"]["sum_received"]["bits_per_second"]) / 1e9

    def ping(self) -> list[float]:
        """Per-echo RTTs (µs) from pod 0 to pod 1."""
        self.alive()
        p = self.sb.run(self.names[0], "ping", "-n", "-c", str(PING_COUNT), "-i", "0.002",
                        "-W", "1", pod_ip(1), check=False, timeout=PING_COUNT * 0.05 + 30)
        return parse_rtts(p.stdout)


def _segment(n: int) -> int:
    return 1000 if n >= 2000 else max(1, n // 5)


def run(s: Settings) -> Report:
    n = max(2, s.pods or DEFAULT_PODS)
    r = Report(NAME, f"{n} pods (netns + TAP) attached one by one through the API on one "
                     f"worker, then detached; TCP and ping pod 0 -> 1 with {n} vs 2 attached "
                     f"({s.runs} x {s.seconds} s)")
    why = prerequisites()
    if why:
        raise RuntimeError(f"cannot create namespaces: {why}")
    nofile = _raise_nofile(n)
    with Sandbox(PREFIX) as sb:
        pods = Pods(sb, n)
        try:
            made = pods.make_namespaces()
            progress(NAME, f"{n} namespaces made in {made:.1f} s (not timed); fd limit "
                           f"{nofile}")
            rss0 = rss_mb(pods.pid)
            for i in (0, 1):
                pods.attach(i)
            pods.ping()  # neighbours resolved, both pods up
            base_gbps = [pods.iperf3(s.seconds) for _ in range(s.runs)]
            base_rtt = [pods.ping() for _ in range(s.runs)]
            idle2 = idle_cpu(pods.pid)
            progress(NAME, f"2 pods: {median(base_gbps) or 0:.2f} Gbit/s, ping median "
                           f"{median([median(x) for x in base_rtt]) or 0:.0f} µs, idle CPU "
                           f"{idle2:.1f} %")
            seg = _segment(n)
            rows: list[list[str]] = []
            rates: list[float] = []
            t_all = last = time.monotonic()
            last_done = 2
            for i in range(2, n):
                pods.attach(i)
                done = i + 1
                if done % seg == 0 or done == n:
                    now = time.monotonic()
                    k, last_done = done - last_done, done
                    rate = k / (now - last) if now > last else 0.0
                    rates.append(rate)
                    rss = rss_mb(pods.pid)
                    rows.append([str(done), f"{rate:.0f}", f"{rss:.0f}", str(pods.fds())])
                    progress(NAME, f"{done} pods: the last {k} at {rate:.0f}/s; RSS "
                                   f"{rss:.0f} MB; {rows[-1][3]} fds")
                    last = now
            attach_s = time.monotonic() - t_all
            rss_n = rss_mb(pods.pid)
            views = pods.client.get(f"/v1/namespaces/{NS}/pods")
            attached = sum(1 for v in views if v.get("attached"))
            if attached != n:
                raise RuntimeError(f"{attached} of {n} pods attached")
            gbps = [pods.iperf3(s.seconds) for _ in range(s.runs)]
            rtt = [pods.ping() for _ in range(s.runs)]
            # After the runs, as with 2: the last pods' kernels have stopped soliciting
            # routers by then (IPv6 sends 3 in the 8 s after a link comes up).
            idle_n = idle_cpu(pods.pid)
            progress(NAME, f"{n} pods: {median(gbps) or 0:.2f} Gbit/s, ping median "
                           f"{median([median(x) for x in rtt]) or 0:.0f} µs, idle CPU "
                           f"{idle_n:.1f} %")
            fds_before = pods.fds() - n  # what the daemon had before the pods' TAPs
            t0 = time.monotonic()
            for i in range(2, n):  # pods 0 and 1 stay, to be measured once more
                pods.detach(i)
            detach_s = time.monotonic() - t0
            while pods.fds() > fds_before + 2 and time.monotonic() - t0 < 60 + n / 10:
                time.sleep(0.01)  # the TAPs are closed after the API answered
            closed_s = time.monotonic() - t0
            # With 2 again: what changed between the two baselines is drift (other load
            # on the machine), not the pods; the ratios take both as the reference.
            base_gbps += [pods.iperf3(s.seconds) for _ in range(s.runs)]
            base_rtt += [pods.ping() for _ in range(s.runs)]
            progress(NAME, f"2 pods again: {median(base_gbps[s.runs:]) or 0:.2f} Gbit/s, "
                           f"ping median {median([median(x) for x in base_rtt[s.runs:]]) or 0:.0f}"
                           " µs")
            for i in (0, 1):
                pods.detach(i)
            rss_after = rss_mb(pods.pid)
            if pods.client.get(f"/v1/namespaces/{NS}/pods"):
                raise RuntimeError("pods left after detaching them all")
        finally:
            pods.remove_namespaces()
    overall = (n - 2) / attach_s if attach_s > 0 else None
    r.add("attach rate per segment", "pods/s", rates)
    r.add("ping with 2 pods, before and after (median of run)", "µs",
          [median(x) for x in base_rtt])
    r.add(f"ping with {n} pods (median of run)", "µs", [median(x) for x in rtt])
    r.add("TCP with 2 pods, before and after", "Gbit/s", base_gbps)
    r.add(f"TCP with {n} pods", "Gbit/s", gbps)
    r.tables.append(("attaching, per segment", ["pods", "pods/s", "RSS MB", "fds"], rows))
    r.check(f"attach rate, {n - 2} pods in all", overall, "pods/s",
            f">= {TARGET_RATE:.0f}/s", overall is not None and overall >= TARGET_RATE)
    r.check("attach rate, slowest segment", min(rates) if rates else None, "pods/s", "",
            None)
    r.check(f"RSS with {n} pods", rss_n, "MB", f"<= {TARGET_RSS_MB:.0f} MB",
            rss_n <= TARGET_RSS_MB)
    r.check("RSS per pod", (rss_n - rss0) * 1024 / n, "kB", "", None)
    tcp = (median(gbps) or 0) / (median(base_gbps) or 1) if base_gbps else None
    r.check(f"TCP with {n} / with 2", tcp, "x", f">= {TARGET_RATIO:.2f}",
            tcp is not None and tcp >= TARGET_RATIO)
    m2 = median([median(x) for x in base_rtt])
    mn = median([median(x) for x in rtt])
    ping = mn / m2 if mn and m2 else None
    r.check(f"ping RTT with {n} / with 2", ping, "x", f"<= {2 - TARGET_RATIO:.2f}",
            ping is not None and ping <= 2 - TARGET_RATIO)
    r.check(f"idle CPU with {n} pods (2 pods: {idle2:.1f} %)", idle_n, "%", "", None)
    detach = (n - 2) / detach_s if detach_s > 0 else None
    r.check("detach rate (API)", detach, "pods/s", "", None)
    closed = (n - 2) / closed_s if closed_s > 0 else None
    r.check("detach rate (every TAP closed)", closed, "pods/s", "", None)
    r.check("RSS after detaching all", rss_after, "MB", "", None)
    pooled = {k: [x for run in v for x in run] for k, v in (("2", base_rtt), ("n", rtt))}
    r.extra = {"pods": n, "segment": seg, "attach_seconds": attach_s,
               "detach_seconds": detach_s, "closed_seconds": closed_s,
               "rss_mb": {"start": rss0, "n": rss_n, "after_detach": rss_after},
               "segments": rows, "idle_cpu_percent": {"2": idle2, "n": idle_n},
               "ping_us": {k: {"p50": percentile(v, 50), "p99": percentile(v, 99)}
                           for k, v in pooled.items()},
               "namespaces_made_seconds": made}
    return r


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.density")
    ap.add_argument("--pods", type=int, default=DEFAULT_PODS)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--out", help="also write the report as JSON here")
    a = ap.parse_args(argv)
    report = run(Settings(runs=a.runs, seconds=a.seconds, pods=a.pods))
    print(render(report))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report.to_json(), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
