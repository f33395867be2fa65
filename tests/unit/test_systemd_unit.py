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


MDWE_PROBE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN (Linux 6.3)
    sys.exit(3)
import wasmtime
try:
    wasmtime.Module.from_file(wasmtime.Engine(), sys.argv[1])
except wasmtime.WasmtimeError as e:
    print(e)
    sys.exit(1)
"""


def test_memory_deny_write_execute_would_break_activators() -> None:
    """Why the unit leaves MemoryDenyWriteExecute= out: under the kernel's equivalent
    (PR_SET_MDWE) wasmtime cannot make the compiled activator executable."""
    assert "MemoryDenyWriteExecute" not in "".join(
        line for line in UNIT.read_text().splitlines() if not line.startswith("#"))
    wasm = ROOT / "activators" / "tcp" / "tcp.wasm"
    p = subprocess.run([sys.executable, "-c", MDWE_PROBE, str(wasm)], capture_output=True,
                       text=True, timeout=120)
    if p.returncode == 3:
        pytest.skip("the kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "executable" in p.stdout
    # And without it the same module compiles: the probe is not broken some other way.
    plain = MDWE_PROBE.replace("libc.prctl(65, 1, 0, 0, 0) != 0", "False")
    p = subprocess.run([sys.executable, "-c", plain, str(wasm)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, (p.stdout, p.stderr)
