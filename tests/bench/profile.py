"""Where the data plane's time goes, per path: `python -m tests.bench.profile PATH`.

PATH is `udp` (64-byte iperf3 UDP, unlimited or `--rate`), `tcp` (iperf3 bulk), `ping`
(`ping -i 0.002`), `dns` (dnsperf against the gateway) or `egress` (iperf3 to the
internet through the egress NAT). It builds the benchmark's own topology, starts the
load, and samples fabricd with py-spy (`--format raw --threads --idle --nonblocking`)
while reading the data-plane thread's CPU time from /proc. It prints the thread's
samples by stage (a stage is the innermost fabric frame's function and line, mapped
by `STAGES`), the top functions by self and inclusive samples, and the thread's CPU per
packet (CPU seconds over the packets the load moved). `--keep FILE` saves the raw
stacks (`py-spy`'s collapsed format) for flame graphs.

Sampling is done from outside without pausing the process, so it perturbs the daemon
little, but a sample rate above ~1 kHz takes CPU from the two cores the load shares.
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
from collections.abc import Callable, Sequence
from typing import Any

from tests.bench.cpu import ThreadCpu, _py_spy, python_thread_names
from tests.bench.topo import FABRIC, Topology

THREAD = "fabric-dataplane"
PERF_EVENTS = ("raw_syscalls:sys_enter", "syscalls:sys_enter_read", "syscalls:sys_enter_write",
               "syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_timerfd_settime",
               "context-switches", "task-clock")
PAYLOAD = 64

# The innermost frame of the data-plane thread's stack, as "function (file:line)" ->
# the stage it belongs to. A frame is matched on its function and file; lines matter
# only for the loop bodies, where one function does several stages.
_LINE_STAGES: dict[tuple[str, str], str] = {
    ("_readable", "readinto(into)"): "read: FileIO.readinto (syscall)",
    ("_readable", "write(out.fd"): "write: os.write (syscall)",
    ("flush", "write(out.fd, frame)"): "write: os.write (syscall)",
    ("_run", "poll("): "epoll_wait (idle or syscall)",
}
_FUNC_STAGES: dict[str, str] = {
    "receive": "route: Router.receive",
    "_readable": "loop: DataPlane._readable (bookkeeping)",
    "_run": "loop: DataPlane._run",
    "_wait": "loop: timers (_wait, _earliest)",
    "_earliest": "loop: timers (_wait, _earliest)",
    "arm": "loop: timers (timerfd arm)",
    "_due": "loop: timers (_due)",
    "_rearm": "loop: timers (_rearm)",
    "flush": "write: flush (router outputs)",
}


def _stage(frame: str, source: Callable[[str, int], str]) -> str:
    """The stage of a frame "func (path:line)"."""
    m = re.match(r"(.+?) \((.+):(\d+)\)$", frame)
    if m is None:
        return frame
    func, path, line = m.group(1).rpartition(".")[2], m.group(2), int(m.group(3))
    text = source(path, line)
    for (f, snippet), stage in _LINE_STAGES.items():
        if f == func and snippet in text:
            return stage
    if "fabric/runtime/dataplane" in path or "fabric/router/router" in path:
        return _FUNC_STAGES.get(func, f"{func} ({os.path.basename(path)})")
    return f"{func} ({os.path.basename(path)})"


class Source:
    """Lines of the sampled source files (py-spy shortens paths to the package part)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.cache: dict[str, list[str]] = {}

    def __call__(self, path: str, line: int) -> str:
        lines = self.cache.get(path)
        if lines is None:
            lines = []
            for p in (path, os.path.join(self.root, path)):
                try:
                    with open(p) as f:
                        lines = f.read().splitlines()
                    break
                except OSError:
                    continue
            self.cache[path] = lines
        return lines[line - 1] if 0 < line <= len(lines) else ""


