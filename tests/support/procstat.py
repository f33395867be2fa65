"""What the campaigns, the soak and the benchmarks read about a running daemon: its
resident memory and open descriptors from /proc, its counters from /metrics, and whether
its log shows a traceback."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any


def rss_kib(pid: int) -> int:
    """VmRSS of the process in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def fd_count(pid: int) -> int:
    """Open descriptors of the process (0 if it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


@dataclass(frozen=True)
class Sample:
    """One reading of the daemon: seconds since the start, RSS in KiB, open fds."""

    t: float
    rss_kib: int
    fds: int


def sample(pid: int, t0: float) -> Sample:
    return Sample(round(time.monotonic() - t0, 1), rss_kib(pid), fd_count(pid))


class Metrics:
    """A /metrics scrape: `get(name, **labels)` sums the samples whose labels match."""

    def __init__(self, text: str) -> None:
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            name, _, rest = head.partition("{")
            labels: dict[str, str] = {}
            for part in _split_labels(rest.rstrip("}")):
                k, _, v = part.partition("=")
                labels[k] = v.strip('"')
            try:
                self.samples.append((name, labels, float(value)))
            except ValueError:
                continue

    def get(self, name: str, **labels: str) -> float:
        return sum(v for n, lab, v in self.samples
                   if n == name and all(lab.get(k) == want for k, want in labels.items()))

    def tunnel(self) -> dict[str, float]:
        """The tunnel's drops by reason and its events by event, as one dict (no name is
        both a reason and an event)."""
        return {**self.by("fabric_tunnel_drops_total", "reason"),
                **self.by("fabric_tunnel_events_total", "event")}

    def by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """Samples of `name` summed by the value of `label`."""
        out: dict[str, float] = {}
        for n, lab, v in self.samples:
            if n == name and all(lab.get(k) == want for k, want in labels.items()):
                key = lab.get(label, "")
                out[key] = out.get(key, 0.0) + v
        return out


def _split_labels(text: str) -> list[str]:
    parts, cur, quoted, esc = [], "", False, False
    for ch in text:
        if esc:
            cur += ch
            esc = False
        elif ch == "\\":
            cur += ch
            esc = True
        elif ch == '"':
            cur += ch
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    return parts


def scrape(control: str) -> Metrics:
    from fabric.control.client import ControlClient

    with ControlClient(control) as c:
        return Metrics(c.get_text("/metrics"))


def diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """What grew between two `Metrics.by` readings (only the keys that did)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v > before.get(k, 0.0)}


def tracebacks(log: str) -> list[str]:
    """The lines of a daemon log that start a Python traceback (with the line before)."""
    lines = log.splitlines()
    return [" | ".join(lines[max(0, i - 1):i + 1]) for i, ln in enumerate(lines)
            if "Traceback" in ln]


def table(samples: list[Sample]) -> str:
    rows = ["     t s    RSS MiB    fds"]
    for s in samples:
        rows.append(f"  {s.t:7.1f}  {s.rss_kib / 1024:9.1f}  {s.fds:5d}")
    return "\n".join(rows)


def describe(d: Any) -> str:
    """A daemon's pid, RSS and fds for a failure message."""
    pid = d.proc.pid if d.proc is not None else 0
    return f"pid {pid} rss {rss_kib(pid) / 1024:.1f} MiB fds {fd_count(pid)}"
