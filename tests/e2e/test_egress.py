"""Egress end to end: pods reach an "internet" namespace of the test through the
worker's egress TUN, NATed to their namespace's own egress address.

Network safety: the worker's default route points at the test's own "internet"
namespace; the server addresses (TEST-NET-2/3) exist only there.
"""

from __future__ import annotations

import re
import subprocess
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


def test_default_egress_cannot_reach_the_worker_or_cloud_metadata(sandbox: Sandbox) -> None:
    """`egress: true` reaches the internet, not the worker's own services (its address on
    the uplink, one it gains later) nor 169.254.169.254; a namespace that names them
    explicitly does."""
    worker_addr, metadata = "198.51.100.1", "169.254.169.254"
    open_ns = ns(sandbox, "open", 7)
    named = ns(sandbox, "named", 8, {"allow": ["0.0.0.0/0", f"{metadata}/32",
                                               f"{worker_addr}/32"]})
    named["cidr"], named["pods"][0]["ip"] = "10.41.0.0/24", "10.41.0.2"
    d, net = topology(sandbox, [open_ns, named])
    worker = d.ns
    sandbox.http_server(worker, 8081)  # the worker's own service, on every address
    sandbox.run(net, "ip", "addr", "add", f"{metadata}/32", "dev", "lo")
    pod_open, pod_named = open_ns["pods"][0]["netns"], named["pods"][0]["netns"]

    def get(pod: str, url: str) -> subprocess.CompletedProcess[str]:
        return sandbox.run(pod, "curl", "-sS", "--max-time", "5", url, check=False,
                           timeout=15)

    assert curl(sandbox, pod_open, "/whoami").strip() == "100.64.0.7"
    for url in (f"http://{worker_addr}:8081/whoami", f"http://{metadata}:8080/whoami",
                "http://100.64.0.8:8081/whoami"):
        t0 = time.monotonic()
        p = get(pod_open, url)
        assert p.returncode != 0, (url, p.stdout)
        assert time.monotonic() - t0 < 3, f"{url}: refused egress must fail fast"
    assert get(pod_named, f"http://{worker_addr}:8081/whoami").stdout.strip() == "100.64.0.8"
    assert get(pod_named, f"http://{metadata}:8080/whoami").stdout.strip() == "100.64.0.8"
    # An address the worker gains later is protected within the refresh interval.
    assert get(pod_open, "http://192.0.2.77:8081/").returncode != 0
    sandbox.run(worker, "ip", "addr", "add", "192.0.2.77/32", "dev", "lo")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        before = protected_denials(d, "open")
        get(pod_open, "http://192.0.2.77:8081/")
        if protected_denials(d, "open") > before:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("a new worker address was never protected")


def protected_denials(d: Daemon, namespace: str) -> int:
    from fabric.control.client import ControlClient

    text = ControlClient(d.control).get_text("/metrics")
    label = f'namespace="{namespace}",counter="denied_protected"'
    m = re.search(r"fabric_egress_total\{" + re.escape(label) + r"\} (\d+)", text)
    assert m is not None, "no denied_protected counter in /metrics"
    return int(m.group(1))
