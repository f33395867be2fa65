"""Driving a campaign from the test's side: the hostile tools in a namespace and their
JSON output, pings, and a watch on the daemon's memory and descriptors while it runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from fabric.tools.sandbox import Daemon, Sandbox
from tests.support.procstat import Sample, fd_count, sample, tracebacks
from tests.support.procstat import table as sample_table

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1024  # in KiB, as /proc counts
SEED = int(os.environ.get("FABRICD_CAMPAIGN_SEED", "20261201"))
# Bounds on the daemon while a campaign runs (stated in docs/reliability.md).
RSS_GROWTH_KIB = 48 * MiB
FD_GROWTH = 8  # after the campaign, once its connections are gone
PROBE_POOL = 32  # sockets a namespace with services keeps for readiness probes
_PING = re.compile(r"(\d+) packets transmitted, (\d+) received")
_RTT = re.compile(r"time=([\d.]+) ms")



def tool(sb: Sandbox, ns: str, *args: str) -> subprocess.Popen[str]:
    """tests.support.hostile in a namespace (its output: JSON lines)."""
    return sb.popen(ns, sys.executable, "-m", "tests.support.hostile", *args, text=True,
                    cwd=ROOT)


def first_line(p: subprocess.Popen[str], timeout: float = 20.0) -> dict[str, Any]:
    assert p.stdout is not None
    ready: list[str] = []
    t = threading.Thread(target=lambda: ready.append(p.stdout.readline()))  # type: ignore
    t.start()
    t.join(timeout)
    if not ready or not ready[0].strip():
        raise AssertionError(f"no first line from {p.args}: {p.stderr.read() if p.stderr else ''}")
    return json.loads(ready[0])


def finish(p: subprocess.Popen[str], timeout: float = 60.0) -> dict[str, Any]:
    """What a tool said after its first line, merged (the last line is its summary)."""
    out, err = p.communicate(timeout=timeout)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert p.returncode == 0 and lines, f"{p.args} exited {p.returncode}: {err[-2000:]}"
    merged: dict[str, Any] = {}
    for ln in lines:
        merged.update(json.loads(ln))
    return merged






def ping_result(out: str) -> tuple[int, int, float | None]:
    """(sent, received, median RTT in ms) from ping's output."""
    m = _PING.search(out)
    rtts = sorted(float(x) for x in _RTT.findall(out))
    med = rtts[len(rtts) // 2] if rtts else None
    return (int(m.group(1)), int(m.group(2)), med) if m else (0, 0, med)


def background_ping(sb: Sandbox, ns: str, ip: str, seconds: float,
                    interval: str = "0.02") -> subprocess.Popen[str]:
    return sb.popen(ns, "ping", "-n", "-i", interval, "-W", "1", "-w", str(int(seconds)), ip,
                    text=True)


class Watch:
    """The daemon's RSS and fds, sampled from a thread while a campaign runs."""

    def __init__(self, d: Daemon, every: float = 0.5) -> None:
        assert d.proc is not None
        self.d = d
        self.pid = d.proc.pid
        self.t0 = time.monotonic()
        self.start = sample(self.pid, self.t0)
        self.samples: list[Sample] = [self.start]
        self._stop = threading.Event()
        self._every = every
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.samples.append(sample(self.pid, self.t0))

    def stop(self) -> Watch:
        self._stop.set()
        self._thread.join()
        self.samples.append(sample(self.pid, self.t0))
        return self

    @property
    def peak_rss(self) -> int:
        return max(s.rss_kib for s in self.samples)

    @property
    def peak_fds(self) -> int:
        return max(s.fds for s in self.samples)

    def report(self, label: str) -> str:
        end = self.samples[-1]
        return (f"{label}: RSS {self.start.rss_kib / MiB:.1f} -> peak {self.peak_rss / MiB:.1f}"
                f" -> {end.rss_kib / MiB:.1f} MiB; fds {self.start.fds} -> peak "
                f"{self.peak_fds} -> {end.fds}")


def wait_until(cond: Callable[[], Any], timeout: float) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def settle_fds(pid: int, bound: int, timeout: float = 15.0) -> int:
    """Wait for the daemon's fds to come back under `bound`; the count at the end."""
    deadline = time.monotonic() + timeout
    n = fd_count(pid)
    while n > bound and time.monotonic() < deadline:
        time.sleep(0.25)
        n = fd_count(pid)
    return n


def assert_healthy(*daemons: Daemon) -> None:
    for d in daemons:
        assert d.proc is not None and d.proc.poll() is None, \
            f"fabricd exited with {d.proc and d.proc.returncode}:\n{d.log()[-3000:]}"
        tb = tracebacks(d.log())
        assert not tb, f"traceback in the log of {d.dir}: {tb[:3]}\n{d.log()[-3000:]}"


def assert_bounded(w: Watch, rss_growth: int = RSS_GROWTH_KIB) -> None:
    assert w.peak_rss - w.start.rss_kib <= rss_growth, \
        w.report("RSS grew too much") + "\n" + sample_table(w.samples)


def seed_for(name: str) -> int:
    seed = SEED + sum(map(ord, name))
    print(f"\n[{name}] seed {seed} (FABRICD_CAMPAIGN_SEED={SEED})")
    return seed


