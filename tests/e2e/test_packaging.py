"""The wheel, as a user gets it: built from a clean copy of the project, it carries what
runs (the shipped activators' .wasm included) and nothing else; installed into a fresh
venv (the pinned dependencies from the index), its `fabricd`, run away from the source
tree with no PYTHONPATH, serves a dormant service woken by the shipped `tcp` activator."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric.tools.sandbox import Daemon, Sandbox

ROOT = Path(__file__).resolve().parents[2]
VIP = "10.40.0.100"
# Build output and local state: never part of a release build (a stale build/ would put
# files that no longer exist into the wheel: setuptools never cleans it).
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                    "__pycache__", ".pytest_cache", ".ruff_cache",
                                    ".hypothesis")


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)  # type: ignore[call-overload]
    assert p.returncode == 0, f"{' '.join(argv)}: {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE, symlinks=True)
    t0 = time.monotonic()
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", str(tmp / "dist"), str(src)], cwd=tmp)
    print(f"\nwheel built in {time.monotonic() - t0:.1f}s")
    (whl,) = (tmp / "dist").glob("fabricd-*.whl")
    yield whl
    shutil.rmtree(tmp, ignore_errors=True)


def test_the_wheel_carries_what_runs_and_nothing_else(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    must = {"activators/__init__.py", "activators/tcp/tcp.wasm", "fabric/cli/main.py",
            "fabric/activator/runtime.py", "gateway/dns.py", "tunnels/core.py"}
    assert must <= names, sorted(must - names)
    # Everything a module is imported from (every package of the source tree) is there.
    for top in ("fabric", "gateway", "tunnels"):
        for py in (ROOT / top).rglob("*.py"):
            assert str(py.relative_to(ROOT)) in names, py
    # Every shipped activator's module, and none of the hostile test modules.
    shipped = {str(w.relative_to(ROOT)) for w in (ROOT / "activators").glob("*/*.wasm")
               if w.parent.name != "testing"}
    assert {"activators/stream/stream.wasm", "activators/postgres/postgres.wasm"} <= shipped
    assert shipped <= names, sorted(shipped - names)
    # The SDKs and project templates are what `fabricd activator new/build` need.
    kit = {str(f.relative_to(ROOT)) for pattern in ("activators/sdk/c/*.h",
                                                      "activators/sdk/zig/*.zig",
                                                      "fabric/activator/templates/**/*")
           for f in ROOT.glob(pattern) if f.is_file() and "__pycache__" not in f.parts}
    assert "activators/sdk/c/fabricd.h" in kit and kit <= names, sorted(kit - names)
    stray = sorted(n for n in names
                   if not n.startswith("fabricd-0") and not n.endswith(".py")
                   and n not in shipped and n not in kit)
    assert not stray, stray
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"fabric", "gateway", "tunnels", "activators",
                    wheel.name.split("-py3")[0] + ".dist-info"}, tops
    dist = wheel.name.split("-py3")[0] + ".dist-info"
    entry = zipfile.ZipFile(wheel).read(f"{dist}/entry_points.txt").decode()
    assert "fabricd = fabric.cli.main:main" in entry
    assert "fabricd-cni = fabric.cni.plugin:main" in entry


@pytest.fixture(scope="module")
def venv(wheel: Path) -> Iterator[Path]:
    """A fresh venv (no system site-packages) with the wheel and its pinned dependencies
    installed by pip from the configured index (or its cache); made without its own pip
    (ensurepip costs seconds): this pip installs into it with --python."""
    home = wheel.parent.parent / "venv"
    t0 = time.monotonic()
    _run([sys.executable, "-m", "venv", "--without-pip", str(home)])
    py = home / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
          "--disable-pip-version-check", "-c", str(ROOT / "requirements.lock"), str(wheel)],
         cwd=home)
    print(f"\nvenv with the wheel installed in {time.monotonic() - t0:.1f}s")
    yield home
    shutil.rmtree(home, ignore_errors=True)


def test_installed_wheel_has_the_cni_plugin(venv: Path, tmp_path: Path) -> None:
    """What docs/cni.md links into /opt/cni/bin: the console script, run through a link
    from elsewhere, as a runtime runs it."""
    link = tmp_path / "fabricd-cni"
    link.symlink_to(venv / "bin" / "fabricd-cni")
    env = {**clean_env(), "CNI_COMMAND": "VERSION"}
    out = _run([str(link)], cwd=str(tmp_path), env=env, input='{"cniVersion": "1.0.0"}')
    assert "1.0.0" in json.loads(out.stdout)["supportedVersions"]


def clean_env() -> dict[str, str]:
    """What an operator's shell would give: no PYTHONPATH, no venv of ours."""
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LANG": "C.UTF-8", "HOME": "/root"}


def test_installed_wheel_runs_a_service_with_the_tcp_activator(venv: Path,
                                                               sandbox: Sandbox) -> None:
    away = os.path.join(sandbox.tmp, "elsewhere")  # cwd outside the source tree
    os.makedirs(away)
    py = str(venv / "bin" / "python")
    where = _run([py, "-c", "import fabric, activators; print(fabric.__file__); "
                  "print(activators.__file__)"], cwd=away, env=clean_env()).stdout.split()
    assert all(w.startswith(str(venv)) for w in where), where
    assert not any(str(ROOT) in w for w in where), where

    worker = sandbox.netns("worker")
    client, web = sandbox.netns("client"), sandbox.netns("web")
    # The backend is the installed package's own test server, started by the hook.
    start = (f"sh -c '(sleep 0.3; exec ip netns exec {web} {py} -m fabric.tools.sandbox "
             "http 8080) >/dev/null 2>&1 &'")
    ns = {"name": "shop", "id": 7, "cidr": "10.40.0.0/24",
          "pods": [{"name": "client", "ip": "10.40.0.2", "netns": client},
                   {"name": "web-1", "ip": "10.40.0.3", "netns": web}],
          "services": [{"name": "web", "ip": VIP, "backends": ["web-1"],
                        "ports": [{"port": 80, "target_port": 8080, "activator": "tcp"}],
                        "on_activate": start}]}
    d = Daemon(sandbox, worker, {"namespaces": [ns]},
               command=[str(venv / "bin" / "fabricd")], env=clean_env(), cwd=away).start()
    d.wait_attached(2)
    log = d.log()
    shipped = f"{venv}/lib/python{sys.version_info.major}.{sys.version_info.minor}" \
              "/site-packages/activators/tcp/tcp.wasm"
    assert f"activator {shipped}" in log, log[-3000:]
    assert "unusable" not in log, log[-3000:]
    svc = d.get("/v1/services")[0]
    assert svc["state"] == "dormant" and "80" in svc["activators"], svc

    t0 = time.monotonic()
    r = sandbox.run(client, "curl", "-sS", "--max-time", "20", f"http://{VIP}/",
                    check=False, timeout=30)
    assert r.returncode == 0 and "hello from" in r.stdout, (r.stderr, d.log()[-3000:])
    print(f"\nfirst request through the woken service: {time.monotonic() - t0:.2f}s")
    svc = d.get("/v1/services")[0]
    act = svc["activators"]["80"]
    assert act["calls"] >= 1 and svc["counters"]["activations"] >= 1, svc
    assert act["fallbacks"] == 0 and act["traps"] == 0, act
    assert d.stop() == 0
