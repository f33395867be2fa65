"""The PostgreSQL activator end to end: the daemon, a real PostgreSQL 15 in a pod
namespace behind a dormant service, real clients (psql, pgbench, psycopg) in another.

- psql with sslmode=disable and sslmode=prefer (answered 'N': plaintext through the
  activator), pgbench -c 20 with no failed transaction, and on a second port of the
  same service ``ssl: passthrough`` with sslmode=require against the server's
  self-signed certificate (TLS end to end, spliced);
- the database frozen (SIGSTOP of the postmaster and its children from ``on_idle``,
  SIGCONT from ``on_activate``) under 21 open psycopg connections once they are all
  idle; a keep-alive every second on one of them (``SELECT 1`` simple and extended,
  pgx's ``-- ping``, a commented ``SELECT 1``) answered while it is frozen, with no
  wake; the next real query thaws it and every connection goes on;
- the database frozen and never thawed (``on_activate`` does nothing): a new psql's
  startup is relayed to the stopped postmaster (its kernel still accepts), and psql gets
  FATAL 57P03 after ``hold_timeout_ms`` instead of hanging; the same with ``ssl:
  passthrough`` (the SSLRequest forwarded, no answer: the activator's 57P03 in its place);
- a real postmaster answering FATAL 57P03 (a smart shutdown waiting for its last
  session answers every new startup "the database system is shutting down"): a psql
  started then gets its session from the server started after it, the startup resent
  meanwhile; a startup error of another SQLSTATE is relayed at once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric.tools.sandbox import Daemon, Sandbox
from tests.support import pgwire as W

VIP = "10.42.0.100"
DB_IP = "10.42.0.3"
ROOT = Path(__file__).resolve().parents[2]
WASM = str(ROOT / "activators" / "postgres" / "postgres.wasm")

pytestmark = pytest.mark.skipif(not W.available(), reason="PostgreSQL 15 is not installed")


@pytest.fixture
def pgroot() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="fbt-pg-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def self_signed(d: Path) -> tuple[Path, Path]:
    cert, key = d / "server.crt", d / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=db.fabric.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def freeze_cmd(pidfile: Path, sig: str) -> str:
    """A hook: signal the postmaster (first line of postmaster.pid) and its children."""
    return (f"sh -c 'p=$(head -n1 {pidfile}); kill -{sig} $(pgrep -P $p) $p'")


def setup(sb: Sandbox, pgroot: Path, service: dict, *, ssl: bool = False
          ) -> tuple[Daemon, str, W.PgServer]:
    worker = sb.netns("worker")
    client, db = sb.netns("client"), sb.netns("db")
    ns = {"name": "data", "id": 9, "cidr": "10.42.0.0/24",
          "pods": [{"name": "client", "ip": "10.42.0.2", "netns": client},
                   {"name": "db-1", "ip": DB_IP, "netns": db}],
          "services": [service]}
    d = Daemon(sb, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    srv = W.PgServer(pgroot, listen="*", netns=db, max_connections=60,
                     ssl_cert=self_signed(pgroot) if ssl else None).start()
    return d, client, srv


def service(ports: list[dict], **extra: object) -> dict:
    return {"name": "pg", "ip": VIP, "backends": ["db-1"], "ports": ports, **extra}


def psql(sb: Sandbox, ns: str, conninfo: str, sql: str, timeout: float = 40
         ) -> subprocess.CompletedProcess[str]:
    return sb.run(ns, "psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", conninfo, "-c", sql,
                  check=False, timeout=timeout)


def stats(d: Daemon, port: int) -> dict:
    return d.get("/v1/services")[0]["streams"][str(port)]


def test_psql_pgbench_sslmodes_and_passthrough(sandbox: Sandbox, pgroot: Path) -> None:
    d, client, srv = setup(sandbox, pgroot, service([
        {"port": 5432, "target_port": 5432, "activator": WASM},
        {"port": 6432, "target_port": 5432, "activator": WASM,
         "activator_config": {"ssl": "passthrough"}}]), ssl=True)
    try:
        svc = d.get("/v1/services")[0]
        assert svc["state"] in ("dormant", "idle") and "5432" in svc["streams"], (
            svc, d.log()[-3000:])
        base = f"host={VIP} port=5432 user=postgres dbname=postgres connect_timeout=30"
        for mode in ("disable", "prefer"):
            r = psql(sandbox, client, f"{base} sslmode={mode}",
                     "select 40 + 2, coalesce((select ssl from pg_stat_ssl"
                     " where pid = pg_backend_pid()), false)")
            assert r.returncode == 0 and r.stdout.strip() == "42|f", (mode, r.stderr,
                                                                      d.log()[-3000:])
        # passthrough: TLS end to end with the server's own certificate.
        tls = f"host={VIP} port=6432 user=postgres dbname=postgres sslmode=require"
        r = psql(sandbox, client, tls, "select ssl, version from pg_stat_ssl"
                 " where pid = pg_backend_pid()")
        assert r.returncode == 0 and r.stdout.startswith("t|TLS"), (r.stderr, d.log()[-3000:])
        assert stats(d, 6432)["counters"]["spliced"] >= 1
        # pgbench: 20 clients, simple and extended protocol, no failed transaction.
        env_conn = ["-h", VIP, "-p", "5432", "-U", "postgres"]
        init = sandbox.run(client, "pgbench", "-i", "-q", "-s", "1", *env_conn, "postgres",
                           check=False, timeout=120)
        assert init.returncode == 0, init.stderr
        for mode in ("simple", "extended", "prepared"):
            r = sandbox.run(client, "pgbench", "-n", "-c", "20", "-j", "2", "-t", "50",
                            "-M", mode, *env_conn, "postgres", check=False, timeout=180)
            assert r.returncode == 0, (mode, r.stderr[-2000:])
            done = re.search(r"number of transactions actually processed: (\d+)/(\d+)",
                             r.stdout)
            assert done and done.group(1) == done.group(2) == "1000", r.stdout
            failed = re.search(r"number of failed transactions: (\d+)", r.stdout)
            assert failed is None or failed.group(1) == "0", r.stdout
        st = stats(d, 5432)
        assert st["counters"]["guest_failures"] == 0, st
    finally:
        srv.stop()


# One client process with 21 psycopg connections, driven line by line over stdin so the
# test can look at the database between steps. Replies are one JSON line per command.
CLIENT = r"""
import json, sys, time, psycopg
conns = [psycopg.connect(host=sys.argv[1], port=5432, user="postgres", dbname="postgres",
                         autocommit=True, connect_timeout=60) for _ in range(21)]
