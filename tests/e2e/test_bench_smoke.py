"""Every benchmark runs once, seconds long, so a benchmark that no longer runs fails CI
(the dns benchmark once broke for weeks: its config lacked a namespace id). Figures are
not checked here: `make bench` reports them, tests check behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.bench.__main__ import BENCHMARKS

ROOT = Path(__file__).resolve().parents[2]


def test_every_benchmark_runs_in_smoke_mode(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "tests.bench", "--quick", "--seconds", "1",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert out.exists(), p.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert sorted(results) == sorted(BENCHMARKS), sorted(results)
    errors = {name: r.get("error") for name, r in results.items() if r.get("error")}
    assert not errors, (errors, p.stderr[-3000:])
    assert p.returncode == 0, p.stderr[-3000:]
