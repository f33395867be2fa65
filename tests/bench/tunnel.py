"""`tunnel`: iperf3 TCP between two workers through the fabric's Noise tunnel, against
wireguard-go and nebula between the same kind of namespaces; plus in-process numbers of
the tunnel core (handshakes a responder answers per second, CPU per data packet).

Each of the three paths has its own four namespaces, all shaped alike:

    client pod --veth--> worker 1 ==(UDP over a veth underlay, 192.0.2.0/24)==> worker 2
                                                                 --veth--> server pod

fabric:       pods `a` (10.40.0.2) and `b` (10.40.0.3) of namespace `shop` (id 7), one on
              each worker; each worker runs fabricd (`worker.tunnel`, keys from
              tunnels.keys). Path: pod -> fabricd w1 (router, Noise encrypt, UDP) ->
              fabricd w2 (decrypt, router) -> pod; pod MTU as the fabric sets it.
wireguard-go: each worker runs `wireguard-go` (a TUN, MTU 1420, its default), configured
              with `wg`; the pods (10.62.1.2 behind w1, 10.62.2.2 behind w2) sit on plain
              veths and the workers forward (ip_forward=1) between them and the TUN
              (allowed-ips: the peer's tunnel address and pod subnet).
nebula:       each worker runs `nebula` (a TUN at nebula's default MTU, static_host_map to
              the peer's underlay address, no lighthouse, firewall open); the workers'
              certificates carry the pod subnets (`-subnets`) and each routes the other's
              pod subnet through the TUN (`unsafe_routes`). Pods and forwarding as above.

So every path has the same pod hop at both ends (the fabric's in fabricd, the others' as
kernel forwarding), and each pod link has its tunnel's MTU, so TCP segments fit it.
Rounds are interleaved (the order turns around each round). During each run the CPU
time of both tunnel processes is read from /proc: CPU-seconds per GB transferred for all
three, per thread for fabricd. Target: the fabric's median throughput at least that of
wireguard-go. Nothing here touches the machine's own network namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

from fabric.control.client import ControlClient
from fabric.tools.sandbox import Daemon
from tests.bench.common import Report, Settings, fmt, interleaved, median, progress
from tests.bench.cpu import _TICK, ThreadCpu, thread_ticks
from tests.bench.topo import Side, Topology

NAME = "tunnel"
FABRIC, WG, NEBULA = "fabric", "wireguard-go", "nebula"
SIDES = (FABRIC, WG, NEBULA)
TARGET = 1.00
W1, W2 = "192.0.2.1", "192.0.2.2"
WG_PORT, NEBULA_PORT, FABRIC_PORT = 51821, 4242, 51820
WG_SOCK_DIR = "/var/run/wireguard"
# The pods behind the wireguard-go and nebula workers (each path has its own namespaces).
OVERLAY = {"1": "10.61.0.1", "2": "10.61.0.2"}
POD_NET = {"1": "10.62.1", "2": "10.62.2"}


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs so far, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user
    return total - idle, total


def process_cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) all threads of a process used so far."""
    if not pid:
        return 0.0
    return sum(u + s for _, u, s in thread_ticks(pid).values()) / _TICK


