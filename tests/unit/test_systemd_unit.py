"""The shipped systemd unit: `systemd-analyze verify` passes on it (with ExecStart
pointed at this venv's fabricd, as an install would), and it says what the daemon
does (Type=notify with a watchdog, reload by SIGHUP, the control socket's directory)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "systemd" / "fabricd.service"


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    fabricd = Path(sys.executable).with_name("fabricd")
    assert fabricd.exists(), "the venv has no fabricd script: make .venv/.installed"
    text = UNIT.read_text().replace("/opt/fabricd/bin/fabricd", str(fabricd))
    unit = tmp_path / "fabricd.service"
    unit.write_text(text)
    p = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    for directive in ("Type=notify", "WatchdogSec=", "RuntimeDirectory=fabricd",
                      "ExecReload=/bin/kill -HUP $MAINPID", "ProtectSystem=strict"):
        assert directive in text
