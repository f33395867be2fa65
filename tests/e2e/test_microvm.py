"""A real microVM on the fabric: QEMU (TCG here; KVM where it runs guests) with Debian's
kernel and the project's busybox initramfs, its TAP attached as an `interface:` pod. The
guest configures itself by DHCP from the gateway and resolves names through the fabric;
it sleeps and wakes behind a service (on_idle pauses it over QMP, on_activate resumes it),
a curl from a pod wakes it from paused, and again after it idled; then the same with the
second mode (snapshot to a file, QEMU gone, restored on demand). Throughput to it is
printed as a fraction of the same between two netns pods. QEMU and the TAP are removed
also on failure (and the sandbox kills whatever still runs in its namespaces).

Network safety: everything is inside namespaces this module makes; the VM's only link
is its TAP in the worker's namespace.

One VM for the module (a TCG boot takes ~8 s on an idle machine): the tests run in order.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from fabric.control.client import ControlClient
from fabric.microvm import qemu
from fabric.microvm.initramfs import IPERF_PORT, SINK_PORT
from fabric.tools.sandbox import Daemon, Sandbox
from tests.support import microvm as mv

pytestmark = pytest.mark.skipif(mv.skip_reason() is not None,
                                reason=str(mv.skip_reason()))

NS = "vmnet"
VM_IP, CLIENT_IP, PEER_IP, WEB_IP = "10.43.0.10", "10.43.0.20", "10.43.0.30", "10.43.0.100"
IDLE = "2s"


@dataclass
class Setup:
    sb: Sandbox
    d: Daemon
    vm: mv.VM
    client: str
    peer: str
    stamps: str
    config: dict[str, Any]
    boot_seconds: float


def service(vm: mv.VM, stamps: str, sleep: str, wake: str,
            *extra: str) -> dict[str, Any]:
    return {"name": "web", "ip": WEB_IP, "backends": ["vm"], "ports": [{"port": 80}],
            "idle_timeout": IDLE, "on_idle": shlex.join([*vm.ctl(sleep, stamps), *extra]),
            "on_activate": shlex.join([*vm.ctl(wake, stamps), *extra])}


@pytest.fixture(scope="module", name="s")
def setup() -> Iterator[Setup]:
    sb = Sandbox("fbt")
    try:
        worker, client, peer = sb.netns("worker"), sb.netns("client"), sb.netns("peer")
        initrd = mv.guest_initrd(sb)
        spec = mv.vm_spec(sb, "vm1", VM_IP, initrd, mv.accel(initrd))
        vm = mv.VM(spec, VM_IP, worker)
        stamps = f"{sb.tmp}/stamps.jsonl"
        with mv.microvm_tap(sb, worker, spec):
            cfg = {"namespaces": [{
                "name": NS, "cidr": "10.43.0.0/24", "mtu": 1400,
                # not ready until it sleeps: else the fabric probes it awake and the
                # service starts out ready, not dormant
                "pods": [{"name": "vm", "ip": VM_IP, "interface": spec.tap, "mac": spec.mac,
                          "ready": False},
                         {"name": "client", "ip": CLIENT_IP, "netns": client},
                         {"name": "peer", "ip": PEER_IP, "netns": peer}],
                "services": [service(vm, stamps, "pause", "resume")]}]}
            d = Daemon(sb, worker, cfg).start()
            d.wait_attached(3)
            boot = mv.boot(vm)
            print(f"\nmicroVM booted ({spec.accel}) to its lease in {boot:.1f} s")
            yield Setup(sb, d, vm, client, peer, stamps, cfg, boot)
            d.stop()
        # the context above stopped QEMU and removed the TAP: check it did
        assert qemu.pid(spec) is None, "QEMU still running after the test"
        gone = sb.run(worker, "ip", "link", "show", spec.tap, check=False)
        assert gone.returncode != 0, f"TAP {spec.tap} left behind"
    finally:
        sb.close()


def phase_sums(d: Daemon) -> dict[str, float]:
    text = ControlClient(d.control).get_text("/metrics")
    out = {}
    for m in re.finditer(r'^fabric_service_wake_phase_seconds_sum\{namespace="vmnet",'
                         r'service="web",phase="(\w+)"\} (\S+)', text, re.M):
        out[m.group(1)] = float(m.group(2))
    m = re.search(r'^fabric_service_wake_seconds_count\{namespace="vmnet",service="web"\} '
                  r'(\S+)', text, re.M)
    out["wakes"] = float(m.group(1)) if m else 0.0
    return out


def wait_for(what: str, cond: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)


def wake(s: Setup, action: str) -> dict[str, float]:
    """curl-like GET of the service from the client pod; the wake's phases in ms, from
    the client's first SYN: hook started, VM running, port accepts, first byte."""
    before = phase_sums(s.d)
    n = len(mv.stamps(s.stamps))
    r = mv.http_get(s.sb, s.client, "web", "/")
    assert r["body"] == "hello from the microVM\n", r
    try:
        wait_for("the wake recorded", lambda: phase_sums(s.d)["wakes"] > before["wakes"], 10)
    except AssertionError as e:
        raise AssertionError(f"{e}: {before} {phase_sums(s.d)} {mv.stamps(s.stamps)} "
                             f"{s.d.get('/v1/services')}") from None
    after = phase_sums(s.d)
    new = [x for x in mv.stamps(s.stamps)[n:] if x["action"] == action]
    assert new, f"no {action} hook ran: {mv.stamps(s.stamps)}"
    t0 = float(r["start"])  # type: ignore[arg-type]
    hook = after["hook"] - before["hook"]
    phases = {"hook started": hook * 1e3,
              "VM running": (new[-1]["done"] - t0) * 1e3,
              "port accepts": (hook + after["ready"] - before["ready"]) * 1e3,
              "first byte": (float(r["first_byte"]) - t0) * 1e3}  # type: ignore[arg-type]
    print(f"wake ({action}): " + ", ".join(f"{k} {v:.1f} ms" for k, v in phases.items()))
    return phases