class TunnelTopology(Topology):
    """Three pairs of workers with a pod behind each: fabric, wireguard-go, nebula."""

    def __init__(self) -> None:
        super().__init__()
        self.daemons: list[Daemon] = []
        self.procs: dict[str, list[subprocess.Popen[Any]]] = {}
        self.mtu: dict[str, int] = {}
        self.wg_sockets: list[str] = []
        self.workers: dict[str, tuple[str, str]] = {}

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:  # wireguard-go's control sockets live outside the namespaces
            for path in self.wg_sockets:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def _build(self) -> None:
        for tool in ("iperf3", "wireguard-go", "wg", "nebula", "nebula-cert"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"`{tool}` is not installed (scripts/install-debs)")
        self._build_fabric()
        self._build_wireguard()
        self._build_nebula()
        for side in self.sides.values():  # handshakes, neighbours; proves each path works
            self.run(side.client, "ping", "-c", "3", "-i", "0.2", "-W", "3", side.server_ip)

    def _underlay(self, tag: str) -> tuple[str, str]:
        sb = self.sb
        w1, w2 = sb.netns(f"{tag}1"), sb.netns(f"{tag}2")
        sb.veth(w1, "under0", w2, "under0")
        for ns, addr in ((w1, W1), (w2, W2)):
            sb.run(ns, "ip", "addr", "add", f"{addr}/24", "dev", "under0")
            sb.run(ns, "ip", "link", "set", "under0", "up")
        return w1, w2

    def _link_mtu(self, ns: str, dev: str) -> int:
        return int(json.loads(self.run(ns, "ip", "-j", "link", "show", "dev", dev))[0]["mtu"])

    # -- fabric ------------------------------------------------------------------------

    def _build_fabric(self) -> None:
        import base64

        from tunnels.keys import generate_keypair, public_key

        sb = self.sb
        w1, w2 = self._underlay("w")
        a, b = sb.netns("a"), sb.netns("b")
        keys = []
        for _ in range(2):
            priv = generate_keypair()[0]
            keys.append((base64.b64encode(priv).decode(),
                         base64.b64encode(public_key(priv)).decode()))

        def config(me: int, local: tuple[str, str, str],
                   remote: tuple[str, str]) -> dict[str, Any]:
            peer = 1 - me
            return {
                "worker": {"id": f"w{me + 1}", "tunnel": {
                    "listen": f"0.0.0.0:{FABRIC_PORT}", "private_key": keys[me][0],
                    "keepalive": "2s",
                    "peers": [{"id": f"w{peer + 1}", "public_key": keys[peer][1],
                               "endpoint": f"{(W1, W2)[peer]}:{FABRIC_PORT}"}]}},
                "namespaces": [{"name": "shop", "id": 7, "cidr": "10.40.0.0/24", "pods": [
                    {"name": local[0], "ip": local[1], "netns": local[2]},
                    {"name": remote[0], "ip": remote[1], "worker": f"w{peer + 1}"}]}],
            }

        d1 = Daemon(sb, w1, config(0, ("a", "10.40.0.2", a), ("b", "10.40.0.3")), name="w1")
        d2 = Daemon(sb, w2, config(1, ("b", "10.40.0.3", b), ("a", "10.40.0.2")), name="w2")
        self.daemons = [d1, d2]
        self.daemon = d1
        for d in self.daemons:
            d.start()
        for d in self.daemons:
            d.wait_attached(1)
        self.workers[FABRIC] = (w1, w2)
        self.mtu[FABRIC] = self._link_mtu(a, "eth0")
        self.sides[FABRIC] = Side(FABRIC, a, b, "10.40.0.3")

    def daemon_state(self) -> str:
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is not None:
                return (f"\nfabricd {os.path.basename(d.dir)} exited with "
                        f"{d.proc.returncode}; log tail:\n{d.log()[-2000:]}")
        for name, procs in self.procs.items():
            for p in procs:
                if p.poll() is not None:
                    return f"\n{name} exited with {p.returncode}"
        return ""

    def fabric_drops(self) -> dict[str, float]:
        """Both fabricds' drop counters summed by reason."""
        drops: dict[str, float] = {}
        for d in self.daemons:
            text = ControlClient(d.control).get_text("/metrics")
            for line in text.splitlines():
                if line.startswith("fabric_drops_total{"):
                    labels, value = line.rsplit(" ", 1)
                    reason = labels.split('reason="', 1)[1].split('"', 1)[0]
                    drops[reason] = drops.get(reason, 0) + float(value)
        return drops

    def udp_rcvbuf_errors(self, side: str) -> int:
        """Datagrams the workers' kernels dropped because a UDP socket's receive buffer
        was full (the tunnel process did not read fast enough), both workers summed."""
        return sum(self.udp_counters(ns)["RcvbufErrors"] for ns in self.workers[side])

    def pids(self, side: str) -> list[int]:
        if side == FABRIC:
            return [d.proc.pid for d in self.daemons if d.proc is not None]
        return [p.pid for p in self.procs[side]]  # `ip netns exec` execs the program

    # -- wireguard-go and nebula: pods behind forwarding workers ------------------------

    def _pods(self, tag: str, workers: tuple[str, str], dev: str, mtu: int) -> Side:
        """A pod behind each worker on a veth of the tunnel's MTU; the workers forward
        between the pods and the tunnel device `dev` (already up, with its address)."""
        sb = self.sb
        pods = []
        for i, w in zip("12", workers, strict=True):
            pod = sb.netns(f"{tag}p{i}")
            net = POD_NET[i]
            sb.veth(w, "pod0", pod, "eth0")
            for ns, d, addr in ((w, "pod0", f"{net}.1/24"), (pod, "eth0", f"{net}.2/24")):
                sb.run(ns, "ip", "addr", "add", addr, "dev", d)
                sb.run(ns, "ip", "link", "set", d, "mtu", str(mtu))
                sb.run(ns, "ip", "link", "set", d, "up")
            sb.run(pod, "ip", "route", "add", "default", "via", f"{net}.1")
            sb.run(w, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            pods.append(pod)
        return Side(tag, pods[0], pods[1], f"{POD_NET['2']}.2")

    def _build_wireguard(self) -> None:
        sb = self.sb
        workers = self._underlay("g")
        keys = []
        for i in "12":
            priv = sb.run(None, "wg", "genkey").stdout.strip()
            pub = sb.run(None, "wg", "pubkey", input=priv + "\n").stdout.strip()
            path = os.path.join(sb.tmp, f"wg{i}.key")
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(priv + "\n")
            keys.append((path, pub))
        # The UAPI socket is /var/run/wireguard/<dev>.sock outside any namespace: unique
        # names keep other runs' (and the machine's own) devices apart.
        devs = [f"wg{sb.run_id}{i}" for i in "12"]
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="error")
        procs = []
        for ns, dev in zip(workers, devs, strict=True):
            log = open(os.path.join(sb.tmp, f"{dev}.log"), "ab")
            procs.append(sb.popen(ns, "wireguard-go", dev, env=env, stdout=log,
                                  stderr=subprocess.STDOUT))
            log.close()
            self.wg_sockets.append(os.path.join(WG_SOCK_DIR, f"{dev}.sock"))
        self.procs[WG] = procs
        for sock, p in zip(self.wg_sockets, procs, strict=True):
            self._wait(lambda sock=sock: os.path.exists(sock), p, f"{sock} to appear")
        for k, (ns, dev) in enumerate(zip(workers, devs, strict=True)):
            me, peer = "12"[k], "21"[k]
            sb.run(ns, "wg", "set", dev, "private-key", keys[k][0], "listen-port", str(WG_PORT),
                   "peer", keys[1 - k][1], "endpoint", f"{(W1, W2)[1 - k]}:{WG_PORT}",
                   "allowed-ips", f"{OVERLAY[peer]}/32,{POD_NET[peer]}.0/24")
            sb.run(ns, "ip", "addr", "add", f"{OVERLAY[me]}/24", "dev", dev)
            sb.run(ns, "ip", "link", "set", dev, "up")
            sb.run(ns, "ip", "route", "add", f"{POD_NET[peer]}.0/24", "dev", dev)
        self.workers[WG] = workers
        self.mtu[WG] = self._link_mtu(workers[0], devs[0])
        self.sides[WG] = self._pods("g", workers, devs[0], self.mtu[WG])

    def _build_nebula(self) -> None:
        import yaml

        sb = self.sb
        workers = self._underlay("n")
        d = os.path.join(sb.tmp, "nebula")
        os.makedirs(d)
        ca_crt, ca_key = os.path.join(d, "ca.crt"), os.path.join(d, "ca.key")
        sb.run(None, "nebula-cert", "ca", "-name", "fbb bench", "-duration", "24h",
               "-out-crt", ca_crt, "-out-key", ca_key)
        dev = "nebula0"
        procs = []
        for k, ns in enumerate(workers):
            me, peer = "12"[k], "21"[k]
            crt, key = os.path.join(d, f"w{me}.crt"), os.path.join(d, f"w{me}.key")
            sb.run(None, "nebula-cert", "sign", "-ca-crt", ca_crt, "-ca-key", ca_key,
                   "-name", f"w{me}", "-ip", f"{OVERLAY[me]}/24",
                   "-subnets", f"{POD_NET[me]}.0/24", "-out-crt", crt, "-out-key", key)
            any_rule = [{"port": "any", "proto": "any", "host": "any"}]
            cfg = {
                "pki": {"ca": ca_crt, "cert": crt, "key": key},
                "static_host_map": {OVERLAY[peer]: [f"{(W1, W2)[1 - k]}:{NEBULA_PORT}"]},
                "lighthouse": {"am_lighthouse": False, "hosts": []},
                "listen": {"host": "0.0.0.0", "port": NEBULA_PORT},
                "punchy": {"punch": False},
                "tun": {"disabled": False, "dev": dev,
                        "unsafe_routes": [{"route": f"{POD_NET[peer]}.0/24",
                                           "via": OVERLAY[peer]}]},
                "logging": {"level": "warning"},
                "firewall": {"outbound": any_rule, "inbound": any_rule},
            }
            path = os.path.join(d, f"w{me}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(cfg, f)
            log = open(os.path.join(d, f"w{me}.log"), "ab")
            procs.append(sb.popen(ns, "nebula", "-config", path, stdout=log,
                                  stderr=subprocess.STDOUT))
            log.close()
        self.procs[NEBULA] = procs
        for ns, p in zip(workers, procs, strict=True):
            self._wait(lambda ns=ns: sb.run(ns, "ip", "link", "show", "dev", dev,
                                            check=False).returncode == 0,
                       p, f"{dev} in {ns}", log=os.path.join(d, f"w{ns[-1]}.log"))
        self.workers[NEBULA] = workers
        self.mtu[NEBULA] = self._link_mtu(workers[0], dev)
        self.sides[NEBULA] = self._pods("n", workers, dev, self.mtu[NEBULA])

    def _wait(self, ready: Callable[[], bool], proc: subprocess.Popen[Any], what: str,
              timeout: float = 10.0, log: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = ""
        if log:
            with open(log, errors="replace") as f:
                tail = f.read()[-1500:]
        raise RuntimeError(f"waited in vain for {what} (process exit code {proc.poll()})"
                           f"{': ' + tail if tail else ''}")


# -- in-process numbers of the tunnel core -----------------------------------------------

def responder_rate(seconds: float, initiators: int = 8, batch: int = 256,
                   load_threshold: float = 1e9) -> float:
    """Initiations per second one responder TunnelCore processes: `initiators` peers send
    it fresh initiations (made beforehand, outside the timing), and only the responder's
    `receive` of them is timed. With the default `load_threshold` (lifted) each one gets
    the full Noise work and a response; with 0 (always under load) each one without a
    cookie gets a cookie reply instead, which is what a worker does under a flood."""
    from tunnels.core import TunnelCore
    from tunnels.keys import generate_keypair

    r_priv, r_pub = generate_keypair()
    # the crypto's own rate: the handshake budget (a flood bound) is not what is measured
    responder = TunnelCore(r_priv, handshake_load_threshold=load_threshold,
                           handshake_budget=None, handshake_budget_peers=None)
    cores = []
    for i in range(initiators):
        priv, pub = generate_keypair()
        core = TunnelCore(priv)
        core.add_peer("r", r_pub, ("192.0.2.1", 51820))
        addr = (f"192.0.2.{10 + i}", 51820)
        responder.add_peer(f"i{i}", pub, addr)
        cores.append((core, addr))
    receive = responder.receive
    now = 1000.0
    n = 0
    busy = 0.0
    while busy < seconds:
        msgs = []
        for _ in range(max(1, batch // initiators)):
            now += 0.001
            for core, addr in cores:
                msgs.append((core.rekey("r", now)[0][1], addr))
        t0 = time.perf_counter()
        for msg, addr in msgs:
            receive(msg, addr, now)
        busy += time.perf_counter() - t0
        n += len(msgs)
    c = responder.counters
    answered = c["cookie_sent"] if load_threshold == 0 else c["response_sent"]
    if answered != n:
        raise RuntimeError(f"responder answered {answered} of {n} initiations: {c}")
    return n / busy


def core_numbers(seconds: float) -> dict[str, float]:
    """One measurement of each in-process number (tests.bench.tunnel_core does the data path)."""
    from tests.bench import tunnel_core as tb

    return {
        "initiations": responder_rate(seconds),
        "cookies": responder_rate(seconds, load_threshold=0),
        "data_us": 1e6 / tb.bench_data(seconds),
        "aead_us": 1e6 / tb.bench_raw_aead(seconds),
    }


# -- the benchmark -----------------------------------------------------------------------

def run(s: Settings) -> Report:
    r = Report(NAME, f"iperf3 TCP, 1 stream, {s.seconds} s x {s.runs} runs, pod -> pod "
                     "across two workers: fabric tunnel vs wireguard-go vs nebula "
                     "(interleaved); tunnel core in-process")
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    with TunnelTopology() as topo:
        drops_before = topo.fabric_drops()

        def measure(side: str, i: int) -> float:
            pids = topo.pids(side)
            python = side == FABRIC
            drops0 = topo.udp_rcvbuf_errors(side)
            cpu0 = [process_cpu_seconds(p) for p in pids]
            m0 = machine_cpu()
            with ThreadCpu(pids[0], python) as c1, ThreadCpu(pids[1], python) as c2:
                res = topo.iperf3(topo.sides[side], seconds=s.seconds)
                m1 = machine_cpu()
            cpu_s = sum(process_cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True))
            busy = (m1[0] - m0[0]) / max(m1[1] - m0[1], 1) * 100
            udp_drops = topo.udp_rcvbuf_errors(side) - drops0
            end = res["end"]
            gbytes = end["sum_received"]["bytes"] / 1e9
            threads = [(f"w{k} {n}", p, sy) for k, c in ((1, c1), (2, c2))
                       for n, p, sy in c.busiest()] if python else []
            m = {"gbps": end["sum_received"]["bits_per_second"] / 1e9,
                 "retransmits": int(end["sum_sent"].get("retransmits", 0)),
                 "cpu_seconds": cpu_s, "gbytes": gbytes,
                 "cpu_s_per_gb": cpu_s / gbytes if gbytes else None,
                 "cpu_percent": [c1.total, c2.total], "threads": threads,
                 "machine_busy_percent": busy, "udp_rcvbuf_drops": udp_drops}
            runs[side].append(m)
            shown = ", ".join(f"{n} {p:.0f}% (sys {sy:.0f}%)" for n, p, sy in threads)
            progress(NAME, f"run {i + 1}/{s.runs} {side}: {m['gbps']:.2f} Gbit/s, "
                           f"{m['retransmits']} retransmits, {udp_drops} UDP rcvbuf drops, "
                           f"CPU w1 {c1.total:.0f}% w2 {c2.total:.0f}%, machine {busy:.0f}% "
                           "busy" + (f"; {shown}" if shown else ""))
            return m["gbps"]

        interleaved(s.runs, {side: (lambda i, side=side: measure(side, i)) for side in SIDES})
        topo.check_daemon()
        drops_after = topo.fabric_drops()
        peers = topo.daemons[0].get("/v1/peers")
        mtu = dict(topo.mtu)

    # In-process: nothing else runs now (the namespaces are gone).
    micro_s = min(float(s.seconds), 2.0) / 2
    core: dict[str, list[float]] = {}
    for i in range(s.runs):
        for k, v in core_numbers(micro_s).items():
            core.setdefault(k, []).append(v)
        progress(NAME, f"core run {i + 1}/{s.runs}: {core['initiations'][-1]:.0f} "
                       f"initiations/s, {core['cookies'][-1]:.0f} cookie replies/s, "
                       f"{core['data_us'][-1]:.1f} us per data packet")

    def col(side: str, key: str) -> list[Any]:
        return [m.get(key) for m in runs[side]]

    for side in SIDES:
        r.add(side, "Gbit/s", col(side, "gbps"))
    for side in SIDES:
        r.add(f"{side} retransmits", "segs", col(side, "retransmits"))
    for side in SIDES:
        r.add(f"{side} underlay UDP rcvbuf drops", "dgrams", col(side, "udp_rcvbuf_drops"))
    for side in SIDES:
        r.add(f"{side} CPU (both ends)", "s/GB", col(side, "cpu_s_per_gb"))
    for side in SIDES:
        r.add(f"machine busy during {side}", "% all", col(side, "machine_busy_percent"))
    r.add("responder: initiations answered", "1/s", core["initiations"])
    r.add("responder under load: cookie replies", "1/s", core["cookies"])
    r.add("data packet send+receive, 1400 B", "us", core["data_us"])
    r.add("  of which AEAD alone (floor)", "us", core["aead_us"])

    f = median(col(FABRIC, "gbps"))
    ratios: dict[str, float | None] = {}
    for other in (WG, NEBULA):
        o = median(col(other, "gbps"))
        ratios[other] = f / o * 100 if f is not None and o else None
    r.check("fabric / wireguard-go (medians)", ratios[WG], "%", f">= {TARGET * 100:.0f} %",
            ratios[WG] is not None and ratios[WG] >= TARGET * 100)
    r.check("fabric / nebula (medians)", ratios[NEBULA], "%", "", None)
    for side in SIDES:
        r.check(f"{side} CPU-seconds per GB (both ends)", median(col(side, "cpu_s_per_gb")),
                "s/GB", "", None)
    r.check("handshake initiations one responder core answers",
            median(core["initiations"]), "1/s", "", None)
    r.check("initiations turned away with cookie replies (under load)",
            median(core["cookies"]), "1/s", "", None)
    r.check("CPU per 1400 B data packet (send + receive, in-process)",
            median(core["data_us"]), "us", "", None)

    threads: dict[str, list[float]] = {}
    for m in runs[FABRIC]:
        for n, p, sy in m["threads"]:
            threads.setdefault(n, []).append(p)
            threads.setdefault(f"{n} (sys)", []).append(sy)
    rows = [[n, fmt(median(v)), str(len(v))] for n, v in threads.items()]
    r.tables.append(("fabricd CPU by thread during the fabric runs (median % of one CPU; "
                     "sys: of which in the kernel; w1 sends, w2 receives)",
                     ["thread", "% CPU", "runs"], rows))

    r.notes.append("MTUs: " + ", ".join(f"{k} {v}" for k, v in mtu.items())
                   + " (pod links of wireguard-go and nebula set to their tunnel's MTU)")
    r.notes.append("all three paths: pod -> worker 1 -> UDP over a veth -> worker 2 -> pod; "
                   "fabricd does the pod hop itself, wireguard-go and nebula rely on "
                   "kernel forwarding between a pod veth and their TUN")
    r.notes.append("underlay UDP rcvbuf drops: datagrams the workers' kernels dropped on a "
                   "full socket receive buffer (each lost one is a TCP retransmit); fabricd "
                   "asks for 8 MB buffers, wireguard-go and nebula run with their defaults")
    r.notes.append(f"in-process numbers: {micro_s:g} s per measurement; the responder "
                   "faces 8 initiating peers; the data path is tests.bench.tunnel_core.bench_data")
    fdrops = {k: v - drops_before.get(k, 0) for k, v in drops_after.items()
              if v - drops_before.get(k, 0)}
    shown_drops = {k: v for k, v in fdrops.items() if k != "ipv6"}
    if shown_drops:
        r.notes.append("fabricd drops: " + ", ".join(f"{k}={v:.0f}"
                                                     for k, v in shown_drops.items()))
    r.extra = {"mtu": mtu, "ratios_percent": ratios, "runs": runs, "core": core,
               "fabric_drops": fdrops, "fabric_peers": peers}
    return r
