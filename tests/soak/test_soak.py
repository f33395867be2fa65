"""`make soak`: ten minutes (FABRICD_SOAK_SECONDS) of mixed traffic on two workers joined
by the tunnel, with both daemons' RSS and open fds sampled every 10 s.

    worker 1: pods a, c, web-1 of namespace shop; b lives on worker 2
      iperf3 a -> c (same worker, 300 Mbit/s) and a -> b (through the tunnel, 50 Mbit/s)
      in 20 s rounds; a ping a -> b all along; DNS probes from c for a local name and a
      forwarded one (a small resolver in worker 1's namespace); a curl from c to the
      service `web` every 8 s, whose backend web-1 is started by its on_activate hook and
      stopped by its on_idle hook after 3 s idle, so it sleeps and wakes all along; a
      capture of pod a for the whole run (to /dev/null) and a 200-frame capture of c every
      30 s.

Bounds, checked at the end: each daemon's RSS at most 64 MiB above its peak of the first
minute, its fds at most 32 above theirs; no traceback; every kind of traffic kept going.
The samples are printed as a table (run with -s, as `make soak` does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

from fabric.tools.sandbox import Daemon, Sandbox
from tests.e2e.test_tunnel import W2, Cluster
from tests.support.campaign import finish, first_line, ping_result, tool
from tests.support.procstat import Sample, sample, tracebacks

SECONDS = float(os.environ.get("FABRICD_SOAK_SECONDS", "600"))
EVERY = 10.0
RSS_BOUND_MIB = 64
FD_BOUND = 32
VIP = "10.40.0.100"


class Loops:
    """Traffic loops in threads until the deadline; what each achieved."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.stats: dict[str, dict[str, Any]] = {}
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def add(self, name: str, body: Any) -> None:
        self.stats[name] = {"ok": 0, "failed": 0, "values": [], "errors": []}

        def run() -> None:
            while time.monotonic() < self.deadline:
                try:
                    value = body()
                    with self.lock:
                        self.stats[name]["ok"] += 1
                        if value is not None:
                            self.stats[name]["values"].append(value)
                except Exception as e:  # a failed round is counted, the loop goes on
                    with self.lock:
                        self.stats[name]["failed"] += 1
                        if len(self.stats[name]["errors"]) < 5:
                            self.stats[name]["errors"].append(str(e)[-300:])
                    time.sleep(1)

        t = threading.Thread(target=run, name=name, daemon=True)
        self.threads.append(t)
        t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join(120)


def build(sb: Sandbox) -> tuple[Cluster, str, str]:
    cl = Cluster(sb)
    c, web = sb.netns("c"), sb.netns("web")
    resolver = tool(sb, cl.w1, "resolver", "--listen", "127.0.0.1:5300")
    assert first_line(resolver)["ready"]
    web_ns = sb.name("web")
    start = (f"sh -c '(exec ip netns exec {web_ns} {sys.executable} -m "
             f"fabric.tools.sandbox http 8080) >/dev/null 2>&1 &'")
    cfg = Cluster.config("w1", cl.k1[0], "w2", cl.k2[1], f"{W2}:51820",
                         local=("a", "10.40.0.2", cl.a), remote=("b", "10.40.0.3"))
    ns = cfg["namespaces"][0]
    ns["mtu"] = 1420
    ns["dns"] = {"upstream": ["127.0.0.1:5300"]}
    ns["pods"] += [{"name": "c", "ip": "10.40.0.4", "netns": c},
                   {"name": "web-1", "ip": "10.40.0.5", "netns": web}]
    ns["services"] = [{"name": "web", "ip": VIP, "backends": ["web-1"],
                       "ports": [{"port": 80, "target_port": 8080}], "idle_timeout": "3s",
                       "on_activate": start,
                       "on_idle": f"sh -c 'ip netns pids {web_ns} | xargs -r kill'"}]
    cl.d1.write_config(cfg)
    cl.start()
    cl.d1.wait_attached(3)
    return cl, c, web