def idle_then(s: Setup, action: str) -> None:
    """Wait for the service's idle hook (`action`) to have run after the last wake."""
    def done() -> bool:
        acts = [x["action"] for x in mv.stamps(s.stamps)]
        return bool(acts) and acts[-1] == action
    wait_for(f"the on_idle {action}", done, 30)


def test_guest_configured_itself_by_dhcp_and_resolves_through_the_fabric(s: Setup) -> None:
    info = mv.http_get(s.sb, s.client, VM_IP, "/cgi-bin/info")["body"]
    assert f"ip {VM_IP}" in info and "route default via 10.43.0.1 dev eth0" in info, info
    assert "resolv nameserver 10.43.0.1" in info, info
    assert f"resolv search {NS}.fabric.internal" in info, info
    assert "mtu 1400" in info, info  # the namespace's MTU, from the DHCP option
    # the guest's resolver, with the search domain DHCP gave it, through the gateway
    got = mv.http_get(s.sb, s.client, VM_IP, "/cgi-bin/resolve?client")["body"]
    assert got.split() == [CLIENT_IP], got
    got = mv.http_get(s.sb, s.client, VM_IP, "/cgi-bin/resolve?web")["body"]
    assert got.split() == [WEB_IP], got
    # the pod's view: attached through its interface, the MAC QEMU gave the guest
    pods = {p["name"]: p for p in s.d.get("/v1/pods")}
    assert pods["vm"]["attached"], pods["vm"]


def test_a_request_wakes_the_paused_vm_and_again_after_it_idled(s: Setup) -> None:
    qemu.pause(s.vm.spec)  # asleep before anyone asked
    assert s.vm.status() == "paused"
    s.d.cli("ready", f"{NS}/vm")
    services = {x["name"]: x for x in s.d.get("/v1/services")}
    assert services["web"]["state"] == "dormant", services["web"]
    first = wake(s, "resume")
    assert s.vm.status() == "running"
    idle_then(s, "pause")
    assert s.vm.status() == "paused"
    second = wake(s, "resume")
    assert s.vm.status() == "running"
    assert first["first byte"] >= first["VM running"] > 0 and second["first byte"] > 0
    # several connections held at once: each is served after the resume
    idle_then(s, "pause")
    clients = [s.sb.popen(s.client, sys.executable, "-c", mv.GET, "web", "80", "/", text=True)
               for _ in range(4)]
    bodies = [json.loads(c.communicate(timeout=90)[0])["body"] for c in clients]
    assert bodies == ["hello from the microVM\n"] * 4, bodies
    assert s.vm.status() == "running"


