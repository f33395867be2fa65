"""PostgreSQL 17's direct TLS (``sslnegotiation=direct``: the first byte is a TLS
ClientHello, 0x16, with ALPN ``postgresql``) through the PostgreSQL activator, end to end.

Debian 12 ships PostgreSQL 15, which neither sends nor accepts direct TLS, so both ends
are real TLS stacks speaking what PG 17 puts on the wire: a Python ``ssl`` client with
ALPN ``postgresql`` and a Python ``ssl`` server with the same ALPN and a self-signed
certificate in the backend pod. What is checked is the activator's part: the dormant
service wakes on the ClientHello, the bytes are forwarded and the pair spliced, the
handshake completes against the backend's own certificate (TLS end to end, nothing
terminated in the fabric), data flows both ways afterwards, and once the connection is
gone the port's need falls back to none. And a backend that accepts and never answers (the
server SIGSTOPped: its kernel still completes the handshake) has the client's connection
closed after ``hold_timeout_ms``, where a splice at the connect left it hanging.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fabric.tools.sandbox import Daemon, Sandbox

VIP = "10.43.0.100"
DB_IP = "10.43.0.3"
ROOT = Path(__file__).resolve().parents[2]
WASM = str(ROOT / "activators" / "postgres" / "postgres.wasm")

SERVER = r"""
import socket, ssl, sys, threading
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
ctx.set_alpn_protocols(["postgresql"])
ls = socket.create_server(("0.0.0.0", 5432))
def serve(c):
    with ctx.wrap_socket(c, server_side=True) as t:
        t.sendall(b"alpn=" + (t.selected_alpn_protocol() or "-").encode() + b"\n")
        while data := t.recv(65536):
            t.sendall(data.upper())
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT = r"""
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
ctx.set_alpn_protocols(["postgresql"])
with socket.create_connection((sys.argv[1], 5432), timeout=30) as s:
    with ctx.wrap_socket(s, server_hostname="db.fabric.test") as t:
        first = t.recv(100)
        t.sendall(b"select 1" * 4096)
        want, got = 8 * 4096, b""
        while len(got) < want:
            got += t.recv(65536)
        print(first.decode().strip(), t.version(), got == b"SELECT 1" * 4096)
"""


def _setup(sandbox: Sandbox, tmp_path: Path, config: dict
           ) -> tuple[Path, Path, str, str, Daemon]:
    """A certificate for db.fabric.test, and the daemon with a dormant service whose
    port runs the PostgreSQL activator with `config`: (cert, key, client, db, daemon)."""
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=db.fabric.test", "-addext", "subjectAltName=DNS:db.fabric.test",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    worker, client, db = sandbox.netns("worker"), sandbox.netns("client"), sandbox.netns("db")
    port: dict = {"port": 5432, "target_port": 5432, "activator": WASM}
    if config:
        port["activator_config"] = config
    ns = {"name": "data", "id": 9, "cidr": "10.43.0.0/24",
          "pods": [{"name": "client", "ip": "10.43.0.2", "netns": client},
                   {"name": "db-1", "ip": DB_IP, "netns": db}],
          "services": [{"name": "pg", "ip": VIP, "backends": ["db-1"], "readiness": "external",
                        "ports": [port]}]}
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    return cert, key, client, db, d


def test_direct_tls_wakes_and_is_passed_through_end_to_end(sandbox: Sandbox,
                                                            tmp_path: Path) -> None:
    cert, key, client, db, d = _setup(sandbox, tmp_path, {})
    srv = sandbox.popen(db, sys.executable, "-c", SERVER, str(cert), str(key),
                        stderr=subprocess.PIPE)
    try:
        sandbox.wait_port(db, 5432)
        d.cli("ready", "data/db-1", "--unready")  # scaled to zero, as a controller would
        assert d.get("/v1/services")[0]["state"] == "dormant"
        cli = sandbox.popen(client, sys.executable, "-c", CLIENT, VIP, str(cert),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait(lambda: d.get("/v1/services")[0]["state"] == "activating",
             "the ClientHello to wake the service")
        d.cli("ready", "data/db-1")
        out, err = cli.communicate(timeout=60)
        assert cli.returncode == 0, (err, d.log()[-3000:])
        alpn, version, echoed = out.split()
        assert alpn == "alpn=postgresql" and version.startswith("TLSv1.") and echoed == "True"
        port = d.get("/v1/services")[0]["streams"]["5432"]
        assert port["counters"]["spliced"] == 1 and port["counters"]["guest_failures"] == 0
        assert port["wake"]["count"] == 1, port
        # the connection is gone: the port's need falls back to none (nothing pins it)
        wait(lambda: d.get("/v1/services")[0]["streams"]["5432"]["need"] == "none",
             "need to fall to none after the last connection")
    finally:
        srv.kill()


FROZEN_CLIENT = r"""
import socket, ssl, sys, time
ctx = ssl.create_default_context(cafile=sys.argv[2])
ctx.set_alpn_protocols(["postgresql"])
t0 = time.monotonic()
try:
    with socket.create_connection((sys.argv[1], 5432), timeout=60) as s:
        with ctx.wrap_socket(s, server_hostname="db.fabric.test") as t:
            print("handshake", t.version())
except (OSError, ssl.SSLError) as e:
    print("failed", type(e).__name__, round(time.monotonic() - t0, 2))
"""


def test_direct_tls_to_a_frozen_backend_is_closed_after_the_hold(sandbox: Sandbox,
                                                                 tmp_path: Path) -> None:
    cert, key, client, db, d = _setup(sandbox, tmp_path, {"hold_timeout_ms": 1500})
    srv = sandbox.popen(db, sys.executable, "-c", SERVER, str(cert), str(key),
                        stderr=subprocess.PIPE)
    try:
        sandbox.wait_port(db, 5432)
        os.killpg(srv.pid, signal.SIGSTOP)  # frozen, never thawed: the kernel still accepts
        r = sandbox.run(client, sys.executable, "-c", FROZEN_CLIENT, VIP, str(cert),
                        check=False, timeout=40)
        words = r.stdout.split()
        assert words[:1] == ["failed"], (r.stdout, r.stderr, d.log()[-3000:])
        assert 1.2 < float(words[-1]) < 10, words
        port = d.get("/v1/services")[0]["streams"]["5432"]
        assert port["guest_counters"].get("startup_timeouts", 0) == 1, port
        assert port["counters"].get("spliced", 0) == 0 and port["counters"]["guest_failures"] == 0
        wait(lambda: d.get("/v1/services")[0]["streams"]["5432"]["need"] == "none",
             "need to fall to none after the connection was closed")
    finally:
        os.killpg(srv.pid, signal.SIGCONT)
        srv.kill()


def wait(cond: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