def test_soak_mixed_traffic(sandbox: Sandbox) -> None:
    sb = sandbox
    cl, c, _ = build(sb)
    daemons: dict[str, Daemon] = {"w1": cl.d1, "w2": cl.d2}
    pids = {k: d.proc.pid for k, d in daemons.items() if d.proc is not None}
    sb.http_server(cl.b, 8081)
    t0 = time.monotonic()
    deadline = t0 + SECONDS
    print(f"\n[soak] {SECONDS:.0f} s of mixed traffic, samples every {EVERY:.0f} s")

    capture = sb.popen(None, *cl.d1.cli_argv("capture", "shop/a", "-w", "/dev/null"),
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tunnel_ping = sb.popen(cl.a, "ping", "-n", "-i", "0.2", "-W", "2", "-w",
                           str(int(SECONDS)), "10.40.0.3", text=True)
    loops = Loops(deadline)

    def iperf(server_ns: str, ip: str, port: int, rate: str) -> Any:
        def body() -> float:
            rest = int(deadline - time.monotonic())
            if rest < 3:
                time.sleep(max(0.0, deadline - time.monotonic()))
                return None  # type: ignore[return-value]
            sb.popen(server_ns, "iperf3", "-s", "-1", "-p", str(port),
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            sb.wait_port(server_ns, port)
            p = sb.run(cl.a, "iperf3", "-c", ip, "-p", str(port), "-t", str(min(20, rest)),
                       "-b", rate, "-J", "--connect-timeout", "3000", check=False,
                       timeout=60)
            res = json.loads(p.stdout or "{}")
            if "end" not in res:
                raise RuntimeError(res.get("error", p.stderr))
            return res["end"]["sum_received"]["bits_per_second"] / 1e6
        return body

    def probe(name: str) -> Any:
        def body() -> dict[str, Any]:
            rest = min(20.0, deadline - time.monotonic())
            if rest < 2:
                time.sleep(max(0.0, rest))
                return None  # type: ignore[return-value]
            p = tool(sb, c, "dnsprobe", "--server", "10.40.0.1", "--name", name,
                     "--seconds", str(rest), "--interval", "0.05")
            first_line(p)
            res = finish(p, timeout=rest + 30)
            if res["lost"] > max(2, res["queries"] // 100):
                raise RuntimeError(f"lost {res['lost']} of {res['queries']}")
            return res
        return body

    def wake() -> float:
        t = time.monotonic()
        r = sb.run(c, "curl", "-sS", "--max-time", "20", f"http://{VIP}/", check=False,
                   timeout=30)
        if r.returncode or "hello from" not in r.stdout:
            raise RuntimeError(f"curl {r.returncode}: {r.stderr.strip()}")
        took = time.monotonic() - t
        time.sleep(max(0.0, 8.0 - took))  # 3 s idle: it sleeps between two requests
        return took

    def tunnel_fetch() -> float:
        t = time.monotonic()
        r = sb.run(cl.a, "sh", "-c", "curl -sS --max-time 20 http://10.40.0.3:8081/bytes/"
                   "2000000 | wc -c", check=False, timeout=30)
        if r.stdout.strip() != "2000000":
            raise RuntimeError(f"got {r.stdout.strip()!r}: {r.stderr.strip()}")
        took = time.monotonic() - t
        time.sleep(max(0.0, 5.0 - took))
        return took

    def short_capture() -> int:
        path = os.path.join(sb.tmp, "c.pcap")
        p = subprocess.run(cl.d1.cli_argv("capture", "shop/c", "-c", "200", "-w", path),
                           capture_output=True, text=True, timeout=60)
        if p.returncode:
            raise RuntimeError(p.stderr)
        time.sleep(30)
        return os.path.getsize(path) / 1e6  # MB of pcap

    loops.add("iperf3 a->c", iperf(c, "10.40.0.4", 5201, "300M"))
    loops.add("iperf3 a->b tunnel", iperf(cl.b, "10.40.0.3", 5202, "50M"))
    loops.add("dns local", probe("a.shop.fabric.internal"))
    loops.add("dns forwarded", probe("example.com"))
    loops.add("service wakes", wake)
    loops.add("tunnel fetch 2 MB", tunnel_fetch)
    loops.add("capture c -c 200 (MB)", short_capture)

    samples: dict[str, list[Sample]] = {k: [] for k in pids}
    while True:
        for k, pid in pids.items():
            samples[k].append(sample(pid, t0))
        if time.monotonic() >= deadline:
            break
        time.sleep(min(EVERY, max(0.0, deadline - time.monotonic())))
    loops.join()
    ping_out = tunnel_ping.communicate(timeout=30)[0]
    capture_alive = capture.poll() is None
    sb.stop(capture)
    for k, pid in pids.items():
        samples[k].append(sample(pid, t0))

    print("\n[soak] samples (RSS MiB / fds):")
    print("     t s" + "".join(f"   {k} RSS  {k} fds" for k in pids))
    for i in range(len(samples["w1"])):
        row = f"  {samples['w1'][i].t:6.0f}"
        for k in pids:
            s = samples[k][i]
            row += f"  {s.rss_kib / 1024:8.1f}  {s.fds:6d}"
        print(row)
    sent, got, rtt = ping_result(ping_out)
    print(f"[soak] ping a -> b through the tunnel: {got}/{sent}, median {rtt} ms")
    for name, st in loops.stats.items():
        vals = [v for v in st["values"] if isinstance(v, (int, float))]
        extra = f", median {sorted(vals)[len(vals) // 2]:.2f}" if vals else ""
        dns = [v for v in st["values"] if isinstance(v, dict)]
        if dns:
            extra = (f", {sum(v['queries'] for v in dns)} queries, "
                     f"{sum(v['lost'] for v in dns)} lost, worst p99 "
                     f"{max(v['p99_ms'] or 0 for v in dns):.1f} ms")
        print(f"[soak] {name}: {st['ok']} ok, {st['failed']} failed{extra} {st['errors'][:2]}")

    verdict = []
    for k in daemons:
        first = [s for s in samples[k] if s.t <= 60] or samples[k][:1]
        rss0 = max(s.rss_kib for s in first)
        fd0 = max(s.fds for s in first)
        end = samples[k][-1]
        verdict.append((k, rss0, end.rss_kib, fd0, end.fds))
        print(f"[soak] {k}: RSS first minute peak {rss0 / 1024:.1f} MiB, end "
              f"{end.rss_kib / 1024:.1f} MiB (bound +{RSS_BOUND_MIB}); fds first minute "
              f"peak {fd0}, end {end.fds} (bound +{FD_BOUND})")
    for k, d in daemons.items():
        assert d.proc is not None and d.proc.poll() is None, f"{k} exited: {d.log()[-2000:]}"
        assert not tracebacks(d.log()), (k, tracebacks(d.log())[:3])
    for k, rss0, rss1, fd0, fd1 in verdict:
        assert rss1 <= rss0 + RSS_BOUND_MIB * 1024, (k, rss0, rss1)
        assert fd1 <= fd0 + FD_BOUND, (k, fd0, fd1)
    assert capture_alive, capture.stderr.read() if capture.stderr else ""
    assert sent > 0 and got >= 0.98 * sent, (sent, got)
    for name, st in loops.stats.items():
        assert st["ok"] >= 1, (name, st)
        assert st["failed"] <= max(1, st["ok"] // 20), (name, st)
