"""`http2`: h2load through the HTTP/2 activator against the same nghttpd reached directly.

One fabric namespace: client pod a, pod w running `nghttpd --no-tls` on 8080. Service
`h2` (VIP 10.50.0.110:80 -> w:8080, activator `http2`) has its port terminated in the local
stack, every request decoded and re-encoded by the guest. Each run is `h2load -c 10 -m 50
-D <seconds> --warm-up-time 1` to the VIP and to 10.50.0.4:8080, interleaved.
Target: requests/s through the activator >= 60 % of direct (medians). For reference, the
same through service `plain` (VIP .111, the `stream` activator: connect, then kernel
splice, no guest per frame): what the stream path itself costs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.bench.common import Report, Settings, interleaved, median, progress
from tests.bench.topo import Topology

NAME = "http2"
VIP = "10.50.0.110"
SPLICE_VIP = "10.50.0.111"
POD = "10.50.0.4"
TARGET = 0.60
THROUGH, DIRECT, SPLICED = "activator", "direct", "spliced"
H2LOAD = ("-c", "10", "-m", "50")


class H2Topology(Topology):
    """Client pod a, nghttpd in pod w, one service with the HTTP/2 activator."""

    def _build(self) -> None:
        sb = self.sb
        worker, a, w = sb.netns("worker"), sb.netns("a"), sb.netns("w")
        root = os.path.join(sb.tmp, "docroot")
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, "index.html"), "w") as f:
            f.write("hello over h2\n")
        self.server = sb.popen(w, "nghttpd", "--no-tls", "-d", root, "8080",
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sb.wait_port(w, 8080)
        self.start_behind_activator(worker, a, w, POD, "h2", "http2", VIP, SPLICE_VIP)
        self.client_ns = a
        for vip in (VIP, SPLICE_VIP):  # wakes the services; first-time costs unmeasured
            self.h2load(f"http://{vip}/", 1)

    def h2load(self, url: str, seconds: int) -> float:
        out = self.run(self.client_ns, "h2load", *H2LOAD, "-D", str(seconds),
                       "--warm-up-time", "1", url, timeout=seconds + 60)
        m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
        done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
        if not m or not done or done.group(1) != done.group(2) or done.group(1) == "0":
            raise RuntimeError(f"h2load to {url}: {out.strip()[-800:]}{self.daemon_state()}")
        return float(m.group(1))

    def counters(self) -> dict[str, object]:
        assert self.daemon is not None
        svc = next(s for s in self.daemon.get("/v1/services") if s["name"] == "h2")
        return dict(svc["streams"]["80"])


def run(s: Settings) -> Report:
    r = Report(NAME, f"h2load {' '.join(H2LOAD)}, {s.seconds} s x {s.runs} runs, through "
                     "the HTTP/2 activator vs nghttpd directly (interleaved)")
    with H2Topology() as topo:
        urls = {THROUGH: f"http://{VIP}/", DIRECT: f"http://{POD}:8080/",
                SPLICED: f"http://{SPLICE_VIP}/"}

        def measure(side: str, i: int) -> float | None:
            try:
                rps = topo.h2load(urls[side], s.seconds)
            except RuntimeError as e:
                if side != SPLICED:
                    raise
                # the reference only: a failed run is noted, not fatal to the benchmark
                r.notes.append(f"run {i + 1} {side}: {str(e).splitlines()[0]}, no requests done")
                return None
            progress(NAME, f"run {i + 1}/{s.runs} {side}: {rps:,.0f} req/s")
            return rps

        got = interleaved(s.runs, {side: (lambda i, side=side: measure(side, i))
                                   for side in (THROUGH, DIRECT, SPLICED)})
        topo.check_daemon()
        st = topo.counters()
    r.add(THROUGH, "req/s", got[THROUGH])
    r.add(DIRECT, "req/s", got[DIRECT])
    r.add(SPLICED + " (stream activator, kernel splice)", "req/s", got[SPLICED])
    v, d = median(got[THROUGH]), median(got[DIRECT])
    ratio = v / d * 100 if v is not None and d else None
    r.check("activator / direct (medians)", ratio, "%", f">= {TARGET * 100:.0f} %",
            ratio is not None and ratio >= TARGET * 100)
    sp = median(got[SPLICED])
    r.check("spliced / direct (the stream path without a guest per frame)",
            sp / d * 100 if sp is not None and d else None, "%", "", None)
    counters = st.get("counters", {})
    assert isinstance(counters, dict)
    r.check("guest failures", float(counters.get("guest_failures", 0)), "", "", None)
    r.extra["streams"] = st
    r.notes.append(f"python {sys.version.split()[0]}; the guest sees every frame both ways")
    return r
