"""A worker in one file: it launches microVMs with QEMU, hands their TAPs to an
embedded `Fabric`, puts them behind a service, and pauses and resumes them on the
fabric's `idle` and `activate` events.

    sudo ip netns exec WORKER_NS .venv/bin/python examples/worker.py \\
        --namespace shop --cidr 10.44.0.0/24 --vms 2 --netns-pod client=CLIENT_NS

Run it as root in the network namespace the fabric should live in (its TAPs are made
there). Each VM boots Debian's kernel with the project's busybox initramfs (see
docs/microvm.md), gets its address by DHCP from the fabric's gateway, and is paused once
it serves; `--netns-pod NAME=NETNS` attaches a network namespace as a pod too (a client
to try the service from: `curl http://web/`). One JSON object per line on stdout says
what happened (`ready`, `activate`, `woken` with the wake's phases, `idle`); SIGTERM or
Ctrl-C stops the VMs, removes their TAPs and detaches everything.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from fabric import Fabric
from fabric.errors import FabricError
from fabric.microvm import qemu
from fabric.microvm.initramfs import build, find_kernel


def say(**fields: Any) -> None:
    """One line of JSON on stdout: what the worker did, with CLOCK_MONOTONIC times."""
    print(json.dumps(fields), flush=True)


def wake(spec: qemu.VMSpec) -> None:
    """Resume a paused VM, or start it again from its snapshot."""
    if qemu.pid(spec) is None:
        qemu.restore(spec)
    else:
        qemu.resume(spec)


def snapshot(spec: qemu.VMSpec) -> None:
    if qemu.pid(spec) is not None:
        qemu.snapshot(spec)


class Worker:
    """The controller's loop: VMs up and asleep, then wake and sleep on events."""

    def __init__(self, args: argparse.Namespace, fab: Fabric) -> None:
        self.args = args
        self.fab = fab
        self.ns = args.namespace
        self.vms: dict[str, qemu.VMSpec] = {}  # pod name -> VM
        self.taps: list[str] = []
        # per service: the wakes the fabric counted and its phase sums, as last seen
        self._wakes: dict[str, tuple[int, dict[str, float]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        a = self.args
        await self.fab.apply_namespace({"name": self.ns, "cidr": a.cidr})
        for item in a.netns_pod:
            name, _, netns = item.partition("=")
            pod = await self.fab.attach_pod(self.ns, {"name": name, "netns": netns})
            say(event="pod", pod=name, ip=pod["ip"])
        kernel = find_kernel()
        if kernel is None:
            raise SystemExit("worker: no kernel in /boot with modules (linux-image-amd64)")
        os.makedirs(a.dir, exist_ok=True)
        initrd = os.path.join(a.dir, "guest.cpio.gz")
        build(initrd, kernel)
        accel = a.accel
        if accel == "auto":
            accel = "kvm" if qemu.kvm_works(kernel.vmlinuz, initrd) is None else "tcg"
        for i in range(a.vms):
            name = f"vm-{i}"
            mac = "02:fb:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(4))
            tap = f"fbw{os.getpid() % 100000}-{i}"[:15]
            qemu.make_tap(tap)
            self.taps.append(tap)
            # Not ready while it boots; the fabric picks its address, DHCP hands it over.
            pod = await self.fab.attach_pod(self.ns, {"name": name, "interface": tap,
                                                      "mac": mac, "ready": False})
            spec = qemu.VMSpec(name=name, dir=os.path.join(a.dir, name), tap=tap, mac=mac,
                               kernel=kernel.vmlinuz, initrd=initrd, accel=accel,
                               memory_mb=a.memory)
            self.vms[name] = spec
            await asyncio.to_thread(qemu.start, spec)
            say(event="vm", pod=name, ip=pod["ip"], tap=tap, accel=accel, qmp=spec.qmp)
        for name, spec in self.vms.items():
            out = await asyncio.to_thread(qemu.wait_console, spec, "fabricd-guest: up",
                                          a.boot_timeout)
            ip = re.findall(r"fabricd-guest: up (\S+)", out)[-1]
            await asyncio.to_thread(qemu.pause, spec)  # asleep until someone asks
            self.fab.set_ready(self.ns, name, True)
            say(event="booted", pod=name, ip=ip)
        net = ipaddress.ip_network(a.cidr)
        vip = a.service_ip or str(net[-2])
        await self.fab.apply_service(self.ns, {
            "name": "web", "ip": vip, "ports": [{"port": 80}],
            "backends": list(self.vms), "idle_timeout": a.idle})
        say(event="ready", service="web", ip=vip, namespace=self.ns)

    async def run(self) -> None:
        """The loop: `activate` resumes the service's VMs, `idle` pauses them."""
        async for ev in self.fab.events():
            if ev.namespace != self.ns or ev.kind not in ("activate", "idle"):
                continue
            t_event = time.monotonic()
            if ev.kind == "activate":
                await self._each(wake)
                if self.args.snapshot:  # back in the pod table's eyes once it runs
                    for name in self.vms:
                        self.fab.set_ready(self.ns, name, True)
                say(event="activate", service=ev.fields.get("service"), t_event=t_event,
                    t_running=time.monotonic(), reason=ev.fields.get("reason"))
                task = asyncio.create_task(self._report_wake(str(ev.fields.get("service"))))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                if self.args.snapshot:
                    # Not ready while QEMU is gone: the fabric's probes would be lost on a
                    # TAP nobody reads, and wait out their timeout after the restore.
                    for name in self.vms:
                        self.fab.set_ready(self.ns, name, False)
                await self._each(snapshot if self.args.snapshot else qemu.pause)
                say(event="idle", service=ev.fields.get("service"), t_event=t_event,
                    t_asleep=time.monotonic())

    async def _each(self, action: Callable[[qemu.VMSpec], object]) -> None:
        await asyncio.gather(*(asyncio.to_thread(action, spec) for spec in self.vms.values()))

    async def _report_wake(self, service: str, timeout: float = 30.0) -> None:
        """Once the fabric has released the held packets, the wake's phases as it measured
        them (from the first packet that found no ready backend)."""
        before = self._wakes.get(service, (0, {}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            count, phases = await self._wake_metrics(service)
            if count > before[0]:
                self._wakes[service] = (count, phases)
                say(event="woken", service=service, **{
                    f"{p}_ms": round((phases[p] - before[1].get(p, 0.0)) * 1e3, 3)
                    for p in phases})
                return
            await asyncio.sleep(0.01)

    async def _wake_metrics(self, service: str) -> tuple[int, dict[str, float]]:
        count, phases = 0, {}
        for m in await self.fab.metrics():
            for labels, value in m.samples:
                if labels.get("namespace") != self.ns or labels.get("service") != service:
                    continue
                if m.name == "fabric_service_wake_seconds":
                    count = value.count  # type: ignore[union-attr]
                    phases["wake"] = value.sum  # type: ignore[union-attr]
                elif m.name == "fabric_service_wake_phase_seconds":
                    phases[labels["phase"]] = value.sum  # type: ignore[union-attr]
        return count, phases

    def stop_vms(self) -> None:
        for spec in self.vms.values():
            qemu.stop(spec)

    def delete_taps(self) -> None:
        """After the fabric let go of them (leaving `async with Fabric` detaches)."""
        for tap in self.taps:
            qemu.delete_tap(tap)


async def main_async(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    w: Worker | None = None
    try:
        async with Fabric(worker_id="example") as fab:
            w = Worker(args, fab)
            try:
                await w.start()
                runner = asyncio.create_task(w.run())
                await stop.wait()
                runner.cancel()
            finally:
                await asyncio.to_thread(w.stop_vms)
    finally:
        if w is not None:
            w.delete_taps()
    say(event="stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="examples/worker.py", description=__doc__.split("\n")[0])
    p.add_argument("--namespace", default="shop")
    p.add_argument("--cidr", default="10.44.0.0/24")
    p.add_argument("--vms", type=int, default=1)
    p.add_argument("--service-ip", help="default: the CIDR's last host")
    p.add_argument("--idle", default="5s", help="the service's idle_timeout")
    p.add_argument("--netns-pod", action="append", default=[], metavar="NAME=NETNS")
    p.add_argument("--dir", help="for the VMs' files (default: a temporary directory)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("--memory", type=int, default=128, help="MiB per VM")
    p.add_argument("--boot-timeout", type=float, default=120.0)
    p.add_argument("--snapshot", action="store_true",
                   help="sleep in a snapshot file (QEMU exits) instead of paused")
    args = p.parse_args(argv)
    if missing := qemu.missing():
        print(f"worker: {missing}", file=sys.stderr)
        return 1
    args.dir = args.dir or tempfile.mkdtemp(prefix="fabricd-worker-")
    try:
        return asyncio.run(main_async(args))
    except (FabricError, RuntimeError, OSError) as e:
        print(f"worker: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
