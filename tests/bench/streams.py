"""`streams`: what a stream port costs (fabric.streams, the plain stream activator).

bulk:  iperf3 -R (the server sends: a download) from pod a through a stream port
       (VIP 10.52.0.101:5201, activator `stream`: held, connected upstream from the VIP,
       then spliced in the kernel; readiness "external" so no probe touches the one-shot
       iperf3 server) against a -> b directly, interleaved. Target: >= 80 % of direct.
       Each run also reads fabricd's per-thread CPU (/proc): the data-plane thread's
       CPU-seconds per GB moved and how busy it was, and the splicer thread's (bulk
       spliced pairs move there, fabric.streams.splicer). A spliced stream crosses the router
       twice (b -> local stack, local stack -> a), so its data-plane cost per GB is about
       twice direct's; with the thread near saturation in both, that ratio, not the
       splice, bounds the throughput ratio (docs/performance.md, "Spliced streams").
       A third side, the same through VIP 10.52.0.102 whose port has `upstream:
       pod-local`: the upstream connection is made inside b (to b's own IP, over its
       loopback), so the bytes cross the router once, as direct's do.
wake:  a dormant stream port (VIP 10.52.0.100:80 -> pod w:8080, readiness probe). A
       client agent in pod a connects to the VIP and sends one byte; WAKE_DELAY later
       the server agent in w listens (t_listen) and answers each connection's byte with
       one byte. The client records when the answer arrives (t_first). The wake's
       overhead is t_first - t_listen minus the same exchange on a direct connection
       (connect, one byte each way: the median of DIRECT_SAMPLES), i.e. what the fabric
       adds between the backend's port accepting and the first response byte at the
       client. CLOCK_MONOTONIC is system-wide, so the agents' clocks agree. Target:
       median <= 3 ms (p99 shown).
"""

from __future__ import annotations

import random
import time

from fabric.tools.sandbox import Daemon
from tests.bench.common import Report, Settings, fmt, interleaved, median, percentile, progress
from tests.bench.cpu import ThreadCpu
from tests.bench.services import Agent
from tests.bench.topo import Side, Topology

NAME = "streams"
NS = "bench"
WAKE_VIP, BULK_VIP, LOCAL_VIP = "10.52.0.100", "10.52.0.101", "10.52.0.102"
WAKE_PORT, WAKE_TARGET, BULK_PORT = 80, 8080, 5201
WAKE_DELAY = 0.2
WAKE_JITTER = (0.0, 0.25)
WAKES_PER_SECOND = 4
MAX_WAKES = 30
DIRECT_SAMPLES = 20
WAKE_TARGET_MS = 3.0
BULK_TARGET = 0.80
VIP, DIRECT, WAKE = "stream port", "direct", "wake"
LOCAL = "stream port, upstream: pod-local"
DATAPLANE, LOOP, SPLICER = "fabric-dataplane", "MainThread", "fabric-splicer"

AGENT = r"""
import json, socket, sys, threading, time
srv = None
def serve(s):
    while True:
        try:
            c, _ = s.accept()
        except OSError:
            return
        try:
            if c.recv(1):
                c.send(b"y")
        except OSError:
            pass
        c.close()
for line in sys.stdin:
    cmd = line.split()
    try:
        if cmd[0] == "listen":
            srv = socket.socket()
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind(("0.0.0.0", int(cmd[1])))
            srv.listen(128)
            t = time.monotonic()
            threading.Thread(target=serve, args=(srv,), daemon=True).start()
            out = {"t_listen": t}
        elif cmd[0] == "close":
            if srv is not None:
                srv.shutdown(socket.SHUT_RDWR)
                srv.close()
                srv = None
            out = {}
        elif cmd[0] == "request":
            s = socket.socket()
            s.settimeout(float(cmd[3]))
            t0 = time.monotonic()
            s.connect((cmd[1], int(cmd[2])))
            s.send(b"x")
            got = s.recv(1)
            t1 = time.monotonic()
            s.close()
            out = {"t_start": t0, "t_first": t1, "ok": got == b"y"}
        else:
            out = {"error": "unknown command " + cmd[0]}
    except OSError as e:
        out = {"error": type(e).__name__ + ": " + str(e)}
    print(json.dumps(out), flush=True)
"""


