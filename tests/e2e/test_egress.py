"""Egress end to end: pods reach an "internet" namespace of the test through the
worker's egress TUN, NATed to their namespace's own egress address.

Network safety: the worker's default route points at the test's own "internet"
namespace; the server addresses (TEST-NET-2/3) exist only there.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from fabric.tools.sandbox import Daemon, Sandbox

SERVER = "203.0.113.10"
POOL = "100.64.0.0/16"


def topology(sb: Sandbox, namespaces: list[dict[str, Any]]) -> tuple[Daemon, str]:
    worker = sb.netns("worker")
    net = sb.internet(worker, SERVER, POOL)
    sb.http_server(net, 8080)
    d = Daemon(sb, worker, {"worker": {"egress": {"tun": "fabeg0", "pool": POOL}},
                            "namespaces": namespaces}).start()
    d.wait_attached(sum(len(n["pods"]) for n in namespaces))
    return d, net


def ns(sb: Sandbox, name: str, ns_id: int, egress: Any = True) -> dict[str, Any]:
    pod = sb.netns(f"{name}-a")
    return {"name": name, "id": ns_id, "cidr": "10.40.0.0/24", "egress": egress,
            "pods": [{"name": "a", "ip": "10.40.0.2", "netns": pod}]}


def curl(sb: Sandbox, pod: str, path: str, timeout: float = 10) -> str:
    return sb.run(pod, "curl", "-sS", "--max-time", str(timeout),
                  f"http://{SERVER}:8080{path}", timeout=timeout + 10).stdout


def test_egress_http_ping_and_big_transfer(sandbox: Sandbox) -> None:
    spec = ns(sandbox, "shop", 7)
    d, _ = topology(sandbox, [spec])
    pod = spec["pods"][0]["netns"]
    assert curl(sandbox, pod, "/whoami").strip() == "100.64.0.7"
    out = sandbox.run(pod, "ping", "-c", "3", "-i", "0.2", "-W", "2", SERVER).stdout
    assert "3 received" in out, out
    size = sandbox.run(pod, "curl", "-sS", "--max-time", "60", "-o", "/dev/null", "-w",
                       "%{size_download}", f"http://{SERVER}:8080/bytes/50000000",
                       timeout=90).stdout
    assert size == "50000000"
    nss = d.get("/v1/namespaces")
    assert nss[0]["egress"] == "100.64.0.7" and nss[0]["egress_flows"] >= 1


def test_same_cidr_namespaces_egress_with_their_own_addresses(sandbox: Sandbox) -> None:
    red, blue = ns(sandbox, "red", 7), ns(sandbox, "blue", 8)
    topology(sandbox, [red, blue])
    seen: dict[str, list[str]] = {"red": [], "blue": []}

    def fetch(name: str, pod: str) -> None:
        for _ in range(20):
            seen[name].append(curl(sandbox, pod, "/whoami").strip())

    threads = [threading.Thread(target=fetch, args=(n["name"], n["pods"][0]["netns"]))
               for n in (red, blue)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["red"] == ["100.64.0.7"] * 20
    assert seen["blue"] == ["100.64.0.8"] * 20


def test_allowlist_denial_fails_fast(sandbox: Sandbox) -> None:
    closed = ns(sandbox, "closed", 9, {"allow": ["198.51.100.0/24"]})
    d, _ = topology(sandbox, [closed])
    pod = closed["pods"][0]["netns"]
    t0 = time.monotonic()
    p = sandbox.run(pod, "curl", "-sS", "--max-time", "10", f"http://{SERVER}:8080/",
                    check=False)
    assert p.returncode != 0
    assert time.monotonic() - t0 < 3, "denied egress must fail fast (ICMP prohibited)"
    assert "unreachable" in p.stderr.lower() or "couldn't connect" in p.stderr.lower()
    from fabric.control.client import ControlClient

    metrics = ControlClient(d.control).get_text("/metrics")
    assert 'reason="egress_denied"' in metrics