ka = conns[0]
for line in sys.stdin:
    cmd = line.split()
    out = {}
    try:
        if cmd[0] == "ping":  # a pool's keep-alive: SELECT 1 every second
            t = []
            for i in range(int(cmd[1])):
                t0 = time.monotonic()
                if i % 5 == 0:  # simple protocol
                    assert ka.execute("SELECT 1").fetchone() == (1,)
                elif i % 5 == 1:  # extended, binary results
                    assert ka.cursor(binary=True).execute("SELECT 1").fetchone() == (1,)
                elif i % 5 == 2:  # extended, a named prepared statement
                    assert ka.execute("select 1", prepare=True).fetchone() == (1,)
                elif i % 5 == 3:  # pgx's pgconn.Ping: the simple Query "-- ping"
                    assert ka.pgconn.exec_(b"-- ping").status == 0  # EMPTY_QUERY
                else:  # commented, extended
                    assert ka.execute("/* ping */ SELECT 1 -- health").fetchone() == (1,)
                t.append(time.monotonic() - t0)
                time.sleep(1)
            out = {"max_s": max(t)}  # reported, not asserted
        elif cmd[0] == "query":  # real work on every connection
            t0 = time.monotonic()
            got = [c.execute("SELECT %s::int + 1", (i,)).fetchone()[0]
                   for i, c in enumerate(conns)]
            out = {"ok": got == [i + 1 for i in range(len(conns))],
                   "s": time.monotonic() - t0}
        elif cmd[0] == "txn":
            with conns[1].transaction():
                conns[1].execute("CREATE TEMP TABLE IF NOT EXISTS t (a int)")
                conns[1].execute("INSERT INTO t VALUES (1)")
            out = {"ok": conns[1].execute("SELECT count(*) FROM t").fetchone()[0] >= 1}
    except Exception as e:
        out = {"error": repr(e)}
    print(json.dumps(out), flush=True)