class StreamsTopology(Topology):
    def _build(self) -> None:
        sb = self.sb
        worker, a, b, w = sb.netns("worker"), sb.netns("a"), sb.netns("b"), sb.netns("w")
        cfg = {"worker": {"id": "bench"}, "namespaces": [{
            "name": NS, "cidr": "10.52.0.0/24",
            "pods": [{"name": "a", "ip": "10.52.0.2", "netns": a},
                     {"name": "b", "ip": "10.52.0.3", "netns": b},
                     {"name": "w", "ip": "10.52.0.4", "netns": w}],
            "services": [
                {"name": "wake", "ip": WAKE_VIP, "backends": ["w"],
                 "ports": [{"port": WAKE_PORT, "target_port": WAKE_TARGET,
                            "activator": "stream"}]},
                {"name": "bulk", "ip": BULK_VIP, "backends": ["b"], "readiness": "external",
                 "ports": [{"port": BULK_PORT, "target_port": BULK_PORT,
                            "activator": "stream"}]},
                {"name": "bulklocal", "ip": LOCAL_VIP, "backends": ["b"],
                 "readiness": "external",
                 "ports": [{"port": BULK_PORT, "target_port": BULK_PORT,
                            "activator": "stream", "upstream": "pod-local"}]},
            ]}]}
        self.daemon = Daemon(sb, worker, cfg).start()
        self.daemon.wait_attached(3)
        self.a, self.b, self.w = a, b, w
        self.sides = {VIP: Side(VIP, a, b, BULK_VIP), DIRECT: Side(DIRECT, a, b, "10.52.0.3"),
                      LOCAL: Side(LOCAL, a, b, LOCAL_VIP)}
        for ip in ("10.52.0.3", "10.52.0.4"):
            self.run(a, "ping", "-c", "3", "-i", "0.05", "-W", "2", ip)


class Waker:
    def __init__(self, topo: StreamsTopology) -> None:
        self.topo = topo
        self.client = Agent(topo, topo.a, AGENT)
        self.server = Agent(topo, topo.w, AGENT)
        self.overheads_ms: list[float] = []
        self.direct_ms: list[float] = []
        self.rng = random.Random(1)

    def direct_rtt(self) -> float:
        """One connect + byte each way straight to the backend, in ms (median)."""
        self.server.call(f"listen {WAKE_TARGET}")
        samples = []
        for _ in range(DIRECT_SAMPLES):
            r = self.client.call(f"request 10.52.0.4 {WAKE_TARGET} 5")
            samples.append((r["t_first"] - r["t_start"]) * 1e3)
        self.server.call("close")
        self.direct_ms = samples
        m = median(samples)
        assert m is not None
        return m

    def make_dormant(self) -> None:
        self.server.call("close")
        self.topo.set_ready("w", False)
        self.topo.set_ready("w", True)
        deadline = time.monotonic() + 5
        while self.topo.service("wake")["state"] in ("ready", "idle"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"wake did not go unready: {self.topo.service('wake')}")
            time.sleep(0.01)

    def wake(self, base_ms: float) -> float:
        self.make_dormant()
        time.sleep(self.rng.uniform(*WAKE_JITTER))
        self.client.send(f"request {WAKE_VIP} {WAKE_PORT} 15")
        time.sleep(WAKE_DELAY)
        t_listen = self.server.call(f"listen {WAKE_TARGET}")["t_listen"]
        got = self.client.reply(timeout=20)
        if not got["ok"]:
            raise RuntimeError(f"wrong answer through the stream port: {got}")
        ms = (got["t_first"] - t_listen) * 1e3 - base_ms
        self.overheads_ms.append(ms)
        return ms

    def batch(self, n: int, base_ms: float, i: int, runs: int) -> float | None:
        got = [self.wake(base_ms) for _ in range(n)]
        progress(NAME, f"run {i + 1}/{runs} wakes: median {fmt(median(got))} ms of {n}")
        return median(got)