def test_throughput_to_the_vm_as_a_fraction_of_netns_to_netns(s: Setup) -> None:
    idle_then(s, "pause")  # the service idles: the VM is ours to run directly
    qemu.resume(s.vm.spec)
    try:
        mv.free_port_sink(s.sb, s.peer, SINK_PORT)
        vm_bps = mv.send_rate(s.sb, s.client, VM_IP, SINK_PORT, 3.0)
        ns_bps = mv.send_rate(s.sb, s.client, PEER_IP, SINK_PORT, 3.0)
    finally:
        qemu.pause(s.vm.spec)
    print(f"\nthroughput client -> microVM ({s.vm.spec.accel}) {vm_bps / 1e6:.0f} Mbit/s, "
          f"client -> netns pod {ns_bps / 1e6:.0f} Mbit/s: {vm_bps / ns_bps:.3f} of it "
          "(TCP, 3 s each, busybox nc into /dev/null as the receiver)")
    assert vm_bps > 0 and ns_bps > 0


def test_iperf3_to_the_vm_as_a_fraction_of_netns_to_netns(s: Setup) -> None:
    """iperf3 (the guest runs Debian's, with its libraries) from a netns pod to the
    microVM, and to a netns pod, in turn: the fraction is printed, not asserted."""
    idle_then(s, "pause")
    qemu.resume(s.vm.spec)
    got = {}
    try:
        server = s.sb.popen(s.peer, "iperf3", "-s", "-p", str(IPERF_PORT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        s.sb.wait_port(s.peer, IPERF_PORT)
        for name, ip in (("microVM", VM_IP), ("netns pod", PEER_IP)):
            out = s.sb.run(s.client, "iperf3", "-c", ip, "-p", str(IPERF_PORT), "-t", "3",
                           "-J", "--connect-timeout", "20000", timeout=90).stdout
            got[name] = json.loads(out)["end"]["sum_received"]["bits_per_second"]
        server.kill()
    finally:
        qemu.pause(s.vm.spec)
    print(f"\niperf3 client -> microVM ({s.vm.spec.accel}) {got['microVM'] / 1e6:.0f} Mbit/s, "
          f"client -> netns pod {got['netns pod'] / 1e6:.0f} Mbit/s: "
          f"{got['microVM'] / got['netns pod']:.3f} of it")
    assert got["microVM"] > 0 and got["netns pod"] > 0


def test_snapshot_and_restore_behind_the_service(s: Setup) -> None:
    cfg = json.loads(json.dumps(s.config))
    # not ready while QEMU is gone (ctl says so to the daemon): no probe is lost
    cfg["namespaces"][0]["services"] = [service(s.vm, s.stamps, "snapshot", "restore",
                                                "--control", s.d.control, "--pod", f"{NS}/vm")]
    cfg["namespaces"][0]["pods"][0]["ready"] = True  # as `fabricd ready` made it
    s.d.write_config(cfg)
    s.d.signal(1)  # SIGHUP: reload
    wait_for("the new hooks", lambda: "snapshot" in json.dumps(s.d.get(f"/v1/namespaces/{NS}")),
             20)
    # a changed service is a new one: its wake metrics start again from zero
    wait_for("the service replaced", lambda: phase_sums(s.d)["wakes"] == 0, 20)
    # the VM is paused (not snapshotted): restore resumes it; then idle snapshots it
    wake(s, "restore")
    idle_then(s, "snapshot")
    assert qemu.pid(s.vm.spec) is None, "QEMU still runs after the snapshot"
    pods = {p["name"]: p for p in s.d.get("/v1/pods")}
    assert pods["vm"]["ready"] is False, pods["vm"]
    size = mv.stamps(s.stamps)[-1]["bytes"]
    print(f"\nsnapshot: {size / 1e6:.1f} MB, QEMU exited")
    phases = wake(s, "restore")  # a new QEMU from the file
    assert s.vm.status() == "running"
    assert {p["name"]: p for p in s.d.get("/v1/pods")}["vm"]["ready"] is True
    assert phases["first byte"] > 0
    # the restored guest still has its lease and its resolver
    got = mv.http_get(s.sb, s.client, VM_IP, "/cgi-bin/resolve?peer")["body"]
    assert got.split() == [PEER_IP], got
