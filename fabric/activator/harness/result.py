"""What a replay found (Result), when its backend is ready (Ready), and bad input
(HarnessError): the types the harness's callers see."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from fabric.activator.harness import timeline as tl

#: A count action whose name ends so is a request the guest answered itself.
LOCAL_ANSWER_SUFFIX = "_answered"


class HarnessError(ValueError):
    """Bad input (a file, the port, the config): one line, exit status 2."""


@dataclass
class Ready:
    """When the simulated backend becomes ready: at a time, after the first wake, never."""

    at: float | None = None
    after_wake: float | None = None
    gone_at: float | None = None  # the backend goes away (scaled to zero) then

    @classmethod
    def parse(cls, text: str | float | None) -> Ready:
        if text is None or text == "never":
            return cls()
        if isinstance(text, int | float):
            return cls(at=float(text))
        s = str(text).strip()
        try:
            if s.startswith("wake+"):
                return cls(after_wake=_seconds(s[5:]))
            if s == "wake":
                return cls(after_wake=0.0)
            return cls(at=_seconds(s))
        except ValueError:
            raise HarnessError(f"--backend-ready-at {text!r}: want SECONDS, wake+SECONDS "
                               "or never") from None


def _seconds(s: str) -> float:
    v = float(s)
    if not math.isfinite(v) or v < 0:
        raise ValueError(s)
    return v


@dataclass
class Result:
    """What a replay did; ``records`` is the timeline."""

    wasm: str
    pcap: str
    port: int
    mode: str  # "packet" or "stream"
    records: list[tl.Record]
    need_history: list[tuple[float, str]]  # (time, level) at every change
    counters: dict[str, int]  # the guest's own (count actions)
    failures: list[dict[str, Any]]  # the host's last_failure of every failed call
    woke: bool
    wake_at: float | None
    backend_ready_at: float | None
    backend_gone_at: float | None
    to_clients: dict[int, bytes]  # per stream: every byte the client received
    host_stats: dict[str, int]
    core_counters: dict[str, int]
    packets: int  # capture packets read
    connections: int  # TCP connections to the port (stream mode)
    max_fuel: int  # the most one call used
    problems: list[str] = field(default_factory=list)  # unmet expectations

    @property
    def text(self) -> str:
        return tl.render(self.records)

    @property
    def final_need(self) -> str:
        return self.need_history[-1][1] if self.need_history else "none"

    @property
    def local_answers(self) -> int:
        return sum(n for k, n in self.counters.items() if k.endswith(LOCAL_ANSWER_SUFFIX))

    @property
    def ok(self) -> bool:
        return not self.failures and not self.problems

    def failure_line(self) -> str | None:
        """One line for people: the first failure of the guest, or the first unmet
        expectation; None when the replay passed."""
        if self.failures:
            f = self.failures[0]
            where = f" at {' <- '.join(f['frames'])}" if f.get("frames") else ""
            more = f" (+{len(self.failures) - 1} more failures)" if len(self.failures) > 1 else ""
            return (f"{f['reason']} at {f['t_ms']:.3f} ms during {f['during']}: "
                    f"{f['message']}{where}; fuel used {f['fuel_used']}; events "
                    f"{f['events'] or 'none'}{more}")
        if self.problems:
            return "expectation not met: " + self.problems[0]
        return None

    def summary(self) -> dict[str, Any]:
        return {"wasm": self.wasm, "pcap": self.pcap, "port": self.port, "mode": self.mode,
                "packets": self.packets, "connections": self.connections,
                "failures": self.failures, "traps": self.host_stats.get("traps", 0),
                "fuel_used": self.host_stats.get("fuel_used", 0),
                "max_fuel_per_call": self.max_fuel, "calls": self.host_stats.get("calls", 0),
                "need_history": [{"t_ms": round(t * 1000, 3), "need": n}
                                 for t, n in self.need_history],
                "final_need": self.final_need, "woke": self.woke,
                "wake_at_ms": None if self.wake_at is None else round(self.wake_at * 1000, 3),
                "backend_ready_at_ms": (None if self.backend_ready_at is None
                                        else round(self.backend_ready_at * 1000, 3)),
                "backend_gone_at_ms": (None if self.backend_gone_at is None
                                       else round(self.backend_gone_at * 1000, 3)),
                "counters": dict(sorted(self.counters.items())),
                "local_answers": self.local_answers,
                "bytes_to_clients": sum(len(b) for b in self.to_clients.values()),
                "host": self.host_stats, "core": self.core_counters,
                "expectations_failed": self.problems, "ok": self.ok}

    def json(self) -> str:
        return json.dumps({"records": [r.json() for r in self.records],
                           "summary": self.summary()}, indent=1)
