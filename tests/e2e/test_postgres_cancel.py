"""A query cancelled through the fabric with two PostgreSQL replicas behind the service.

A CancelRequest comes on a new connection, which the host would send to a replica
chosen by the hash of its client port: without the PostgreSQL activator routing it
(``upstream_connect_like``, activators/ABI.md) about half of the cancels reach a
replica that never had the session and the query runs on. Real clients (psycopg and
its libpq ``PQcancel``) in a client pod, two real PostgreSQL 15 servers in two pods;
with upstream connections from the VIP and made inside the replica's pod
(``upstream: pod-local``), where the cancel must reach the same pod the same way.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric.tools.sandbox import Daemon, Sandbox
from tests.e2e.test_postgres_activator import VIP, WASM, stats
from tests.support import pgwire as W

DB_IPS = ["10.42.0.3", "10.42.0.4"]

pytestmark = pytest.mark.skipif(not W.available(), reason="PostgreSQL 15 is not installed")

# Sessions are opened until both replicas have some (each reports inet_server_addr()
# and its pid); on each a pg_sleep(60) runs in a thread, the main thread watches that
# session on its replica directly (pod to pod, not through the service) until the query
# is running, then cancels it once (libpq's PQcancel: a new connection to the VIP). A
# cancel that reaches the other replica is lost: the query runs its 60 s out and is
# reported "completed", not "cancelled".
CLIENT = r"""
import json, sys, threading, time, psycopg
host = sys.argv[1]
kw = dict(port=5432, user="postgres", dbname="postgres", sslmode="disable",
          autocommit=True, connect_timeout=60)
conns, seen = [], set()
while len(conns) < 40 and not (len(conns) >= 6 and len(seen) == 2):
    c = psycopg.connect(host=host, **kw)
    addr, pid = c.execute("SELECT host(inet_server_addr()), pg_backend_pid()").fetchone()
    seen.add(addr)
    conns.append((c, addr, pid))
watch = {a: psycopg.connect(host=a, **kw) for a in seen}
out = {"replicas": sorted(seen), "sessions": len(conns), "results": []}
for c, addr, pid in conns:
    res = {}
    def run(c=c, res=res):
        try:
            c.execute("SELECT pg_sleep(60)")
            res["r"] = "completed"
        except psycopg.errors.QueryCanceled:
            res["r"] = "cancelled"
        except Exception as e:
            res["r"] = repr(e)
    t = threading.Thread(target=run)
    t.start()
    for _ in range(2000):  # until the server runs it: a cancel before that is ignored
        st = watch[addr].execute("SELECT state, query FROM pg_stat_activity WHERE pid = %s",
                                 (pid,)).fetchone()
        if st and st[0] == "active" and "pg_sleep" in st[1]:
            break
        time.sleep(0.01)
    c.cancel()
    t.join()
    out["results"].append(res["r"])
print(json.dumps(out), flush=True)
"""


@pytest.fixture
def pgroots() -> Iterator[list[Path]]:
    ds = [Path(tempfile.mkdtemp(prefix="fbt-pgc-")) for _ in DB_IPS]
    try:
        yield ds
    finally:
        for d in ds:
            shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("upstream", ["vip", "pod-local"])
def test_a_pg_sleep_is_cancelled_through_the_fabric_with_two_replicas(
        sandbox: Sandbox, pgroots: list[Path], upstream: str) -> None:
    worker, client = sandbox.netns("worker"), sandbox.netns("client")
    dbs = [sandbox.netns(f"db{i + 1}") for i in range(len(DB_IPS))]
    ns = {"name": "data", "id": 9, "cidr": "10.42.0.0/24",
          "pods": [{"name": "client", "ip": "10.42.0.2", "netns": client}]
          + [{"name": f"db-{i + 1}", "ip": ip, "netns": dbs[i]} for i, ip in enumerate(DB_IPS)],
          "services": [{"name": "pg", "ip": VIP, "backends": ["db-1", "db-2"],
                        "ports": [{"port": 5432, "target_port": 5432, "activator": WASM,
                                   "upstream": upstream}]}]}
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(3)
    servers = []
    try:
        for root, db in zip(pgroots, dbs, strict=True):
            servers.append(W.PgServer(root, listen="*", netns=db, max_connections=60).start())
        r = sandbox.run(client, sys.executable, "-c", CLIENT, VIP, check=False, timeout=900)
        assert r.returncode == 0, (r.stderr[-3000:], d.log()[-3000:])
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["replicas"] == DB_IPS, out  # both replicas ran sessions
        assert out["results"] == ["cancelled"] * out["sessions"], out
        st = stats(d, 5432)
        assert st["counters"]["guest_failures"] == 0, st
        assert st["guest_counters"].get("cancels_matched", 0) >= out["sessions"], st
        if upstream == "pod-local":  # sessions and cancels alike were made in the pods
            c = st["counters"]
            assert c["pod_local_connects"] == c["upstream_connects"] >= 2 * out["sessions"], c
    finally:
        for s in servers:
            s.stop()
