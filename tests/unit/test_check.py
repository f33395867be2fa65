"""`fabricd check -c FILE` (every problem of a config, one line each, exit 1; "ok" and 0
otherwise; nothing run, no root) and `fabricd --version`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fabric.cli import main as cli
from fabric.config.load import check_config, load_config
from fabric.config.specs import SHIPPED_ACTIVATORS
from fabric.errors import ConfigError

GOOD = """\
worker: {id: w1}
namespaces:
  - name: shop
    id: 7
    cidr: 10.10.0.0/24
    pods:
      - {name: web-1, ip: 10.10.0.2, netns: web1}
      - {name: db-1, ip: 10.10.0.4, worker: w2}
    services:
      - {name: web, ip: 10.10.0.100, ports: [80], backends: [web-1]}
"""

# Eight mistakes in distinct places, and one that follows from another (the service's
# backend `a` is a pod that is itself wrong): reported as the eight, once each.
BAD = """\
worker: {id: w1, control_mode: "0666"}
bogus: 1
namespaces:
  - name: shop
    id: 7
    cidr: 10.10.0.0/24
    pods:
      - {name: a, ip: 10.99.0.2, netns: x}
      - {name: b, ip: 10.10.0.3}
      - {name: c, ip: 10.10.0.4, netns: y}
      - {name: c, ip: 10.10.0.5, netns: z}
    services:
      - {name: web, ip: 10.10.0.100, ports: [80], backends: [a, nope]}
  - {name: shop, cidr: 10.11.0.0/24}
  - {name: two, cidr: 10.12.0.0/33}
"""


def write(tmp_path: Path, text: str, name: str = "fabricd.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_good_file_is_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD)
    assert cli.main(["check", "-c", path]) == 0
    out, err = capsys.readouterr()
    assert out == (f"fabricd: {path}: ok (worker w1: 1 namespace, 2 pods, 1 service, "
                   "0 peers)\n")
    assert err == ""


def test_every_problem_is_one_line_naming_file_and_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BAD)
    assert cli.main(["check", "-c", path]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    keys = [line.removeprefix(f"fabricd: {path}: ").split(":", 1)[0] for line in lines]
    assert keys == [
        "bogus",
        "worker.control_mode",
        "namespaces[0].pods[0].ip",
        "namespaces[0].pods[1]",
        "namespaces[0].pods[3].name",
        "namespaces[0].services[0].backends[1]",
        "namespaces[2].cidr",
        "namespaces[1].name",
        "8 problems",
    ], err
    assert all(line.startswith(f"fabricd: {path}: ") for line in lines)
    assert "10.99.0.2 is not inside cidr 10.10.0.0/24" in lines[2]
    assert "duplicate pod name c (also pods[2])" in lines[4]
    assert "no pod named nope" in lines[5]


def test_the_first_problem_is_the_one_the_daemon_reports(tmp_path: Path) -> None:
    """check and the loader agree: the loader stops at the first of check's problems."""
    path = write(tmp_path, BAD.replace("bogus: 1\n", "").replace('control_mode: "0666"',
                                                                  'control_mode: "0600"'))
    config, problems = check_config(path)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert config is None and problems[0].message == e.value.message


def test_a_good_file_checks_to_the_config_the_daemon_loads(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert check_config(path) == (load_config(path), [])


def test_pod_indices_stay_those_of_the_file_after_a_skipped_pod(tmp_path: Path) -> None:
    """A cross-namespace clash is named at the pod's place in the file, even when an
    earlier pod of its namespace had a problem of its own."""
    path = write(tmp_path, """\
namespaces:
  - name: a
    cidr: 10.1.0.0/24
    pods:
      - {name: p, ip: 10.1.0.2, interface: tap0}
  - name: b
    cidr: 10.2.0.0/24
    pods:
      - {name: bad, ip: 10.9.0.2, interface: tap9}
      - {name: q, ip: 10.2.0.3, interface: tap0}
""")
    msgs = [p.message for p in check_config(path)[1]]
    assert msgs == [
        f"{path}: namespaces[1].pods[0].ip: 10.9.0.2 is not inside cidr 10.2.0.0/24",
        f"{path}: namespaces[1].pods[1].interface: interface tap0 is already used by pod p "
        "in namespace a",
    ]


@pytest.mark.parametrize("text, problem", [
    ("", "file is empty"),
    ("worker: [\n", "invalid YAML"),
    ("- 1\n", "expected a mapping at the top level"),
    ("namespaces: {}\n", "namespaces: expected a list"),
])
def test_unreadable_files_are_one_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          text: str, problem: str) -> None:
    path = write(tmp_path, text)
    assert cli.main(["check", "-c", path]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and problem in lines[0], lines
    assert lines[1] == f"fabricd: {path}: 1 problem"


def test_missing_file_and_missing_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "-c", "/nonexistent/fabricd.yaml"]) == 1
    err = capsys.readouterr().err
    assert "fabricd: /nonexistent/fabricd.yaml: cannot read: No such file or directory" in err
    assert cli.main(["check"]) == 2
    assert "-c/--config" in capsys.readouterr().err


