"""DHCPv4 from the gateway, end to end: busybox's udhcpc in a pod's netns (its address
flushed first) gets its address, netmask, gateway, MTU, DNS server and search list from
the fabric, applies them with its lease script, then pings another pod and resolves a
pod's name through the fabric's DNS with what the lease said; renewals and releases are
answered and counted; a namespace with `dhcp: false` does not answer.

Network safety: the worker and the pods are namespaces this test makes; DHCP never
leaves them (the pods' only link is the fabric's TAP).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Callable

import pytest

from fabric.control.client import ControlClient
from fabric.tools.sandbox import Daemon, Sandbox

pytestmark = pytest.mark.skipif(shutil.which("busybox") is None,
                                reason="busybox (Debian busybox-static) is not installed")

# What udhcpc runs on each event: apply the lease, and leave its variables in a file
# named for the event so the test reads what the server said.
SCRIPT = """#!/bin/sh
out={out}
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/$mask" broadcast "$broadcast" dev "$interface"
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    ip route replace default via "$router" dev "$interface"
    ;;
esac
env > "$out/$1.env.tmp" && mv "$out/$1.env.tmp" "$out/$1.env"
"""


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.05)


def lease_env(path: str) -> dict[str, str]:
    with open(path) as f:
        return dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)


def counter(d: Daemon, ns: str, name: str) -> int:
    text = ControlClient(d.control).get_text("/metrics")
    m = re.search(rf'^fabric_dhcp_total\{{namespace="{ns}",counter="{name}"\}} (\d+)', text,
                  re.M)
    return int(m.group(1)) if m else 0


def udhcpc(script: str, *extra: str) -> list[str]:
    return ["busybox", "udhcpc", "-i", "eth0", "-f", "-s", script, "-O", "search", "-O",
            "mtu", "-t", "5", "-T", "2", *extra]


@pytest.fixture
def fabric(sandbox: Sandbox) -> tuple[Sandbox, Daemon, str, str, str, str]:
    worker = sandbox.netns("worker")
    vm, b, q = sandbox.netns("vm"), sandbox.netns("b"), sandbox.netns("q")
    shop = {"name": "shop", "cidr": "10.41.0.0/24", "mtu": 1400,
            "dns": {"resolv_conf": False}, "dhcp": {"lease": "1h"},
            "pods": [{"name": "vm", "ip": "10.41.0.2", "netns": vm},
                     {"name": "b", "ip": "10.41.0.3", "netns": b}]}
    quiet = {"name": "quiet", "cidr": "10.42.0.0/24", "dhcp": False,
             "pods": [{"name": "q", "ip": "10.42.0.2", "netns": q}]}
    d = Daemon(sandbox, worker, {"namespaces": [shop, quiet]}).start()
    d.wait_attached(3)
    out = os.path.join(sandbox.tmp, "leases")
    os.makedirs(out)
    script = os.path.join(sandbox.tmp, "lease.sh")
    with open(script, "w") as f:
        f.write(SCRIPT.format(out=out))
    os.chmod(script, 0o755)
    for ns in (vm, q):  # forget what the fabric configured: DHCP must bring it back
        sandbox.run(ns, "ip", "-4", "addr", "flush", "dev", "eth0")
        sandbox.run(ns, "ip", "link", "set", "eth0", "mtu", "1500")
    return sandbox, d, vm, q, script, out


def test_udhcpc_gets_its_lease_and_uses_it(
        fabric: tuple[Sandbox, Daemon, str, str, str, str]) -> None:
    sb, d, vm, _, script, out = fabric
    assert "inet " not in sb.run(vm, "ip", "-4", "addr", "show", "dev", "eth0").stdout
    # -B: the broadcast flag (the reply comes to ff:ff:ff:ff:ff:ff); -q: exit once bound
    p = sb.run(vm, *udhcpc(script, "-q", "-n", "-B"), timeout=60)
    env = lease_env(os.path.join(out, "bound.env"))
    assert env["ip"] == "10.41.0.2", p.stderr
    assert (env["subnet"], env["router"], env["dns"], env["serverid"]) == \
        ("255.255.255.0", "10.41.0.1", "10.41.0.1", "10.41.0.1")
    assert env["mtu"] == "1400" and env["lease"] == "3600"
    assert env["domain"] == "shop.fabric.internal"
    assert env["search"].split() == ["shop.fabric.internal", "fabric.internal"]
    link = sb.run(vm, "ip", "-4", "addr", "show", "dev", "eth0").stdout
    assert "inet 10.41.0.2/24" in link and "mtu 1400" in link, link
    assert "default via 10.41.0.1" in sb.run(vm, "ip", "route").stdout
    # the lease in use: another pod by address, a pod's name through the fabric's DNS
    sb.run(vm, "ping", "-c", "2", "-W", "5", "10.41.0.3", timeout=30)
    dig = sb.run(vm, "dig", f"@{env['dns']}", f"+domain={env['search'].split()[0]}", "+short",
                 "+time=5", "+tries=2", "b", timeout=30).stdout
    assert dig.split() == ["10.41.0.3"], dig
    assert counter(d, "shop", "discover") >= 1 and counter(d, "shop", "offer") >= 1
    assert counter(d, "shop", "ack") >= 1 and counter(d, "shop", "nak") == 0


def test_renewal_and_release_are_answered(
        fabric: tuple[Sandbox, Daemon, str, str, str, str]) -> None:
    sb, d, vm, _, script, out = fabric
    # no -B: the OFFER and ACK are unicast to the pod's MAC and address (RFC 2131 §4.1)
    p = sb.popen(vm, *udhcpc(script, "-R"))
    wait_for("bound", lambda: os.path.exists(os.path.join(out, "bound.env")))
    acks = counter(d, "shop", "ack")
    assert lease_env(os.path.join(out, "bound.env"))["ip"] == "10.41.0.2"
    os.killpg(p.pid, signal.SIGUSR1)  # renew: a REQUEST unicast from 10.41.0.2 to the server
    wait_for("renewed", lambda: os.path.exists(os.path.join(out, "renew.env")))
    assert lease_env(os.path.join(out, "renew.env"))["ip"] == "10.41.0.2"
    assert counter(d, "shop", "ack") > acks  # (udhcpc may retransmit its renew)
    os.killpg(p.pid, signal.SIGUSR2)  # release
    wait_for("released", lambda: counter(d, "shop", "release") >= 1)
    sb.stop(p)
    assert counter(d, "shop", "refused_unknown_mac") == 0
    assert counter(d, "shop", "malformed") == 0


def test_dhcp_off_does_not_answer(fabric: tuple[Sandbox, Daemon, str, str, str, str]) -> None:
    sb, d, _, q, script, out = fabric
    p = sb.run(q, *udhcpc(script, "-q", "-n", "-t", "2", "-T", "1"), check=False, timeout=60)
    assert p.returncode != 0
    assert not os.path.exists(os.path.join(out, "bound.env"))
    text = ControlClient(d.control).get_text("/metrics")
    assert 'fabric_dhcp_total{namespace="quiet"' not in text
    m = re.search(r'^fabric_drops_total\{namespace="quiet",pod="q",reason="spoofed_source"\} '
                  r'(\d+)', text, re.M)
    assert m and int(m.group(1)) >= 1, text