"""


def test_a_database_started_by_the_wake_serves_its_first_sessions(sandbox: Sandbox,
                                                                   pgroot: Path) -> None:
    """Scale to zero for real: no server runs until `on_activate` starts one. A postmaster
    listens before it takes sessions (it answers FATAL 57P03 "the database system is
    starting up" meanwhile), so a port that accepts is not yet a database that serves:
    the clients held through the wake must still get their sessions."""
    worker = sandbox.netns("worker")
    client, db = sandbox.netns("client"), sandbox.netns("db")
    srv = W.PgServer(pgroot, listen="*", netns=db, max_connections=60).init()
    script = pgroot / "start.sh"
    script.write_text("(exec " + " ".join(srv.argv) + f") >{pgroot}/hook.log 2>&1 &\n")
    ns = {"name": "data", "id": 9, "cidr": "10.42.0.0/24",
          "pods": [{"name": "client", "ip": "10.42.0.2", "netns": client},
                   {"name": "db-1", "ip": DB_IP, "netns": db}],
          "services": [service([{"port": 5432, "target_port": 5432, "activator": WASM}],
                               on_activate=f"sh {script}")]}
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    try:
        procs = [sandbox.popen(client, "psql", "-X", "-At", "-v", "ON_ERROR_STOP=1",
                               f"host={VIP} user=postgres dbname=postgres sslmode=disable",
                               "-c", f"select {i} + 1")
                 for i in range(5)]
        outs = [p.communicate(timeout=60) for p in procs]
        assert [o[0].decode().strip() for o in outs] == [str(i + 1) for i in range(5)], (
            outs, d.log()[-3000:], (pgroot / "hook.log").read_text()[-2000:])
        st = stats(d, 5432)
        assert st["counters"]["guest_failures"] == 0, st
    finally:
        pidfile = srv.data / "postmaster.pid"
        if pidfile.exists():
            pid = int(pidfile.read_text().split()[0])
            try:
                os.kill(pid, signal.SIGQUIT)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)


def frozen(srv: W.PgServer) -> bool:
    """Every process of the server is stopped (state T)."""
    states = []
    for pid in srv.pids():
        try:
            states.append(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
        except OSError:
            pass
    return bool(states) and all(s == "T" for s in states)


def wait(cond, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_database_frozen_under_idle_connections_keepalives_answered(sandbox: Sandbox,
                                                                    pgroot: Path) -> None:
    pidfile = pgroot / "data" / "postmaster.pid"
    d, client, srv = setup(sandbox, pgroot, service(
        [{"port": 5432, "target_port": 5432, "activator": WASM}], idle_timeout="2s",
        on_idle=freeze_cmd(pidfile, "STOP"), on_activate=freeze_cmd(pidfile, "CONT")))
    proc = sandbox.popen(client, sys.executable, "-c", CLIENT, VIP, stdin=subprocess.PIPE,
                         text=True)

    def ask(cmd: str, timeout: float = 60) -> dict:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(cmd + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, (proc.stderr.read() if proc.stderr else "", d.log()[-3000:])
        return json.loads(line)

    try:
        assert ask("query")["ok"]
        assert ask("txn")["ok"]
        # 21 idle sessions: need none, the service idles, on_idle freezes the database.
        wait(lambda: frozen(srv), "the database to be frozen under idle connections")
        hooks = d.get("/v1/services")[0]["hooks"]
        before = dict(stats(d, 5432)["guest_counters"])
        r = ask("ping 5", timeout=30)
        assert "error" not in r, r
        assert frozen(srv), "a keep-alive woke the database"
        after = stats(d, 5432)["guest_counters"]
        assert after.get("keepalives_answered", 0) - before.get("keepalives_answered", 0) >= 5
        assert d.get("/v1/services")[0]["hooks"] == hooks  # no on_activate ran
        # A real query thaws it, on every connection, in order.
        r = ask("query")
        assert r.get("ok"), (r, d.log()[-3000:])
        assert not frozen(srv)
        st = stats(d, 5432)
        assert st["counters"]["guest_failures"] == 0, st
        assert st["guest_counters"].get("wake_query", 0) >= 1, st
    finally:
        if proc.stdin:
            proc.stdin.close()
        proc.kill()
        srv.stop()


def test_a_startup_to_a_database_frozen_for_good_gets_57p03(sandbox: Sandbox,
                                                           pgroot: Path) -> None:
    """on_activate fails to thaw the database (here: it does nothing). The frozen
    postmaster still completes TCP handshakes, so the readiness probe passes and the
    StartupMessage is relayed; psql (no connect_timeout) gets the activator's FATAL 57P03
    once hold_timeout_ms has passed without a byte back, instead of hanging for ever."""
    pidfile = pgroot / "data" / "postmaster.pid"
    d, client, srv = setup(sandbox, pgroot, service(
        [{"port": 5432, "target_port": 5432, "activator": WASM,
          "activator_config": {"hold_timeout_ms": 2000}},
         {"port": 6432, "target_port": 5432, "activator": WASM,
          "activator_config": {"hold_timeout_ms": 2000, "ssl": "passthrough"}}],
        idle_timeout="1s", on_idle=freeze_cmd(pidfile, "STOP"), on_activate="true"))
    base = f"host={VIP} port=5432 user=postgres dbname=postgres sslmode=disable"
    try:
        r = psql(sandbox, client, f"{base} connect_timeout=30", "select 40 + 2")
        assert r.returncode == 0 and r.stdout.strip() == "42", (r.stderr, d.log()[-3000:])
        wait(lambda: frozen(srv), "the database to be frozen once idle")
        t0 = time.monotonic()
        r = psql(sandbox, client, base, "select 1", timeout=30)
        took = time.monotonic() - t0
        assert r.returncode != 0 and "not available (hold timeout)" in r.stderr, (
            r.stdout, r.stderr, d.log()[-3000:])
        assert 1.5 < took < 15, took
        assert frozen(srv), "nothing thawed it"
        st = stats(d, 5432)
        assert st["guest_counters"].get("startup_timeouts", 0) >= 1, st
        assert st["counters"]["guest_failures"] == 0, st
        # TLS passthrough: the SSLRequest goes to the frozen postmaster, which never
        # answers; spliced at once, psql hung here for ever
        t0 = time.monotonic()
        r = psql(sandbox, client, f"host={VIP} port=6432 user=postgres dbname=postgres"
                 " sslmode=require", "select 1", timeout=30)
        took = time.monotonic() - t0
        # libpq takes the 'E' for the answer to its SSLRequest; since the fix of
        # CVE-2024-10977 it no longer prints the (unauthenticated) text of one
        assert r.returncode != 0 and ("not available (hold timeout)" in r.stderr
                                      or "error response during SSL" in r.stderr), (
            r.stdout, r.stderr, d.log()[-3000:])
        assert 1.5 < took < 15, took
        st = stats(d, 6432)
        assert st["guest_counters"].get("startup_timeouts", 0) >= 1, st
        assert st["counters"].get("spliced", 0) == 0 and st["counters"]["guest_failures"] == 0
    finally:
        subprocess.run(freeze_cmd(pidfile, "CONT"), shell=True, check=False, timeout=10)
        srv.stop()


def startup_answer(path: str) -> bytes:
    """Everything a server sends to a StartupMessage on its unix socket, to its close."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
        s.sendall(W.startup())
        got = b""
        while not W.count_rfq(got) and (chunk := s.recv(65536)):
            got += chunk
        return got
    except OSError:
        return b""
    finally:
        s.close()


def test_a_startup_during_a_smart_shutdown_gets_its_session_from_the_next_server(
        sandbox: Sandbox, pgroot: Path) -> None:
    """The stop half of the wake race (an on_idle ``pg_ctl stop -m smart`` while a client
    connects), with the real server's answers: a smart shutdown waits for its last
    session and answers every new startup FATAL 57P03 "the database system is shutting
    down" meanwhile; then it exits, and the next server takes the startup. psql (no
    connect_timeout) used to get the FATAL."""
    d, client, srv = setup(sandbox, pgroot, service(
        [{"port": 5432, "target_port": 5432, "activator": WASM,
          "activator_config": {"hold_timeout_ms": 30000}}]))
    base = f"host={VIP} port=5432 user=postgres sslmode=disable"
    held = None
    try:
        r = psql(sandbox, client, f"{base} dbname=postgres connect_timeout=30", "select 1")
        assert r.returncode == 0, (r.stderr, d.log()[-3000:])
        held = W.RawPg.unix(srv.socket_path)  # keeps the smart shutdown waiting
        pid = int((srv.data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
        wait(lambda: b"shutting down" in startup_answer(srv.socket_path),
             "the postmaster to answer 57P03")
        p = sandbox.popen(client, "psql", "-X", "-At", "-v", "ON_ERROR_STOP=1",
                          f"{base} dbname=postgres", "-c", "select 40 + 2", text=True)
        wait(lambda: stats(d, 5432)["guest_counters"].get("startup_retries", 0) >= 3,
             "the startup to be answered 57P03 and resent")
        assert p.poll() is None, p.communicate()
        held.close()  # its last session ends: the postmaster exits ...
        held = None
        wait(lambda: not (srv.data / "postmaster.pid").exists(), "the postmaster to exit")
        srv.proc.wait(10)
        srv.proc = subprocess.Popen(srv.argv, stdout=srv.log, stderr=srv.log)  # ... restarted
        out, err = p.communicate(timeout=40)
        assert p.returncode == 0 and out.strip() == "42", (out, err, d.log()[-3000:])
        # another SQLSTATE is the client's to see at once (3D000: no such database)
        t0 = time.monotonic()
        r = psql(sandbox, client, f"{base} dbname=nope", "select 1")
        assert r.returncode != 0 and 'database "nope" does not exist' in r.stderr, r.stderr
        assert time.monotonic() - t0 < 5
        st = stats(d, 5432)
        assert st["counters"]["guest_failures"] == 0, st
        assert "startup_timeouts" not in st["guest_counters"], st
    finally:
        if held is not None:
            held.sock.close()
        srv.stop()
