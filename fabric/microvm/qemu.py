"""Launch, pause, resume, snapshot and restore a microVM with Debian's qemu-system-x86.

A VM is described by a `VMSpec` kept as `vm.json` in its directory (with its QMP socket,
console log, pid file and snapshot), so that another process (a service's `on_idle` /
`on_activate` hook: `python -m fabric.microvm.ctl`) can act on it. QEMU daemonizes: it
outlives whoever started it, and is found again through its pid file.

The network is a TAP made beforehand (`ip tuntap add ... vnet_hdr`, persistent, so it
survives QEMU exiting for a snapshot) that the fabric attaches as an `interface:` pod;
QEMU opens it with `vnet_hdr=on,vhost=off` and the virtio-net device offers checksum and
TSO offloads, so large segments cross the TAP unsegmented.

Snapshots: QMP `migrate` to `exec:cat > FILE` of the stopped VM, then `quit` (the VM's
memory is freed while it sleeps); restore starts a new QEMU with `-incoming "exec:cat
FILE"` and `-S`, waits until the state is loaded, then `cont`. (QEMU 7.2 has no
`file:` migration URI; savevm/loadvm need a qcow2 disk this VM does not have, and keep
the process and its memory.) It works the same with TCG and KVM.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

from fabric.microvm.qmp import QMP, QMPError

QEMU = "qemu-system-x86_64"
SPEC_FILE = "vm.json"


@dataclass(frozen=True)
class VMSpec:
    """One microVM: its files live in `dir`."""

    name: str
    dir: str
    tap: str
    mac: str
    kernel: str
    initrd: str
    accel: str = "tcg"  # "tcg" or "kvm"
    memory_mb: int = 128
    cpus: int = 1
    append: str = "console=ttyS0 quiet panic=-1"

    @property
    def qmp(self) -> str:
        return os.path.join(self.dir, "qmp.sock")

    @property
    def console(self) -> str:
        return os.path.join(self.dir, "console.log")

    @property
    def pidfile(self) -> str:
        return os.path.join(self.dir, "qemu.pid")

    @property
    def snapshot(self) -> str:
        return os.path.join(self.dir, "snapshot.bin")

    def save(self) -> None:
        with open(os.path.join(self.dir, SPEC_FILE), "w") as f:
            json.dump(dataclasses.asdict(self), f)

    @classmethod
    def load(cls, vm_dir: str) -> VMSpec:
        with open(os.path.join(vm_dir, SPEC_FILE)) as f:
            return cls(**json.load(f))


def argv(spec: VMSpec, incoming: str | None = None) -> list[str]:
    """QEMU's command line for the VM (with `incoming`: restore from that URI, paused)."""
    cpu = ["-cpu", "host,-arch-capabilities"] if spec.accel == "kvm" else []
    a = [QEMU, "-name", spec.name, "-accel", spec.accel, *cpu, "-M", "q35",
         "-m", str(spec.memory_mb), "-smp", str(spec.cpus),
         "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
         "-serial", f"file:{spec.console}",
         "-kernel", spec.kernel, "-initrd", spec.initrd, "-append", spec.append,
         "-netdev", f"tap,id=n0,ifname={spec.tap},script=no,downscript=no,vhost=off,"
                    "vnet_hdr=on",
         "-device", f"virtio-net-pci,netdev=n0,mac={spec.mac},csum=on,guest_csum=on,"
                    "gso=on,host_tso4=on,host_tso6=on,guest_tso4=on,guest_tso6=on",
         "-qmp", f"unix:{spec.qmp},server=on,wait=off",
         "-pidfile", spec.pidfile, "-daemonize"]
    if incoming is not None:
        a += ["-S", "-incoming", incoming]
    return a


def make_tap(name: str, netns: str | None = None) -> None:
    """A persistent TAP with a virtio-net header, up, for QEMU to open by name."""
    pre = ["ip", "netns", "exec", netns] if netns else []
    _run([*pre, "ip", "tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"])
    _run([*pre, "ip", "link", "set", name, "up"])


def delete_tap(name: str, netns: str | None = None) -> None:
    pre = ["ip", "netns", "exec", netns] if netns else []
    subprocess.run([*pre, "ip", "link", "del", name], capture_output=True, timeout=10)


def _run(cmd: list[str], timeout: float = 30.0) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {(p.stderr or p.stdout).strip()}")


def pid(spec: VMSpec) -> int | None:
    """The running QEMU's pid, from its pid file (None when it is not running)."""
    try:
        with open(spec.pidfile) as f:
            p = int(f.read().strip())
        os.kill(p, 0)
        return p
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None


def start(spec: VMSpec, netns: str | None = None, incoming: str | None = None) -> None:
    """Start QEMU (daemonized, in `netns` if given, where the TAP is); returns once its
    QMP socket is listening."""
    os.makedirs(spec.dir, exist_ok=True)
    spec.save()
    for path in (spec.qmp, spec.pidfile):
        if os.path.exists(path):
            os.unlink(path)
    pre = ["ip", "netns", "exec", netns] if netns else []
    _run([*pre, *argv(spec, incoming)], timeout=60)
    with QMP(spec.qmp) as q:  # -daemonize returns after the socket listens
        q.status()


