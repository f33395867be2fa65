"""`storms`: wake storms. Many clients at once against dormant services, every one must
get through; the figures are failures, how long the last client waited, and the pacing
of the release.

one:      CLIENTS clients connect at once to one dormant service (VIP 10.53.0.100:80 ->
          pod w:8080, readiness probe, no activator), each sends a byte and waits for
          one back. The backend (an asyncio server answering each connection's byte) is
          started WAKE_DELAY after the first client, as an on_activate hook would. Run for
          the L3 path and for a stream port (activator `stream`, VIP 10.53.0.101).
many:     SERVICES dormant services (VIPs 10.53.0.1xx-2xx -> the same pod, one target
          port each), PER_SERVICE clients each, all at once; the backend listens on every
          port WAKE_DELAY later.
Pacing: the release starts at most hold.release_burst new flows per ready backend every
hold.release_interval (128 per 1 ms by default); the service's `released` and
`release_paced` counters and the backend's accept times give how many held connections
reached the backend in its first millisecond.
Targets: 0 failed connections.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from fabric.config.specs import DEFAULT_RELEASE_BURST, DEFAULT_RELEASE_INTERVAL
from fabric.tools.sandbox import Daemon
from tests.bench.common import Report, Settings, fmt, median, percentile, progress
from tests.bench.topo import Topology

NAME = "storms"
NS = "bench"
CIDR = "10.53.0.0/24"
L3_VIP, STREAM_VIP = "10.53.0.100", "10.53.0.101"
W_IP = "10.53.0.4"
PORT, TARGET = 80, 8080
CLIENTS = 1000
SERVICES = 100
PER_SERVICE = 10
MANY_BASE_PORT = 9000
WAKE_DELAY = 0.3

CLIENT = r"""
import asyncio, json, sys, time
targets = json.loads(sys.argv[1])  # [[ip, port, count], ...]
timeout = float(sys.argv[2])
async def one(ip, port):
    t0 = time.monotonic()
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
        w.write(b"x")
        got = await asyncio.wait_for(r.readexactly(1), timeout)
        w.close()
        return (time.monotonic() - t0, got == b"y", "")
    except Exception as e:
        return (time.monotonic() - t0, False, type(e).__name__)
async def main():
    jobs = [one(ip, port) for ip, port, n in targets for _ in range(n)]
    res = await asyncio.gather(*jobs)
    print(json.dumps(res))
asyncio.run(main())
"""

SERVER = r"""
import asyncio, json, sys, time
ports = json.loads(sys.argv[1])
accepts = []
async def handle(r, w):
    accepts.append(time.monotonic())
    try:
        if await r.read(1):
            w.write(b"y")
            await w.drain()
    except Exception:
        pass
    w.close()
