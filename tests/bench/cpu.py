"""CPU time of a process per thread, from /proc (the namespaces share the PID space, so
the benchmark can read the daemon's and dnsmasq's counters from outside).

    with ThreadCpu(pid) as cpu:
        ...  # the measurement
    cpu.busiest()  # [("fabric-dataplane", 97.1, 30.2), ("MainThread", 40.3, 12.0)]

Python threads all carry the process's name in /proc, so for Python processes the
thread names come from `py-spy dump` (in the venv) when it is there; otherwise a thread
is called by its name in /proc and its id. Threads of the same name are summed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")
_names: dict[int, dict[int, str]] = {}  # pid -> tid -> Python thread name


def thread_ticks(pid: int) -> dict[int, tuple[str, int, int]]:
    """(comm, user ticks, system ticks) per thread id of a process; {} if it is gone."""
    out: dict[int, tuple[str, int, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # comm is in parentheses and may contain spaces: split after the last ')'
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(tid)] = (comm, int(fields[11]), int(fields[12]))
    return out


def _py_spy() -> str | None:
    exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return exe if os.path.exists(exe) else shutil.which("py-spy")


def python_thread_names(pid: int) -> dict[int, str]:
    """Thread id -> Python thread name, from `py-spy dump` ({} without py-spy)."""
    exe = _py_spy()
    if exe is None:
        return {}
    try:
        out = subprocess.run([exe, "dump", "--pid", str(pid)], capture_output=True,
                             text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {int(t): n for t, n in re.findall(r'^Thread (\d+) \([^)]*\): "([^"]*)"', out, re.M)}


class ThreadCpu:
    """Per-thread CPU use (in % of one CPU) of a process over a `with` block."""

    def __init__(self, pid: int | None, python: bool = True) -> None:
        self.pid = pid
        self.python = python
        self.percent: dict[str, float] = {}
        self.system_percent: dict[str, float] = {}
        self._t0 = 0.0
        self._before: dict[int, tuple[str, int, int]] = {}

    def __enter__(self) -> ThreadCpu:
        self._before = thread_ticks(self.pid) if self.pid else {}
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.pid:
            return
        after = thread_ticks(self.pid)
        wall = max(time.monotonic() - self._t0, 1e-9)
        busy = {tid: (comm, u - self._before.get(tid, (comm, 0, 0))[1],
                      s - self._before.get(tid, (comm, 0, 0))[2])
                for tid, (comm, u, s) in after.items()}
        names = _names.setdefault(self.pid, {})
        if self.python and any(tid not in names and u + s for tid, (_, u, s) in busy.items()):
            names.update(python_thread_names(self.pid))
        for tid, (comm, u, s) in busy.items():
            name = names.get(tid) or (comm if tid == self.pid else f"{comm}/{tid}")
            self.percent[name] = self.percent.get(name, 0.0) + (u + s) / _TICK / wall * 100
            self.system_percent[name] = self.system_percent.get(name, 0.0) + s / _TICK / wall * 100

    @property
    def total(self) -> float:
        return sum(self.percent.values())

    def busiest(self, n: int = 4) -> list[tuple[str, float, float]]:
        """The n busiest threads: (name, % CPU, of which % in the kernel)."""
        top = sorted(self.percent.items(), key=lambda kv: -kv[1])[:n]
        return [(k, v, self.system_percent.get(k, 0.0)) for k, v in top if v >= 0.5]