def wait_console(spec: VMSpec, text: str, timeout: float) -> str:
    """Wait for `text` on the serial console (the guest says "fabricd-guest: up IP")."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        try:
            with open(spec.console, errors="replace") as f:
                out = f.read()
        except FileNotFoundError:
            out = ""
        if text in out:
            return out
        # (its pid file may lag its start by a moment)
        if pid(spec) is None and time.monotonic() - started > 2:
            raise RuntimeError(f"VM {spec.name}: QEMU exited; console: {out[-500:]!r}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"VM {spec.name}: no {text!r} on the console within "
                               f"{timeout:.0f} s; console: {out[-500:]!r}")
        time.sleep(0.1)


def pause(spec: VMSpec) -> None:
    with QMP(spec.qmp) as q:
        q.cmd("stop")


def resume(spec: VMSpec) -> None:
    """`cont`, and return once QEMU says the VM runs."""
    with QMP(spec.qmp) as q:
        q.cmd("cont")
        status = q.status()
        if status != "running":
            raise QMPError(f"VM {spec.name}: {status} after cont")


def snapshot(spec: VMSpec, timeout: float = 60.0) -> int:
    """Stop the VM, write its state to `spec.snapshot`, quit QEMU; returns the bytes."""
    tmp = spec.snapshot + ".tmp"
    with QMP(spec.qmp, timeout=timeout) as q:
        q.cmd("stop")
        q.cmd("migrate", uri=f"exec:cat > {_quote(tmp)}")
        deadline = time.monotonic() + timeout
        while True:
            info = q.cmd("query-migrate")
            state = info.get("status")
            if state == "completed":
                break
            if state in ("failed", "cancelled") or time.monotonic() > deadline:
                raise QMPError(f"VM {spec.name}: snapshot {state}: "
                               f"{info.get('error-desc', 'timed out')}")
            time.sleep(0.01)
        os.replace(tmp, spec.snapshot)
        p = pid(spec)
        try:
            q.cmd("quit")
        except QMPError:
            pass  # it quit before answering
    _wait_gone(p, timeout)
    return os.path.getsize(spec.snapshot)


def restore(spec: VMSpec, netns: str | None = None, timeout: float = 60.0) -> None:
    """Start a new QEMU from `spec.snapshot` and run it once its state is loaded."""
    if not os.path.exists(spec.snapshot):
        raise RuntimeError(f"VM {spec.name}: no snapshot at {spec.snapshot}")
    if pid(spec) is not None:
        raise RuntimeError(f"VM {spec.name}: QEMU is still running")
    start(spec, netns, incoming=f"exec:cat {_quote(spec.snapshot)}")
    with QMP(spec.qmp, timeout=timeout) as q:
        deadline = time.monotonic() + timeout
        while (status := q.status()) == "inmigrate":
            if time.monotonic() > deadline:
                raise QMPError(f"VM {spec.name}: state not loaded in {timeout:.0f} s")
            time.sleep(0.005)
        if status not in ("paused", "postmigrate", "prelaunch"):
            raise QMPError(f"VM {spec.name}: {status} after loading the snapshot")
        q.cmd("cont")
        if (status := q.status()) != "running":
            raise QMPError(f"VM {spec.name}: {status} after cont")


def stop(spec: VMSpec, timeout: float = 10.0) -> None:
    """Make sure QEMU is gone: `quit` over QMP, then SIGKILL."""
    p = pid(spec)
    if p is None:
        return
    try:
        with QMP(spec.qmp, timeout=2) as q:
            q.cmd("quit")
    except (QMPError, OSError):
        pass
    if not _wait_gone(p, timeout):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_gone(p, 5)


def _wait_gone(p: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while p is not None:
        try:
            os.kill(p, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _quote(path: str) -> str:
    return "'" + path.replace("'", "'\\''") + "'"


def missing() -> str | None:
    """Why a microVM cannot run here (one line), or None."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (Debian qemu-system-x86)"
    from fabric.microvm.initramfs import missing as no_guest

    return no_guest()


def kvm_works(kernel: str, initrd: str, timeout: float = 10.0) -> str | None:
    """None when KVM boots the guest to userspace here; else why not (one line).

    /dev/kvm opening is not enough: under nested virtualization it may create VMs whose
    Linux guest then dies or hangs (see docs/microvm.md), so a guest is booted to its
    init, which powers off at once with `fabricd.probe`. The answer is cached for this
    boot of the machine, kernel and QEMU (in the temp directory)."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError as e:
        return f"/dev/kvm: {e.strerror}"
    key = f"{os.path.basename(kernel)} {_boot_id()} {shutil.which(QEMU)}"
    cache = os.path.join(tempfile.gettempdir(), f"fabricd-kvm-probe-{os.getuid()}.json")
    try:
        with open(cache) as f:
            c = json.load(f)
        if c.get("key") == key:
            return c.get("why")
    except (OSError, ValueError):
        pass
    cmd = [QEMU, "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-M", "q35", "-m",
           "128", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
           "-serial", "stdio", "-kernel", kernel, "-initrd", initrd,
           "-append", "console=ttyS0 quiet panic=-1 fabricd.probe"]
    why: str | None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out = p.stdout + p.stderr
        if "fabricd-guest: probe ok" in out:
            why = None
        else:
            last = [ln for ln in out.strip().splitlines() if ln.strip()][-1:] or ["no output"]
            why = f"KVM did not boot a guest here (QEMU: {last[0].strip()[:120]})"
    except subprocess.TimeoutExpired:
        why = (f"/dev/kvm opens, but a guest under KVM did not reach userspace in "
               f"{timeout:.0f} s (nested virtualization?)")
    try:
        with open(cache, "w") as f:
            json.dump({"key": key, "why": why}, f)
    except OSError:
        pass
    return why


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""
