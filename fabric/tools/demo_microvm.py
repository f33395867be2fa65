"""The demo's microVM step: a real VM (QEMU, Debian's kernel, the project's initramfs)
attached as an `interface:` pod, configured by DHCP, asleep behind a service and woken by
a request. It runs when KVM runs guests here (`FABRICD_DEMO_MICROVM=tcg` runs it under
TCG anyway, `=off` skips it); otherwise the demo says why it skips it."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Any

from fabric.microvm import qemu
from fabric.microvm.initramfs import build, find_kernel
from fabric.tools.sandbox import Daemon, Sandbox

VM_IP = "10.77.0.40"
VIP = "10.77.0.101"


@dataclass
class MicroVMStep:
    spec: qemu.VMSpec
    worker: str
    stamps: str

    def pod(self) -> dict[str, Any]:
        # not ready while it boots: asleep first, then the service may wake it
        return {"name": "vm-1", "ip": VM_IP, "interface": self.spec.tap,
                "mac": self.spec.mac, "ready": False}

    def service(self) -> dict[str, Any]:
        def ctl(action: str) -> str:
            return shlex.join([sys.executable, "-m", "fabric.microvm.ctl", self.spec.dir,
                               action, "--stamps", self.stamps])
        return {"name": "vm-web", "ip": VIP, "backends": ["vm-1"], "ports": [{"port": 80}],
                "idle_timeout": "60s", "on_activate": ctl("resume"), "on_idle": ctl("pause")}

    def run(self, sb: Sandbox, d: Daemon, client: str, step: Any, done: Any) -> None:
        t = step(f"booting a microVM ({self.spec.accel}, 128 MiB, Debian's kernel, a busybox "
                 "initramfs) on TAP " + self.spec.tap)
        qemu.start(self.spec, self.worker)
        out = qemu.wait_console(self.spec, "fabricd-guest: up", 120)
        done(t, f"its init says {out.strip().splitlines()[-1]!r} (address by DHCP from the "
                "gateway)")
        t = step("client fetches http://vm-1/cgi-bin/resolve?client: the guest resolves a "
                 "name through the fabric")
        got = sb.run(client, "curl", "-sS", "--max-time", "10",
                     "http://vm-1/cgi-bin/resolve?client").stdout.strip()
        done(t, f"the guest says client is {got}")
        t = step("pausing the VM (QMP stop) and marking it ready: service vm-web is dormant")
        qemu.pause(self.spec)
        d.cli("ready", "shop/vm-1")
        done(t)
        t = step("client calls http://vm-web/ -- the fabric holds the SYN and runs on_activate "
                 "(QMP cont)")
        c0 = time.monotonic()
        body = sb.run(client, "curl", "-sS", "--max-time", "30", "http://vm-web/",
                      timeout=40).stdout.strip()
        c1 = time.monotonic()
        with open(self.stamps) as f:
            resume = [json.loads(line) for line in f if '"resume"' in line][-1]
        done(t, f"{body!r} in {(c1 - c0) * 1000:.0f} ms (curl's whole run); the hook had "
                f"the VM running {(resume['done'] - c0) * 1000:.0f} ms after curl started")

    def close(self) -> None:
        qemu.stop(self.spec)
        qemu.delete_tap(self.spec.tap, self.worker)


def plan(sb: Sandbox, worker: str) -> MicroVMStep | None:
    """The step, with its TAP made, or None after saying why it is skipped."""
    mode = os.environ.get("FABRICD_DEMO_MICROVM", "auto")
    if mode == "off":
        print("==> microVM step skipped (FABRICD_DEMO_MICROVM=off)")
        return None
    why = qemu.missing()
    kernel = find_kernel()
    if why is not None or kernel is None:
        print(f"==> microVM step skipped: {why}")
        return None
    initrd = os.path.join(sb.tmp, "guest.cpio.gz")
    build(initrd, kernel)
    accel = "tcg" if mode == "tcg" else "kvm"
    if mode != "tcg":
        print("==> checking whether KVM runs a guest here (a test boot, cached)", flush=True)
        why = qemu.kvm_works(kernel.vmlinuz, initrd)
        if why is not None:
            print(f"==> microVM step skipped: {why}; FABRICD_DEMO_MICROVM=tcg runs it "
                  "emulated (slower)")
            return None
    spec = qemu.VMSpec(name="vm-1", dir=os.path.join(sb.tmp, "vm-1"),
                       tap=f"tap-{sb.run_id}", mac="02:00:0a:4d:00:28", kernel=kernel.vmlinuz,
                       initrd=initrd, accel=accel)
    qemu.make_tap(spec.tap, worker)
    return MicroVMStep(spec, worker, os.path.join(sb.tmp, "vm-stamps.jsonl"))
