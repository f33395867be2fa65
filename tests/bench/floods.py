"""`floods`: pod-to-pod ping and iperf3 on one worker, unloaded and under each flood the
hardening asks about, as ratios to the unloaded figures. Target: every ratio >= 80 %.

fabric:  the worker namespace runs fabricd with namespace `bench` (10.50.0.0/24): pods a
         (10.50.0.2) and b (10.50.0.3), measured; pod c (10.50.0.4), a flooder; and a
         tunnel listener on 0.0.0.0:51820 (one configured peer, never reachable).
underlay: namespace `evil` joined to the worker by a veth (192.0.2.2 -> 192.0.2.1): the
         tunnel floods come from there.

Floods (tests.support.hostile flood: prebuilt datagrams sent with sendmmsg in batches of
a millisecond's worth, paced; the rate achieved is measured and printed, with the rate
the daemon counted):
  empty      0-byte UDP datagrams to the tunnel port, 20k/s
  dns-chain  the review's H1 query (1472 bytes, records whose names are chains of
             compression pointers) from pod c to the gateway's DNS, 2k/s
  hs-garbage 148-byte type-1 handshake messages of random bytes (mac1 wrong), 20k/s
  hs-mac1    type-1 initiations with a valid mac1 (made with the worker's public key,
             as anyone who has the config can) and random Noise bytes, 20k/s: past the
             load threshold each gets a cookie reply; hs-mac1-2k the same at 2k/s

Each round measures, for each condition in turn (the order turns around every round):
ping a -> b (`ping -c 200 -i 0.002`, the median of the per-packet times) and iperf3 TCP
a -> b for `--seconds`. The flooder runs from just before the ping to just after the
iperf3; then what it left in the socket buffers is let drain before the next condition.
Ratios are of the medians over the rounds: throughput loaded/unloaded, ping
unloaded/loaded (so that both read "fraction kept"). The flooder's own CPU is reported:
on a two-CPU machine it competes with iperf3 and the daemon for the same cores.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from typing import Any

from fabric.tools.sandbox import Daemon
from tests.bench.common import Report, Settings, fmt, interleaved, median, progress
from tests.bench.ping import parse_rtts
from tests.bench.topo import FABRIC, Side, Topology
from tests.support.campaign import ROOT

NAME = "floods"
TARGET = 0.80
COUNT = 200
INTERVAL = "0.002"
TUNNEL_PORT = 51820
UNLOADED = "unloaded"
# condition: (flood kind, rate per second, where it comes from, target)
FLOODS: dict[str, tuple[str, int, str, str]] = {
    "empty": ("empty", 20000, "evil", f"192.0.2.1:{TUNNEL_PORT}"),
    "dns-chain": ("dns-chain", 2000, "c", "10.50.0.1:53"),
    "hs-garbage": ("garbage-init", 20000, "evil", f"192.0.2.1:{TUNNEL_PORT}"),
    "hs-mac1": ("mac1-init", 20000, "evil", f"192.0.2.1:{TUNNEL_PORT}"),
    "hs-mac1-2k": ("mac1-init", 2000, "evil", f"192.0.2.1:{TUNNEL_PORT}"),
}
CONDITIONS = (UNLOADED, *FLOODS)


def _keypair() -> tuple[str, str]:
    from tunnels.keys import generate_keypair, public_key

    priv = generate_keypair()[0]
    return base64.b64encode(priv).decode(), base64.b64encode(public_key(priv)).decode()


class FloodTopology(Topology):
    """Pods a, b (measured) and c (flooder) on one worker with a tunnel listener, and an
    underlay namespace in front of the listener."""

    def _build(self) -> None:
        sb = self.sb
        worker, a, b, c = sb.netns("worker"), sb.netns("a"), sb.netns("b"), sb.netns("c")
        evil = sb.netns("evil")
        sb.link(worker, "under0", "192.0.2.1/24", evil, "eth0", "192.0.2.2/24")
        priv, self.public_key = _keypair()
        cfg = {"worker": {"id": "bench", "tunnel": {
            "listen": f"0.0.0.0:{TUNNEL_PORT}", "private_key": priv,
            "peers": [{"id": "far", "public_key": _keypair()[1]}]}},
            "namespaces": [{
                "name": "bench", "cidr": "10.50.0.0/24", "mtu": 1500,
                "dns": {"upstream": []},
                "pods": [{"name": "a", "ip": "10.50.0.2", "netns": a},
                         {"name": "b", "ip": "10.50.0.3", "netns": b},
                         {"name": "c", "ip": "10.50.0.4", "netns": c}]}]}
        self.daemon = Daemon(sb, worker, cfg).start()
        self.daemon.wait_attached(3)
        self.where = {"evil": evil, "c": c}
        self.sides = {FABRIC: Side(FABRIC, a, b, "10.50.0.3")}
        self.run(a, "ping", "-c", "3", "-i", "0.05", "-W", "2", "10.50.0.3")
        self.run(c, "ping", "-c", "1", "-W", "2", "10.50.0.1")

    def counted(self) -> dict[str, float]:
        """What the daemon counted of the floods so far: tunnel datagrams read or dropped
        by the kernel filter, DNS queries."""
        from tests.support.procstat import scrape

        assert self.daemon is not None
        m = scrape(self.daemon.control)
        return {"tunnel": m.get("fabric_tunnel_events_total", event="datagrams_in")
                + (m.get("fabric_tunnel_drops_total", reason="kernel_drops") or 0),
                "dns": m.get("fabric_dns_total", namespace="bench", counter="queries")}

    def settle(self, timeout: float = 30.0) -> float:
        """Wait until what a flood left in the socket buffers is read (the counters stop
        moving), so it does not weigh on the next measurement; the seconds it took."""
        t0 = time.monotonic()
        last = self.counted()
        while time.monotonic() - t0 < timeout:
            time.sleep(0.3)
            now = self.counted()
            if now == last:
                break
            last = now
        return time.monotonic() - t0

    def flood(self, name: str, seconds: float) -> subprocess.Popen[str]:
        kind, rate, where, target = FLOODS[name]
        args = ["--target", target, "--kind", kind, "--rate", str(rate), "--seconds",
                str(seconds)]
        if kind == "mac1-init":
            args += ["--pubkey", self.public_key]
        p = self.sb.popen(self.where[where], sys.executable, "-m", "tests.support.hostile",
                          "flood", *args, text=True, cwd=ROOT)
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line.startswith("{"):
            raise RuntimeError(f"flood {name} did not start: {p.stderr.read() if p.stderr else ''}")
        return p


def _stop_flood(topo: FloodTopology, p: subprocess.Popen[str]) -> dict[str, Any]:
    topo.sb.stop(p, timeout=10)
    out = (p.stdout.read() if p.stdout else "") or ""
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"the flooder said nothing: {p.stderr.read() if p.stderr else ''}")
    return json.loads(lines[-1])


def run(s: Settings) -> Report:
    r = Report(NAME, f"pod a -> b on one worker, unloaded and under floods, {s.runs} rounds: "
                     f"ping -c {COUNT} -i {INTERVAL} and iperf3 TCP {s.seconds} s each")
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in CONDITIONS}
    with FloodTopology() as topo:
        side = topo.sides[FABRIC]

        def measure(cond: str, i: int) -> dict[str, Any]:
            topo.check_daemon()
            flood = None
            before = topo.counted()
            t0 = time.monotonic()
            if cond != UNLOADED:
                flood = topo.flood(cond, seconds=s.seconds + 30)
                time.sleep(0.5)  # at its rate before anything is measured
            try:
                out = topo.run(side.client, "ping", "-n", "-c", str(COUNT), "-i", INTERVAL,
                               "-W", "1", side.server_ip, timeout=COUNT * 0.05 + 30)
                rtts = parse_rtts(out)
                res = topo.iperf3(side, seconds=s.seconds)
            finally:
                fl = _stop_flood(topo, flood) if flood is not None else {}
            took = time.monotonic() - t0
            after = topo.counted()
            drained = topo.settle() if flood is not None else 0.0
            got = {"ping_us": median(rtts), "ping_lost": COUNT - len(rtts),
                   "gbps": res["end"]["sum_received"]["bits_per_second"] / 1e9,
                   "offered_rate": fl.get("rate"), "flooder_cpu": fl.get("cpu_seconds"),
                   "flood_seconds": fl.get("seconds"), "drained_seconds": drained,
                   "counted_rate": None}
            if flood is not None:
                what = "dns" if FLOODS[cond][0] == "dns-chain" else "tunnel"
                got["counted_rate"] = (after[what] - before[what]) / took
            results[cond].append(got)
            extra = (f"; flood {fmt(got['offered_rate'])}/s offered, "
                     f"{fmt(got['counted_rate'])}/s counted, flooder CPU "
                     f"{fmt(got['flooder_cpu'])} s") if flood is not None else ""
            progress(NAME, f"round {i + 1}/{s.runs} {cond}: ping {fmt(got['ping_us'])} µs, "
                           f"iperf3 {got['gbps']:.2f} Gbit/s{extra}")
            return got

        interleaved(s.runs, {c: (lambda i, c=c: measure(c, i)) for c in CONDITIONS})
        topo.check_daemon()
        drops = topo.fabric_drops()

    def col(cond: str, key: str) -> list[float | None]:
        return [m[key] for m in results[cond]]

    for cond in CONDITIONS:
        r.add(f"{cond} ping median", "µs", col(cond, "ping_us"))
        r.add(f"{cond} iperf3", "Gbit/s", col(cond, "gbps"))
    for cond in FLOODS:
        r.add(f"{cond} offered", "/s", col(cond, "offered_rate"))
        r.add(f"{cond} counted by fabricd", "/s", col(cond, "counted_rate"))
    base_ping = median(col(UNLOADED, "ping_us"))
    base_tput = median(col(UNLOADED, "gbps"))
    rows = []
    for cond in FLOODS:
        kind, rate, where, target = FLOODS[cond]
        p = median(col(cond, "ping_us"))
        t = median(col(cond, "gbps"))
        ping_ratio = base_ping / p * 100 if p and base_ping else None
        tput_ratio = t / base_tput * 100 if t is not None and base_tput else None
        r.check(f"{cond} ({fmt(rate)}/s): iperf3 loaded / unloaded", tput_ratio, "%",
                f">= {TARGET * 100:.0f} %", tput_ratio is not None and tput_ratio >= TARGET * 100)
        r.check(f"{cond} ({fmt(rate)}/s): ping unloaded / loaded", ping_ratio, "%",
                f">= {TARGET * 100:.0f} %", ping_ratio is not None and ping_ratio >= TARGET * 100)
        rows.append([cond, f"{kind} from {where} to {target}", fmt(rate),
                     fmt(median(col(cond, "offered_rate"))),
                     fmt(median(col(cond, "counted_rate"))),
                     fmt(median(col(cond, "flooder_cpu")))])
    r.tables.append(("floods: asked, offered by the flooder, counted by fabricd (medians); "
                     "flooder CPU-seconds per round",
                     ["flood", "what", "asked/s", "offered/s", "counted/s", "flooder CPU s"],
                     rows))
    r.notes.append(f"unloaded: ping median {fmt(base_ping)} µs, iperf3 {fmt(base_tput)} "
                   "Gbit/s; the flooder shares the machine's CPUs with iperf3 and fabricd")
    shown = {k: v for k, v in drops.items() if k != "ipv6"}
    if shown:
        r.notes.append("fabricd drops: " + ", ".join(f"{k}={v:.0f}" for k, v in shown.items()))
    r.extra = {"results": results, "floods": {k: list(v) for k, v in FLOODS.items()},
               "fabric_drops": drops}
    return r
