"""`egress`: iperf3 TCP from a pod to a server on the "internet" through the fabric's
egress (pod -> TAP -> fabricd NAT -> the worker's egress TUN -> the worker's kernel
routing -> veth), against plain kernel forwarding between the same kind of namespaces.

fabric: worker namespace (ip_forward=1, default route to the internet namespace) runs
        fabricd with `egress: {tun: fabeg0, pool: 100.64.0.0/16}`; namespace `bench`
        (id 7, 10.40.0.0/24, egress as 100.64.0.7) has pod `a` (10.40.0.2).
kernel: client `kc` (10.53.0.2/24) -> `kfwd` (10.53.0.1, ip_forward=1, default route to
        the internet namespace) -> the internet. Plain routing, no NAT: there is no
        nftables/iptables on the machine, and the internet namespace routes 10.53.0.0/24
        back to kfwd instead (as it routes the pool back to the worker). The client's
        link gets the pod's MTU so both send segments of the same size.
internet: one namespace for both, the server 203.0.113.10 on its loopback.

Per round and side: upload (pod -> server, the target) and download (`-R`, reported for
reference). Target (issue 12): the fabric's upload reaches at least 80 % of kernel forwarding's
(medians, interleaved runs). Nothing is routed or NATed in the machine's own namespace.
"""

from __future__ import annotations

import json
from typing import Any

from fabric.tools.sandbox import Daemon
from tests.bench.common import Report, Settings, fmt, interleaved, median, progress
from tests.bench.cpu import ThreadCpu
from tests.bench.topo import FABRIC, Side, Topology

NAME = "egress"
KERNEL = "kernel"
SIDES = (FABRIC, KERNEL)
TARGET = 0.80
SERVER = "203.0.113.10"
POOL = "100.64.0.0/16"
EGRESS_ADDR = "100.64.0.7"
DIRECTIONS = ("up", "down")  # down: iperf3 -R, the server sends


