"""The PostgreSQL activator with `upstream: pod-local`: a real PostgreSQL 15 in a pod,
psql and pgbench in another. Every session's upstream connection is made inside the
database pod (to its own IP, over its loopback): the server sees the pod's own address
as the client's (what pg_hba.conf must allow), pgbench -c 20 runs without a failed
transaction, and the database pod's TAP carries none of the sessions' bytes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fabric.tools.sandbox import Sandbox
from tests.e2e.test_postgres_activator import DB_IP, VIP, WASM, pgroot, psql, setup, stats
from tests.support import pgwire as W

pytestmark = pytest.mark.skipif(not W.available(), reason="PostgreSQL 15 is not installed")
__all__ = ["pgroot"]  # the fixture, shared


def test_sessions_connect_inside_the_database_pod(sandbox: Sandbox, pgroot: Path) -> None:
    d, client, srv = setup(sandbox, pgroot, {
        "name": "pg", "ip": VIP, "backends": ["db-1"],
        "ports": [{"port": 5432, "target_port": 5432, "activator": WASM,
                   "upstream": "pod-local"}]})
    try:
        base = f"host={VIP} port=5432 user=postgres dbname=postgres connect_timeout=30"
        r = psql(sandbox, client, f"{base} sslmode=disable",
                 "select host(inet_client_addr()), host(inet_server_addr())")
        assert r.returncode == 0, (r.stderr, d.log()[-3000:])
        assert r.stdout.strip() == f"{DB_IP}|{DB_IP}", r.stdout
        conn = ["-h", VIP, "-p", "5432", "-U", "postgres"]
        init = sandbox.run(client, "pgbench", "-i", "-q", "-s", "1", *conn, "postgres",
                           check=False, timeout=120)
        assert init.returncode == 0, init.stderr
        before = next(p for p in d.get("/v1/pods") if p["name"] == "db-1")
        r = sandbox.run(client, "pgbench", "-n", "-S", "-c", "20", "-j", "2", "-t", "200",
                        *conn, "postgres", check=False, timeout=180)
        assert r.returncode == 0, r.stderr[-2000:]
        done = re.search(r"number of transactions actually processed: (\d+)/(\d+)", r.stdout)
        assert done and done.group(1) == done.group(2) == "4000", r.stdout
        failed = re.search(r"number of failed transactions: (\d+)", r.stdout)
        assert failed is None or failed.group(1) == "0", r.stdout
        after = next(p for p in d.get("/v1/pods") if p["name"] == "db-1")
        c = stats(d, 5432)["counters"]
        assert c["pod_local_connects"] >= 22 and c["guest_failures"] == 0, c
        assert c["pod_local_fallback_not_local"] == c["pod_local_fallback_netns"] == 0, c
        # 4,000 transactions' queries and answers (~0.5 MB each way through the VIP
        # path) crossed the pod's loopback, not its TAP: at most probes did.
        frames = (after["tx_packets"] - before["tx_packets"]
                  + after["rx_packets"] - before["rx_packets"])
        assert frames < 200, (before, after)
    finally:
        srv.stop()
