"""`python -m tests.bench.ping_floor`: what ping's RTT through *any* userspace forwarder
between two TAPs costs on this machine, to know the floor the fabric is measured against.

Pods `a` (10.52.0.2) and `b` (10.52.0.3) each get a TAP whose other end is a bare L2 hub
in a namespace of its own: every frame read from one TAP is written to the other, nothing
parsed. The hub comes in four builds: Python and C, each either blocking in `epoll_wait`
(the thread sleeps between frames, as fabricd's data plane does) or spinning on
`epoll_wait(0)` for `--spin` µs after the last frame before it sleeps again. The same
`ping -c COUNT -i 0.002` runs over each hub and over a veth pair (the kernel baseline),
interleaved, `--runs` times; medians of each run's per-packet `time=` values.

Where a bare hub costs as much above veth as fabricd does, the difference is the
machine's (a sleeping thread's wakeup: scheduler and vCPU halt/IPI), not the fabric's
code. Needs root; everything lives in throwaway `fbb-<runid>-*` namespaces.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from fabric.tools.sandbox import Sandbox
from tests.bench.common import median, percentile
from tests.bench.cpu import python_thread_names
from tests.bench.ping import parse_rtts
from tests.bench.topo import FABRIC, VETH, Topology

COUNT = 200
INTERVAL = "0.002"

# Both hubs: argv[1] = spin µs (0: block in epoll_wait); TAPs h0 and h1 in the hub's own
# namespace; "ready" on stdout once both are open.
PY_HUB = r"""
import fcntl, os, select, struct, sys, time
spin = float(sys.argv[1]) / 1e6
fds = []
for name in ("h0", "h1"):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", name.encode(), 0x0002 | 0x1000))
    fds.append(fd)
peer = {fds[0]: fds[1], fds[1]: fds[0]}
ep = select.epoll()
for fd in fds:
    ep.register(fd, select.EPOLLIN)
print("ready", flush=True)
buf = bytearray(65536)
mono = time.monotonic
last = 0.0
while True:
    events = ep.poll(0 if spin and mono() - last < spin else -1)
    for fd, _ in events:
        while True:
            try:
                n = os.readv(fd, [buf])
            except BlockingIOError:
                break
            try:
                os.write(peer[fd], memoryview(buf)[:n])
            except OSError:
                pass
        last = mono()
