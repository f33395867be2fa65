"""`shards`: what a second data-plane process buys (issue 12, "past one core").

One fabricd runs every namespace's data plane on one thread, so a worker's pods share
one core. The way out designed in docs/performance.md is data-plane shards: processes
that own disjoint sets of namespaces, each with its own fds. This benchmark measures the
prototype of that, which needs nothing new in the daemon: the same two namespaces
(n1: pods a1 -> b1, n2: pods a2 -> b2) served by

one shard:  one fabricd owning both namespaces;
two shards: two fabricd processes, one namespace each (each in its own worker netns,
            so their control sockets and local stacks never meet).

Both sets of pods exist at once and the runs are interleaved. Each run drives both pairs
at the same time with iperf3, one TCP stream each and then 64-byte UDP as fast as it
goes, and sums what they received. The
ratio two shards / one shard is the scaling a worker gets from a second core; on this
2-core machine the iperf3 processes and the kernel's TAP work share those same cores,
so it is a floor, not the ceiling of a many-core worker.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from fabric.tools.sandbox import Daemon
from tests.bench.common import Report, Settings, interleaved, median, progress
from tests.bench.topo import Topology

NAME = "shards"
PORTS = (5211, 5212)


class ShardTopology(Topology):
    def _build(self) -> None:
        sb = self.sb
        self.pairs: dict[str, list[tuple[str, str, str]]] = {}
        one_cfg: list[dict[str, Any]] = []
        self.daemons: list[Daemon] = []
        for layout in ("one", "two"):
            pairs = []
            for n in (1, 2):
                a, b = sb.netns(f"{layout}-a{n}"), sb.netns(f"{layout}-b{n}")
                net = f"10.6{n}.{0 if layout == 'one' else 1}"
                ns = {"name": f"n{n}", "cidr": f"{net}.0/24",
                      "pods": [{"name": "a", "ip": f"{net}.2", "netns": a},
                               {"name": "b", "ip": f"{net}.3", "netns": b}]}
                pairs.append((a, b, f"{net}.3"))
                if layout == "one":
                    one_cfg.append(ns)
                else:
                    worker = sb.netns(f"worker-two{n}")
                    d = Daemon(sb, worker, {"worker": {"id": f"shard{n}"},
                                            "namespaces": [ns]}, f"fabricd-shard{n}").start()
                    d.wait_attached(2)
                    self.daemons.append(d)
            self.pairs[layout] = pairs
        worker = sb.netns("worker-one")
        self.daemon = Daemon(sb, worker, {"worker": {"id": "one"}, "namespaces": one_cfg},
                             "fabricd-one").start()
        self.daemon.wait_attached(4)
        for pairs in self.pairs.values():
            for a, _, ip in pairs:
                self.run(a, "ping", "-c", "3", "-i", "0.05", "-W", "2", ip)

    def check_all(self) -> None:
        self.check_daemon()
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is not None:
                raise RuntimeError(f"a shard's fabricd exited with {d.proc.returncode}")

    def both(self, layout: str, seconds: int, *args: str) -> list[dict[str, Any]]:
        """iperf3 on both pairs of a layout at once; their JSON results."""
        self.check_all()
        pairs = self.pairs[layout]
        for (_, b, _), port in zip(pairs, PORTS, strict=True):
            self.sb.popen(b, "iperf3", "-s", "-1", "-p", str(port),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.sb.wait_port(b, port)
        clients = [self.sb.popen(a, "iperf3", "-c", ip, "-p", str(port), "-J", "-t",
                                 str(seconds), "--connect-timeout", "3000", *args,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for (a, _, ip), port in zip(pairs, PORTS, strict=True)]
        out = []
        for c in clients:
            text, err = c.communicate(timeout=seconds + 30)
            res = json.loads(text or "{}")
            if c.returncode != 0 or "error" in res:
                raise RuntimeError(f"iperf3 ({layout}): {res.get('error') or err.strip()}"
                                   f"{self.daemon_state()}")
            out.append(res)
        return out

    def tcp(self, layout: str, seconds: int) -> float:
        """Both pairs' TCP (one stream each), summed, Gbit/s."""
        return sum(r["end"]["sum_received"]["bits_per_second"]
                   for r in self.both(layout, seconds)) / 1e9

    def udp(self, layout: str, seconds: int) -> float:
        """Both pairs' 64-byte UDP as fast as iperf3 sends, received, summed, kpps."""
        res = self.both(layout, seconds, "-u", "-l", "64", "-b", "0", "-w", "4M")
        return sum((r["end"]["sum_received"]["packets"]
                    - r["end"]["sum_received"]["lost_packets"])
                   / r["end"]["sum_received"]["seconds"] for r in res) / 1e3


def run(s: Settings) -> Report:
    r = Report(NAME, f"two pod pairs in two namespaces at once (iperf3 TCP 1 stream each, "
                     f"then 64-byte UDP), {s.seconds} s x {s.runs} runs: one fabricd for "
                     f"both namespaces vs one fabricd per namespace (interleaved)")
    got: dict[str, dict[str, list[float]]] = {k: {"tcp": [], "udp": []} for k in ("one", "two")}
    with ShardTopology() as topo:
        def measure(layout: str, i: int) -> None:
            g, k = topo.tcp(layout, s.seconds), topo.udp(layout, s.seconds)
            got[layout]["tcp"].append(g)
            got[layout]["udp"].append(k)
            progress(NAME, f"run {i + 1}/{s.runs} {layout} shard(s): TCP {g:.2f} Gbit/s, "
                           f"UDP 64 B {k:.0f} kpps")

        interleaved(s.runs, {k: (lambda i, k=k: measure(k, i)) for k in ("one", "two")})
        topo.check_all()
    for layout, label in (("one", "one shard (both namespaces)"),
                          ("two", "two shards (one namespace each)")):
        r.add(f"{label}, TCP", "Gbit/s", got[layout]["tcp"])
        r.add(f"{label}, UDP 64 B received", "kpps", got[layout]["udp"])
    for key, unit in (("tcp", "TCP"), ("udp", "UDP 64 B")):
        one, two = median(got["one"][key]), median(got["two"][key])
        ratio = two / one * 100 if one and two is not None else None
        r.check(f"two shards / one shard, {unit} (medians)", ratio, "%", "> 100 % on 2 cores",
                None)
    r.extra = got
    return r
