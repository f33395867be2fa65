"""Faults the fabric heals by itself, with the daemon running and real pods: a pod's
network namespace deleted and made again (a pod restart), a VMM's TAP (here a veth end)
removed and recreated, and the daemon killed with SIGKILL and started again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

from fabric.control.client import ControlClient
from fabric.errors import FabricError
from fabric.tools.sandbox import Daemon, Sandbox, delete_netns

CIDR = "10.45.0.0/24"


def pings(sb: Sandbox, ns: str, ip: str, count: int = 2) -> bool:
    p = sb.run(ns, "ping", "-c", str(count), "-i", "0.2", "-W", "1", ip, check=False,
               timeout=20)
    return f"{count} received" in p.stdout


def wait_for(cond, timeout: float) -> float:  # noqa: ANN001
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s")


def test_a_pod_whose_netns_is_deleted_and_made_again_comes_back(sandbox: Sandbox) -> None:
    worker = sandbox.netns("worker")
    a, b = sandbox.netns("a"), sandbox.netns("b")
    ns = {"name": "shop", "id": 7, "cidr": CIDR,
          "pods": [{"name": "a", "ip": "10.45.0.2", "netns": a},
                   {"name": "b", "ip": "10.45.0.3", "netns": b}]}
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    # Subscribed once lines() returns (a CLI started here might subscribe too late).
    stream = ControlClient(d.control).lines("/v1/events")
    seen: list[dict] = []

    def read() -> None:
        try:
            for line in stream:
                seen.append(json.loads(line))
        except FabricError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert pings(sandbox, a, "10.45.0.3")
        # The pod restarts: its namespace goes away (and its TAP with it), then comes back.
        delete_netns(b)
        subprocess.run(["ip", "netns", "add", b], check=True)
        sandbox.run(b, "ip", "link", "set", "lo", "up")
        took = wait_for(lambda: {p["name"]: p["attached"] for p in d.get("/v1/pods")}["b"]
                        and pings(sandbox, a, "10.45.0.3", 1), 10.0)
        print(f"\n[faults] pod netns deleted and made again: traffic back in {took:.2f} s")
        assert took < 6.0, took  # the 2 s retry, plus the TAP made anew
        wait_for(lambda: any(e["kind"] == "pod_attached" for e in seen), 5.0)
        kinds = [e["kind"] for e in seen if e.get("pod") == "b"]
        assert "pod_port_lost" in kinds, kinds
        assert "pod_attached" in kinds[kinds.index("pod_port_lost"):], kinds
    finally:
        d.stop()
        reader.join(10)


def test_an_interface_pod_survives_its_interface_being_recreated(sandbox: Sandbox) -> None:
    """A VMM recreates its TAP when the VM restarts: the AF_PACKET port follows the name."""
    worker = sandbox.netns("worker")
    a, vm = sandbox.netns("a"), sandbox.netns("vm")

    def plug() -> None:
        sandbox.veth(worker, "fabvm0", vm, "eth0")
        sandbox.run(worker, "ip", "link", "set", "fabvm0", "up")
        sandbox.run(vm, "ip", "link", "set", "eth0", "address", "02:00:0a:2d:00:09")
        sandbox.run(vm, "ip", "addr", "add", "10.45.0.9/24", "dev", "eth0")
        sandbox.run(vm, "ip", "link", "set", "eth0", "up")
        sandbox.run(vm, "ip", "route", "add", "default", "via", "10.45.0.1")

    plug()
    ns = {"name": "shop", "id": 7, "cidr": CIDR,
          "pods": [{"name": "a", "ip": "10.45.0.2", "netns": a},
                   {"name": "vm", "ip": "10.45.0.9", "interface": "fabvm0",
                    "mac": "02:00:0a:2d:00:09"}]}
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    assert pings(sandbox, a, "10.45.0.9")
    sandbox.run(worker, "ip", "link", "del", "fabvm0")
    time.sleep(0.3)
    plug()
    took = wait_for(lambda: pings(sandbox, a, "10.45.0.9", 1), 10.0)
    print(f"\n[faults] VMM TAP recreated: traffic back in {took:.2f} s")
    assert took < 6.0, took
    vm_row = next(p for p in d.get("/v1/pods") if p["name"] == "vm")
    assert vm_row["attached"], vm_row


def test_the_daemon_killed_and_started_again_serves_at_once(sandbox: Sandbox) -> None:
    worker = sandbox.netns("worker")
    a, b = sandbox.netns("a"), sandbox.netns("b")
    ns = {"name": "shop", "id": 7, "cidr": CIDR,
          "pods": [{"name": "a", "ip": "10.45.0.2", "netns": a},
                   {"name": "b", "ip": "10.45.0.3", "netns": b}]}
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    assert pings(sandbox, a, "10.45.0.3")
    d.signal(signal.SIGKILL)
    assert d.proc is not None
    d.proc.wait(10)
    # Nothing is left behind: the TAPs went with the process.
    links = sandbox.run(b, "ip", "-o", "link").stdout
    assert "eth0" not in links, links
    # The same daemon again, on the same control socket, which the dead one left behind.
    t0 = time.monotonic()
    d2 = d.start()
    d2.wait_attached(2)
    assert "removed stale control socket" in d2.log()
    took = wait_for(lambda: pings(sandbox, a, "10.45.0.3", 1), 10.0)
    print(f"\n[faults] kill -9 and restart: serving {time.monotonic() - t0:.2f} s after the "
          f"start (first ping {took:.2f} s after the pods attached)")
    assert pings(sandbox, a, "10.45.0.3")


def test_after_a_kill_9_a_start_removes_resolv_conf_files_whose_netns_is_gone(
        sandbox: Sandbox) -> None:
    """The killed daemon removed nothing; pod b's netns went while it was down. The next
    start removes b's file (whoever wrote it, only that netns read it), says so once, and
    keeps c's: c left the config, but its netns still exists and may be another
    daemon's."""
    worker = sandbox.netns("worker")
    a, b, c = sandbox.netns("a"), sandbox.netns("b"), sandbox.netns("c")
    pods = [{"name": n, "ip": f"10.45.0.{i + 2}", "netns": netns}
            for i, (n, netns) in enumerate((("a", a), ("b", b), ("c", c)))]
    ns = {"name": "shop", "id": 7, "cidr": CIDR, "pods": pods}
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(3)
    path = {n: f"/etc/netns/{n}/resolv.conf" for n in (a, b, c)}
    assert all(os.path.exists(p) for p in path.values())
    d.signal(signal.SIGKILL)
    assert d.proc is not None
    d.proc.wait(10)
    subprocess.run(["ip", "netns", "delete", b], check=True)  # /etc/netns/<b> stays
    assert os.path.exists(path[b]) and os.path.exists(path[c])
    d.write_config({"worker": {"id": "fabricd"}, "namespaces": [{**ns, "pods": pods[:1]}]})
    d2 = d.start()
    d2.wait_attached(1)
    assert not os.path.exists(os.path.dirname(path[b]))
    assert d2.log().count(f"removed stale {path[b]}") == 1, d2.log()
    assert os.path.exists(path[c]) and os.path.exists(path[a])
    d2.stop()
    assert not os.path.exists(path[a])
