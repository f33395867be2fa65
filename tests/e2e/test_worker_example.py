"""examples/worker.py, run as its README section says: it boots a microVM, hands the TAP
to an embedded `Fabric`, and a client pod's request to the service wakes the paused VM,
then again after the VM idled (paused again on the `idle` event); SIGTERM removes the VM,
its TAP and the pods. Network safety: namespaces this test makes."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fabric.microvm import qemu
from fabric.tools.sandbox import Sandbox
from tests.support import microvm as mv

pytestmark = pytest.mark.skipif(mv.skip_reason() is not None,
                                reason=str(mv.skip_reason()))

WORKER = Path(__file__).resolve().parents[2] / "examples" / "worker.py"


class Lines:
    """The worker's JSON lines, read as they come."""

    def __init__(self, p: subprocess.Popen[str], log: str) -> None:
        self.p = p
        self.log = log
        self.seen: list[dict[str, Any]] = []

    def wait(self, event: str, timeout: float = 120.0) -> dict[str, Any]:
        assert self.p.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.p.stdout], [], [], 0.5)
            if r:
                line = self.p.stdout.readline()
                if not line:
                    break
                self.seen.append(json.loads(line))
                if self.seen[-1]["event"] == event:
                    return self.seen[-1]
            elif self.p.poll() is not None:
                break
        with open(self.log) as f:
            err = f.read()
        raise AssertionError(f"no {event!r} from the worker: {self.seen} {err[-2000:]}")


def test_worker_wakes_and_sleeps_its_vm_on_events(sandbox: Sandbox) -> None:
    worker, client = sandbox.netns("worker"), sandbox.netns("client")
    vm_dir = os.path.join(sandbox.tmp, "vms")
    log_path = os.path.join(sandbox.tmp, "worker.log")
    with open(log_path, "w") as log:  # a file: a pipe nobody reads would block its logging
        p = sandbox.popen(worker, sys.executable, str(WORKER), "--namespace", "ex",
                          "--cidr", "10.45.0.0/24", "--vms", "1", "--idle", "2s",
                          "--netns-pod", f"client={client}", "--dir", vm_dir, text=True,
                          stderr=log)
    out = Lines(p, log_path)
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
            print(f"\nwake {round_}: event in the worker {(act['t_event'] - t0) * 1e3:.1f} ms,"
                  f" VM running {(act['t_running'] - t0) * 1e3:.1f} ms, port accepted "
                  f"{woken['ready_ms']:.1f} ms, first byte "
                  f"{(float(r['first_byte']) - t0) * 1e3:.1f} ms; held packets released "
                  f"{woken['release_ms']:.2f} ms after the port accepted")
            idle = out.wait("idle", 30)
            assert with_status.status() == "paused"
            # the VM ran until the idle timeout (2 s) after the request's flow closed
            print(f"idle {idle['t_event'] - float(r['first_byte']):.2f} s after the first byte")
            assert idle["t_event"] - float(r["first_byte"]) > 1.5, json.dumps(out.seen)
        assert ready["ip"] == "10.45.0.254"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
        rc = p.wait(60)
    assert rc == 0, Path(log_path).read_text()[-2000:]
    assert out.wait("stopped", 5)
    assert qemu.pid(spec) is None, "QEMU left running"
    links = sandbox.run(worker, "ip", "-o", "link").stdout
    assert spec.tap not in links and "tap" not in links.replace(spec.tap, ""), links
    assert "eth0" not in sandbox.run(client, "ip", "-o", "link").stdout