def parse_raw(text: str, thread: str = THREAD) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) stacks of one thread: (frames outermost first, count)."""
    out = []
    for ln in text.splitlines():
        stack, _, count = ln.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if not frames or thread not in frames[0]:
            continue
        out.append((frames[1:], int(count)))
    return out


def summarize(stacks: list[tuple[list[str], int]], source: Source, top: int = 15
              ) -> dict[str, Any]:
    total = sum(c for _, c in stacks) or 1
    stages: collections.Counter[str] = collections.Counter()
    selfs: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for frames, c in stacks:
        if not frames:
            continue
        selfs[frames[-1]] += c
        for f in set(re.sub(r":\d+\)$", ")", x) for x in frames):
            incl[f] += c
        # The innermost frame in the data plane or the router decides the stage, unless a
        # deeper frame is elsewhere (a NAT, a checksum): then that deeper one does.
        stages[_stage(frames[-1], source)] += c
    pct = lambda n: n * 100.0 / total  # noqa: E731
    return {"samples": total,
            "stages": [(k, pct(v)) for k, v in stages.most_common()],
            "self": [(k, pct(v)) for k, v in selfs.most_common(top)],
            "inclusive": [(k, pct(v)) for k, v in incl.most_common(top)]}


# --- loads ------------------------------------------------------------------------------


def _udp_load(topo: Topology, seconds: int, rate: int) -> Callable[[], float]:
    """64-byte UDP a -> b; returns the packets received by b."""
    sd = topo.sides[FABRIC]
    res: dict[str, Any] = {}
    ovf0 = topo.udp_counters(sd.server).get("RcvbufErrors", 0)
    txd0 = topo.tx_dropped(sd.client)

    def go() -> None:
        res.update(topo.iperf3(sd, "-u", "-l", str(PAYLOAD), "-b", str(rate * PAYLOAD * 8),
                               "-w", "4M", seconds=seconds))

    t = threading.Thread(target=go)
    t.start()

    def done() -> float:
        t.join()
        rx = res["end"]["sum_received"]
        print(f"udp: sent {res['end']['sum_sent']['packets']}, received "
              f"{rx['packets'] - rx['lost_packets']} ({rx['lost_percent']:.2f} % lost: "
              f"{topo.udp_counters(sd.server).get('RcvbufErrors', 0) - ovf0} overflowed b's "
              f"socket, {topo.tx_dropped(sd.client) - txd0} a's TAP queue)")
        return float(rx["packets"] - rx["lost_packets"])
    return done


# Bytes the last TCP load moved (iperf3's receiver), for the CPU per GB lines.
MOVED: dict[str, float] = {}


def _tcp_load(topo: Topology, seconds: int, _rate: int) -> Callable[[], float]:
    """iperf3 TCP a -> b (or the reference side's pair); returns the frames the fabric
    read from its ports (both directions: data and ACKs), 0 for a reference side."""
    sd = topo.sides[SIDE[0]]
    res: dict[str, Any] = {}
    fabric = sd.name == FABRIC
    before = _rx_frames(topo) if fabric else 0.0
    t = threading.Thread(target=lambda: res.update(topo.iperf3(sd, seconds=seconds)))
    t.start()

    def done() -> float:
        t.join()
        rx = res["end"]["sum_received"]
        gbps = rx["bits_per_second"] / 1e9
        MOVED["bytes"] = float(rx["bytes"])
        MOVED["seconds"] = float(rx["seconds"])
        if not fabric:
            print(f"tcp ({sd.name}): {gbps:.2f} Gbit/s")
            return 0.0
        frames = _rx_frames(topo) - before
        print(f"tcp: {gbps:.2f} Gbit/s, {frames:.0f} frames read "
              f"({gbps * 1e9 / 8 * seconds / max(frames, 1):.0f} bytes per frame)")
        return frames
    return done


def _ping_load(topo: Topology, seconds: int, _rate: int) -> Callable[[], float]:
    sd = topo.sides[FABRIC]
    count = int(seconds / 0.002)
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(topo.run(
        sd.client, "ping", "-n", "-q", "-c", str(count), "-i", "0.002", sd.server_ip,
        timeout=seconds * 3 + 30)))
    t.start()

    def done() -> float:
        t.join()
        print("ping:", out[0].strip().splitlines()[-1])
        return 2.0 * count  # request and reply each cross the fabric
    return done


def _rx_frames(topo: Topology) -> float:
    assert topo.daemon is not None
    return float(sum(p.get("rx_packets", 0) for p in topo.daemon.get("/v1/pods")))


# The side the load runs on: FABRIC, or the benchmark's reference (tcp: veth, egress:
# kernel), whose whole-machine CPU per GB and kernel profile are the comparison.
SIDE = [FABRIC]


def _machine() -> tuple[float, float]:
    """/proc/stat now: (busy, idle) CPU seconds over all CPUs."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        # user nice system idle iowait irq softirq steal
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / tick, (v[3] + v[4]) / tick


def _report_record(path: str, top: int = 30) -> None:
    """The hottest symbols (self time, all CPUs) of a `perf record -a`, kernel and user."""
    out = subprocess.run(["perf", "report", "-i", path, "--no-children", "--sort",
                          "comm,dso,sym", "-g", "none", "--stdio", "--percent-limit", "0.4"],
                         capture_output=True, text=True).stdout
    rows = [ln for ln in out.splitlines() if ln.strip() and not ln.startswith("#")]
    print(f"\nperf record -a, self time by comm/dso/symbol (top {top}):")
    for ln in rows[:top]:
        print("  " + ln.strip())


def build(path: str) -> tuple[Topology, Callable[[Topology, int, int], Callable[[], float]]]:
    if path in ("udp", "tcp", "ping"):
        return Topology(), {"udp": _udp_load, "tcp": _tcp_load, "ping": _ping_load}[path]
    if path == "egress":
        from tests.bench.egress import EgressTopology

        def egress(topo: Topology, seconds: int, rate: int) -> Callable[[], float]:
            return _tcp_load(topo, seconds, rate)
        return EgressTopology(), egress
    if path == "dns":
        from tests.bench.dns import DnsTopology

        def dns(topo: Topology, seconds: int, _rate: int) -> Callable[[], float]:
            sd = topo.sides[FABRIC]
            res: dict[str, Any] = {}
            t = threading.Thread(target=lambda: res.update(
                topo.dnsperf(sd, "-q", "50", seconds=seconds)))  # type: ignore[attr-defined]
            t.start()

            def done() -> float:
                t.join()
                print(f"dns: {res['qps']:.0f} queries/s, {res['completed']:.0f} answered")
                return float(res["completed"])
            return done
        return DnsTopology(), dns
    raise SystemExit(f"unknown path {path!r}: udp, tcp, ping, dns or egress")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.profile",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("path", choices=("udp", "tcp", "ping", "dns", "egress"))
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rate", type=int, default=0,
                    help="udp: packets/s offered (0: as fast as iperf3 goes)")
    ap.add_argument("--hz", type=int, default=500, help="py-spy samples per second")
    ap.add_argument("--txqueuelen", type=int,
                    help="udp, tcp, ping: set the sending pod's eth0 (its TAP) queue length "
                         "first (the kernel's default is 500 frames)")
    ap.add_argument("--keep", help="save py-spy's raw stacks here")
    ap.add_argument("--perf", action="store_true",
                    help="also count the data-plane thread's syscalls and context switches "
                         "with `perf stat` (per packet)")
    ap.add_argument("--no-spy", action="store_true",
                    help="CPU per packet only, without py-spy (no sampling overhead)")
    ap.add_argument("--side", choices=("fabric", "reference"), default="fabric",
                    help="tcp, egress: load the benchmark's reference path instead (veth, "
                         "kernel forwarding): for its CPU per GB and --record")
    ap.add_argument("--record", metavar="FILE",
                    help="also `perf record -a -g` the whole machine into FILE and print "
                         "the hottest symbols (kernel work such as copies, checksums, "
                         "segmentation shows up there)")
    a = ap.parse_args(argv)
    if a.side == "reference":
        if a.path not in ("tcp", "egress"):
            raise SystemExit("--side reference: tcp or egress only")
        SIDE[0] = "veth" if a.path == "tcp" else "kernel"
        a.no_spy = True
    spy = _py_spy()
    if spy is None and not a.no_spy:
        print("py-spy is not installed (make .venv/.installed)", file=sys.stderr)
        return 1
    topo, load = build(a.path)
    with topo:
        assert topo.daemon is not None and topo.daemon.proc is not None
        pid = topo.daemon.proc.pid
        if a.txqueuelen and FABRIC in topo.sides:
            topo.run(topo.sides[FABRIC].client, "ip", "link", "set", "eth0", "txqueuelen",
                     str(a.txqueuelen))
        raw = a.keep or tempfile.mktemp(suffix=".txt")
        t0 = time.monotonic()
        window = max(a.seconds - 2, 1)
        with ThreadCpu(pid) as cpu:
            done = load(topo, a.seconds, a.rate)
            time.sleep(1.0)
            m0 = _machine()
            tm0 = time.monotonic()
            recording = None
            if a.record:
                recording = subprocess.Popen(
                    ["perf", "record", "-a", "-g", "-F", "499", "-o", a.record, "--",
                     "sleep", str(window)], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
            counting = None
            if a.perf and SIDE[0] == FABRIC:
                tid = next((t for t, n in python_thread_names(pid).items() if n == THREAD),
                           None)
                if tid is not None:
                    counting = subprocess.Popen(
                        ["perf", "stat", "-x", ",", "-e", ",".join(PERF_EVENTS), "-t",
                         str(tid), "--", "sleep", str(max(a.seconds - 2, 1))],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if not a.no_spy:
                assert spy is not None
                subprocess.run([spy, "record", "--pid", str(pid), "--duration",
                                str(window), "--rate", str(a.hz), "--format",
                                "raw", "--threads", "--idle", "--nonblocking", "-o", raw],
                               check=True, capture_output=True)
            else:
                time.sleep(window)
            counted = counting.communicate()[1] if counting is not None else ""
            if recording is not None:
                recording.wait()
            m1 = _machine()
            tm1 = time.monotonic()
            packets = done()
        wall = time.monotonic() - t0
        topo.check_daemon()
    dp = cpu.percent.get(THREAD)
    sys_pct = cpu.system_percent.get(THREAD, 0.0)
    moved = MOVED.get("bytes", 0.0)
    if moved:
        # Bytes in the measured window, assuming the load's rate was steady through it.
        gb = moved / MOVED["seconds"] * (tm1 - tm0) / 1e9
        busy, idle = m1[0] - m0[0], m1[1] - m0[1]
        print(f"machine: {busy / gb:.3f} CPU s per GB moved ({busy / (tm1 - tm0) * 100:.0f} % "
              f"of one CPU busy, {idle / max(busy + idle, 1e-9) * 100:.1f} % idle) over "
              f"{tm1 - tm0:.1f} s")
        if dp is not None and SIDE[0] == FABRIC:
            print(f"data-plane thread: {dp / 100 * wall / (moved / 1e9):.3f} CPU s per GB "
                  f"(user {(dp - sys_pct) / 100 * wall / (moved / 1e9):.3f}, kernel "
                  f"{sys_pct / 100 * wall / (moved / 1e9):.3f})")
    if dp is not None and packets:
        print(f"data-plane thread: {dp:.1f} % CPU (kernel {sys_pct:.1f} %) over {wall:.1f} s, "
              f"{dp / 100 * wall / packets * 1e6:.2f} µs CPU per packet "
              f"({packets / a.seconds / 1e3:.1f} kpps over the {a.seconds} s load)")
    if counted:
        per = packets / a.seconds * max(a.seconds - 2, 1)  # packets in perf's window, approx.
        print(f"perf stat over {max(a.seconds - 2, 1)} s (~{per:.0f} packets):")
        for ln in counted.splitlines():
            f = ln.split(",")
            if len(f) > 2 and f[0].replace(".", "").isdigit():
                print(f"  {f[2]:40s} {float(f[0]):14.0f}  {float(f[0]) / max(per, 1):8.3f} "
                      "per packet")
    print("threads:", ", ".join(f"{n} {p:.0f}% (sys {s:.0f}%)" for n, p, s in cpu.busiest()))
    if a.record:
        _report_record(a.record)
    if a.no_spy:
        return 0
    with open(raw) as f:
        stacks = parse_raw(f.read())
    if not a.keep:
        os.unlink(raw)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    s = summarize(stacks, Source(root))
    print(f"\n{s['samples']} samples of {THREAD}\n\nby stage:")
    for k, v in s["stages"]:
        if v >= 0.3:
            print(f"  {v:5.1f} %  {k}")
    print("\nself (innermost frame, by line):")
    for k, v in s["self"]:
        print(f"  {v:5.1f} %  {k}")
    print("\ninclusive (by function):")
    for k, v in s["inclusive"]:
        print(f"  {v:5.1f} %  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
