"""A microVM on a sandbox's worker namespace, for the e2e tests and the bench: the
guest's initramfs built once per run, a persistent TAP, QEMU daemonized in the worker's
namespace, and its removal (QEMU, TAP) also on failure."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fabric.microvm import qemu
from fabric.microvm.initramfs import build, find_kernel
from fabric.tools.sandbox import Sandbox

WORKER = Path(__file__).resolve().parents[2] / "examples" / "worker.py"
BOOT_TIMEOUT = 120.0  # TCG on a busy 2-core machine: ~8 s alone, several times that loaded


def skip_reason() -> str | None:
    return qemu.missing()


def accel(initrd: str) -> str:
    """kvm where a guest runs under it, else tcg (FABRICD_MICROVM_ACCEL forces one)."""
    forced = os.environ.get("FABRICD_MICROVM_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    kernel = find_kernel()
    assert kernel is not None
    return "kvm" if qemu.kvm_works(kernel.vmlinuz, initrd) is None else "tcg"


def guest_initrd(sb: Sandbox) -> str:
    kernel = find_kernel()
    assert kernel is not None
    path = os.path.join(sb.tmp, "guest.cpio.gz")
    if not os.path.exists(path):
        build(path, kernel)
    return path


def mac_for(ip: str) -> str:
    return "02:00:" + ":".join(f"{int(x):02x}" for x in ip.split("."))


@dataclass
class VM:
    spec: qemu.VMSpec
    ip: str
    netns: str  # where QEMU and its TAP are (the fabric worker's namespace)

    def ctl(self, action: str, stamps: str | None = None) -> list[str]:
        """The hook command that acts on this VM (fabric.microvm.ctl)."""
        cmd = [sys.executable, "-m", "fabric.microvm.ctl", self.spec.dir, action]
        return cmd + (["--stamps", stamps] if stamps else [])

    def status(self) -> str:
        if qemu.pid(self.spec) is None:
            return "not running"
        from fabric.microvm.qmp import QMP

        with QMP(self.spec.qmp) as q:
            return q.status()


def vm_spec(sb: Sandbox, name: str, ip: str, initrd: str, accel_: str) -> qemu.VMSpec:
    kernel = find_kernel()
    assert kernel is not None
    return qemu.VMSpec(name=name, dir=os.path.join(sb.tmp, f"vm-{name}"),
                       tap=f"tap{sb.run_id}{name[-3:]}"[:15], mac=mac_for(ip),
                       kernel=kernel.vmlinuz, initrd=initrd, accel=accel_)


@contextmanager
def microvm_tap(sb: Sandbox, netns: str, spec: qemu.VMSpec) -> Iterator[None]:
    """The VM's TAP, made before the fabric attaches it; removed with QEMU afterwards."""
    qemu.make_tap(spec.tap, netns)
    try:
        yield
    finally:
        qemu.stop(spec)
        qemu.delete_tap(spec.tap, netns)


def boot(vm: VM, timeout: float = BOOT_TIMEOUT) -> float:
    """Start QEMU and wait for the guest to say it has its lease; returns the seconds."""
    t0 = time.monotonic()
    qemu.start(vm.spec, vm.netns)
    out = qemu.wait_console(vm.spec, "fabricd-guest: up", timeout)
    m = re.search(r"fabricd-guest: up (\S+)", out)
    if not m or m.group(1) != vm.ip:
        raise RuntimeError(f"VM {vm.spec.name}: booted without its lease: {out[-400:]!r}")
    return time.monotonic() - t0


# A client run inside a pod's netns: one HTTP GET with its times on CLOCK_MONOTONIC (one
# clock for the whole machine, so they compare with the hooks' stamps).
GET = r"""
import json, socket, sys, time
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
addr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
t0 = time.monotonic()  # the name resolved first: from here on it is the wake
s = socket.create_connection(addr, 60)
t1 = time.monotonic()
s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
first = s.recv(65536)
t2 = time.monotonic()
data = first
while (c := s.recv(65536)):
    data += c
body = data.split(b"\r\n\r\n", 1)[1].decode(errors="replace")
print(json.dumps({"start": t0, "connected": t1, "first_byte": t2, "body": body}))
"""

