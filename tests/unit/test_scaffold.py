"""`fabricd activator new` + `build` + the project's own tests, for every language and
protocol, as an author runs them: the commands in a fresh temp dir, the project's pytest
in a subprocess from its own directory (nothing of the fabricd source tree on its path).
One zig cache per session keeps the builds to about a second each."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fabric.activator import project as proj
from fabric.cli import main as cli
from fabric.services.manager import ActivatorRefused
from tests.unit.test_control import FakeFabric, Harness


@pytest.fixture(scope="session")
def zig_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    pytest.importorskip("ziglang")
    d = tmp_path_factory.mktemp("zig-cache")
    old = os.environ.get("FABRICD_ZIG_CACHE")
    os.environ["FABRICD_ZIG_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("FABRICD_ZIG_CACHE", None)
    else:
        os.environ["FABRICD_ZIG_CACHE"] = old


@pytest.mark.parametrize("proto", proj.PROTOS)
@pytest.mark.parametrize("lang", list(proj.LANGS))
def test_scaffold_builds_and_passes_its_own_tests(lang: str, proto: str, tmp_path: Path,
                                                  zig_cache: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    name = f"my_{proto}"
    assert cli.main(["activator", "new", name, "--lang", lang, "--proto", proto,
                     "--dir", str(tmp_path)]) == 0
    root = tmp_path / name
    assert cli.main(["activator", "build", str(root)]) == 0
    out = capsys.readouterr().out
    wasm = root / f"{name}.wasm"
    digest = hashlib.sha256(wasm.read_bytes()).hexdigest()
    assert f"{wasm}: {wasm.stat().st_size} bytes, sha256 {digest}" in out
    # its config example is a valid fabricd config once it names the module
    example = (root / "config.example.yaml").read_text()
    (tmp_path / "fabricd.yaml").write_text(example.replace(f"/path/to/{name}.wasm", str(wasm)))
    assert cli.main(["check", "-c", str(tmp_path / "fabricd.yaml")]) == 0
    said = "".join(capsys.readouterr())
    assert ": ok (" in said and "warning" not in said, said
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "2 passed" in r.stdout


def test_a_build_is_reproducible_wherever_the_project_is(tmp_path: Path,
                                                        zig_cache: Path) -> None:
    """(A fresh cache gives the same bytes too: activators/build.py --check builds the
    shipped C and Zig activators with one.)"""
    for lang in proj.LANGS:
        digests = set()
        for where in ("a", "b/c"):
            (tmp_path / lang / where).mkdir(parents=True)
            root = proj.scaffold("same", lang, "stream", tmp_path / lang / where)
            digests.add(proj.build_project(root).sha256)
        assert len(digests) == 1, (lang, digests)


@pytest.mark.parametrize("lang", list(proj.LANGS))
def test_a_debug_build_keeps_file_and_line(lang: str, tmp_path: Path, zig_cache: Path) -> None:
    """`fabricd activator build --debug`: the module keeps DWARF, so a trap's report can
    name file:line; the release build has none."""
    from fabric.activator import dwarf

    root = proj.scaffold("dbg", lang, "stream", tmp_path)
    release = proj.build_project(root, tmp_path / "release.wasm")
    assert cli.main(["activator", "build", str(root), "--debug", "-o",
                     str(tmp_path / "debug.wasm")]) == 0
    debug = (tmp_path / "debug.wasm").read_bytes()
    assert len(debug) > release.size
    m = dwarf.parse(debug)
    assert m.rows > 0 and not m.problem, m.problem
    assert dwarf.parse(release.path.read_bytes()).rows == 0


@pytest.mark.parametrize("argv, message", [
    (["new", "Bad-Name"], "a name is 1-32 of [a-z0-9_]"),
    (["new", "x", "--dir", "/nonexistent/where"], "no such directory"),
    (["build", "/nonexistent/project"], "not a directory"),
    (["build", "."], "no src/ directory"),
    (["build", "--reload", "nonsense", "."], "expected NS/SERVICE or NS/SERVICE:PORT"),
])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["activator", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_new_refuses_an_existing_directory(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "taken").mkdir()
    assert cli.main(["activator", "new", "taken", "--dir", str(tmp_path)]) == 2
    assert "exists already" in capsys.readouterr().err


def test_a_compile_error_is_shown_and_exits_1(tmp_path: Path, zig_cache: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    root = proj.scaffold("broken", "c", "stream", tmp_path)
    src = root / "src" / "broken.c"
    src.write_text(src.read_text() + "\nthis is not C;\n")
    assert cli.main(["activator", "build", str(root)]) == 1
    err = capsys.readouterr().err
    assert "build failed" in err and "broken.c" in err
    assert not (root / "broken.wasm").exists()


def test_watch_rebuilds_on_change_and_survives_a_compile_error(tmp_path: Path,
                                                               zig_cache: Path) -> None:
    root = proj.scaffold("watched", "zig", "stream", tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.Popen([sys.executable, "-m", "fabric.cli.main", "activator", "build",
                          "--watch", str(root)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(240, p.kill)  # a missed rebuild fails the reads, never hangs
    watchdog.start()
    try:
        assert p.stdout is not None and p.stderr is not None
        first = p.stdout.readline()
        assert "watched.wasm:" in first and "sha256" in first, first
        assert "watching" in p.stdout.readline()
        src = root / "src" / "watched.zig"
        good = src.read_text()
        src.write_text(good + "\nthis is not zig\n")
        assert "build failed" in p.stderr.readline()
        src.write_text(good.replace("held connection timed out", "held too long"))
        line = p.stdout.readline()
        assert "watched.wasm:" in line and line.split("sha256 ")[1][:64] != \
            first.split("sha256 ")[1][:64], (first, line)
        assert b"held too long" in (root / "watched.wasm").read_bytes()
    finally:
        watchdog.cancel()
        p.terminate()
        p.wait(timeout=10)


class ReloadingFabric(FakeFabric):
    """The control API's reload call, recorded (refused while `refuse` is set)."""

    def __init__(self) -> None:
        super().__init__()
        self.reloads: list[tuple[str, str, int | None, str | None]] = []
        self.refuse: str | None = None

    async def reload_activator(self, ns: str, service: str, port: int | None,
                               module: str | None) -> list[dict[str, Any]]:
        if self.refuse:
            raise ActivatorRefused(self.refuse)
        self.reloads.append((ns, service, port, module))
        return [{"service": service, "port": port, "module": module,
                 "generation": len(self.reloads) + 1}]


def test_build_reload_swaps_the_build_into_the_daemon(tmp_path: Path, zig_cache: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    """`build --reload` goes through the control API's reload call with the fresh
    module (the daemon side: tests/e2e/test_tutorial.py); a refusal is one line, exit 1."""
    root = proj.scaffold("live", "c", "stream", tmp_path)
    fabric = ReloadingFabric()
    sockdir = tempfile.mkdtemp(prefix="fctl", dir="/tmp")  # AF_UNIX paths are short
    h = Harness(fabric, os.path.join(sockdir, "control.sock")).start()
    try:
        argv = ["activator", "build", str(root), "--reload", "demo/web:80",
                "--control", h.path]
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        wasm = str(root / "live.wasm")
        assert fabric.reloads == [("demo", "web", 80, wasm)]
        assert f"demo/web:80: activator reloaded ({wasm}, generation 2)" in out, out
        fabric.refuse = "live.wasm: no exported function fab_process; the old module keeps serving"
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert "keeps serving" in err and err.count("\n") == 1, err
    finally:
        h.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