class EgressTopology(Topology):
    """The fabric's egress and a kernel forwarder, both in front of one internet."""

    def __init__(self) -> None:
        super().__init__()
        self.mtu = 0

    def _build(self) -> None:
        sb = self.sb
        worker, a = sb.netns("worker"), sb.netns("a")
        # worker <-> internet (the fabric's uplink)
        net = sb.internet(worker, SERVER, POOL)
        kc, kfwd = sb.netns("kc"), sb.netns("kfwd")

        cfg = {"worker": {"id": "bench", "egress": {"tun": "fabeg0", "pool": POOL}},
               "namespaces": [{"name": "bench", "id": 7, "cidr": "10.40.0.0/24",
                               "egress": True,
                               "pods": [{"name": "a", "ip": "10.40.0.2", "netns": a}]}]}
        self.daemon = Daemon(sb, worker, cfg).start()
        self.daemon.wait_attached(1)
        link = json.loads(self.run(a, "ip", "-j", "link", "show", "dev", "eth0"))[0]
        self.mtu = int(link["mtu"])

        # kc <-> kfwd <-> internet (the kernel's path)
        sb.veth(kc, "eth0", kfwd, "eth0")
        sb.veth(kfwd, "up0", net, "eth1")
        for ns, dev, ip in ((kc, "eth0", "10.53.0.2/24"), (kfwd, "eth0", "10.53.0.1/24"),
                            (kfwd, "up0", "198.51.101.1/24"), (net, "eth1", "198.51.101.53/24")):
            sb.run(ns, "ip", "addr", "add", ip, "dev", dev)
            sb.run(ns, "ip", "link", "set", dev, "up")
        for ns, dev in ((kc, "eth0"), (kfwd, "eth0")):
            sb.run(ns, "ip", "link", "set", dev, "mtu", str(self.mtu))
        sb.run(kc, "ip", "route", "add", "default", "via", "10.53.0.1")
        sb.run(kfwd, "ip", "route", "add", "default", "via", "198.51.101.53")
        sb.run(kfwd, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sb.run(net, "ip", "route", "add", "10.53.0.0/24", "via", "198.51.101.1")

        self.sides = {FABRIC: Side(FABRIC, a, net, SERVER),
                      KERNEL: Side(KERNEL, kc, net, SERVER)}
        for side in self.sides.values():  # resolve neighbours, prove both paths work
            self.run(side.client, "ping", "-c", "3", "-i", "0.05", "-W", "2", SERVER)
        # The internet has no route to 10.40.0.0/24: the pod's replies come back only
        # because the fabric NATs it to the namespace's egress address.
        egress = self.daemon.get("/v1/namespaces")[0].get("egress")
        if egress != EGRESS_ADDR:
            raise RuntimeError(f"namespace bench egresses as {egress}, not {EGRESS_ADDR}")

    def server_pid(self) -> int | None:
        d = self.daemon
        return d.proc.pid if d is not None and d.proc is not None else None


def run(s: Settings) -> Report:
    r = Report(NAME, f"iperf3 TCP, 1 stream, {s.seconds} s x {s.runs} runs, pod -> internet "
                     "through the fabric's egress NAT vs kernel forwarding (interleaved)")
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        side: {d: [] for d in DIRECTIONS} for side in SIDES}
    with EgressTopology() as topo:
        drops_before = topo.fabric_drops()

        def measure(side: str, i: int) -> float:
            gbps_up = 0.0
            for direction in DIRECTIONS:
                args = ["-R"] if direction == "down" else []
                pid = topo.server_pid() if side == FABRIC else None
                with ThreadCpu(pid) as cpu:
                    res = topo.iperf3(topo.sides[side], *args, seconds=s.seconds)
                end = res["end"]
                m = {"gbps": end["sum_received"]["bits_per_second"] / 1e9,
                     "retransmits": int(end["sum_sent"].get("retransmits", 0)),
                     "fabric_cpu_percent": cpu.total if pid else None,
                     "fabric_threads": cpu.busiest() if pid else []}
                results[side][direction].append(m)
                threads = ", ".join(f"{n} {p:.0f}% (sys {sy:.0f}%)"
                                    for n, p, sy in m["fabric_threads"])
                progress(NAME, f"run {i + 1}/{s.runs} {side} {direction}: "
                               f"{m['gbps']:.2f} Gbit/s, {m['retransmits']} retransmits"
                               + (f"; fabricd {threads}" if threads else ""))
                if direction == "up":
                    gbps_up = m["gbps"]
            return gbps_up

        interleaved(s.runs, {side: (lambda i, side=side: measure(side, i))
                             for side in SIDES})
        topo.check_daemon()
        drops_after = topo.fabric_drops()
        namespaces = topo.daemon.get("/v1/namespaces") if topo.daemon else []
        mtu = topo.mtu

    def col(side: str, direction: str, key: str) -> list[float | None]:
        return [m.get(key) for m in results[side][direction]]

    for direction in DIRECTIONS:
        for side in SIDES:
            r.add(f"{side} {direction}", "Gbit/s", col(side, direction, "gbps"))
    for direction in DIRECTIONS:
        for side in SIDES:
            r.add(f"{side} {direction} retransmits", "segs",
                  col(side, direction, "retransmits"))
    for direction in DIRECTIONS:
        r.add(f"fabricd CPU {direction}", "%", col(FABRIC, direction, "fabric_cpu_percent"))

    ratios: dict[str, float | None] = {}
    for direction in DIRECTIONS:
        f = median(col(FABRIC, direction, "gbps"))
        k = median(col(KERNEL, direction, "gbps"))
        ratios[direction] = f / k * 100 if f is not None and k else None
    r.check("fabric / kernel upload (medians)", ratios["up"], "%",
            f">= {TARGET * 100:.0f} %", ratios["up"] is not None and ratios["up"] >= TARGET * 100)
    r.check("fabric / kernel download (medians)", ratios["down"], "%", "", None)

    rows = []
    for direction in DIRECTIONS:
        threads: dict[str, list[float]] = {}
        for m in results[FABRIC][direction]:
            for n, p, sy in m["fabric_threads"]:
                threads.setdefault(f"{n} (sys)", []).append(sy)
                threads.setdefault(n, []).append(p)
        rows.append([direction, "; ".join(f"{n} {fmt(median(v))}"
                                          for n, v in threads.items())])
    r.tables.append(("fabricd CPU by thread (median % of one CPU; sys: of which in the "
                     "kernel)", ["direction", "threads"], rows))

    r.notes.append(f"kernel path: plain routing through a forwarding namespace, no NAT "
                   f"(no nftables/iptables here); both clients use MTU {mtu}")
    fdrops = {k: v - drops_before.get(k, 0) for k, v in drops_after.items()
              if v - drops_before.get(k, 0)}
    shown = {k: v for k, v in fdrops.items() if k != "ipv6"}
    if shown:
        r.notes.append("fabricd drops: " + ", ".join(f"{k}={v:.0f}" for k, v in shown.items()))
    r.extra = {"mtu": mtu, "ratios_percent": ratios,
               "runs": results, "fabric_drops": fdrops, "namespaces": namespaces}
    return r
