"""What an operator types, against running daemons: `fabricd monitor` and `get drops`
naming a spoofed packet, an egress denial and a hold timeout with their headers (and
nothing attached when nobody monitors); `status` and `describe`; `peer add/set/remove/
rekey` changing a live tunnel between two workers.

Network safety: the "internet" is the test's own namespace (TEST-NET-3 server); the
tunnel underlay (TEST-NET-1) exists only on the veth between the two worker namespaces.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from typing import Any

from fabric.control.client import ControlClient
from fabric.tools.sandbox import Daemon, Sandbox
from tests.e2e.test_tunnel import W1, Cluster

SERVER = "203.0.113.10"
POOL = "100.64.0.0/16"
VIP = "10.40.0.100"


def sinks(d: Daemon) -> float:
    text = ControlClient(d.control).get_text("/metrics")
    m = re.search(r"^fabricd_monitor_sinks (\S+)$", text, re.M)
    assert m, text[-500:]
    return float(m.group(1))


def wait_for(pred: Any, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_monitor_and_drops_name_spoofing_egress_denial_and_hold_timeout(
        sandbox: Sandbox) -> None:
    sb = sandbox
    worker = sb.netns("worker")
    net = sb.internet(worker, SERVER, POOL)
    sb.http_server(net, 8080)
    client, web = sb.netns("client"), sb.netns("web")
    ns = {"name": "shop", "id": 7, "cidr": "10.40.0.0/24",
          "egress": {"allow": ["198.51.100.0/24"]},
          "pods": [{"name": "client", "ip": "10.40.0.2", "netns": client},
                   {"name": "web-1", "ip": "10.40.0.3", "netns": web}],
          "services": [{"name": "web", "ip": VIP, "ports": [{"port": 80, "target_port": 8080}],
                        "backends": ["web-1"], "hold": {"timeout": "1s"}}]}
    d = Daemon(sb, worker, {"worker": {"egress": {"tun": "fabeg0", "pool": POOL}},
                            "namespaces": [ns]}).start()
    d.wait_attached(2)
    assert sinks(d) == 0  # nobody monitors: the drop path has nothing to feed

    mon = subprocess.Popen(d.cli_argv("monitor", "-n", "shop", "-o", "json"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    text = subprocess.Popen(d.cli_argv("monitor"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[dict[str, Any]] = []

    def read() -> None:
        assert mon.stdout is not None
        for line in mon.stdout:
            lines.append(json.loads(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: sinks(d) == 2, what="two monitors attached")
        # A spoofed source, sent from inside the client pod.
        sb.run(client, sys.executable, "-c",
               "from scapy.all import IP, UDP, send; "
               "send(IP(src='10.40.0.99', dst='10.40.0.3')/UDP(sport=4444, dport=9), "
               "verbose=0)", timeout=60)
        # Egress the namespace's allow list refuses.
        sb.run(client, "curl", "-sS", "--max-time", "5", f"http://{SERVER}:8080/",
               check=False)
        # A connection held for a backend that never comes up, until the hold times out.
        sb.run(client, "curl", "-sS", "--max-time", "10", f"http://{VIP}/", check=False)

        def reasons() -> set[str]:
            return {str(e.get("reason")) for e in lines}

        want = {"spoofed_source", "egress_denied", "hold_timeout"}
        wait_for(lambda: want <= reasons(), what=f"{want} in {lines}")
    finally:
        mon.terminate()
        text.terminate()
        mon.wait(10)
        text_out = text.communicate(timeout=10)[0]
    by = {e["reason"]: e for e in reversed(lines)}
    spoof, denied, held = by["spoofed_source"], by["egress_denied"], by["hold_timeout"]
    assert (spoof["pod"], spoof["src"], spoof["dst"], spoof["proto"], spoof["sport"],
            spoof["dport"]) == ("client", "10.40.0.99", "10.40.0.3", "udp", 4444, 9), spoof
    assert (denied["pod"], denied["src"], denied["dst"], denied["proto"], denied["dport"],
            denied["flags"]) == ("client", "10.40.0.2", SERVER, "tcp", 8080, "S"), denied
    assert (held["pod"], held["src"], held["dst"], held["dport"]) == (
        "client", "10.40.0.2", VIP, 80), held
    assert all(e["kind"] == "drop" and e["namespace"] == "shop" for e in lines)
    assert "shop/client spoofed_source udp 10.40.0.99:4444 -> 10.40.0.3:9" in text_out
    wait_for(lambda: sinks(d) == 0, what="monitors detached after they hung up")

    drops = json.loads(d.cli("get", "drops", "-n", "shop", "-o", "json"))
    assert want <= {x["reason"] for x in drops}, drops
    table = d.cli("get", "drops")
    assert "egress_denied" in table and f"{SERVER}:8080" in table
    status = d.cli("status")
    m = re.search(r"drops in the last minute: (\d+)", status)
    assert m and int(m.group(1)) >= 3, status
    assert "namespaces: 1; pods: 2 (2 attached" in status and "services: 1" in status
    described = d.cli("describe", "pod", "shop/client")
    assert described.startswith("Pod: client") and "pod_attached" in described, described
    svc = d.cli("describe", "service", "web", "-n", "shop")
    assert svc.startswith("Service: web") and "state:" in svc, svc


def ping_ok(sb: Sandbox, ns: str, dst: str, count: int = 3) -> bool:
    out = sb.run(ns, "ping", "-c", str(count), "-i", "0.2", "-W", "2", dst, check=False).stdout
    return f"{count} received" in out


def test_peer_commands_change_a_live_tunnel(sandbox: Sandbox) -> None:
    cl = Cluster(sandbox).start()
    sb = cl.sb
    wait_for(lambda: ping_ok(sb, cl.b, "10.40.0.2", 1), 20, "the tunnel")
    wg = cl.d2.cli("get", "peers", "-o", "wg")
    assert "peer: w1" in wg and f"endpoint: {W1}:51820" in wg and "ago" in wg, wg
    assert "received" in wg and "sent" in wg

    cl.d2.cli("peer", "remove", "w1")
    assert json.loads(cl.d2.cli("get", "peers", "-o", "json")) == []
    assert not ping_ok(sb, cl.b, "10.40.0.2", 2)
    p = subprocess.run(cl.d2.cli_argv("peer", "remove", "w1"), capture_output=True, text=True)
    assert p.returncode == 1 and "not found" in p.stderr, p.stderr

    out = cl.d2.cli("peer", "add", "w1", "--public-key", cl.k1[1], "--endpoint",
                    f"{W1}:51820")
    assert "peer w1 added" in out
    wait_for(lambda: ping_ok(sb, cl.b, "10.40.0.2", 2), 20, "the tunnel back after add")

    out = cl.d2.cli("peer", "set", "w1", "--endpoint", f"{W1}:51999")
    row = json.loads(cl.d2.cli("get", "peers", "-o", "json"))[0]
    assert row["endpoint"] == f"{W1}:51999" and row["public_key"] == cl.k1[1], row
    cl.d2.cli("peer", "set", "w1", "--endpoint", f"{W1}:51820")
    before = json.loads(cl.d2.cli("get", "peers", "-o", "json"))[0]["last_handshake"]
    time.sleep(1.1)
    assert "handshake started" in cl.d2.cli("peer", "rekey", "w1")
    wait_for(lambda: (json.loads(cl.d2.cli("get", "peers", "-o", "json"))[0]
                      ["last_handshake"] or 0) > (before or 0), 10, "a new handshake")
    assert ping_ok(sb, cl.b, "10.40.0.2", 3)
    status = cl.d2.cli("status")
    assert "peers: 1 (1 up, 0 down)" in status, status
