"""`scale`: many namespaces in one process, no network namespaces involved.

Builds 1,000 `Router`s (namespaces) of 10 pods each, all with the same CIDR
10.60.0.0/24, every pod with a fake `Port(vnet=True, mtu=1500)` attached, and reads
VmRSS before and after (target: under 200 MB in all). It times `Router.receive()` for a
valid pod -> pod UDP frame with 10, 100 and 1,000 namespaces, and in a router of 250
pods against one of 10: the per-frame cost should not grow (ratio largest/smallest ~1).
Each timing is also done round-robin over all the routers, which touches all their
memory as a busy worker would.

The measuring runs in a fresh interpreter (`python -m tests.bench.scale --child`) so
that the memory numbers are those of the routers, not of whatever ran before.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from tests.bench.common import Report, Settings, median, progress

NAME = "scale"
CIDR = "10.60.0.0/24"
NAMESPACES = (10, 100, 1000)
PODS = 10
BIG_PODS = 250
TARGET_MB = 200.0
TARGET_RATIO = 1.5
ITERATIONS_PER_SECOND = 20_000


def rss_kb(field: str = "VmRSS") -> int:
    """This process's resident memory (or another /proc/self/status field) in kB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(iterations: int, runs: int) -> dict[str, Any]:
    """Build the namespaces step by step and time at each step; return the numbers."""
    from fabric.config.specs import DEFAULT_GATEWAY_MAC as GATEWAY_MAC
    from fabric.net import packets
    from fabric.net.vnet import ZERO_HDR
    from fabric.router.model import Port
    from fabric.router.router import Router

    def pod_mac(j: int) -> bytes:
        return b"\x02\x00\x0a\x3c\x00" + bytes([j + 2])

    def build(i: int, pods: int) -> tuple[Router, list[Port]]:
        r = Router(f"ns{i}", CIDR)
        ports = []
        for j in range(pods):
            r.add_pod(f"pod{j}", f"10.60.0.{j + 2}", packets.mac_str(pod_mac(j)))
            port = Port(vnet=True, mtu=1500)
            r.attach(f"pod{j}", port, 0.0)
            ports.append(port)
        return r, ports

    def frame(pods: int) -> bytes:
        """UDP from the first pod to the last one, as it arrives from a TAP."""
        src, dst = packets.ip_bytes("10.60.0.2"), packets.ip_bytes(f"10.60.0.{pods + 1}")
        return (ZERO_HDR + packets.eth_header(packets.mac_bytes(GATEWAY_MAC), pod_mac(0),
                                              packets.ETH_P_IP)
                + packets.udp_packet(src, dst, 40000, 5201, bytes(64)))

    def time_receive(pairs: list[tuple[Router, Port, Port]], template: bytes) -> float:
        """ns per receive(), cycling over `pairs`, minus the cost of the same loop that
        only restores the buffer from the template."""
        buf = bytearray(template)
        n = len(template)
        for r, src, dst in pairs:  # every frame must take the fast path
            buf[:] = template
            if r.receive(src, buf, n, 1.0) is not dst or buf[10 + 14 + 8] != 63:
                raise RuntimeError(f"{r.name}: the frame was not forwarded to its pod")
        seq = [(r, p) for r, p, _ in pairs] * (iterations // len(pairs) + 1)
        seq = seq[:iterations]
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter_ns()
            for r, p in seq:
                buf[:] = template
                r.receive(p, buf, n, 1.0)
            t1 = time.perf_counter_ns()
            for _r, _p in seq:  # same unpacking, no call
                buf[:] = template
            t2 = time.perf_counter_ns()
        finally:
            gc.enable()
        overheads.append((t2 - t1) / iterations)
        return ((t1 - t0) - (t2 - t1)) / iterations

    overheads: list[float] = []
    templates = {PODS: frame(PODS), BIG_PODS: frame(BIG_PODS)}
    gc.collect()
    rss: dict[str, int] = {"before_kb": rss_kb()}
    nss: list[tuple[Router, list[Port]]] = []
    timings: list[dict[str, Any]] = []

    def measure(label: str, namespaces: int, pods: int,
                one: tuple[Router, list[Port]], every: list[tuple[Router, list[Port]]]) -> None:
        single = [(one[0], one[1][0], one[1][-1])]
        spread = [(r, ports[0], ports[-1]) for r, ports in every]
        res: dict[str, list[float]] = {"one router": [], "round-robin": []}
        for _ in range(runs):
            res["one router"].append(time_receive(single, templates[pods]))
            if len(spread) > 1:
                res["round-robin"].append(time_receive(spread, templates[pods]))
        for mode, values in res.items():
            if not values:
                continue
            timings.append({"label": label, "namespaces": namespaces, "pods": pods,
                            "mode": mode, "ns_per_frame": values,
                            "spread_over": len(every) if mode == "round-robin" else 1})

    for count in NAMESPACES:
        t0 = time.monotonic()
        while len(nss) < count:
            nss.append(build(len(nss), PODS))
        built = time.monotonic() - t0
        if count == max(NAMESPACES):
            gc.collect()
            rss["after_kb"] = rss_kb()
        print(f"{count} namespaces built (+{built:.2f} s), timing", file=sys.stderr, flush=True)
        measure(f"{count} ns x {PODS} pods", count, PODS, nss[len(nss) // 2], nss)
    big = build(len(nss), BIG_PODS)
    nss.append(big)
    measure(f"{len(nss) - 1}+1 ns, {BIG_PODS} pods", len(nss), BIG_PODS, big, [big])
    rss["end_kb"] = rss_kb()
    rss["peak_kb"] = rss_kb("VmHWM")
    return {"rss": rss, "timings": timings, "iterations": iterations,
            "restore_loop_ns": median(overheads),
            "pods_total": len(nss) * PODS - PODS + BIG_PODS}


def run(s: Settings) -> Report:
    iterations = ITERATIONS_PER_SECOND * s.seconds
    r = Report(NAME, f"1,000 routers x {PODS} pods in one process, same CIDR {CIDR}: "
                     f"memory, and receive() cost vs namespaces and pods "
                     f"({iterations} frames x {s.runs} runs)")
    p = subprocess.run([sys.executable, "-m", "tests.bench.scale", "--child",
                        "--iterations", str(iterations), "--runs", str(s.runs)],
                       capture_output=True, text=True, timeout=600)
    for line in p.stderr.splitlines():
        progress(NAME, line)
    if p.returncode != 0:
        raise RuntimeError(f"scale child failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    data = json.loads(p.stdout)
    rss = data["rss"]
    mb = 1024.0
    r.add("VmRSS before building", "MB", [rss["before_kb"] / mb])
    r.add(f"VmRSS with {max(NAMESPACES)} ns x {PODS} pods", "MB", [rss["after_kb"] / mb])
    r.add("  delta", "MB", [(rss["after_kb"] - rss["before_kb"]) / mb])
    r.add("  per pod", "kB", [(rss["after_kb"] - rss["before_kb"]) / (max(NAMESPACES) * PODS)])
    medians: dict[str, list[float]] = {"one router": [], "round-robin": []}
    for t in data["timings"]:
        label = f"{t['label']}, {t['mode']}"
        if t["mode"] == "round-robin":
            label += f" ({t['spread_over']})"
        r.add(label, "ns/frame", t["ns_per_frame"])
        m = median(t["ns_per_frame"])
        if m is not None:
            medians[t["mode"]].append(m)
    total = rss["after_kb"] / mb
    r.check(f"VmRSS total, {max(NAMESPACES)} ns x {PODS} pods", total, "MB",
            f"< {TARGET_MB:.0f} MB", total < TARGET_MB)
    r.check("VmRSS delta (the routers)", (rss["after_kb"] - rss["before_kb"]) / mb, "MB", "",
            None)
    one = medians["one router"]
    ratio = max(one) / min(one) if one and min(one) > 0 else None
    r.check("receive() largest/smallest, one router", ratio, "x",
            f"~1 (<= {TARGET_RATIO})", ratio is not None and ratio <= TARGET_RATIO)
    rr = medians["round-robin"]
    r.check("receive() largest/smallest, round-robin", max(rr) / min(rr) if rr else None,
            "x", "", None)
    r.notes.append(f"the restore loop alone costs {data['restore_loop_ns']:.0f} ns/frame, "
                   "already subtracted")
    r.extra = data
    return r


def main(argv: Sequence[str] | None = None) -> int:
    """The measuring child; `python -m tests.bench scale` is the way to run this."""
    ap = argparse.ArgumentParser(prog="python -m tests.bench.scale")
    ap.add_argument("--child", action="store_true", required=True,
                    help="measure and print the numbers as JSON")
    ap.add_argument("--iterations", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    json.dump(_child(args.iterations, args.runs), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
