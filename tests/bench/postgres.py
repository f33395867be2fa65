"""`postgres`: pgbench through the PostgreSQL activator against the same server directly.

One fabric namespace: client pod `a` (10.50.0.2), a real PostgreSQL 15 in pod `d`
(10.50.0.5:5432, started by tests/support/pgwire.PgServer, trust auth, fsync off) and a
service `pg` (VIP 10.50.0.110:5432 -> d:5432) whose port runs
activators/postgres/postgres.wasm: every connection is terminated in the namespace's
local stack and every message passes through the activator (framed both ways,
keep-alives answered locally). `pgbench -i -s 1` once, then `pgbench -n -S -c 20 -j 2
-T <seconds>` (select-only, simple protocol) through the VIP and to d's address
directly (pod to pod through the fabric, no activator), interleaved, `--runs` times.
The TPS is pgbench's "without initial connection time". Target: VIP >= 60 % of direct
(medians).

The same through port 5434 of the service, whose port has `upstream: pod-local` (same
activator): every session's upstream connection is made inside d, to d's own IP over
its loopback, so a message crosses the router once (client -> local stack) instead of
twice. Same target.

A third side, for reading the result (no target): port 5433 of the same service runs
the plain `stream` activator, which splices every connection once its backend is up, so
it measures the stream host's path (client -> router -> local stack -> router -> pod and
back) with no guest call per message. And the activator alone, in this process through
`ActivatorHost.process()`: microseconds per relayed query (one simple Query event and
its four-message answer, two calls), the guest's share of a transaction.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from fabric.tools.sandbox import Daemon
from tests.bench.common import Report, Settings, interleaved, median, progress
from tests.bench.topo import Topology
from tests.support import pgwire

NAME = "postgres"
VIP = "10.50.0.110"
DB_IP = "10.50.0.5"
CLIENTS = 20
TARGET = 0.60
WASM = Path(__file__).resolve().parents[2] / "activators" / "postgres" / "postgres.wasm"
_TPS = re.compile(r"tps = ([0-9.]+) \(without initial connection time\)")


class PgTopology(Topology):
    """Client pod a, database pod d, the service pg with the PostgreSQL activator."""

    def _build(self) -> None:
        if not pgwire.available():
            raise RuntimeError("PostgreSQL 15 is not installed (scripts/install-debs)")
        sb = self.sb
        worker, a, d = sb.netns("worker"), sb.netns("a"), sb.netns("d")
        cfg = {"worker": {"id": "bench"}, "namespaces": [{
            "name": "bench", "cidr": "10.50.0.0/24",
            "pods": [{"name": "a", "ip": "10.50.0.2", "netns": a},
                     {"name": "d", "ip": DB_IP, "netns": d}],
            "services": [{"name": "pg", "ip": VIP, "backends": ["d"],
                          "ports": [{"port": 5432, "target_port": 5432,
                                     "activator": str(WASM)},
                                    {"port": 5434, "target_port": 5432,
                                     "activator": str(WASM), "upstream": "pod-local"},
                                    {"port": 5433, "target_port": 5432,
                                     "activator": "stream"}]}],
        }]}
        self.daemon = Daemon(sb, worker, cfg).start()
        self.daemon.wait_attached(2)
        self.client_ns = a
        self.pgroot = Path(tempfile.mkdtemp(prefix="fbb-pg-"))
        self.pg = pgwire.PgServer(self.pgroot, listen="*", netns=d, max_connections=50).start()

    def __exit__(self, *exc: object) -> None:
        try:
            if getattr(self, "pg", None) is not None:
                self.pg.stop()
            if getattr(self, "pgroot", None) is not None:
                shutil.rmtree(self.pgroot, ignore_errors=True)
        finally:
            super().__exit__(*exc)

    def pgbench(self, host: str, *args: str, timeout: float, port: int = 5432) -> str:
        return self.run(self.client_ns, "pgbench", "-h", host, "-p", str(port), "-U",
                        "postgres", *args, "postgres", timeout=timeout)


def guest_cost(seconds: float) -> float:
    """µs per relayed query of the PostgreSQL activator alone (20 sessions, in turn)."""
    import time

    from fabric.activator import abi as A
    from fabric.activator.host import ActivatorHost
    from tests.support import pgwire as W

    greeting = W.msg(b"R", b"\0\0\0\0") + W.msg(b"Z", b"I")
    q = W.query("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;")
    answer = (W.msg(b"T", b"\0\1abalance\0" + bytes(18)) + W.msg(b"D", b"\0\1\0\0\0\x041234")
              + W.msg(b"C", b"SELECT 1\0") + W.msg(b"Z", b"I"))
    with ActivatorHost(WASM, {}) as host:
        inst = host.instance(5432)
        for sid in range(1, CLIENTS + 1):
            for ev in (A.StreamOpen(sid, 5432), A.StreamData(sid, W.startup()),
                       A.UpstreamConnectResult(sid, 1), A.UpstreamData(sid, greeting)):
                inst.process([ev], CLIENTS)
        n = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        while True:
            for _ in range(100):
                sid = n % CLIENTS + 1
                a = inst.process([A.StreamData(sid, q)], CLIENTS)
                b = inst.process([A.UpstreamData(sid, answer)], CLIENTS)
                n += 1
            if not a or not b:
                raise RuntimeError(f"the activator failed: {host.stats}")
            t = time.perf_counter()
            if t >= end:
                break
    return (t - t0) / n * 1e6


def run(s: Settings) -> Report:
    r = Report(NAME, f"pgbench -n -S -c {CLIENTS} -j 2 -T {s.seconds} x {s.runs} runs through "
                     "the PostgreSQL activator (VIP) vs the same server directly (pod IP), "
                     "interleaved")
    with PgTopology() as topo:
        topo.pgbench(VIP, "-i", "-q", "-s", "1", timeout=180)

        def bench(host: str, side: str, i: int, port: int = 5432) -> float:
            out = topo.pgbench(host, "-n", "-S", "-c", str(CLIENTS), "-j", "2", "-T",
                               str(s.seconds), timeout=s.seconds + 120, port=port)
            m = _TPS.search(out)
            if not m:
                raise RuntimeError(f"no tps in pgbench output: {out[-500:]}")
            failed = re.search(r"number of failed transactions: (\d+)", out)
            if failed and failed.group(1) != "0":
                raise RuntimeError(f"pgbench through {side}: {failed.group(0)}")
            tps = float(m.group(1))
            progress(NAME, f"run {i + 1}/{s.runs} {side}: {tps:,.0f} tps")
            return tps

        stream_errors: list[str] = []

        def reference(i: int) -> float | None:
            """The spliced reference is information only: its failure is noted, not fatal."""
            try:
                return bench(VIP, "stream", i, 5433)
            except RuntimeError as e:
                stream_errors.append(str(e).splitlines()[0][-300:])
                progress(NAME, f"run {i + 1}/{s.runs} stream: failed ({stream_errors[-1]})")
                return None

        got: dict[str, list[float | None]] = interleaved(s.runs, {
            "vip": lambda i: bench(VIP, "vip", i),
            "pod-local": lambda i: bench(VIP, "pod-local", i, 5434),
            "direct": lambda i: bench(DB_IP, "direct", i),
            "stream": reference})
        topo.check_daemon()
        assert topo.daemon is not None
        svc = [x for x in topo.daemon.get("/v1/services") if x["name"] == "pg"][0]
        st = svc["streams"]["5432"]
        local = svc["streams"]["5434"]
    r.add("through the activator", "tps", got["vip"])
    r.add("through the activator, upstream: pod-local", "tps", got["pod-local"])
    r.add("direct", "tps", got["direct"])
    r.add("stream host, spliced (info)", "tps", got["stream"])
    costs = [guest_cost(max(0.5, s.seconds / 5)) for _ in range(s.runs)]
    r.add("activator alone per query (info)", "µs", costs)
    v, d = median(got["vip"]), median(got["direct"])
    ratio = v / d * 100 if v is not None and d else None
    r.check("activator / direct (medians)", ratio, "%", f">= {TARGET * 100:.0f} %",
            ratio is not None and ratio >= TARGET * 100)
    lv = median(got["pod-local"])
    lratio = lv / d * 100 if lv is not None and d else None
    r.check("activator, upstream: pod-local / direct (medians)", lratio, "%",
            f">= {TARGET * 100:.0f} %", lratio is not None and lratio >= TARGET * 100)
    st_ratio = median(got["stream"])
    r.check("spliced stream host / direct (info)",
            st_ratio / d * 100 if st_ratio is not None and d else None, "%", "", None)
    r.check("activator alone per query (median)", median(costs), "µs", "", None)
    for e in stream_errors:
        r.notes.append(f"spliced reference run failed: {e}")
    fails = st["counters"].get("guest_failures", 0) + local["counters"].get("guest_failures", 0)
    r.check("guest failures", float(fails), "", "== 0", fails == 0)
    lc = local["counters"]
    r.notes.append(f"pod-local port: {lc.get('pod_local_connects', 0)} upstreams made in the "
                   f"pod, {sum(v for k, v in lc.items() if k.startswith('pod_local_fallback'))}"
                   " fell back to the VIP")
    return r
