"""A scrape checked against the registry (fabric.runtime.families) and by promtool:
every family it has is declared, with the declared type, every sample carries exactly
the declared labels (a histogram's buckets `le` as well), and `promtool check metrics`
(Prometheus' own linter) finds nothing."""

from __future__ import annotations

import shutil
import subprocess

from fabric.runtime.families import BY_NAME
from tests.support.procstat import Metrics


def family_of(sample: str) -> tuple[str, str]:
    """(family, suffix) of a sample name: a histogram's _bucket, _sum, _count or ''."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = sample[: -len(suffix)]
        if sample.endswith(suffix) and base in BY_NAME and BY_NAME[base].kind == "histogram":
            return base, suffix
    return sample, ""


def problems(text: str) -> list[str]:
    """What in the scrape `text` differs from the registry (empty: nothing)."""
    out: list[str] = []
    typed: dict[str, str] = {}
    helped: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            typed[name] = kind
            fam = BY_NAME.get(name)
            if fam is None:
                out.append(f"{name}: not in the registry")
            elif fam.kind != kind:
                out.append(f"{name}: TYPE {kind}, the registry says {fam.kind}")
        elif line.startswith("# HELP "):
            helped.add(line.split(" ", 3)[2])
    for name in typed:
        if name not in helped:
            out.append(f"{name}: no HELP")
    for sample, labels, _ in Metrics(text).samples:
        base, suffix = family_of(sample)
        fam = BY_NAME.get(base)
        if fam is None:
            out.append(f"{sample}: a sample of no declared family")
            continue
        if base not in typed:
            out.append(f"{sample}: a sample before its TYPE")
        want = set(fam.labels) | ({"le"} if suffix == "_bucket" else set())
        if set(labels) != want:
            out.append(f"{sample}{labels}: labels {sorted(labels)}, declared {sorted(want)}")
    return out


def promtool(text: str) -> str | None:
    """What `promtool check metrics` says about `text`: "" when it passes, None when
    promtool is not installed."""
    exe = shutil.which("promtool")
    if exe is None:
        return None
    r = subprocess.run([exe, "check", "metrics"], input=text, capture_output=True, text=True,
                       timeout=60)
    said = (r.stdout + r.stderr).strip()
    return said or ("" if r.returncode == 0 else f"exit {r.returncode}")
