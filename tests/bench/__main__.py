"""`python -m tests.bench [NAME ...] [--runs N] [--seconds S] [--out FILE] [--quick]`.

Runs the benchmarks one after the other (never two at once), prints a table per
benchmark and a summary, and writes everything to a JSON file. The exit code is 0 even
when targets are missed (this is a report); it is 1 only when a benchmark could not run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from tests.bench import (
    cni,
    density,
    dns,
    egress,
    floods,
    http1,
    http2,
    microvm,
    ping,
    postgres,
    replay,
    scale,
    sdk,
    services,
    shards,
    storms,
    streams,
    tcp,
    tunnel,
    udp,
)
from tests.bench.common import Report, Settings, fmt, render, table
from tests.bench.topo import leftovers

BENCHMARKS: dict[str, Callable[[Settings], Report]] = {
    tcp.NAME: tcp.run,
    udp.NAME: udp.run,
    ping.NAME: ping.run,
    scale.NAME: scale.run,
    density.NAME: density.run,
    dns.NAME: dns.run,
    egress.NAME: egress.run,
    tunnel.NAME: tunnel.run,
    services.NAME: services.run,
    floods.NAME: floods.run,
    cni.NAME: cni.run,
    streams.NAME: streams.run,
    storms.NAME: storms.run,
    postgres.NAME: postgres.run,
    http2.NAME: http2.run,
    replay.NAME: replay.run,
    http1.NAME: http1.run,
    microvm.NAME: microvm.run,
    shards.NAME: shards.run,
    sdk.NAME: sdk.run,
}


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return v


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="Benchmark the fabric against the kernel on this machine.")
    ap.add_argument("names", nargs="*", metavar="NAME",
                    help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    ap.add_argument("--runs", type=_positive, help="repetitions per measurement (5)")
    ap.add_argument("--seconds", type=_positive, help="length of each measurement (5)")
    ap.add_argument("--pods", type=_positive,
                    help="pods the density benchmark attaches (1000; --quick: 50)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke check: --runs 1 --seconds 2 unless given")
    ap.add_argument("--out", default="bench-results.json",
                    help="where to write the JSON results (default: %(default)s)")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    args.names = list(dict.fromkeys(args.names)) or list(BENCHMARKS)
    # --quick: the whole set in under 3 minutes on this machine kind (1-second runs; the
    # microVM's snapshot restore left out)
    default = Settings(runs=1, seconds=1) if args.quick else Settings()
    args.settings = Settings(runs=args.runs or default.runs,
                             seconds=args.seconds or default.seconds,
                             pods=args.pods or (50 if args.quick else None),
                             quick=args.quick)
    return args


def _meta(settings: Settings, names: list[str]) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "commit": commit,
        "runs": settings.runs, "seconds": settings.seconds, "benchmarks": names,
    }


def _summary(reports: list[Report]) -> str:
    rows = []
    for r in reports:
        if r.error:
            rows.append([r.name, "(could not run)", "-", "-", "ERROR"])
        for c in r.checks:
            if c.passed is not None:
                v = f"{fmt(c.value)} {c.unit}" if c.value is not None else "-"
                rows.append([r.name, c.label, v, c.target, c.status])
    met = sum(1 for r in reports for c in r.checks if c.passed)
    missed = sum(1 for r in reports for c in r.checks if c.passed is False)
    errors = sum(1 for r in reports if r.error)
    tail = f"  {met} target(s) met, {missed} MISSED" + (f", {errors} ERROR" if errors else "")
    return "\n".join(["== summary", table(["bench", "result", "value", "target", "status"],
                                          rows, left=2), tail])


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the sandboxes, which clean up


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    s: Settings = args.settings
    meta = _meta(s, args.names)
    print(f"fabricd benchmarks: {', '.join(args.names)}; {s.runs} run(s) of {s.seconds} s; "
          f"{meta['cpus']} CPUs, kernel {meta['kernel']}, commit {meta['commit']}", flush=True)
    stale = leftovers()
    meta["stale_namespaces"] = stale
    if stale:
        print(f"WARNING: {len(stale)} fbb-* namespace(s) already exist ({', '.join(stale[:5])}"
              f"{', ...' if len(stale) > 5 else ''}): another benchmark run, or a killed one "
              "whose processes may still use CPU; `make sweep` removes them", flush=True)
    reports: list[Report] = []
    t_all = time.monotonic()
    try:
        for name in args.names:
            print(f"\n-- running {name} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                report = BENCHMARKS[name](s)
            except Exception as e:
                report = Report(name, "failed")
                report.error = f"{type(e).__name__}: {e}"
                traceback.print_exc(file=sys.stderr)
            except BaseException:  # Ctrl-C, SIGTERM: say so in the results, then stop
                reports.append(Report(name, "interrupted", error="interrupted",
                                      elapsed=time.monotonic() - t0))
                raise
            report.elapsed = time.monotonic() - t0
            reports.append(report)
            print("\n" + render(report), flush=True)
    finally:
        print("\n" + _summary(reports), flush=True)
        meta["elapsed_seconds"] = round(time.monotonic() - t_all, 1)
        doc = {"meta": meta, "results": {r.name: r.to_json() for r in reports}}
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        print(f"\nresults written to {args.out} ({meta['elapsed_seconds']:.0f} s in all)")
    return 1 if any(r.error for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
