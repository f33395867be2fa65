"""examples/worker.py, run as its README section says: it boots a microVM, hands the TAP
to an embedded `Fabric`, and a client pod's request to the service wakes the paused VM,
then again after the VM idled (paused again on the `idle` event); SIGTERM removes the VM,
its TAP and the pods. Network safety: namespaces this test makes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from fabric.microvm import qemu
from fabric.tools.sandbox import Sandbox
from tests.support import microvm as mv

pytestmark = pytest.mark.skipif(mv.skip_reason() is not None,
                                reason=str(mv.skip_reason()))


@pytest.mark.parametrize("mode", ["pause", "snapshot"])
def test_worker_wakes_and_sleeps_its_vm_on_events(sandbox: Sandbox, mode: str) -> None:
    worker, client = sandbox.netns("worker"), sandbox.netns("client")
    vm_dir = os.path.join(sandbox.tmp, "vms")
    asleep = "paused" if mode == "pause" else "not running"  # a snapshot: QEMU exited
    out = mv.start_worker(sandbox, worker, client, "ex", "10.45.0.0/24", vm_dir, "2s",
                          *(["--snapshot"] if mode == "snapshot" else []))
    p, log_path = out.p, out.log
    try:
        vm = out.wait("vm", 60)
        ready = out.wait("ready")
        spec = qemu.VMSpec.load(os.path.join(vm_dir, "vm-0"))
        with_status = mv.VM(spec, vm["ip"], worker)
        assert with_status.status() == "paused"
        for round_ in (1, 2):
            r = mv.http_get(sandbox, client, "web", "/")  # the fabric's DNS, the VIP
            assert r["body"] == "hello from the microVM\n", r
            act = out.wait("activate", 30)
            woken = out.wait("woken", 30)
            t0 = float(r["start"])
            print(f"\nwake {round_} ({mode}): event in the worker "
                  f"{(act['t_event'] - t0) * 1e3:.1f} ms, VM running "
                  f"{(act['t_running'] - t0) * 1e3:.1f} ms, port accepted "
                  f"{woken['ready_ms']:.1f} ms, first byte "
                  f"{(float(r['first_byte']) - t0) * 1e3:.1f} ms; held packets released "
                  f"{woken['release_ms']:.2f} ms after the port accepted")
            assert with_status.status() == "running"
            idle = out.wait("idle", 30)
            assert with_status.status() == asleep
            # the VM ran until the idle timeout (2 s) after the request's flow closed
            print(f"idle {idle['t_event'] - float(r['first_byte']):.2f} s after the first byte")
            assert idle["t_event"] - float(r["first_byte"]) > 1.5, out.seen
        assert ready["ip"] == "10.45.0.254"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
        rc = p.wait(60)
    assert rc == 0, Path(log_path).read_text()[-2000:]
    assert out.wait("stopped", 5)
    assert qemu.pid(spec) is None, "QEMU left running"
    links = sandbox.run(worker, "ip", "-o", "link").stdout
    assert spec.tap not in links, links
    assert "eth0" not in sandbox.run(client, "ip", "-o", "link").stdout