# Sends bytes for `seconds` to host:port, half-closes, waits for the receiver to close:
# the rate of what the receiver took (busybox nc into /dev/null on both kinds of pods).
SEND = r"""
import json, socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
buf = b"\0" * 262144
s = socket.create_connection((host, port), 30)
n = 0
t0 = time.monotonic()
while time.monotonic() - t0 < seconds:
    n += s.send(buf)
s.shutdown(socket.SHUT_WR)
s.settimeout(60)
while s.recv(65536):
    pass
print(json.dumps({"bytes": n, "seconds": time.monotonic() - t0}))
"""


def http_get(sb: Sandbox, ns: str, host: str, path: str = "/", port: int = 80,
             timeout: float = 90.0) -> dict[str, object]:
    out = sb.run(ns, sys.executable, "-c", GET, host, str(port), path, timeout=timeout).stdout
    result = json.loads(out)
    assert isinstance(result, dict)
    return result


def send_rate(sb: Sandbox, ns: str, host: str, port: int, seconds: float) -> float:
    """Bits per second from a pod to host:port (a receiver that drops what it gets)."""
    out = sb.run(ns, sys.executable, "-c", SEND, host, str(port), str(seconds),
                 timeout=seconds + 90).stdout
    r = json.loads(out)
    return float(r["bytes"]) * 8 / float(r["seconds"])


def free_port_sink(sb: Sandbox, ns: str, port: int) -> None:
    """busybox nc listening in `ns`, into /dev/null, again after each connection."""
    sb.popen(ns, "sh", "-c", f"while true; do busybox nc -l -p {port} >/dev/null; done")
    sb.wait_port(ns, port)


def stamps(path: str) -> list[dict[str, float]]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


class Lines:
    """The worker's JSON lines, read from its stdout's fd as they come (no buffered file
    object: select() would not see lines already buffered)."""

    def __init__(self, p: subprocess.Popen[bytes], log: str) -> None:
        self.p = p
        self.log = log
        self.seen: list[dict[str, Any]] = []
        self.used = 0  # seen[:used] were returned or passed over by wait()
        self._buf = b""

    def _read(self, timeout: float) -> bool:
        assert self.p.stdout is not None
        fd = self.p.stdout.fileno()
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            return self.p.poll() is None
        chunk = os.read(fd, 65536)
        if not chunk:
            return False
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        self.seen.extend(json.loads(line) for line in lines if line.strip())
        return True

    def wait(self, event: str, timeout: float = 120.0) -> dict[str, Any]:
        """The next `event` line after the last one returned (earlier others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(self.used, len(self.seen)):
                if self.seen[i]["event"] == event:
                    self.used = i + 1
                    return self.seen[i]
            if time.monotonic() > deadline or not self._read(0.2):
                break
        with open(self.log) as f:
            err = f.read()
        raise AssertionError(f"no {event!r} from the worker: {self.seen} {err[-2000:]}")


def start_worker(sb: Sandbox, worker: str, client: str, ns: str, cidr: str, vm_dir: str,
                 idle: str, *extra: str) -> Lines:
    """examples/worker.py in `worker`'s namespace with one VM and `client` as a pod."""
    log_path = os.path.join(sb.tmp, "worker.log")
    with open(log_path, "w") as log:  # a file: a pipe nobody reads would block its logging
        p = sb.popen(worker, sys.executable, str(WORKER), "--namespace", ns, "--cidr", cidr,
                     "--vms", "1", "--idle", idle, "--netns-pod", f"client={client}",
                     "--dir", vm_dir, *extra, stderr=log)
    return Lines(p, log_path)
