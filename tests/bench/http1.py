"""`http1`: wrk through the HTTP/1.1 activator against the same server reached directly.

One fabric namespace: client pod a, pod w running tests/support/h1server.py (asyncio,
keep-alive) on 8080. Service `h1` (VIP 10.50.0.112:80 -> w:8080, activator `http1`) has
its port terminated in the local stack, every request and response framed by the guest
and relayed through it. Each run is `wrk -t 2 -c 10 -d <seconds>` to the VIP and to
10.50.0.4:8080, interleaved, and through service `plain` (VIP .113, the `stream`
activator: connect, then kernel splice, no guest per request): the stream path's own
ceiling, set by the daemon's per-connection work rather than by any guest. Target:
requests/s through the activator >= 60 % of the spliced path (medians: what the guest's
framing and relay cost on top of the stream path); activator / direct is reported.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.bench.common import Report, Settings, interleaved, median, progress
from tests.bench.topo import Topology

NAME = "http1"
VIP = "10.50.0.112"
SPLICE_VIP = "10.50.0.113"
POD = "10.50.0.4"
TARGET = 0.60
THROUGH, DIRECT, SPLICED = "activator", "direct", "spliced"
WRK = ("-t", "2", "-c", "10")
SERVER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "support", "h1server.py")


def wrk_rps(out: str) -> tuple[float, int, int]:
    """Requests/s, requests done and failed (non-2xx plus socket errors) of a wrk run."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    done = re.search(r"(\d+) requests in", out)
    if not rps or not done:
        raise RuntimeError(f"wrk: {out.strip()[-800:]}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                     out)
    failed = (int(non2xx.group(1)) if non2xx else 0) + (
        sum(map(int, sock.groups())) if sock else 0)
    return float(rps.group(1)), int(done.group(1)), failed


class H1Topology(Topology):
    """Client pod a, the asyncio HTTP/1.1 server in pod w, the HTTP/1.1 activator."""

    def _build(self) -> None:
        sb = self.sb
        worker, a, w = sb.netns("worker"), sb.netns("a"), sb.netns("w")
        self.server = sb.popen(w, sys.executable, SERVER, "8080",
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sb.wait_port(w, 8080)
        self.start_behind_activator(worker, a, w, POD, "h1", "http1", VIP, SPLICE_VIP)
        self.client_ns = a
        for vip in (VIP, SPLICE_VIP):  # wakes the services; first-time costs unmeasured
            self.wrk(f"http://{vip}/", 1)

    def wrk(self, url: str, seconds: int) -> float:
        out = self.run(self.client_ns, "wrk", *WRK, "-d", f"{seconds}s", url,
                       timeout=seconds + 60)
        rps, done, failed = wrk_rps(out)
        if failed or not done:
            raise RuntimeError(f"wrk to {url}: {failed} failed of {done}: "
                               f"{out.strip()[-800:]}{self.daemon_state()}")
        return rps

    def counters(self) -> dict[str, object]:
        assert self.daemon is not None
        svc = next(s for s in self.daemon.get("/v1/services") if s["name"] == "h1")
        return dict(svc["streams"]["80"])


def run(s: Settings) -> Report:
    r = Report(NAME, f"wrk {' '.join(WRK)}, {s.seconds} s x {s.runs} runs, through the "
                     "HTTP/1.1 activator vs the server directly (interleaved)")
    with H1Topology() as topo:
        urls = {THROUGH: f"http://{VIP}/", DIRECT: f"http://{POD}:8080/",
                SPLICED: f"http://{SPLICE_VIP}/"}

        def measure(side: str, i: int) -> float | None:
            rps = topo.wrk(urls[side], s.seconds)
            progress(NAME, f"run {i + 1}/{s.runs} {side}: {rps:,.0f} req/s")
            return rps

        got = interleaved(s.runs, {side: (lambda i, side=side: measure(side, i))
                                   for side in (THROUGH, DIRECT, SPLICED)})
        topo.check_daemon()
        st = topo.counters()
    r.add(THROUGH, "req/s", got[THROUGH])
    r.add(DIRECT, "req/s", got[DIRECT])
    r.add(SPLICED + " (stream activator, kernel splice)", "req/s", got[SPLICED])
    v, d, sp = median(got[THROUGH]), median(got[DIRECT]), median(got[SPLICED])
    r.check("activator / direct (medians)", v / d * 100 if v is not None and d else None,
            "%", "", None)
    r.check("spliced / direct (the stream path without a guest per request)",
            sp / d * 100 if sp is not None and d else None, "%", "", None)
    ratio = v / sp * 100 if v is not None and sp else None
    r.check("activator / spliced (the guest's share)", ratio, "%",
            f">= {TARGET * 100:.0f} %", ratio is not None and ratio >= TARGET * 100)
    counters = st.get("counters", {})
    assert isinstance(counters, dict)
    r.check("guest failures", float(counters.get("guest_failures", 0)), "", "", None)
    r.extra["streams"] = st
    r.notes.append(f"python {sys.version.split()[0]}; the guest frames every request and "
                   "response both ways")
    return r