def run(s: Settings) -> Report:
    total = min(MAX_WAKES, WAKES_PER_SECOND * s.seconds)
    per_run = [total // s.runs + (1 if i < total % s.runs else 0) for i in range(s.runs)]
    r = Report(NAME, f"iperf3 -R {s.seconds} s x {s.runs} runs through a spliced stream port "
                     f"vs pod to pod (interleaved); {total} wakes of a dormant stream port "
                     f"(backend listens {WAKE_DELAY * 1e3:.0f} ms after the client's request)")
    with StreamsTopology() as topo:
        waker = Waker(topo)
        base = waker.direct_rtt()
        waker.wake(base)  # first-time costs are not measured
        waker.overheads_ms.clear()

        assert topo.daemon is not None and topo.daemon.proc is not None
        pid = topo.daemon.proc.pid
        cost: dict[str, dict[str, list[float]]] = {
            side: {"dp": [], "busy": [], "loop": [], "splicer": []}
            for side in (VIP, DIRECT, LOCAL)}

        def bulk(side: str, i: int) -> float:
            t0 = time.monotonic()
            with ThreadCpu(pid) as cpu:
                res = topo.iperf3(topo.sides[side], "-R", seconds=s.seconds)
            wall = time.monotonic() - t0
            end = res["end"]["sum_received"]
            gbps = end["bits_per_second"] / 1e9
            gb = end["bytes"] / 1e9
            # CPU over the whole iperf3 call (its setup included, so "busy" reads a
            # little low) per GB moved; the same for both sides.
            busy = cpu.percent.get(DATAPLANE, 0.0)
            per_gb = busy / 100 * wall / gb if gb > 0 else 0.0
            c = cost[side]
            if gb > 0:
                c["dp"].append(per_gb)
                c["loop"].append(cpu.percent.get(LOOP, 0.0) / 100 * wall / gb)
                c["splicer"].append(cpu.percent.get(SPLICER, 0.0) / 100 * wall / gb)
            c["busy"].append(busy)
            progress(NAME, f"run {i + 1}/{s.runs} {side}: {gbps:.2f} Gbit/s, data plane "
                           f"{busy:.0f} % busy, {per_gb:.2f} CPU-s/GB, splicer thread "
                           f"{c['splicer'][-1] if gb > 0 else 0:.2f} CPU-s/GB")
            return float(gbps)

        got = interleaved(s.runs, {
            VIP: lambda i: bulk(VIP, i),
            DIRECT: lambda i: bulk(DIRECT, i),
            LOCAL: lambda i: bulk(LOCAL, i),
            WAKE: lambda i: waker.batch(per_run[i], base, i, s.runs) if per_run[i] else None,
        })
        topo.check_daemon()
        streams = topo.service("bulk").get("streams", {}).get(str(BULK_PORT), {})
        local = topo.service("bulklocal").get("streams", {}).get(str(BULK_PORT), {})

    ov = waker.overheads_ms
    r.add(VIP, "Gbit/s", got[VIP])
    r.add(DIRECT, "Gbit/s", got[DIRECT])
    r.add(LOCAL, "Gbit/s", got[LOCAL])
    r.add("wake overhead (median of run)", "ms", got[WAKE])
    v, d = median(got[VIP]), median(got[DIRECT])
    ratio = v / d * 100 if v is not None and d else None
    r.check("stream port / direct (medians)", ratio, "%", f">= {BULK_TARGET * 100:.0f} %",
            ratio is not None and ratio >= BULK_TARGET * 100)
    lv = median(got[LOCAL])
    lratio = lv / d * 100 if lv is not None and d else None
    r.check("stream port, upstream: pod-local / direct (medians)", lratio, "%",
            f">= {BULK_TARGET * 100:.0f} %", lratio is not None and lratio >= BULK_TARGET * 100)
    m = median(ov)
    r.check(f"wake to first response byte, overhead, median of {len(ov)}", m, "ms",
            f"<= {fmt(WAKE_TARGET_MS)} ms", m is not None and m <= WAKE_TARGET_MS)
    dv, dd = median(cost[VIP]["dp"]), median(cost[DIRECT]["dp"])
    r.check("data-plane CPU per GB, stream port", dv, "s/GB", "", None)
    r.check("data-plane CPU per GB, direct", dd, "s/GB", "", None)
    r.check("data-plane CPU per GB, stream port / direct", dv / dd if dv and dd else None,
            "x", "", None)
    dl = median(cost[LOCAL]["dp"])
    r.check("data-plane CPU per GB, pod-local / direct", dl / dd if dl and dd else None,
            "x", "", None)
    r.check("data-plane thread busy, stream port", median(cost[VIP]["busy"]), "%", "", None)
    r.check("data-plane thread busy, direct", median(cost[DIRECT]["busy"]), "%", "", None)
    r.check("event loop CPU per GB, stream port", median(cost[VIP]["loop"]),
            "s/GB", "", None)
    r.check("splicer thread CPU per GB, stream port", median(cost[VIP]["splicer"]),
            "s/GB", "", None)
    r.check("splicer thread CPU per GB, pod-local", median(cost[LOCAL]["splicer"]),
            "s/GB", "", None)
    r.check("wake overhead p99", percentile(ov, 99), "ms", "", None)
    r.check("direct connect + 1 byte each way (median)", base, "ms", "", None)
    c = streams.get("counters", {})
    r.notes.append(f"bulk port: {c.get('spliced', 0)} streams spliced, "
                   f"{c.get('bytes_spliced', 0) / 1e9:.2f} GB through splice(2)")
    lc = local.get("counters", {})
    r.notes.append(f"pod-local port: {lc.get('pod_local_connects', 0)} upstreams made in the "
                   f"pod, {sum(v for k, v in lc.items() if k.startswith('pod_local_fallback'))}"
                   f" fell back to the VIP, {lc.get('bytes_spliced', 0) / 1e9:.2f} GB spliced")
    r.extra = {"wake_overheads_ms": ov, "direct_ms": waker.direct_ms, "cpu_per_gb": cost}
    return r
