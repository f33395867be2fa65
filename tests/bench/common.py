"""What every benchmark shares: settings, result records, the table printer, and the
interleaving of fabric and kernel runs."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    """How long and how often: `runs` repetitions of `seconds`-long measurements."""

    runs: int = 5
    seconds: int = 5
    pods: int | None = None  # the density benchmark's pod count (None: its default)
    quick: bool = False  # `--quick`: a benchmark may leave out its slowest extras


@dataclass
class Series:
    """One measured quantity: its raw value per run and their median."""

    label: str
    unit: str
    values: list[float | None] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return median(self.values)

    @property
    def spread(self) -> tuple[float, float] | None:
        """(lowest, highest) of the measured runs; None with fewer than two."""
        vs = [v for v in self.values if v is not None]
        return (min(vs), max(vs)) if len(vs) >= 2 else None

    def to_json(self) -> dict[str, Any]:
        sp = self.spread
        return {"label": self.label, "unit": self.unit, "values": self.values,
                "median": self.median, "min": sp[0] if sp else None,
                "max": sp[1] if sp else None}


@dataclass
class Check:
    """A derived result; `passed` is None for numbers shown for reference only."""

    label: str
    value: float | None
    unit: str
    target: str
    passed: bool | None

    @property
    def status(self) -> str:
        if self.passed is None:
            return "info"
        return "PASS" if self.passed else "MISSED"

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "value": self.value, "unit": self.unit,
                "target": self.target, "passed": self.passed, "status": self.status}


@dataclass
class Report:
    """Everything one benchmark found, printed as a table and saved as JSON."""

    name: str
    title: str
    series: list[Series] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # (caption, headers, rows): further tables printed after the raw runs
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    elapsed: float = 0.0

    def add(self, label: str, unit: str, values: Sequence[float | None] = ()) -> Series:
        s = Series(label, unit, list(values))
        self.series.append(s)
        return s

    def check(self, label: str, value: float | None, unit: str, target: str,
              passed: bool | None) -> Check:
        if value is None and passed is not None:
            passed = False  # could not be measured: the target is not met
        c = Check(label, value, unit, target, passed)
        self.checks.append(c)
        return c

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title,
                "series": [s.to_json() for s in self.series],
                "checks": [c.to_json() for c in self.checks], "notes": self.notes,
                "extra": self.extra, "error": self.error,
                "elapsed_seconds": round(self.elapsed, 2)}


def median(values: Sequence[float | None]) -> float | None:
    """Median of the values that were measured (None: a run that produced nothing)."""
    vs = [v for v in values if v is not None]
    return statistics.median(vs) if vs else None


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0-100) by linear interpolation, None for no values."""
    if not values:
        return None
    vs = sorted(values)
    k = (len(vs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(vs) - 1)
    return vs[lo] + (vs[hi] - vs[lo]) * (k - lo)


def progress(name: str, msg: str) -> None:
    """A line on stderr while a benchmark runs (stdout keeps the tables)."""
    print(f"  [{name}] {msg}", file=sys.stderr, flush=True)


def interleaved(runs: int, sides: dict[str, Callable[[int], T]]) -> dict[str, list[T]]:
    """Run each side once per round, alternating which goes first, so that noise on the
    machine hits all sides alike. Each callable gets the round number."""
    out: dict[str, list[T]] = {k: [] for k in sides}
    order = list(sides)
    for i in range(runs):
        for k in order if i % 2 == 0 else order[::-1]:
            out[k].append(sides[k](i))
    return out


def fmt(v: float | None) -> str:
    """A number with as many digits as make sense for its size."""
    if v is None:
        return "-"
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    for digits, limit in ((3, 1.0), (2, 10.0), (1, 100.0)):
        if abs(round(v, digits)) < limit:
            return f"{v:.{digits}f}"
    return f"{v:.0f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 2) -> str:
    """A plain text table: the first `left` columns left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        cells = [str(c).ljust(w) if i < left else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        return "  " + "  ".join(cells).rstrip()

    sep = "  " + "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def spread(s: Series) -> str:
    """The runs' range and its width as a share of the median: how far one run may be
    from the next on this machine ("-" with one run)."""
    sp = s.spread
    if sp is None:
        return "-"
    lo, hi = sp
    m = s.median
    rel = f" ({(hi - lo) / abs(m) * 100:.0f} %)" if m else ""
    return f"{fmt(lo)}-{fmt(hi)}{rel}"


def render(report: Report) -> str:
    """The report as text: a header, the raw runs with medians, then the checks."""
    out = [f"== {report.name}: {report.title}  ({report.elapsed:.0f} s)"]
    if report.series:
        n = max(len(s.values) for s in report.series)
        headers = ["measurement", "unit", *(f"run {i + 1}" for i in range(n)), "median",
                   "spread"]
        rows = [[s.label, s.unit, *(fmt(v) for v in s.values),
                 *([""] * (n - len(s.values))), fmt(s.median), spread(s)]
                for s in report.series]
        out.append(table(headers, rows))
    for caption, headers, rows in report.tables:
        out.append(f"\n  {caption}")
        out.append(table(headers, rows, left=1))
    if report.checks:
        out.append("")
        rows = [[c.label, fmt(c.value), c.unit, c.target or "-", c.status]
                for c in report.checks]
        out.append(table(["result", "value", "unit", "target", "status"], rows, left=1))
    for note in report.notes:
        out.append(f"  note: {note}")
    if report.error:
        out.append(f"  ERROR: {report.error}")
    return "\n".join(out)
