"""`python -m fabric.microvm.ctl VM_DIR pause|resume|snapshot|restore|status`: act on a
microVM started by fabric.microvm.qemu, for a service's hooks:

    on_idle:     "/opt/fabricd/bin/python -m fabric.microvm.ctl /run/vms/web pause"
    on_activate: "/opt/fabricd/bin/python -m fabric.microvm.ctl /run/vms/web resume"

(`snapshot` / `restore` for the second mode: the VM's state goes to a file and QEMU
exits; restore starts QEMU again from it, or continues a VM that was only paused.)
`--stamps FILE` appends one JSON line per action with CLOCK_MONOTONIC times (when this
process started its work, when the VM ran again) for the wake's phases. Errors are one
line on stderr, exit 1.
"""

from __future__ import annotations

import argparse
import json
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
    a = p.parse_args(argv)
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
                extra["bytes"] = qemu.snapshot(spec)
        elif a.action == "restore":
            if qemu.pid(spec) is None:
                qemu.restore(spec)
            else:  # paused, never snapshotted (the mode changed): just continue
                qemu.resume(spec)
                extra["resumed"] = True
        else:
            print("not running" if qemu.pid(spec) is None else _status(spec))
            return 0
    except (OSError, ValueError, RuntimeError, QMPError) as e:
        print(f"microvm {a.action}: {e}", file=sys.stderr)
        return 1
    done = time.monotonic()
    if a.stamps:
        with open(a.stamps, "a") as f:
            f.write(json.dumps({"action": a.action, "process": T0, "started": started,
                                "done": done, **extra}) + "\n")
    return 0


def _status(spec: qemu.VMSpec) -> str:
    from fabric.microvm.qmp import QMP

    with QMP(spec.qmp) as q:
        return q.status()


if __name__ == "__main__":
    sys.exit(main())