async def main():
    for p in ports:
        await asyncio.start_server(handle, "0.0.0.0", p, backlog=4096)
    print(json.dumps({"t_listen": time.monotonic()}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    print(json.dumps({"accepts": accepts}), flush=True)
asyncio.run(main())
"""


class StormTopology(Topology):
    def __init__(self, services: int) -> None:
        self.nservices = services
        super().__init__()

    def _build(self) -> None:
        sb = self.sb
        worker, a, w = sb.netns("worker"), sb.netns("a"), sb.netns("w")
        svcs: list[dict[str, Any]] = [
            {"name": "l3", "ip": L3_VIP, "backends": ["w"],
             "ports": [{"port": PORT, "target_port": TARGET}]},
            {"name": "stream", "ip": STREAM_VIP, "backends": ["w"],
             "ports": [{"port": PORT, "target_port": TARGET, "activator": "stream"}]},
        ]
        for i in range(self.nservices):
            svcs.append({"name": f"s{i}", "ip": many_vip(i, self.nservices), "backends": ["w"],
                         "ports": [{"port": PORT, "target_port": MANY_BASE_PORT + i}]})
        cfg = {"worker": {"id": "bench"}, "namespaces": [{
            "name": NS, "cidr": "10.53.0.0/16" if self.nservices > 90 else CIDR,
            "pods": [{"name": "a", "ip": "10.53.0.2", "netns": a},
                     {"name": "w", "ip": W_IP, "netns": w}],
            "services": svcs}]}
        self.daemon = Daemon(sb, worker, cfg).start()
        self.daemon.wait_attached(2)
        self.a, self.w = a, w
        self.run(a, "ping", "-c", "2", "-i", "0.05", "-W", "2", W_IP)
        # The client opens many sockets at once: its namespace's limits must allow it.
        self.run(w, "sysctl", "-qw", "net.core.somaxconn=4096")

    def services(self) -> dict[str, dict[str, Any]]:
        assert self.daemon is not None
        return {s["name"]: s for s in self.daemon.get("/v1/services")}


def many_vip(i: int, n: int) -> str:
    """The i-th of n services' VIPs: inside 10.53.0.0/24 for a few, a /16 for many."""
    return f"10.53.0.{150 + i}" if n <= 90 else f"10.53.{1 + i // 200}.{10 + i % 200}"


def storm(topo: StormTopology, targets: list[list[Any]], ports: list[int],
          timeout: float = 30.0) -> dict[str, Any]:
    """Start the clients, then the backend WAKE_DELAY later; every client's outcome."""
    client = topo.sb.popen(topo.a, sys.executable, "-c", CLIENT, json.dumps(targets),
                           str(timeout), stdout=subprocess.PIPE, text=True)
    time.sleep(WAKE_DELAY)
    server = topo.sb.popen(topo.w, sys.executable, "-u", "-c", SERVER, json.dumps(ports),
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdin is not None
    t_listen = json.loads(server.stdout.readline())["t_listen"]
    out, _ = client.communicate(timeout=timeout + 30)
    server.stdin.write("\n")
    server.stdin.flush()
    accepts = json.loads(server.stdout.readline())["accepts"]
    server.kill()
    res = json.loads(out)
    fails = [r for r in res if not r[1]]
    first_ms = [(t - t_listen) * 1e3 for t in sorted(accepts)]
    in_first_ms = sum(1 for t in first_ms if t <= (first_ms[0] if first_ms else 0) + 1.0)
    return {"clients": len(res), "failed": len(fails),
            "errors": sorted({r[2] for r in fails}),
            "p50_s": median([r[0] for r in res]), "max_s": max(r[0] for r in res),
            "accepted": len(accepts), "first_accept_ms": first_ms[0] if first_ms else None,
            "last_accept_ms": first_ms[-1] if first_ms else None,
            "in_first_ms": in_first_ms}


def run(s: Settings) -> Report:
    quick = s.seconds <= 2
    clients = 100 if quick else CLIENTS
    nservices = 10 if quick else SERVICES
    r = Report(NAME, f"{clients} clients at once to one dormant service (L3 path, then a "
                     f"stream port); {nservices} dormant services x {PER_SERVICE} clients "
                     f"at once; backend up {WAKE_DELAY * 1e3:.0f} ms after the first client")
    results: dict[str, dict[str, Any]] = {}
    with StormTopology(nservices) as topo:
        for label, vip in (("one service, L3", L3_VIP), ("one service, stream port",
                                                         STREAM_VIP)):
            results[label] = storm(topo, [[vip, PORT, clients]], [TARGET])
            progress(NAME, f"{label}: {results[label]['failed']} of {clients} failed")
            time.sleep(0.5)
        targets = [[many_vip(i, nservices), PORT, PER_SERVICE] for i in range(nservices)]
        results["many services"] = storm(topo, targets,
                                         [MANY_BASE_PORT + i for i in range(nservices)])
        progress(NAME, f"many services: {results['many services']['failed']} failed")
        svcs = topo.services()
        topo.check_daemon()
    rows = []
    for label, res in results.items():
        rows.append([label, str(res["clients"]), str(res["failed"]),
                     fmt(res["p50_s"] * 1e3), fmt(res["max_s"] * 1e3),
                     fmt(res["first_accept_ms"]), fmt(res["last_accept_ms"]),
                     str(res["in_first_ms"])])
        r.check(f"{label}: failed connections", res["failed"], "", "0", res["failed"] == 0)
    r.tables.append(("storms", ["storm", "clients", "failed", "p50 ms", "max ms",
                                "1st accept ms", "last accept ms", "accepts in 1st ms"], rows))
    held = svcs["l3"]["counters"]
    r.notes.append(f"L3 service: held {held['held']}, released {held['released']} "
                   f"({held['release_paced']} of them waited for a later paced step: "
                   f"hold.release_burst {DEFAULT_RELEASE_BURST} new flows per ready backend "
                   f"every {DEFAULT_RELEASE_INTERVAL * 1e3:g} ms), hold overflow "
                   f"{held['hold_overflow']}, hold timeouts {held['hold_timeout']}")
    p99 = percentile([res["max_s"] for res in results.values()], 99)
    r.check("slowest client of all storms", p99 * 1e3 if p99 else None, "ms", "", None)
    errors = {label: res["errors"] for label, res in results.items() if res["errors"]}
    if errors:
        r.notes.append(f"client errors: {errors}")
    r.extra = {"storms": results}
    return r
