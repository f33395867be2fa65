"""`python -m fabric.microvm.ctl VM_DIR pause|resume|snapshot|restore|status`: act on a
microVM started by fabric.microvm.qemu, for a service's hooks:

    on_idle:     "/opt/fabricd/bin/python -m fabric.microvm.ctl /run/vms/web pause"
    on_activate: "/opt/fabricd/bin/python -m fabric.microvm.ctl /run/vms/web resume"

(`snapshot` / `restore` for the second mode: the VM's state goes to a file and QEMU
exits; restore starts QEMU again from it, or continues a VM that was only paused.)
With `--control SOCKET --pod NS/POD`, `snapshot` marks the pod not ready (through the
daemon's control API) before QEMU goes, and `restore` marks it ready once it runs: the
fabric's probes are not sent to a TAP nobody reads, where they would be lost and wait
out their timeout (1 s) after the restore.
`--stamps FILE` appends one JSON line per action with CLOCK_MONOTONIC times (when this
process started its work, when the VM ran again) for the wake's phases. Errors are one
line on stderr, exit 1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time

T0 = time.monotonic()  # as early as this process can tell

from fabric.microvm import qemu  # noqa: E402
from fabric.microvm.qmp import QMPError  # noqa: E402

ACTIONS = ("pause", "resume", "snapshot", "restore", "status")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fabric.microvm.ctl",
                                description="Pause, resume, snapshot or restore a microVM.")
    p.add_argument("vm_dir", help="the VM's directory (with vm.json, qmp.sock)")
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("--stamps", help="append the action's monotonic times to this file")
    p.add_argument("--control", help="the daemon's control socket (with --pod)")
    p.add_argument("--pod", metavar="NS/POD", help="the VM's pod, marked not ready while "
                   "it sleeps in a snapshot")
    a = p.parse_args(argv)
    if (a.control is None) != (a.pod is None) or (a.pod and a.pod.count("/") != 1):
        p.error("--control and --pod NS/POD go together")
    started = time.monotonic()
    try:
        spec = qemu.VMSpec.load(a.vm_dir)
        extra: dict[str, object] = {}
        if a.action == "pause":
            qemu.pause(spec)
        elif a.action == "resume":
            qemu.resume(spec)
        elif a.action == "snapshot":
            if qemu.pid(spec) is not None:  # else it sleeps in its snapshot already
                if a.pod:
                    set_ready(a.control, a.pod, False)
                extra["bytes"] = qemu.snapshot(spec)
        elif a.action == "restore":
            if qemu.pid(spec) is None:
                qemu.restore(spec)
            else:  # paused, never snapshotted (the mode changed): just continue
                qemu.resume(spec)
                extra["resumed"] = True
            if a.pod:
                set_ready(a.control, a.pod, True)
        else:
            print("not running" if qemu.pid(spec) is None else _status(spec))
            return 0
    except (OSError, ValueError, TypeError, RuntimeError, QMPError) as e:
        print(f"microvm {a.action}: {e}", file=sys.stderr)
        return 1
    done = time.monotonic()
    if a.stamps:
        with open(a.stamps, "a") as f:
            f.write(json.dumps({"action": a.action, "process": T0, "started": started,
                                "done": done, **extra}) + "\n")
    return 0


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.path)


def set_ready(control: str, pod: str, ready: bool) -> None:
    """PUT /v1/namespaces/NS/pods/POD/ready on the daemon's control socket."""
    ns, name = pod.split("/")
    c = _UnixHTTP(control)
    try:
        c.request("PUT", f"/v1/namespaces/{ns}/pods/{name}/ready",
                  json.dumps({"ready": ready}), {"Content-Type": "application/json"})
        r = c.getresponse()
        body = r.read().decode(errors="replace")
        if r.status != 200:
            raise RuntimeError(f"marking {pod} {'ready' if ready else 'not ready'}: "
                               f"{r.status} {body.strip()[:200]}")
    finally:
        c.close()


def _status(spec: qemu.VMSpec) -> str:
    from fabric.microvm.qmp import QMP

    with QMP(spec.qmp) as q:
        return q.status()


if __name__ == "__main__":
    sys.exit(main())
