"""docs/activators.md's tutorial, run as written: the ```sh tutorial blocks, in order,
in one shell in an empty temp dir, with this environment's `fabricd` and `python` first
on PATH (the daemon part, ```sh tutorial-daemon, runs in tests/e2e/test_tutorial.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "activators.md"


def blocks(tag: str) -> list[str]:
    """The bodies of the fenced blocks marked ```sh TAG, in order."""
    return re.findall(rf"^```sh {re.escape(tag)}\n(.*?)^```$", DOC.read_text(), re.M | re.S)


def test_the_tutorial_has_commands() -> None:
    text = "\n".join(blocks("tutorial"))
    for cmd in ("fabricd activator new", "fabricd activator build", "python -m pytest"):
        assert cmd in text
    assert "fabricd activator build --reload" in "\n".join(blocks("tutorial-daemon"))


def test_the_tutorial_runs_as_written(tmp_path: Path,
                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("ziglang")
    script = "set -eux\n" + "\n".join(blocks("tutorial"))
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["FABRICD_ZIG_CACHE"] = str(tmp_path_factory.getbasetemp() / "zig-cache")
    r = subprocess.run(["sh", "-c", script], cwd=work, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (work / "hello" / "hello.wasm").is_file()
    assert (work / "hello_zig" / "hello_zig.wasm").is_file()
    assert r.stdout.count("passed") == 2, r.stdout
