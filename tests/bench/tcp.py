"""`tcp`: iperf3 TCP bulk, one stream, pod a -> pod b through the fabric against the
veth pair ka -> kb. Target (issue 12): the fabric reaches at least 80 % of veth's throughput."""

from __future__ import annotations

from tests.bench.common import Report, Settings, interleaved, median, progress
from tests.bench.topo import FABRIC, VETH, Topology

NAME = "tcp"
TARGET = 0.80


def run(s: Settings) -> Report:
    r = Report(NAME, f"iperf3 TCP bulk, 1 stream, {s.seconds} s x {s.runs} runs, "
                     "fabric pod a -> b vs veth ka -> kb (interleaved)")
    with Topology() as topo:
        retransmits: dict[str, list[int]] = {FABRIC: [], VETH: []}

        def measure(side: str, i: int) -> float:
            res = topo.iperf3(topo.sides[side], seconds=s.seconds)
            end = res["end"]
            gbps = end["sum_received"]["bits_per_second"] / 1e9
            retransmits[side].append(int(end["sum_sent"].get("retransmits", 0)))
            progress(NAME, f"run {i + 1}/{s.runs} {side}: {gbps:.2f} Gbit/s")
            return gbps

        got = interleaved(s.runs, {side: (lambda i, side=side: measure(side, i))
                                   for side in (FABRIC, VETH)})
        topo.check_daemon()
        drops = topo.fabric_drops()
    r.add("fabric", "Gbit/s", got[FABRIC])
    r.add("veth", "Gbit/s", got[VETH])
    r.add("fabric retransmits", "segs", retransmits[FABRIC])
    r.add("veth retransmits", "segs", retransmits[VETH])
    f, v = median(got[FABRIC]), median(got[VETH])
    ratio = f / v * 100 if f is not None and v else None
    r.check("fabric / veth (medians)", ratio, "%", f">= {TARGET * 100:.0f} %",
            ratio is not None and ratio >= TARGET * 100)
    r.extra = {"fabric_gbps": got[FABRIC], "veth_gbps": got[VETH],
               "retransmits": retransmits, "fabric_drops": drops}
    shown = {k: v for k, v in drops.items() if k != "ipv6"}  # the pods' own IPv6 chatter
    if shown:
        r.notes.append("fabricd drops: " + ", ".join(f"{k}={v:.0f}" for k, v in shown.items()))
    return r
