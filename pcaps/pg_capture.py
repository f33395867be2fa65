"""Capture real PostgreSQL client sessions through the PostgreSQL activator, with tshark.

Run as root (namespaces; the e2e lock): ``flock /tmp/fabricd-e2e.lock .venv/bin/python
pcaps/pg_capture.py``. It starts the daemon with a service `pg` (VIP 10.42.0.100:5432,
activators/postgres/postgres.wasm) in front of a real PostgreSQL 15 in pod `db`
(10.42.0.3), captures with tshark on the pod interface of the client (client <-> VIP)
and of the database (VIP <-> db:5432), and runs, one after the other, a psql session
(simple protocol) and a psycopg session (extended protocol: keep-alives in the simple,
extended, binary and prepared forms, real queries with parameters, a transaction).
It writes pcaps/pg_sessions/{client,backend}.pcap; tests/replay/test_pg_replay.py
replays them through the activator and checks what it sends each way.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fabric.tools.sandbox import Daemon, Sandbox  # noqa: E402
from tests.support import pgwire  # noqa: E402

VIP, CLIENT_IP, DB_IP = "10.42.0.100", "10.42.0.2", "10.42.0.3"
OUT = ROOT / "pcaps" / "pg_sessions"

PSYCOPG = r"""
import psycopg
with psycopg.connect(host="10.42.0.100", port=5432, user="postgres", dbname="postgres",
                     autocommit=True, application_name="replay") as c:
    assert c.execute("SELECT 1").fetchone() == (1,)
    assert c.cursor(binary=True).execute("SELECT 1").fetchone() == (1,)
    for _ in range(6):
        assert c.execute("select 1", prepare=True).fetchone() == (1,)
    c.execute("CREATE TEMP TABLE t (a int, b text)")
    c.execute("INSERT INTO t VALUES (%s, %s), (%s, %s)", (1, "x", 2, "y"))
    assert c.execute("SELECT sum(a) FROM t WHERE b <> %s", ("z",)).fetchone() == (3,)
    assert c.execute("select 1", prepare=True).fetchone() == (1,)
    with c.transaction():
        c.execute("INSERT INTO t VALUES (3, 'z')")
        assert c.execute("SELECT 1").fetchone() == (1,)
    assert c.execute(";").statusmessage is None
    assert c.execute("SELECT count(*) FROM t").fetchone() == (3,)
"""


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    sb = Sandbox("fbc")
    pgroot = Path(tempfile.mkdtemp(prefix="fbc-pg-"))
    capdir = Path(tempfile.mkdtemp(prefix="fbc-cap-"))
    srv = None
    try:
        worker, client, db = sb.netns("worker"), sb.netns("client"), sb.netns("db")
        cfg = {"namespaces": [{"name": "data", "id": 9, "cidr": "10.42.0.0/24",
                               "pods": [{"name": "client", "ip": CLIENT_IP, "netns": client},
                                        {"name": "db", "ip": DB_IP, "netns": db}],
                               "services": [{"name": "pg", "ip": VIP, "backends": ["db"],
                                             "ports": [{"port": 5432, "target_port": 5432,
                                                        "activator": str(ROOT / "activators"
                                                                         / "postgres"
                                                                         / "postgres.wasm")}]}]}]}
        d = Daemon(sb, worker, cfg).start()
        d.wait_attached(2)
        srv = pgwire.PgServer(pgroot, listen="*", netns=db).start()
        caps = {}
        for ns, name in ((client, "client"), (db, "backend")):
            dev = [ln.split(":")[1].strip().split("@")[0]
                   for ln in sb.run(ns, "ip", "-o", "link").stdout.splitlines()
                   if ": lo:" not in ln][0]
            path = capdir / f"{name}.pcap"
            caps[name] = (sb.popen(ns, "tshark", "-q", "-i", dev, "-F", "pcap", "-w",
                                   str(path), "-f", "tcp port 5432"), path)
        time.sleep(2)  # tshark opens the interface
        env = ["env", "PGHOST=" + VIP, "PGUSER=postgres", "PGAPPNAME=replay"]
        sb.run(client, *env, "psql", "-X", "-At", "-c", "select 1", "-c",
               "select 40 + 2", "-c", "SELECT 1;", "-c", "begin; select 1; commit")
        sb.run(client, sys.executable, "-c", PSYCOPG, timeout=60)
        time.sleep(1)
        for p, path in caps.values():
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=10)
            if not path.exists():
                raise RuntimeError(f"tshark wrote no {path}: {err.decode()[-500:]}")
            shutil.copy(path, OUT / path.name)
            print(f"{OUT / path.name}: {path.stat().st_size} bytes")
        d.stop()
        return 0
    finally:
        if srv is not None:
            srv.stop()
        sb.close()
        shutil.rmtree(pgroot, ignore_errors=True)
        shutil.rmtree(capdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
