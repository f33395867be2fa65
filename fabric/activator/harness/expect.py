"""``--expect`` checks on a replay's Result: each one a line when it is not met.

    need=none|traffic|active   the port's need level at the end
    wake / no-wake             a backend was (never) woken: the need went active while
                               none was ready; for a packet activator a held packet
                               wakes too, as in the daemon
    local-answers=N            sum of the guest's counters named *_answered (the shipped
                               activators count pings_answered, keepalives_answered)
    count:NAME=N               one guest counter (absent counts as 0)
    client-bytes>=N            bytes the clients received, all streams (stream activators)
    golden=FILE                the timeline equals FILE (--update-golden rewrites it)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fabric.activator.harness import timeline as tl
from fabric.activator.harness.result import HarnessError, Result

_COUNT = re.compile(r"count:([a-z0-9_]{1,32})=(\d+)\Z")
NEEDS = ("none", "traffic", "active")


@dataclass(frozen=True)
class Expectation:
    kind: str  # need, wake, no-wake, local-answers, count, client-bytes, golden
    value: str = ""
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> Expectation:
        s = text.strip()
        if s in ("wake", "no-wake"):
            return cls(s)
        key, eq, val = s.partition("=")
        if key == "need" and val in NEEDS:
            return cls("need", val)
        if key == "local-answers" and val.isdigit():
            return cls("local-answers", val)
        if key == "golden" and val:
            return cls("golden", val)
        if s.startswith("client-bytes>=") and s[14:].isdigit():
            return cls("client-bytes", s[14:])
        m = _COUNT.match(s)
        if m:
            return cls("count", m.group(2), m.group(1))
        raise HarnessError(f"--expect {text!r}: want need=none|traffic|active, wake, no-wake, "
                           "local-answers=N, count:NAME=N, client-bytes>=N or golden=FILE")

    def check(self, r: Result, update_golden: bool = False) -> str | None:
        """None when met, else what was wanted and what happened."""
        k = self.kind
        if k == "need":
            got = r.final_need
            return None if got == self.value else f"need={self.value}: the need ended {got}"
        if k == "wake":
            return None if r.woke else "wake: the backend was never woken"
        if k == "no-wake":
            return None if not r.woke else (f"no-wake: woken at {r.wake_at * 1000:.3f} ms"
                                            if r.wake_at is not None else "no-wake: woken")
        if k == "local-answers":
            got = r.local_answers
            want = int(self.value)
            return None if got == want else (
                f"local-answers={want}: {got} answered locally ({_counts(r)})")
        if k == "count":
            got = r.counters.get(self.name, 0)
            return None if got == int(self.value) else (
                f"count:{self.name}={self.value}: it is {got}")
        if k == "client-bytes":
            got = sum(len(b) for b in r.to_clients.values())
            return None if got >= int(self.value) else (
                f"client-bytes>={self.value}: the clients received {got} bytes")
        if k == "golden":
            if update_golden:
                Path(self.value).write_text(r.text)
                return None
            return tl.golden_diff(self.value, r.text)
        return f"unknown expectation {k}"


def _counts(r: Result) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(r.counters.items())) or "no counters"


def check_all(r: Result, expectations: list[Expectation], update_golden: bool = False
              ) -> list[str]:
    """Check every expectation; the unmet ones are also kept in ``r.problems``."""
    out = [p for e in expectations if (p := e.check(r, update_golden)) is not None]
    r.problems.extend(out)
    return out