"""

C_HUB = r"""
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
static double mono(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
int main(int argc, char **argv) {
    double spin = atof(argv[1]) / 1e6, last = 0;
    int fds[2], ep = epoll_create1(0);
    for (int i = 0; i < 2; i++) {
        struct ifreq ifr; memset(&ifr, 0, sizeof ifr);
        ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
        snprintf(ifr.ifr_name, IFNAMSIZ, "h%d", i);
        fds[i] = open("/dev/net/tun", O_RDWR | O_NONBLOCK);
        if (fds[i] < 0 || ioctl(fds[i], TUNSETIFF, &ifr) < 0) { perror("tun"); return 1; }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
    }
    printf("ready\n"); fflush(stdout);
    static char buf[65536];
    struct epoll_event evs[4];
    for (;;) {
        int n = epoll_wait(ep, evs, 4, spin > 0 && mono() - last < spin ? 0 : -1);
        for (int e = 0; e < n; e++) {
            int i = evs[e].data.u32;
            ssize_t k;
            while ((k = read(fds[i], buf, sizeof buf)) > 0)
                (void)!write(fds[1 - i], buf, k);
            last = mono();
        }
    }
}
"""


def build_c(tmp: str) -> str | None:
    """The C hub built with the system's cc, or None when there is no compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src, exe = os.path.join(tmp, "hub.c"), os.path.join(tmp, "hub")
    with open(src, "w") as f:
        f.write(C_HUB)
    subprocess.run([cc, "-O2", "-o", exe, src], check=True)
    return exe


class Counting:
    """`perf stat` task-clock of one thread (or process) while a ping runs: the forwarder's
    CPU, both directions of every echo, its kernel work inside the writes included."""

    def __init__(self, tid: int | None) -> None:
        self.p = None
        if tid is not None and shutil.which("perf"):
            self.p = subprocess.Popen(["perf", "stat", "-x", ",", "-e", "task-clock", "-t",
                                       str(tid)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
            time.sleep(0.2)  # perf attaches

    def stop(self) -> float | None:
        """µs of CPU while counting (None without perf)."""
        if self.p is None:
            return None
        self.p.send_signal(signal.SIGINT)
        err = self.p.communicate(timeout=10)[1]
        for ln in err.splitlines():
            f = ln.split(",")
            if len(f) > 2 and f[2] == "task-clock":
                try:
                    return float(f[0]) * 1000.0  # msec
                except ValueError:
                    return None
        return None


class Hubs:
    """Pods a and b behind a hub namespace whose hub process is replaced per variant."""

    def __init__(self, sb: Sandbox) -> None:
        self.sb = sb
        self.hubns = sb.netns("hub")
        self.a, self.b = sb.netns("ha"), sb.netns("hb")
        self.proc: subprocess.Popen[str] | None = None

    def start(self, argv: list[str]) -> None:
        self.stop()
        p = self.proc = self.sb.popen(self.hubns, *argv, stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"hub {argv} did not start")
        for tap, ns, ip in (("h0", self.a, "10.52.0.2"), ("h1", self.b, "10.52.0.3")):
            self.sb.run(self.hubns, "ip", "link", "set", tap, "netns", ns)
            self.sb.run(ns, "ip", "link", "set", tap, "name", "eth0")
            self.sb.run(ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            self.sb.run(ns, "ip", "link", "set", "eth0", "up")
        self.sb.run(self.a, "ping", "-c", "3", "-i", "0.05", "-W", "2", "10.52.0.3")

    def stop(self) -> None:
        if self.proc is not None:
            self.sb.stop(self.proc)  # its TAPs (and the pods' eth0) go with it
            self.proc = None
            for ns in (self.a, self.b):
                while self.sb.run(ns, "ip", "link", "show", "eth0", check=False).returncode == 0:
                    time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--count", type=int, default=COUNT)
    ap.add_argument("--fifo", action="store_true",
                    help="also fabricd and the C hub with their forwarding thread SCHED_FIFO 1")
    ap.add_argument("--busy-poll", metavar="DURATION",
                    help="also a second fabricd with worker.busy_poll set to this (\"3ms\")")
    ap.add_argument("--spin", type=float, default=0.0,
                    help="also hubs that poll this many µs after the last frame (0: none)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="fbb-floor-")
    results: dict[str, list[list[float]]] = {}
    cpu_us: dict[str, list[float]] = {}
    try:
        exe = build_c(tmp)
        with contextlib.ExitStack() as stack:
            topo = stack.enter_context(Topology())
            polling = (stack.enter_context(Topology({"busy_poll": args.busy_poll}))
                       if args.busy_poll else None)
            sb = topo.sb
            hubs = Hubs(sb)
            variants: dict[str, list[str] | None] = {
                "veth": None,
                "fabricd": None,
                "python hub, epoll blocks": [sys.executable, "-c", PY_HUB, "0"],
            }
            if exe is not None:
                variants["C hub, epoll blocks"] = [exe, "0"]
            if args.spin > 0:
                variants[f"python hub, spins {args.spin:g} µs"] = [sys.executable, "-c",
                                                                  PY_HUB, str(args.spin)]
                if exe is not None:
                    variants[f"C hub, spins {args.spin:g} µs"] = [exe, str(args.spin)]
            assert topo.daemon is not None and topo.daemon.proc is not None
            names = python_thread_names(topo.daemon.proc.pid)
            dp_tid = [t for t, n in names.items() if n == "fabric-dataplane"]
            fifo_tid: list[int] = []
            busy = f"fabricd, busy_poll {args.busy_poll}"
            busy_tid: list[int] = []
            if polling is not None:
                assert polling.daemon is not None and polling.daemon.proc is not None
                variants[busy] = None
                busy_tid = [t for t, n in python_thread_names(polling.daemon.proc.pid).items()
                            if n == "fabric-dataplane"]
            if args.fifo:
                variants["fabricd, data plane SCHED_FIFO"] = None
                if exe is not None:
                    variants["C hub, SCHED_FIFO"] = [exe, "0"]
                fifo_tid = dp_tid
            for i in range(args.runs):
                names = list(variants) if i % 2 == 0 else list(variants)[::-1]
                for name in names:
                    hub = variants[name]
                    fifo = "SCHED_FIFO" in name
                    if hub is None and name == busy and polling is not None:
                        side = polling.sides[FABRIC]
                        ns, ip = side.client, side.server_ip
                    elif hub is None:
                        side = topo.sides[VETH if name == "veth" else FABRIC]
                        ns, ip = side.client, side.server_ip
                        for tid in fifo_tid:
                            os.sched_setscheduler(tid, os.SCHED_FIFO if fifo else os.SCHED_OTHER,
                                                  os.sched_param(1 if fifo else 0))
                    else:
                        hubs.start(hub)
                        ns, ip = hubs.a, "10.52.0.3"
                        if fifo:
                            assert hubs.proc is not None
                            # `ip netns exec` execs: its pid is the hub's
                            os.sched_setscheduler(hubs.proc.pid, os.SCHED_FIFO,
                                                  os.sched_param(1))
                    tid = (None if name == "veth" else
                           busy_tid[0] if name == busy and busy_tid else
                           dp_tid[0] if hub is None and dp_tid else
                           hubs.proc.pid if hub is not None and hubs.proc is not None else None)
                    stat = Counting(tid)
                    out = sb.run(ns, "ping", "-n", "-c", str(args.count), "-i", INTERVAL,
                                 "-W", "1", ip, check=False, timeout=args.count * 0.05 + 30)
                    cpu = stat.stop()
                    rtts = parse_rtts(out.stdout)
                    results.setdefault(name, []).append(rtts)
                    if cpu is not None and rtts:
                        cpu_us.setdefault(name, []).append(cpu / len(rtts))
                    print(f"run {i + 1}/{args.runs} {name}: median {median(rtts) or 0:.1f} µs, "
                          f"forwarder CPU {cpu / max(len(rtts), 1) if cpu else 0:.1f} µs/echo",
                          file=sys.stderr, flush=True)
            hubs.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    veth = median([median(r) for r in results["veth"]]) or 0.0
    print(f"{'path':32} {'median µs':>10} {'+veth µs':>9} {'p99 µs':>8} {'CPU µs/echo':>12}"
          f"  (medians of {args.runs} runs x {args.count} echoes, -i {INTERVAL})")
    for name, runs in results.items():
        m = median([median(r) for r in runs]) or 0.0
        p99 = median([percentile(r, 99) for r in runs]) or 0.0
        c = median(cpu_us.get(name, []))
        print(f"{name:32} {m:10.1f} {m - veth:9.1f} {p99:8.1f} "
              f"{'-' if c is None else f'{c:.1f}':>12}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