def test_check_runs_without_root_and_without_the_daemon(tmp_path: Path) -> None:
    """A process of its own, as an operator runs it: nothing but the file is touched
    (no namespaces or devices), the daemon's heavy modules are not even imported."""
    path = write(tmp_path, GOOD)
    code = ("import sys; from fabric.cli.main import main; rc = main(['check', '-c', "
            f"{path!r}]); heavy = [m for m in ('fabric.control.daemon', 'fabric.runtime."
            "worker', 'wasmtime', 'pyroute2') if m in sys.modules]; print(heavy); "
            "sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [f"fabricd: {path}: ok (worker w1: 1 namespace, "
                                     "2 pods, 1 service, 0 peers)", "[]"]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import tomllib

    with open(Path(__file__).resolve().parents[2] / "pyproject.toml", "rb") as f:
        expected = tomllib.load(f)["project"]["version"]
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"fabricd {expected}\n"
    assert cli.version() == expected


def test_activators_the_daemon_would_run_without_are_warnings(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Accepted, but not acted on as written: the check still passes, and says so."""
    module = tmp_path / "mine.wasm"
    module.write_bytes(b"\0asm\1\0\0\0")
    (tmp_path / "dir.wasm").mkdir()
    path = write(tmp_path, f"""\
namespaces:
  - name: shop
    cidr: 10.1.0.0/24
    pods: [{{name: a, ip: 10.1.0.2, netns: a}}]
    services:
      - name: web
        ip: 10.1.0.100
        backends: [a]
        ports:
          - {{port: 80, activator: tcp}}
          - {{port: 81, activator: tpc}}
          - {{port: 82, activator: {module}}}
          - {{port: 83, activator: {tmp_path / "nope.wasm"}}}
          - {{port: 84, activator: {tmp_path / "dir.wasm"}}}
          - {{port: 85, activator: relative.wasm}}
          - {{port: 86}}
""")
    assert cli.main(["check", "-c", path]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("1 service, 0 peers; 5 warnings)\n"), out
    lines = err.splitlines()
    at = f"fabricd: {path}: namespaces[0].services[0].ports"
    assert lines == [
        f"{at}[1].activator: warning: 'tpc' is not shipped in this version (shipped: "
        f"{', '.join(SHIPPED_ACTIVATORS)}); "
        "the service would hold and activate without it",
        f"{at}[3].activator: warning: cannot read {tmp_path / 'nope.wasm'}: No such file or "
        "directory; the service would hold and activate without it",
        f"{at}[4].activator: warning: {tmp_path / 'dir.wasm'} is not a regular file; the "
        "service would hold and activate without it",
        f"{at}[5].activator: warning: relative.wasm is relative: the daemon reads it from its "
        "working directory (/ under systemd), not this file's",
        f"{at}[5].activator: warning: cannot read relative.wasm: No such file or directory; "
        "the service would hold and activate without it",
    ]


SHIPPED_CONFIG = """\
namespaces:
  - name: shop
    cidr: 10.1.0.0/24
    pods: [{{name: a, ip: 10.1.0.2, netns: a}}]
    services:
      - name: web
        ip: 10.1.0.100
        backends: [a]
        ports:
          - {{port: 80, activator: {name}, activator_config: {config}}}
"""


@pytest.mark.parametrize(("name", "config", "key", "problem"), [
    ("http2", "{reopen_upstream: 'yes'}", "reopen_upstream",
     "expected true or false, got string 'yes'"),
    ("http2", "{max_connections: 5000}", "max_connections",
     "expected an integer from 0 to 1024, got integer 5000"),
    ("http2", "{hold_timeout_ms: 2s}", "hold_timeout_ms",
     "expected an integer of at least 1, got string '2s'"),
    ("stream", "{wake_on_data: 2}", "wake_on_data",
     "expected 0, 1, true or false, got integer 2"),
    ("postgres", "{ssl: passtrough}", "ssl",
     "expected one of passthrough, off, disable, none, got string 'passtrough'"),
    ("postgres", "{stream_hold_bytes: -1}", "stream_hold_bytes",
     "expected an integer of at least 1, got integer -1"),
    ("tcp", "{max_flows: 1.5}", "max_flows", "expected an integer of at least 1, got"),
    ("http1", "{health: [{path: /h, status: 700}]}", "health[0].status",
     "expected an integer from 200 to 599, got integer 700"),
    ("http1", "{health: [{path: /h, code: 200}]}", "health[0].code", "unknown field"),
])
def test_shipped_activator_config_values_the_module_cannot_read_are_errors(
        tmp_path: Path, name: str, config: str, key: str, problem: str) -> None:
    """The SDK's readers fall back to the default on a value they cannot read, so these
    would have been taken silently as if never written."""
    path = write(tmp_path, SHIPPED_CONFIG.format(name=name, config=config))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert f"namespaces[0].services[0].ports[0].activator_config.{key}" in msg, msg
    assert problem in msg, msg


def test_shipped_activator_flags_given_as_booleans_reach_the_module_as_numbers(
        tmp_path: Path) -> None:
    path = write(tmp_path, SHIPPED_CONFIG.format(
        name="stream", config="{wake_on_data: true, hold_timeout_ms: 500}"))
    port = load_config(path).namespaces[0].services[0].ports[0]
    assert port.activator_config == {"wake_on_data": 1, "hold_timeout_ms": 500}
    assert type(port.activator_config["wake_on_data"]) is int


def test_keys_a_shipped_activator_does_not_read_are_warnings(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, SHIPPED_CONFIG.format(
        name="http2", config="{reopen_upstreams: true, hold_timeout_ms: 500}"))
    assert cli.main(["check", "-c", path]) == 0
    out, err = capsys.readouterr()
    assert "1 warning)" in out, out
    assert err.splitlines() == [
        f"fabricd: {path}: namespaces[0].services[0].ports[0].activator_config: warning: "
        "the http2 activator does not read reopen_upstreams (it reads hold_bytes, "
        "hold_timeout_ms, max_busy_connections, max_connections, memory_limit, port, "
        "reopen_upstream, target_port): ignored"]
