"""The gateway end to end: DNS from pods with dig, an upstream resolver (dnsmasq) in an
"internet" namespace of the test, resolv.conf written for pods, names added at run time.

Network safety: the worker, the pods and the "internet" are all namespaces this test
makes; the upstream's address (TEST-NET-2) lives only on the test's own veth.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from typing import Any

import pytest

from fabric.tools.sandbox import Daemon, Sandbox

UPSTREAM = "198.51.100.53"
WORKER_UPLINK = "198.51.100.1"


def internet(sb: Sandbox, worker: str) -> str:
    """An "internet" namespace joined to the worker by a veth, with a resolver."""
    net = sb.netns("internet")
    sb.veth(worker, "up0", net, "eth0")
    sb.run(worker, "ip", "addr", "add", f"{WORKER_UPLINK}/24", "dev", "up0")
    sb.run(worker, "ip", "link", "set", "up0", "up")
    sb.run(net, "ip", "addr", "add", f"{UPSTREAM}/24", "dev", "eth0")
    sb.run(net, "ip", "link", "set", "eth0", "up")
    return net


def dnsmasq(sb: Sandbox, net: str) -> subprocess.Popen[Any]:
    p = sb.popen(net, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
                 "--no-dhcp-interface=eth0", f"--listen-address={UPSTREAM}",
                 "--bind-interfaces", "--pid-file=", "--user=root", "--local-ttl=300",
                 "--cname=www.example.test,edge.example.test",
                 "--cname=edge.example.test,web.example.test",
                 "--host-record=web.example.test,203.0.113.80",
                 "--txt-record=big.example.test," + ",".join(["x" * 200] * 6))
    sb.wait_port(net, 53)
    return p


def dig(sb: Sandbox, ns: str, *args: str) -> str:
    return sb.run(ns, "dig", "@10.40.0.1", "+time=10", "+tries=1", *args, timeout=30).stdout


def status(out: str) -> str:
    m = re.search(r"status: (\w+)", out)
    assert m, out
    return m.group(1)


def answers(out: str) -> list[list[str]]:
    sec = out.split(";; ANSWER SECTION:\n", 1)
    if len(sec) < 2:
        return []
    return [ln.split() for ln in sec[1].split("\n\n", 1)[0].splitlines() if ln.strip()]


@pytest.fixture
def gateway(sandbox: Sandbox) -> tuple[Sandbox, Daemon, str, str, str]:
    worker = sandbox.netns("worker")
    net = internet(sandbox, worker)
    dnsmasq(sandbox, net)
    a, b = sandbox.netns("a"), sandbox.netns("b")
    ns = {"name": "shop", "id": 7, "cidr": "10.40.0.0/24", "dns": {"upstream": [UPSTREAM]},
          "pods": [{"name": "a", "ip": "10.40.0.2", "netns": a},
                   {"name": "b", "ip": "10.40.0.3", "netns": b}]}
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    return sandbox, d, a, b, net


def test_dns_local_names(gateway: tuple[Sandbox, Daemon, str, str, str]) -> None:
    sb, d, a, b, _ = gateway
    out = dig(sb, a, "b.shop.fabric.internal", "A")
    assert status(out) == "NOERROR"
    assert answers(out) == [["b.shop.fabric.internal.", "5", "IN", "A", "10.40.0.3"]]
    assert " aa " in out.split("flags:", 1)[1].split(";", 1)[0] + " "
    out = dig(sb, a, "b.shop.fabric.internal", "AAAA")
    assert status(out) == "NOERROR" and answers(out) == []  # NODATA, not NXDOMAIN
    out = dig(sb, a, "-x", "10.40.0.3")
    assert answers(out)[0][3:] == ["PTR", "b.shop.fabric.internal."]
    assert status(dig(sb, a, "nosuch.shop.fabric.internal")) == "NXDOMAIN"
    out = dig(sb, a, "+tcp", "a.shop.fabric.internal")
    assert answers(out)[0][4] == "10.40.0.2"
    out = dig(sb, a, "B.ShOp.FaBrIc.InTeRnAl", "A")  # 0x20: the question's case echoed
    assert answers(out)[0][0] == "B.ShOp.FaBrIc.InTeRnAl."
    # Plain queries (a bare OPT, or none) take the prebuilt answers' fast path: the same
    # answers, asked twice so the second is a hit on the very same bytes.
    for opts in (("+nocookie",), ("+noedns",), ("+nocookie", "+dnssec")):
        for _ in range(2):
            out = dig(sb, a, *opts, "b.Shop.fabric.internal", "A")
            assert status(out) == "NOERROR", out
            assert answers(out) == [["b.Shop.fabric.internal.", "5", "IN", "A", "10.40.0.3"]]
            assert ("udp: 1232" in out) == ("+noedns" not in opts), out
        out = dig(sb, a, *opts, "nosuch.shop.fabric.internal")
        assert status(out) == "NXDOMAIN" and "AUTHORITY: 1" in out, out
    from fabric.control.client import ControlClient

    metrics = ControlClient(d.control).get_text("/metrics")
    m = re.search(r'^fabric_dns_total\{namespace="shop",counter="nxdomain"\} (\d+)', metrics,
                  re.M)
    assert m and int(m.group(1)) >= 1, metrics


def test_dns_forwarding_and_servfail(gateway: tuple[Sandbox, Daemon, str, str, str]) -> None:
    sb, d, a, b, net = gateway
    out = dig(sb, a, "www.example.test", "A")
    assert status(out) == "NOERROR"
    rows = answers(out)
    assert [r[3] for r in rows] == ["CNAME", "CNAME", "A"], out
    assert rows[-1][4] == "203.0.113.80"
    # A TXT answer too big for UDP comes back truncated; dig retries over TCP by itself.
    out = dig(sb, a, "big.example.test", "TXT")
    assert status(out) == "NOERROR" and answers(out), out
    for pid in sb.run(None, "ip", "netns", "pids", net).stdout.split():
        os.kill(int(pid), 9)
    t0 = time.monotonic()
    out = dig(sb, a, "other.example.test", "A")
    assert status(out) == "SERVFAIL"
    assert time.monotonic() - t0 < 9


def test_resolv_conf_and_runtime_pod(gateway: tuple[Sandbox, Daemon, str, str, str]) -> None:
    sb, d, a, b, _ = gateway
    path = f"/etc/netns/{a}/resolv.conf"
    with open(path) as f:
        text = f.read()
    assert "nameserver 10.40.0.1" in text and "search shop.fabric.internal fabric.internal" in text
    # The pod's own resolver (ip netns exec bind-mounts the file) finds short names.
    assert "10.40.0.3" in sb.run(a, "getent", "hosts", "b").stdout
    c = sb.netns("c")
    from fabric.control.client import ControlClient

    pod = ControlClient(d.control).put("/v1/namespaces/shop/pods/c",
                                       {"ip": "10.40.0.4", "netns": c})
    assert pod["dns"] == {"nameservers": ["10.40.0.1"],
                          "search": ["shop.fabric.internal", "fabric.internal"]}
    assert answers(dig(sb, a, "c.shop.fabric.internal"))[0][4] == "10.40.0.4"
    for _ in range(2):  # the prebuilt answer, hit on the very same bytes
        assert answers(dig(sb, a, "+nocookie", "c.shop.fabric.internal"))[0][4] == "10.40.0.4"
    ControlClient(d.control).delete("/v1/namespaces/shop/pods/c")
    assert status(dig(sb, a, "c.shop.fabric.internal")) == "NXDOMAIN"
    assert status(dig(sb, a, "+nocookie", "c.shop.fabric.internal")) == "NXDOMAIN"
    assert not os.path.exists(f"/etc/netns/{c}/resolv.conf")
    assert d.stop() == 0
    assert not os.path.exists(path)
    text = json.dumps(d.log())
    assert "Traceback" not in text
