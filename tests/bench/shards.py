"""Past one core, measured before it is built: `python -m tests.bench.shards`.

The shard design (docs/performance.md, "Past one core") gives each data-plane process
a disjoint set of namespaces. Its data plane is what two `fabricd`s, each with one of
the namespaces, already are, so this measures that against one `fabricd` with both:

one:  worker `w` runs fabricd with namespaces `n1` (10.71.1.0/24: pods a1, b1) and
      `n2` (10.71.2.0/24: a2, b2);
two:  workers `s1` and `s2` run one fabricd each, `s1` with `n1` (pods c1, d1), `s2`
      with `n2` (c2, d2).

Per round and layout, both pairs at once: iperf3 TCP (one stream each) and 64-byte
UDP as fast as iperf3 goes; the sums, medians of interleaved rounds. On a machine with
two cores the load's own processes (four iperf3s) share those cores with the shards,
so this is the least two shards can show.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from fabric.tools.sandbox import Daemon, Sandbox, prerequisites

PREFIX = "fbb"
PORT = 5201


def _ns_cfg(name: str, net: int, pods: tuple[str, str], nss: tuple[str, str]
            ) -> dict[str, Any]:
    return {"name": name, "cidr": f"10.71.{net}.0/24",
            "pods": [{"name": p, "ip": f"10.71.{net}.{i + 2}", "netns": ns}
                     for i, (p, ns) in enumerate(zip(pods, nss, strict=True))]}


class Shards:
    """Both layouts, built on enter and removed on exit."""

    def __init__(self) -> None:
        why = prerequisites()
        if why:
            raise RuntimeError(f"cannot create namespaces: {why}")
        self.sb = Sandbox(PREFIX)
        # layout -> [(client netns, server netns, server ip)] for n1 and n2
        self.pairs: dict[str, list[tuple[str, str, str]]] = {}

    def __enter__(self) -> Shards:
        try:
            self._build()
        except BaseException:
            self.sb.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.sb.close()

    def _build(self) -> None:
        sb = self.sb
        one = {p: sb.netns(p) for p in ("a1", "b1", "a2", "b2")}
        cfg = {"worker": {"id": "one"}, "namespaces": [
            _ns_cfg("n1", 1, ("a1", "b1"), (one["a1"], one["b1"])),
            _ns_cfg("n2", 2, ("a2", "b2"), (one["a2"], one["b2"]))]}
        Daemon(sb, sb.netns("w"), cfg, "one").start().wait_attached(4)
        two = {p: sb.netns(p) for p in ("c1", "d1", "c2", "d2")}
        for k, name in ((1, "s1"), (2, "s2")):
            cfg = {"worker": {"id": name}, "namespaces": [
                _ns_cfg(f"n{k}", k, (f"c{k}", f"d{k}"), (two[f"c{k}"], two[f"d{k}"]))]}
            Daemon(sb, sb.netns(name), cfg, name).start().wait_attached(2)
        self.pairs = {"one": [(one["a1"], one["b1"], "10.71.1.3"),
                              (one["a2"], one["b2"], "10.71.2.3")],
                      "two": [(two["c1"], two["d1"], "10.71.1.3"),
                              (two["c2"], two["d2"], "10.71.2.3")]}
        for pairs in self.pairs.values():
            for client, _, ip in pairs:
                sb.run(client, "ping", "-c", "3", "-i", "0.05", "-W", "2", ip)

    def both(self, layout: str, seconds: int, *args: str) -> list[dict[str, Any]]:
        """iperf3 on both pairs of a layout at once; their JSON results."""
        sb = self.sb
        pairs = self.pairs[layout]
        for _, server, _ in pairs:
            sb.popen(server, "iperf3", "-s", "-1", "-p", str(PORT),
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _, server, _ in pairs:
            sb.wait_port(server, PORT)
        clients = [sb.popen(client, "iperf3", "-c", ip, "-p", str(PORT), "-J", "-t",
                            str(seconds), *args, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
                   for client, _, ip in pairs]
        out = []
        for p in clients:
            text, _ = p.communicate(timeout=seconds + 30)
            res = json.loads(text)
            if "error" in res:
                raise RuntimeError(f"iperf3 ({layout}): {res['error']}")
            out.append(res)
        return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.shards",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    a = ap.parse_args(argv)
    got: dict[str, dict[str, list[float]]] = {k: {"tcp": [], "udp": []} for k in ("one", "two")}
    with Shards() as s:
        for i in range(a.runs):
            for layout in ("one", "two") if i % 2 == 0 else ("two", "one"):
                tcp = s.both(layout, a.seconds)
                gbps = sum(r["end"]["sum_received"]["bits_per_second"] for r in tcp) / 1e9
                udp = s.both(layout, a.seconds, "-u", "-l", "64", "-b", "0", "-w", "4M")
                kpps = sum((r["end"]["sum_received"]["packets"]
                            - r["end"]["sum_received"]["lost_packets"])
                           / r["end"]["sum_received"]["seconds"] for r in udp) / 1e3
                got[layout]["tcp"].append(gbps)
                got[layout]["udp"].append(kpps)
                print(f"  [shards] run {i + 1}/{a.runs} {layout}: TCP {gbps:.2f} Gbit/s, "
                      f"UDP 64 B {kpps:.0f} kpps (both pairs)", file=sys.stderr, flush=True)
    print("layout  TCP Gbit/s (median, runs)          UDP 64 B kpps received (median, runs)")
    for layout, m in got.items():
        print(f"{layout:6s}  {statistics.median(m['tcp']):6.2f} "
              f"{' '.join(f'{x:.2f}' for x in m['tcp']):28s} "
              f"{statistics.median(m['udp']):6.0f} {' '.join(f'{x:.0f}' for x in m['udp'])}")
    for key, unit in (("tcp", "TCP"), ("udp", "UDP")):
        o, t = statistics.median(got["one"][key]), statistics.median(got["two"][key])
        print(f"two shards / one, {unit}: {t / o * 100:.0f} %" if o else f"{unit}: -")
    return 0


if __name__ == "__main__":
    sys.exit(main())
