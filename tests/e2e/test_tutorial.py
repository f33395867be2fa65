"""docs/activators.md's tutorial to the end: the ```sh tutorial blocks make and build the
project, the doc's config snippet (its netns names and module path replaced by this
sandbox's) runs it in a real daemon in front of an echo backend, and the ```sh
tutorial-daemon block, as written, rebuilds it and swaps it in (generation 2) while
connections keep working."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from fabric.tools.sandbox import Daemon, Sandbox
from tests.e2e.test_streams import echo_server
from tests.unit.test_tutorial import DOC, blocks


def doc_config() -> dict[str, Any]:
    (text,) = re.findall(r"^```yaml\n(.*?)^```$", DOC.read_text(), re.M | re.S)
    return yaml.safe_load(text)


def echo_through(sb: Sandbox, ns: str, vip: str, msg: str) -> str:
    r = sb.run(ns, sys.executable, "-c",
               "import socket\n"
               f"c=socket.create_connection(({vip!r},80),timeout=20)\n"
               f"c.sendall({msg!r}.encode()); print(c.recv(100).decode())\n", timeout=40)
    return r.stdout.strip()


def test_the_tutorial_runs_in_a_daemon(sandbox: Sandbox, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["FABRICD_ZIG_CACHE"] = str(tmp_path / "zig-cache")
    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run(["sh", "-c", "set -eu\n" + "\n".join(blocks("tutorial"))], cwd=work,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    project = work / "hello"

    cfg = doc_config()
    (ns,) = cfg["namespaces"]
    (svc,) = ns["services"]
    (port,) = svc["ports"]
    port["activator"] = str(project / "hello.wasm")
    web = sandbox.netns("web")
    client = sandbox.netns("client")
    ns["pods"][0]["netns"] = web
    ns["pods"].append({"name": "client", "ip": "10.70.0.2", "netns": client})
    echo_server(sandbox, web, port["target_port"])
    d = Daemon(sandbox, sandbox.netns("worker"), cfg).start()
    d.wait_attached(2)
    vip = svc["ip"]
    assert echo_through(sandbox, client, vip, "first") == "first", d.log()[-3000:]

    env["FABRICD_CONTROL"] = d.control
    r = subprocess.run(["sh", "-c", "set -eu\n" + "\n".join(blocks("tutorial-daemon"))],
                       cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:] + d.log()[-2000:]
    assert "hello.wasm:" in r.stdout and "sha256" in r.stdout, r.stdout
    assert "demo/web:80: activator reloaded" in r.stdout and "generation 2" in r.stdout, \
        r.stdout
    assert echo_through(sandbox, client, vip, "after") == "after", d.log()[-3000:]
    st = d.get("/v1/services")[0]["streams"]["80"]
    assert st["generation"] == 2 and st["counters"]["guest_failures"] == 0, st
