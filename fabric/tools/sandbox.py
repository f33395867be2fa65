"""Throwaway network namespaces for the demo, the end-to-end tests and the benchmarks.

Everything is named `<prefix>-<run id>-<role>` so a sweeper can remove what a crashed
run left behind without touching anything else; `close()` removes it all, also after
failures. Nothing here touches the machine's own network namespace beyond `ip netns`.

`python -m fabric.tools.sandbox --sweep [PREFIX...]` removes leftovers; `python -m
fabric.tools.sandbox http PORT` is a tiny HTTP server for tests (it never does reverse DNS).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

from fabric.config.specs import NETNS_DIR

PREFIXES = ("fbt", "fbd", "fbb")  # tests, demo, benchmarks


def prerequisites() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TAP devices)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    for tool in ("ip",):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    return None


class Sandbox:
    """A set of network namespaces, veths, processes and files, removed on close()."""

    def __init__(self, prefix: str = "fbt") -> None:
        self.prefix = prefix
        self.run_id = secrets.token_hex(3)
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self.tmp = tempfile.mkdtemp(prefix=f"{prefix}-{self.run_id}-")

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def name(self, role: str) -> str:
        return f"{self.prefix}-{self.run_id}-{role}"

    def netns(self, role: str) -> str:
        name = self.name(role)
        _ip("netns", "add", name)
        self.namespaces.append(name)
        self.run(name, "ip", "link", "set", "lo", "up")
        return name

    def run(self, ns: str | None, *cmd: str, check: bool = True, timeout: float = 30.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): "
                               f"{(p.stderr or p.stdout).strip()}")
        return p

    def popen(self, ns: str | None, *cmd: str, **kw: Any) -> subprocess.Popen[Any]:
        argv = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        p = subprocess.Popen(argv, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def veth(self, ns_a: str, name_a: str, ns_b: str | None, name_b: str) -> None:
        """A veth pair with one end in each namespace (ns_b None: stays in ns_a too)."""
        tmp = f"v{secrets.token_hex(5)}"
        self.run(ns_a, "ip", "link", "add", name_a, "type", "veth", "peer", "name", tmp)
        if ns_b is not None:
            self.run(ns_a, "ip", "link", "set", tmp, "netns", ns_b)
        self.run(ns_b or ns_a, "ip", "link", "set", tmp, "name", name_b)

    def link(self, ns_a: str, dev_a: str, addr_a: str | None, ns_b: str, dev_b: str,
             addr_b: str | None) -> None:
        """A veth between two namespaces, addressed (CIDR notation) and up on both ends."""
        self.veth(ns_a, dev_a, ns_b, dev_b)
        for ns, dev, addr in ((ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b)):
            if addr:
                self.run(ns, "ip", "addr", "add", addr, "dev", dev)
            self.run(ns, "ip", "link", "set", dev, "up")

    def internet(self, worker: str, server: str, pool: str) -> str:
        """An "internet" namespace behind `worker` (which routes and forwards to it), with
        `server` on its loopback and a route for the egress `pool` back to the worker."""
        net = self.netns("internet")
        self.run(net, "ip", "addr", "add", f"{server}/32", "dev", "lo")
        self.link(worker, "up0", "198.51.100.1/24", net, "eth0", "198.51.100.53/24")
        self.run(worker, "ip", "route", "add", "default", "via", "198.51.100.53")
        self.run(worker, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.run(net, "ip", "route", "add", pool, "via", "198.51.100.1")
        return net

    def http_server(self, ns: str, port: int) -> subprocess.Popen[Any]:
        p = self.popen(ns, sys.executable, "-m", "fabric.tools.sandbox", "http", str(port))
        self.wait_port(ns, port)
        return p

    def wait_port(self, ns: str, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run(ns, "ss", "-ltnH", f"sport = :{port}", check=False).stdout
            if out.strip():
                return
            time.sleep(0.05)
        raise RuntimeError(f"nothing listens on port {port} in {ns} after {timeout}s")

    def stop(self, p: subprocess.Popen[Any], sig: int = signal.SIGTERM,
             timeout: float = 10.0) -> int | None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        return p.returncode

    def close(self) -> None:
        for p in reversed(self.procs):
            try:
                self.stop(p, timeout=5)
            except Exception:
                pass
        self.procs.clear()
        for ns in reversed(self.namespaces):
            delete_netns(ns)
        self.namespaces.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


class Daemon:
    """A `fabricd run` inside a namespace, with its control socket in the sandbox."""

    def __init__(self, sandbox: Sandbox, ns: str, config: dict[str, Any],
                 name: str = "fabricd", *, command: Sequence[str] | None = None,
                 env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        """`command` is the fabricd to run (default: this interpreter's), with `env` and
        `cwd` (default: inherited), e.g. an installed wheel away from the source tree."""
        import yaml

        self.sandbox = sandbox
        self.ns = ns
        self.command = list(command) if command is not None else None
        self.env = env
        self.cwd = cwd
        self.dir = os.path.join(sandbox.tmp, name)
        os.makedirs(self.dir, exist_ok=True)
        self.control = os.path.join(self.dir, "control.sock")
        config = dict(config)
        config.setdefault("worker", {})
        config["worker"] = {"id": name, **config["worker"], "control": self.control}
        self.config_path = os.path.join(self.dir, "config.yaml")
        self.write_config(config)
        self.log_path = os.path.join(self.dir, "log")
        self.proc: subprocess.Popen[Any] | None = None
        self._yaml = yaml

    def write_config(self, config: dict[str, Any]) -> None:
        import yaml

        config = dict(config)
        config["worker"] = {**config.get("worker", {}), "control": self.control}
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)

    def start(self, timeout: float = 20.0) -> Daemon:
        log = open(self.log_path, "ab")
        cmd = self.command or self._own_command()
        self.proc = self.sandbox.popen(self.ns, *cmd, "run", "-c", self.config_path,
                                       stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                       cwd=self.cwd)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fabricd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.get("/v1/health")
                return self
            except Exception:
                time.sleep(0.05)
        raise RuntimeError(f"fabricd did not answer within {timeout}s:\n{self.log()}")

    def get(self, path: str) -> Any:
        from fabric.control.client import ControlClient

        return ControlClient(self.control).get(path)

    @staticmethod
    def _own_command() -> list[str]:
        exe = os.path.join(os.path.dirname(sys.executable), "fabricd")
        return [exe] if os.path.exists(exe) else [sys.executable, "-m", "fabric"]

    def cli_argv(self, *args: str) -> list[str]:
        """The command line of `fabricd --control SOCKET ARGS...` (for Popen)."""
        cmd = self.command or self._own_command()
        return [*cmd, "--control", self.control, *args]

    def cli(self, *args: str, check: bool = True, timeout: float = 30.0) -> str:
        p = subprocess.run(self.cli_argv(*args), capture_output=True, text=True,
                           timeout=timeout)
        if check and p.returncode:
            raise RuntimeError(f"fabricd {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    def wait_attached(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        pods: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            pods = self.get("/v1/pods")
            if sum(1 for p in pods if p["attached"]) >= count:
                return
            time.sleep(0.05)
        raise RuntimeError(f"pods not attached after {timeout}s: {json.dumps(pods)}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        return self.sandbox.stop(self.proc, timeout=timeout)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def delete_netns(name: str) -> None:
    """Kill what runs in the namespace, then delete it."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                          timeout=10).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)
    shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


def sweep(prefixes: Sequence[str] = PREFIXES) -> list[str]:
    """Delete namespaces that earlier runs left behind."""
    if not os.path.isdir(NETNS_DIR):
        return []
    gone = []
    for name in sorted(os.listdir(NETNS_DIR)):
        if any(name.startswith(p + "-") for p in prefixes):
            delete_netns(name)
            gone.append(name)
    return gone


def _http(port: int, ready_file: str | None = None) -> None:
    """A small HTTP server: `/` says hello, `/bytes/N` returns N bytes, `/whoami` the
    client's address as the server sees it."""
    import socketserver
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            path = urllib.parse.urlparse(self.path).path
            if path.startswith("/bytes/"):
                n = int(path.rsplit("/", 1)[1])
                self.send_response(200)
                self.send_header("Content-Length", str(n))
                self.end_headers()
                chunk = b"x" * 65536
                while n > 0:
                    self.wfile.write(chunk[: min(n, len(chunk))])
                    n -= len(chunk)
                return
            if path == "/whoami":
                body = f"{self.client_address[0]}\n".encode()
            else:
                body = f"hello from {os.uname().nodename} pid {os.getpid()}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True
        request_queue_size = 1024

    with Server(("0.0.0.0", port), Handler) as srv:
        if ready_file:  # when the port accepts, on the system-wide monotonic clock
            with open(ready_file, "w") as f:
                f.write(f"{time.monotonic()}\n")
        srv.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fabric.tools.sandbox")
    ap.add_argument("--sweep", nargs="*", metavar="PREFIX")
    sub = ap.add_subparsers(dest="cmd")
    h = sub.add_parser("http")
    h.add_argument("port", type=int)
    h.add_argument("--ready-file")
    args = ap.parse_args(argv)
    if args.cmd == "http":
        _http(args.port, args.ready_file)
        return 0
    if args.sweep is not None:
        for name in sweep(args.sweep or PREFIXES):
            print(f"removed {name}")
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
