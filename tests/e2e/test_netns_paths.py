"""Pods' `netns` paths against the real daemon: the host's namespace, the daemon's own
and a FIFO are refused through the API with a clear error, nothing is created, and the
control plane goes on serving; work inside a namespace that hangs is given up on."""

from __future__ import annotations

import os
import time

import pytest

from fabric.control.client import ControlClient
from fabric.errors import PortError
from fabric.ports import netlink
from fabric.tools.sandbox import Daemon, Sandbox


def links(sb: Sandbox, ns: str | None) -> set[str]:
    out = sb.run(ns, "ip", "-o", "link", "show").stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def metric(d: Daemon, counter: str) -> float:
    for line in ControlClient(d.control).get_text("/metrics").splitlines():
        if line.startswith(f'fabric_netns_total{{counter="{counter}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_host_own_and_fifo_paths_are_refused_and_nothing_is_made(sandbox: Sandbox) -> None:
    worker = sandbox.netns("worker")
    a = sandbox.netns("a")
    ns = {"name": "shop", "cidr": "10.40.0.0/24",
          "pods": [{"name": "a", "ip": "10.40.0.2", "netns": a}]}
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(1)
    assert d.proc is not None
    fifo = os.path.join(sandbox.tmp, "fake.netns")
    os.mkfifo(fifo)
    host_before, worker_before = links(sandbox, None), links(sandbox, worker)
    client = ControlClient(d.control)
    cases = {
        "/proc/1/ns/net": "/proc/1/ns/net",  # refused as the host's, or unreadable
        f"/proc/{os.getpid()}/ns/net": "the host's",  # this test runs in the host's
        worker: "the fabric's own network namespace",
        f"/run/netns/{worker}": "the fabric's own network namespace",
        f"/proc/{d.proc.pid}/ns/net": "the fabric's own network namespace",
        fifo: "is a FIFO, not a namespace file",
    }
    for i, (path, why) in enumerate(cases.items()):
        t0 = time.monotonic()
        with pytest.raises(PortError) as err:
            client.put(f"/v1/namespaces/shop/pods/p{i}",
                       {"ip": f"10.40.0.{10 + i}", "netns": path})
        assert time.monotonic() - t0 < 2
        assert err.value.status == 422 and err.value.code == "port_failed"
        message = err.value.message
        assert "\n" not in message and path in message and why in message, message
    pods = client.get("/v1/pods")
    assert [p["name"] for p in pods] == ["a"], pods
    assert links(sandbox, None) == host_before  # no TAP left in the host's namespace
    assert links(sandbox, worker) == worker_before
    assert metric(d, "refused_own") >= 4 and metric(d, "refused_not_namespace") >= 1
    # The control plane was never stuck: a good pod is attached right after.
    b = sandbox.netns("b")
    pod = client.put("/v1/namespaces/shop/pods/b", {"ip": "10.40.0.3", "netns": b})
    assert pod["attached"], pod
    assert "1 received" in sandbox.run(a, "ping", "-c", "1", "-W", "2", "10.40.0.3").stdout


def test_work_inside_a_namespace_that_hangs_is_given_up_on(sandbox: Sandbox) -> None:
    ns = sandbox.netns("slow")
    before = netlink.counters.snapshot().get("timeouts", 0)
    t0 = time.monotonic()
    with pytest.raises(PortError, match=r"sleep did not finish within 0.2s"):
        netlink.run_in_netns(ns, time.sleep, 3.0, timeout=0.2)
    assert time.monotonic() - t0 < 1.0
    assert netlink.counters.snapshot()["timeouts"] == before + 1
    # A call that finishes in time still runs inside the namespace.
    here = os.stat("/proc/self/ns/net").st_ino
    there = netlink.run_in_netns(ns, lambda: os.stat("/proc/thread-self/ns/net").st_ino)
    assert there != here
    assert there == os.stat(f"/run/netns/{ns}").st_ino
