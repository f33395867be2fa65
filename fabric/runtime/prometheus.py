"""Prometheus text exposition (format 0.0.4) without a client library.

The fabric keeps its own counters and histograms; this module only turns a snapshot of
them into text, so scraping never touches the data path. Which families exist, with which
labels, is fabric.runtime.families (the one registry).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from fabric.histogram import HistogramSnapshot

MetricKind = Literal["counter", "gauge", "histogram"]
Value = float | HistogramSnapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_KINDS = ("counter", "gauge", "histogram")


@dataclass
class Metric:
    """One metric family: a name, its type and help, and labelled samples (a histogram's
    samples are HistogramSnapshots)."""

    name: str
    kind: MetricKind
    help: str
    samples: list[tuple[dict[str, str], Value]] = field(default_factory=list)


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value: float) -> str:
    """Integers print without '.0' so counters stay exact and readable; specials per the spec."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    v = float(value)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(v)


def _labels(labels: dict[str, str], metric: str) -> str:
    if not labels:
        return ""
    parts = []
    for key, value in labels.items():
        if not _LABEL_RE.match(key) or key.startswith("__"):
            raise ValueError(f"metric {metric}: invalid label name {key!r}")
        parts.append(f'{key}="{_escape_label(str(value))}"')
    return "{" + ",".join(parts) + "}"


def _histogram(name: str, labels: dict[str, str], h: Value) -> list[str]:
    """Cumulative `_bucket` lines up to le="+Inf", then `_sum` and `_count`."""
    if not isinstance(h, HistogramSnapshot):
        raise ValueError(f"metric {name}: a histogram sample must be a HistogramSnapshot")
    if "le" in labels:
        raise ValueError(f"metric {name}: 'le' is the histogram's own label")
    lab = _labels(labels, name)
    head = lab[:-1] + "," if lab else "{"
    out = []
    total = 0
    for bound, n in zip(h.bounds, h.counts, strict=False):
        total += n
        out.append(f'{name}_bucket{head}le="{format_value(bound)}"}} {total}')
    total += h.counts[-1]
    out.append(f'{name}_bucket{head}le="+Inf"}} {total}')
    out.append(f"{name}_sum{lab} {format_value(h.sum)}")
    out.append(f"{name}_count{lab} {total}")
    return out


def render(metrics: list[Metric]) -> str:
    """Render families; repeated names are merged because Prometheus rejects split families."""
    families: dict[str, Metric] = {}
    merged: dict[str, list[tuple[dict[str, str], Value]]] = {}
    for m in metrics:
        if not _NAME_RE.match(m.name):
            raise ValueError(f"invalid metric name {m.name!r}")
        if m.kind not in _KINDS:
            raise ValueError(f"metric {m.name}: kind must be counter, gauge or histogram, "
                             f"not {m.kind!r}")
        first = families.get(m.name)
        if first is None:
            families[m.name] = m
            merged[m.name] = list(m.samples)
        elif first.kind != m.kind:
            raise ValueError(f"metric {m.name}: declared as both {first.kind} and {m.kind}")
        else:
            merged[m.name].extend(m.samples)
    lines: list[str] = []
    for name, m in families.items():
        lines.append(f"# HELP {name} {_escape_help(m.help)}")
        lines.append(f"# TYPE {name} {m.kind}")
        for labels, value in merged[name]:
            if m.kind == "histogram":
                lines.extend(_histogram(name, labels, value))
                continue
            if isinstance(value, HistogramSnapshot):
                raise ValueError(f"metric {name}: a {m.kind} sample must be a number")
            lines.append(f"{name}{_labels(labels, name)} {format_value(value)}")
    return "\n".join(lines) + "\n" if lines else ""
