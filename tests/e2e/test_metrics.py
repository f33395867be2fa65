"""/metrics of two running daemons, scraped while everything they count is busy: pings
and an egress download in flight, DNS answered from the zone and by an upstream, a
service waking (its hook starts the backend, a client's request held meanwhile) and the
tunnel carrying the pods' traffic. Each scrape passes `promtool check metrics` and
matches the registry (fabric.runtime.families); the latency histograms saw the wake's
phases, both kinds of DNS answer and the handshake.

Network safety: the underlay (TEST-NET-1), the "internet" namespace with its resolver
and HTTP server (TEST-NET-2/3) exist only on the veths between namespaces this test makes.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import time
from typing import Any

import pytest

from fabric.tools.sandbox import Daemon, Sandbox
from tests.support.procstat import Metrics, scrape
from tests.support.promcheck import problems, promtool

W1, W2 = "192.0.2.1", "192.0.2.2"
SERVER = "203.0.113.10"
UPSTREAM = "198.51.100.53"  # the "internet" namespace's address (Sandbox.internet)
POOL = "100.64.0.0/16"
VIP = "10.40.0.100"
HOOK_DELAY = 1.5  # the backend starts this long after its hook


def keypair() -> tuple[str, str]:
    from tunnels.keys import generate_keypair, public_key

    priv = generate_keypair()[0]
    return base64.b64encode(priv).decode(), base64.b64encode(public_key(priv)).decode()


def _config(me: str, priv: str, peer: str, pub: str, endpoint: str,
            pods: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    worker: dict[str, Any] = {"id": me, "tunnel": {
        "listen": "0.0.0.0:51820", "private_key": priv, "keepalive": "2s",
        "peers": [{"id": peer, "public_key": pub, "endpoint": endpoint}]}}
    worker.update(extra.pop("worker", {}))
    return {"worker": worker, "namespaces": [{
        "name": "shop", "id": 7, "cidr": "10.40.0.0/24", "pods": pods, **extra}]}


def _checked(control: str, what: str) -> str:
    from fabric.control.client import ControlClient

    with ControlClient(control) as c:
        text = c.get_text("/metrics")
    assert problems(text) == [], (what, problems(text))
    said = promtool(text)
    assert said == "", f"promtool check metrics on {what}: {said}"
    return text


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus)")
def test_live_scrapes_pass_promtool_and_histograms_fill(sandbox: Sandbox) -> None:
    sb = sandbox
    w1, w2 = sb.netns("w1"), sb.netns("w2")
    sb.veth(w1, "under0", w2, "under0")
    for ns, addr in ((w1, W1), (w2, W2)):
        sb.run(ns, "ip", "addr", "add", f"{addr}/24", "dev", "under0")
        sb.run(ns, "ip", "link", "set", "under0", "up")
    net = sb.internet(w1, SERVER, POOL)
    sb.http_server(net, 8080)
    sb.popen(net, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
             "--no-dhcp-interface=eth0", f"--listen-address={UPSTREAM}", "--bind-interfaces",
             "--pid-file=", "--user=root", "--host-record=web.example.test,203.0.113.80")
    sb.wait_port(net, 53)
    a, b, web = sb.netns("a"), sb.netns("b"), sb.netns("web")
    web_ns = sb.name("web")
    k1, k2 = keypair(), keypair()
    hook = (f"sh -c '(sleep {HOOK_DELAY}; exec ip netns exec {web_ns} {sys.executable} -m "
            f"fabric.tools.sandbox http 8080) >/dev/null 2>&1 &'")
    d1 = Daemon(sb, w1, _config(
        "w1", k1[0], "w2", k2[1], f"{W2}:51820",
        [{"name": "a", "ip": "10.40.0.2", "netns": a},
         {"name": "web", "ip": "10.40.0.4", "netns": web},
         {"name": "b", "ip": "10.40.0.3", "worker": "w2"}],
        worker={"egress": {"tun": "fabeg0", "pool": POOL}},
        egress=True, dns={"upstream": [UPSTREAM]},
        services=[{"name": "site", "ip": VIP, "ports": [{"port": 80, "target_port": 8080}],
                   "backends": ["web"], "on_activate": hook}]), name="w1")
    d2 = Daemon(sb, w2, _config(
        "w2", k2[0], "w1", k1[1], f"{W1}:51820",
        [{"name": "b", "ip": "10.40.0.3", "netns": b},
         {"name": "a", "ip": "10.40.0.2", "worker": "w1"},
         {"name": "web", "ip": "10.40.0.4", "worker": "w1"}]), name="w2")
    d1.start()
    d2.start()
    d1.wait_attached(2)
    d2.wait_attached(1)
    out = sb.run(a, "ping", "-c", "3", "-i", "0.2", "-W", "3", "10.40.0.3").stdout
    assert "3 received" in out, out

    # Busy: pings through the tunnel, a slow egress download, DNS both ways, a wake.
    pinger = sb.popen(a, "ping", "-q", "-c", "100", "-i", "0.05", "-W", "2", "10.40.0.3",
                      text=True)
    download = sb.popen(a, "curl", "-sS", "--max-time", "60", "--limit-rate", "2M", "-o",
                        "/dev/null", f"http://{SERVER}:8080/bytes/8000000", text=True)
    for name in ("b.shop.fabric.internal", "web.example.test"):
        got = sb.run(a, "dig", "@10.40.0.1", "+time=5", "+tries=2", "+short", name).stdout
        assert got.strip(), (name, got)
    resolver = sb.popen(a, "sh", "-c", "for i in $(seq 300); do dig @10.40.0.1 +short +time=2 "
                        "+tries=1 a.shop.fabric.internal www.example.test >/dev/null; done")
    assert d1.get("/v1/services")[0]["state"] == "dormant"
    client = sb.popen(a, "curl", "-sS", "--max-time", "30", f"http://{VIP}/", text=True,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while (svc := d1.get("/v1/services")[0])["held_packets"] < 1:
        assert time.monotonic() < deadline, svc
        time.sleep(0.02)
    assert svc["state"] == "activating", svc

    during = Metrics(_checked(d1.control, "w1 while waking"))
    lab = {"namespace": "shop", "service": "site"}
    assert during.get("fabric_service_state", **lab, state="activating") == 1
    assert during.get("fabric_service_held_packets", **lab) >= 1
    assert during.get("fabric_egress_flows", namespace="shop") >= 1
    assert during.get("fabric_tunnel_rx_bytes_total") > 0
    assert during.get("fabric_port_rx_bytes_total", namespace="shop", pod="a") > 0
    _checked(d2.control, "w2 under traffic")
    assert resolver.poll() is None, "the DNS queries went on through the scrapes"

    body, err = client.communicate(timeout=40)
    assert "hello from" in body, (body, err, d1.log()[-2000:])
    assert pinger.wait(timeout=30) == 0
    download.wait(timeout=60)

    after = Metrics(_checked(d1.control, "w1 after the wake"))
    assert after.get("fabric_service_wakes_total", **lab) == 1
    assert after.get("fabric_service_wake_seconds_count", **lab) == 1
    for phase in ("hook", "ready", "release"):
        assert after.get("fabric_service_wake_phase_seconds_count", **lab, phase=phase) == 1
    # The backend started HOOK_DELAY after its hook: the ready phase holds that sleep.
    assert after.get("fabric_service_wake_phase_seconds_sum", **lab, phase="ready") \
        >= HOOK_DELAY
    assert after.get("fabric_service_wake_seconds_bucket", **lab, le="+Inf") == 1
    for source in ("local", "upstream"):
        assert after.get("fabric_dns_answer_seconds_count", namespace="shop",
                         source=source) >= 1, source
    phases = {p: after.get("fabric_service_wake_phase_seconds_sum", **lab, phase=p) * 1e3
              for p in ("hook", "ready", "release")}
    dns = {src: after.get("fabric_dns_answer_seconds_sum", namespace="shop", source=src) /
           after.get("fabric_dns_answer_seconds_count", namespace="shop", source=src) * 1e3
           for src in ("local", "upstream")}
    print(f"\n[metrics] wake {after.get('fabric_service_wake_seconds_sum', **lab) * 1e3:.1f} ms"
          f" = " + " + ".join(f"{p} {v:.1f}" for p, v in phases.items())
          + "; dns mean " + ", ".join(f"{k} {v:.3f} ms" for k, v in dns.items())
          + f"; {len(during.samples)} samples in a scrape")
    handshakes = sum(scrape(d.control).get("fabric_tunnel_handshake_seconds_count")
                     for d in (d1, d2))
    assert handshakes >= 1
    assert after.get("fabric_service_state", **lab, state="ready") == 1
