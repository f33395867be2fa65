"""The network benchmarks' topology, all inside throwaway `fbb-<runid>-*` namespaces.

fabric: a worker namespace runs `fabricd` with one namespace `bench` (10.50.0.0/24);
        pods `a` (10.50.0.2) and `b` (10.50.0.3) live in namespaces of their own.
veth:   the kernel baseline, a plain veth pair between `ka` (10.51.0.2/24) and `kb`
        (10.51.0.3/24).
Nothing is routed or NATed in the machine's own namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from typing import Any

from fabric.config.specs import NETNS_DIR
from fabric.tools.sandbox import Daemon, Sandbox, prerequisites

PREFIX = "fbb"
FABRIC = "fabric"
VETH = "veth"
IPERF_PORT = 5201


def leftovers() -> list[str]:
    """`fbb-*` namespaces that exist although no Topology of ours is open: a killed run
    (or, against the rules, a concurrent one). They are not removed here, since they might
    belong to a run in progress; `make sweep` removes them."""
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(PREFIX + "-"))
    except OSError:
        return []


@dataclass(frozen=True)
class Side:
    """Where a measurement runs: the client's namespace, the server's and its address."""

    name: str
    client: str
    server: str
    server_ip: str


class Topology:
    """Both paths, built on enter and removed on exit (also on failure)."""

    def __init__(self, worker: dict[str, Any] | None = None) -> None:
        why = prerequisites()
        if why:
            raise RuntimeError(f"cannot create namespaces: {why}")
        self.worker = worker or {}  # more `worker` keys for the daemon (busy_poll)
        self.sb = Sandbox(PREFIX)
        self.daemon: Daemon | None = None
        self.sides: dict[str, Side] = {}

    def __enter__(self) -> Topology:
        try:
            self._build()
        except BaseException:
            self.sb.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.sb.close()

    def _build(self) -> None:
        sb = self.sb
        worker, a, b = sb.netns("worker"), sb.netns("a"), sb.netns("b")
        ka, kb = sb.netns("ka"), sb.netns("kb")
        sb.veth(ka, "eth0", kb, "eth0")
        for ns, ip in ((ka, "10.51.0.2"), (kb, "10.51.0.3")):
            sb.run(ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            sb.run(ns, "ip", "link", "set", "eth0", "up")
        cfg = {"worker": {"id": "bench", **self.worker}, "namespaces": [{
            "name": "bench", "cidr": "10.50.0.0/24",
            "pods": [{"name": "a", "ip": "10.50.0.2", "netns": a},
                     {"name": "b", "ip": "10.50.0.3", "netns": b}],
        }]}
        self.daemon = Daemon(sb, worker, cfg).start()
        self.daemon.wait_attached(2)
        self.sides = {FABRIC: Side(FABRIC, a, b, "10.50.0.3"),
                      VETH: Side(VETH, ka, kb, "10.51.0.3")}
        for side in self.sides.values():  # resolve neighbours, prove both paths work
            self.run(side.client, "ping", "-c", "3", "-i", "0.05", "-W", "2", side.server_ip)

    def start_behind_activator(self, worker: str, client: str, backend: str, pod_ip: str,
                               name: str, activator: str, vip: str, splice_vip: str) -> None:
        """The stream-activator benches' daemon: pods `a` (client) and `w` (backend,
        listening on 8080) in namespace "bench", service `name` at `vip` through
        `activator` and service "plain" at `splice_vip` through the plain `stream`
        activator (the spliced reference), both port 80 -> 8080."""
        def svc(svc_name: str, ip: str, act: str) -> dict[str, Any]:
            return {"name": svc_name, "ip": ip, "backends": ["w"],
                    "ports": [{"port": 80, "target_port": 8080, "activator": act}]}

        cfg = {"worker": {"id": "bench"}, "namespaces": [{
            "name": "bench", "cidr": "10.50.0.0/24",
            "pods": [{"name": "a", "ip": "10.50.0.2", "netns": client},
                     {"name": "w", "ip": pod_ip, "netns": backend}],
            "services": [svc(name, vip, activator), svc("plain", splice_vip, "stream")],
        }]}
        self.daemon = Daemon(self.sb, worker, cfg).start()
        self.daemon.wait_attached(2)
        self.run(client, "ping", "-c", "3", "-i", "0.05", "-W", "2", pod_ip)

    def run(self, ns: str, *cmd: str, timeout: float = 30.0) -> str:
        """Run a command in a namespace; on failure say whether the daemon is still up."""
        p = self.sb.run(ns, *cmd, check=False, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} in {ns} failed ({p.returncode}): "
                               f"{(p.stderr or p.stdout).strip()[-500:]}{self.daemon_state()}")
        return p.stdout

    def daemon_state(self) -> str:
        """'' while fabricd runs, else its exit code and the end of its log."""
        d = self.daemon
        if d is None or d.proc is None or d.proc.poll() is None:
            return ""
        return f"\nfabricd exited with {d.proc.returncode}; log tail:\n{d.log()[-2000:]}"

    def service(self, name: str) -> dict[str, Any]:
        """A service's row from the daemon (the benchmarks' namespace is "bench")."""
        assert self.daemon is not None
        for svc in self.daemon.get("/v1/services"):
            if svc["name"] == name:
                return dict(svc)
        raise RuntimeError(f"service {name} is gone")

    def set_ready(self, pod: str, ready: bool, ns: str = "bench") -> None:
        from fabric.control.client import ControlClient

        assert self.daemon is not None
        ControlClient(self.daemon.control).set_ready(ns, pod, ready)

    def check_daemon(self) -> None:
        state = self.daemon_state()
        if state:
            raise RuntimeError(state.strip())

    def iperf3(self, side: Side, *args: str, seconds: int) -> dict[str, Any]:
        """One iperf3 test from the client to a fresh one-shot server; its JSON result."""
        self.check_daemon()
        self.sb.popen(side.server, "iperf3", "-s", "-1", "-p", str(IPERF_PORT),
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.sb.wait_port(side.server, IPERF_PORT)
        out = self.run(side.client, "iperf3", "-c", side.server_ip, "-p", str(IPERF_PORT),
                       "-J", "-t", str(seconds), "--connect-timeout", "3000", *args,
                       timeout=seconds + 30)
        result: dict[str, Any] = json.loads(out)
        if "error" in result:
            raise RuntimeError(f"iperf3 on {side.name}: {result['error']}")
        return result

    def udp_counters(self, ns: str) -> dict[str, int]:
        """The namespace's kernel UDP counters (/proc/net/snmp is per network namespace)."""
        lines = [ln.split() for ln in self.run(ns, "cat", "/proc/net/snmp").splitlines()
                 if ln.startswith("Udp:")]
        return dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))

    def tx_dropped(self, ns: str, dev: str = "eth0") -> int:
        """Frames the device dropped on transmit (for a TAP: the fabric did not read them
        fast enough and its queue overflowed)."""
        link = json.loads(self.run(ns, "ip", "-j", "-s", "link", "show", "dev", dev))[0]
        stats = link.get("stats64") or link.get("stats") or {}
        return int(stats.get("tx", {}).get("dropped", 0))

    def fabric_drops(self) -> dict[str, float]:
        """fabricd's drop counters summed by reason (from its /metrics)."""
        from fabric.control.client import ControlClient

        assert self.daemon is not None
        text = ControlClient(self.daemon.control).get_text("/metrics")
        drops: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("fabric_drops_total{"):
                labels, value = line.rsplit(" ", 1)
                reason = labels.split('reason="', 1)[1].split('"', 1)[0]
                drops[reason] = drops.get(reason, 0) + float(value)
        return drops
