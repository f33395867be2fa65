"""More real PostgreSQL clients through the PostgreSQL activator, each compared with the
same client connected straight to the database pod (pod to pod, not through the
service): the direct answer is the oracle.

One daemon and one PostgreSQL 15 for the whole file (a module fixture), and one client
process in the client pod, driven line by line over stdin (one JSON command in, one JSON
answer out), so that sessions (a LISTENer) outlive a step while the test looks at the
service between steps:

- asyncpg: ``fetch`` with parameters, a prepared statement reused, ``executemany``,
  transactions (one rolled back by an error), COPY both ways (``copy_records_to_table``,
  ``copy_to_table``, ``copy_from_query``, a few MB), and a pool of 10 connections
  running 200 concurrent queries;
- psycopg 3 pipeline mode (many queries before one Sync; keep-alive ``SELECT 1`` among
  real queries and alone, prepared statements, an error aborting the rest);
- LISTEN/NOTIFY: a listening session sits idle (need ``none``, the service idles), another
  session NOTIFYs, the listener gets it; the same with the database frozen by
  ``on_idle`` under both sessions and thawed by the NOTIFY; idle asyncpg, asyncpg pool
  and psycopg sessions whose keep-alives (a pool's reset query included) are answered
  while the database stays frozen, then real work (a 3 MB parameter held while it thaws);
- a large result (20 rows of 1 MB), byte for byte on the wire and through psycopg;
- an error inside a transaction: ``SELECT 1/0``, then keep-alive shaped queries (simple,
  extended, a named statement, ``-- ping``) while the transaction is failed (the server
  must answer them: 25P02), ROLLBACK, a keep-alive again: the same bytes as a direct
  session gets, and the session stays usable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fabric.tools.sandbox import Daemon, Sandbox
from tests.e2e.test_postgres_activator import (
    DB_IP,
    VIP,
    WASM,
    frozen,
    service,
    setup,
    stats,
    wait,
)
from tests.support import pgwire as W

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not W.available(), reason="PostgreSQL 15 is not installed")

CLIENT = r"""
import asyncio, hashlib, io, json, socket, struct, sys, time
import asyncpg, psycopg
from tests.support import pgwire as W

KW = dict(port=5432, user="postgres", dbname="postgres", connect_timeout=60)


def sha(b):
    return hashlib.sha256(b).hexdigest()


class Raw:
    # A hand-driven session: the exact bytes the server (or the activator) sends.
    def __init__(self, host):
        self.sock = socket.create_connection((host, 5432), timeout=60)
        self.buf = bytearray()
        self.exchange(W.startup(), 1)

    def exchange(self, data, rfq):
        if data:
            self.sock.sendall(data)
        out, seen, i = bytearray(), 0, 0
        while seen < rfq:
            while len(self.buf) - i >= 5:
                (n,) = struct.unpack_from("!i", self.buf, i + 1)
                if len(self.buf) - i < 1 + n:
                    break
                if self.buf[i] == ord("Z"):
                    seen += 1
                i += 1 + n
                if seen == rfq:
                    break
            if seen == rfq:
                break
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        out = bytes(self.buf[:i])
        del self.buf[:i]
        return out

    def close(self):
        self.sock.sendall(W.TERMINATE)
        self.sock.close()


async def s_asyncpg(host):
    out = {}
    c = await asyncpg.connect(host=host, port=5432, user="postgres", database="postgres",
                              timeout=60)
    try:
        rows = await c.fetch("SELECT g, g * $1::int, md5(g::text) FROM generate_series(1, $2) g",
                             3, 100)
        out["fetch"] = [list(r) for r in rows]
        out["fetchval"] = [await c.fetchval("SELECT 1"), await c.fetchval("SELECT $1::text", "a")]
        stmt = await c.prepare("SELECT $1::int + $2::int, $3::text")
        out["prepared"] = [list(await stmt.fetchrow(i, i, str(i))) for i in range(50)]
        out["prepared_many"] = [list(r) for r in await stmt.fetch(7, 8, "x")]
        await c.execute("CREATE TEMP TABLE t (a int PRIMARY KEY, b text)")
        await c.executemany("INSERT INTO t VALUES ($1, $2)", [(i, f"r{i}") for i in range(1000)])
        async with c.transaction():
            await c.execute("INSERT INTO t VALUES (1000, 'in txn')")
            try:
                async with c.transaction():  # a savepoint rolled back by its error
                    await c.execute("INSERT INTO t VALUES (1, 'dup')")
            except asyncpg.UniqueViolationError as e:
                out["dup"] = e.sqlstate
        try:
            async with c.transaction():
                await c.execute("INSERT INTO t VALUES (1001, 'lost')")
                await c.fetchval("SELECT 1 / $1::int", 0)
        except asyncpg.DivisionByZeroError as e:
            out["div"] = e.sqlstate
        out["after_txn"] = list(await c.fetchrow("SELECT count(*), sum(a), max(a) FROM t"))
        # COPY in (binary records, then csv text) and out, a few MB each way
        await c.execute("CREATE TEMP TABLE big (a int, b text, c float8)")
        recs = [(i, "x" * 64 + str(i), i / 7) for i in range(40000)]
        out["copy_in"] = await c.copy_records_to_table("big", records=recs,
                                                       columns=["a", "b", "c"])
        csv = "".join(f"{i},y{'z' * 80}{i},{i}.5\n" for i in range(40000, 70000)).encode()
        out["copy_in_csv"] = await c.copy_to_table("big", source=io.BytesIO(csv), format="csv")
        buf = io.BytesIO()
        out["copy_out"] = await c.copy_from_query("SELECT * FROM big ORDER BY a", output=buf,
                                                  format="csv")
        data = buf.getvalue()
        out["copy_out_bytes"], out["copy_out_sha"] = len(data), sha(data)
        out["big"] = list(await c.fetchrow(
            "SELECT count(*), sum(a), md5(string_agg(b, ',' ORDER BY a)) FROM big"))
    finally:
        await c.close()
    pool = await asyncpg.create_pool(host=host, port=5432, user="postgres", database="postgres",
                                     min_size=10, max_size=10, timeout=60)
    try:
        async def one(i):
            if i % 10 == 0:
                return await pool.fetchval("SELECT 1")  # a pool's own health query
            return await pool.fetchval("SELECT $1::int * 2 FROM pg_sleep(0.01)", i)
        got = await asyncio.gather(*(one(i) for i in range(200)))
        out["pool"] = list(got)
        pids = await asyncio.gather(*(pool.fetchval("SELECT pg_backend_pid() FROM pg_sleep(0.2)")
                                      for _ in range(10)))
        out["pool_sessions"] = len(set(pids))
    finally:
        await pool.close()
    return out


def s_pipeline(host):
    out = {}
    with psycopg.connect(host=host, autocommit=True, **KW) as conn:
        with conn.pipeline():
            curs = [conn.execute("SELECT %s::int * 2, %s::text", (i, f"v{i}")) for i in range(100)]
        out["mixed"] = [list(c.fetchone()) for c in curs]
        with conn.pipeline():  # keep-alive shaped queries among real ones, then alone
            curs = [conn.execute("SELECT 1") if i % 3 else conn.execute("SELECT %s::int", (i,))
                    for i in range(60)]
            curs += [conn.execute("SELECT 1") for _ in range(80)]
        out["select1"] = [list(c.fetchone()) for c in curs]
        with conn.pipeline():  # named prepared statements, binary results
            curs = [conn.cursor(binary=True).execute("SELECT %s::int + 1", (i,), prepare=True)
                    for i in range(30)]
        out["prepared"] = [list(c.fetchone()) for c in curs]
        errs = []
        try:
            with conn.pipeline():
                a = conn.execute("SELECT 10")
                conn.execute("SELECT 1/0")
                conn.execute("SELECT 20")
        except psycopg.Error as e:
            errs.append([type(e).__name__, e.sqlstate])
        out["aborted"] = errs
        out["a"] = a.fetchone()[0]
        out["after"] = conn.execute("SELECT 1").fetchone()[0]
    with psycopg.connect(host=host, **KW) as conn:  # a transaction in one pipeline
        with conn.pipeline():
            conn.execute("CREATE TEMP TABLE p (a int)")
            for i in range(200):
                conn.execute("INSERT INTO p VALUES (%s)", (i,))
            cur = conn.execute("SELECT count(*), sum(a) FROM p")
        out["txn"] = list(cur.fetchone())
        out["status"] = conn.info.transaction_status.name
        conn.commit()
    return out


def s_large(host):
    out = {}
    sql = "SELECT repeat('x', 1000000) FROM generate_series(1,20)"
    r = Raw(host)
    try:
        data = r.exchange(W.query(sql), 1)
        out["raw_simple"] = [len(data), sha(data)]
        data = r.exchange(W.parse(sql) + W.bind() + W.describe(b"P") + W.execute() + W.SYNC, 1)
        out["raw_extended"] = [len(data), sha(data)]
    finally:
        r.close()
    with psycopg.connect(host=host, **KW) as conn:
        rows = conn.execute(sql).fetchall()
        out["psycopg"] = [len(rows), all(row[0] == "x" * 1000000 for row in rows)]
        rows = conn.cursor(binary=True).execute(sql).fetchall()
        out["psycopg_binary"] = [len(rows), all(row[0] == "x" * 1000000 for row in rows)]
    return out


def s_errors(host):
    out = {}
    r = Raw(host)
    steps = [("begin", W.query("BEGIN"), 1),
             ("div", W.query("SELECT 1/0"), 1),
             ("select1", W.query("SELECT 1"), 1),
             ("empty", W.query(";"), 1),
             ("ping", W.query("-- ping"), 1),
             ("ext", W.parse("SELECT 1") + W.bind() + W.describe(b"P") + W.execute() + W.SYNC, 1),
             ("named", W.parse("SELECT 1", "s1") + W.SYNC, 1),
             ("bind_named", W.bind(stmt="s1") + W.execute() + W.SYNC, 1),
             ("flush", W.parse("SELECT 1") + W.describe(b"S") + W.FLUSH + W.SYNC, 1),
             ("rollback", W.query("ROLLBACK"), 1),
             ("select1_after", W.query("SELECT 1"), 1),
             ("ext_after", W.parse("SELECT 1") + W.bind() + W.describe(b"P") + W.execute()
              + W.SYNC, 1),
             ("named_after", W.parse("SELECT 1", "s1") + W.bind(stmt="s1") + W.execute()
              + W.SYNC, 1),
             ("begin2", W.query("BEGIN"), 1),
             ("div2", W.parse("SELECT 1/0") + W.bind() + W.execute() + W.SYNC, 1),
             ("select1_2", W.query("SELECT 1"), 1),
             ("commit", W.query("COMMIT"), 1),  # a COMMIT of a failed transaction: ROLLBACK
             ("select1_3", W.query("SELECT 1"), 1)]
    try:
        out["raw"] = [[name, r.exchange(data, n).hex()] for name, data, n in steps]
    finally:
        r.close()
    with psycopg.connect(host=host, **KW) as conn:
        log = []

        def step(name, f):
            try:
                log.append([name, "ok", f()])
            except psycopg.Error as e:
                log.append([name, type(e).__name__, e.sqlstate, e.diag.message_primary])
            log.append([name, conn.info.transaction_status.name])

        def simple(q):
            res = conn.pgconn.exec_(q)
            code = res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) or b""
            return [res.status, code.decode()]

        step("first", lambda: conn.execute("SELECT 1").fetchone()[0])
        step("div", lambda: conn.execute("SELECT 1/0").fetchone())
        step("select1", lambda: conn.execute("SELECT 1").fetchone())
        step("binary", lambda: conn.cursor(binary=True).execute("SELECT 1").fetchone())
        step("prepared", lambda: conn.execute("select 1", prepare=True).fetchone())
        step("simple", lambda: simple(b"SELECT 1"))
        step("ping", lambda: simple(b"-- ping"))
        conn.rollback()
        step("after", lambda: conn.execute("SELECT 1").fetchone()[0])
        step("after_real", lambda: conn.execute("SELECT %s::int + 1", (41,)).fetchone()[0])
        conn.rollback()
        out["psycopg"] = log
    return out

async def s_asyncpg_more(host):
    out = {}
    c = await asyncpg.connect(host=host, port=5432, user="postgres", database="postgres",
                              timeout=60)
    try:
        await c.execute("CREATE TEMP TABLE nn (a int NOT NULL, b text)")
        try:  # an error in the middle of a COPY: the server ends it, the session goes on
            await c.copy_records_to_table("nn", records=[(i, "v") for i in range(20000)]
                                          + [(None, "bad")] + [(1, "w")] * 20000)
        except asyncpg.NotNullViolationError as e:
            out["copy_err"] = e.sqlstate
        out["after_copy_err"] = await c.fetchval("SELECT count(*) FROM nn")
        # many statements: past the cache of locally known ones, reused, then dropped
        out["stmts"] = [await c.fetchval(f"SELECT {i} + $1::int", i) for i in range(12)] * 2
        out["again"] = [await c.fetchval("SELECT 1"), await c.fetchval("select 1")]
        await c.execute("DEALLOCATE ALL")
        await c.reset()
        out["after_reset"] = await c.fetchval("SELECT 2")
        rows = await c.fetch("SELECT repeat('y', 1000000) FROM generate_series(1, 20)")
        out["large"] = [len(rows), all(r[0] == "y" * 1000000 for r in rows)]
        # executemany sends its Bind/Execute pairs pipelined before one Sync
        await c.execute("CREATE TEMP TABLE em (a int, b text)")
        await c.executemany("INSERT INTO em VALUES ($1, $2)",
                            [(i, "e" * (i % 300)) for i in range(5000)])
        out["em"] = list(await c.fetchrow("SELECT count(*), sum(length(b)) FROM em"))
        try:
            await c.executemany("INSERT INTO nn VALUES ($1, $2)", [(1, "a"), (None, "b"), (2, "c")])
        except asyncpg.NotNullViolationError as e:
            out["em_err"] = e.sqlstate
        out["cursor"] = []
        async with c.transaction():
            async for r in c.cursor("SELECT g FROM generate_series(1, 500) g", prefetch=50):
                out["cursor"].append(r[0])
        out["big_param"] = await c.fetchval("SELECT md5($1::text)", "p" * 3_000_000)
    finally:
        await c.close()
    return out


def s_psycopg_more(host):
    out = {}
    with psycopg.connect(host=host, autocommit=True, **KW) as conn:
        # keep-alives alone in a pipeline, their results fetched in the middle (a Flush)
        with conn.pipeline() as p:
            curs = [conn.execute("SELECT 1") for _ in range(10)]
            first = curs[0].fetchone()
            curs += [conn.execute("SELECT 1") for _ in range(5)]
            p.sync()
            curs += [conn.execute("SELECT 1") for _ in range(5)]
            curs.append(conn.execute("SELECT %s::int", (77,)))
            curs += [conn.execute("SELECT 1") for _ in range(5)]
        out["ka_pipeline"] = [list(first)] + [list(c.fetchone()) for c in curs[1:]]
        with conn.pipeline():
            curs = [conn.execute("SELECT 1") for _ in range(100)]  # more than a group holds
        out["ka_100"] = sum(c.fetchone()[0] for c in curs)
        conn.execute("CREATE TEMP TABLE cp (a int NOT NULL)")
        errs = []
        try:
            with conn.cursor().copy("COPY cp FROM STDIN") as cp:
                for i in range(30000):
                    cp.write_row((i,))
                cp.write(b"oops\n")
                for i in range(30000):
                    cp.write_row((i,))
        except psycopg.Error as e:
            errs.append([type(e).__name__, e.sqlstate])
        out["copy_err"] = errs
        out["after"] = conn.execute("SELECT count(*) FROM cp").fetchone()[0]
        with conn.transaction():  # a server-side cursor
            cur = conn.cursor("sc")
            cur.execute("SELECT g, repeat('c', 1000) FROM generate_series(1, 3000) g")
            n = 0
            while rows := cur.fetchmany(250):
                n += len(rows)
            cur.close()
        out["named_cursor"] = n
    return out


sessions = {}


def s_session(cmd, host):
    # Sessions kept open across steps (a pool's idle connections): asyncpg and psycopg.
    loop = sessions.setdefault("loop", asyncio.new_event_loop())
    run = loop.run_until_complete
    if cmd == "open":
        sessions[host, "a"] = run(asyncpg.connect(host=host, port=5432, user="postgres",
                                                  database="postgres", timeout=60))
        sessions[host, "p"] = psycopg.connect(host=host, autocommit=True, **KW)
        async def make_pool():  # made in the loop that runs it
            return await asyncpg.create_pool(host=host, port=5432, user="postgres",
                                             database="postgres", min_size=2, max_size=2,
                                             timeout=60)
        sessions[host, "pool"] = run(make_pool())
        run(sessions[host, "pool"].fetchval("SELECT $1::int", 1))  # relayed, so is its reset
        a = sessions[host, "a"]
        run(a.execute("CREATE TEMP TABLE s (a int, b text)"))
        return [run(a.fetchval("SELECT 1")), run(a.fetchval("SELECT $1::int", 5))]
    a, p, pool = sessions[host, "a"], sessions[host, "p"], sessions[host, "pool"]
    if cmd == "ping":  # keep-alives as pools send them
        got = []
        for _ in range(3):
            got.append(run(a.fetchval("SELECT 1")))
            got.append(run(a.execute("SELECT 1")))
            got.append(p.execute("SELECT 1").fetchone()[0])
            # a pool's keep-alive: the query, then the reset query of the release
            got.append(run(pool.fetchval("SELECT 1")))
        return got
    if cmd == "work":  # what wakes it: a held big parameter, a pipeline, a COPY
        out = [run(a.fetchval("SELECT length($1::text)", "h" * 3_000_000))]
        with p.pipeline():
            curs = [p.execute("SELECT %s::int * 3", (i,)) for i in range(100)]
        out.append([c.fetchone()[0] for c in curs])
        recs = [(i, "r" * 100) for i in range(30000)]
        out.append(run(a.copy_records_to_table("s", records=recs)))
        out.append(run(a.fetchval("SELECT sum(a) FROM s")))
        out.append(run(a.fetchval("SELECT 1")))
        out.append(run(pool.fetchval("SELECT $1::int + 1", 41)))
        return out
    if cmd == "close":
        run(a.close())
        run(pool.close())
        p.close()
        return True
    raise ValueError(cmd)


listeners = {}
notifiers = {}


def handle(cmd, host):
    if cmd == "asyncpg":
        return asyncio.run(s_asyncpg(host))
    if cmd == "pipeline":
        return s_pipeline(host)
    if cmd == "large":
        return s_large(host)
    if cmd == "errors":
        return s_errors(host)
    if cmd == "asyncpg_more":
        return asyncio.run(s_asyncpg_more(host))
    if cmd == "psycopg_more":
        return s_psycopg_more(host)
    if cmd.startswith("session "):
        return s_session(cmd.split()[1], host)
    if cmd == "listen":  # a session that LISTENs, then sits idle
        c = listeners.get(host) or psycopg.connect(host=host, autocommit=True, **KW)
        listeners[host] = c
        c.execute("LISTEN ch")
        return {"ok": True}
    if cmd.startswith("notify"):  # from another session (kept open, idle in between)
        c = notifiers.get(host) or psycopg.connect(host=host, autocommit=True, **KW)
        notifiers[host] = c
        c.execute("SELECT pg_notify('ch', %s)", (cmd.split(" ", 1)[1],))
        return {"ok": True}
    if cmd == "recv":
        got = [[n.channel, n.payload] for n in listeners[host].notifies(timeout=20, stop_after=1)]
        return {"got": got}
    if cmd == "close":
        for d in (listeners, notifiers):
            c = d.pop(host, None)
            if c is not None:
                c.close()
        return {"ok": True}
    raise ValueError(cmd)


for line in sys.stdin:
    req = json.loads(line)
    t0 = time.monotonic()
    try:
        out = {"result": handle(req["cmd"], req["host"])}
    except Exception as e:
        import traceback
        out = {"error": repr(e), "tb": traceback.format_exc()}
    out["s"] = round(time.monotonic() - t0, 3)
    print(json.dumps(out), flush=True)
"""


class Env:
    """The daemon, the database and the client process of this file."""

    def __init__(self, sb: Sandbox, d: Daemon, srv: W.PgServer, proc: subprocess.Popen[str],
                 flag: Path) -> None:
        self.sb, self.d, self.srv, self.proc, self.flag = sb, d, srv, proc, flag

    def ask(self, cmd: str, host: str, timeout: float = 120) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, "host": host}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, (self.proc.stderr.read() if self.proc.stderr else "", self.d.log()[-3000:])
        out = json.loads(line)
        assert "error" not in out, (cmd, host, out.get("tb"), out, self.d.log()[-3000:])
        print(f"[{cmd} {host}] {out['s']} s")
        return out["result"]

    def both(self, cmd: str) -> tuple[Any, Any]:
        """The answer through the activator's VIP, and the oracle's (direct)."""
        direct = self.ask(cmd, DB_IP)
        return self.ask(cmd, VIP), direct

    def svc(self) -> dict:
        return self.d.get("/v1/services")[0]

    def idle(self) -> bool:
        """The service idled (after its idle_timeout the backend may also be dormant)."""
        svc = self.svc()
        return not svc["need"] and svc["state"] in ("idle", "dormant")

    def healthy(self) -> None:
        st = stats(self.d, 5432)
        assert st["counters"]["guest_failures"] == 0, st
        assert st["guest_counters"].get("protocol_errors", 0) == 0, st
        assert st["guest_counters"].get("hold_timeouts", 0) == 0, st


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    sb = Sandbox("fbt")
    pgroot = Path(tempfile.mkdtemp(prefix="fbt-pgcl-"))
    srv: W.PgServer | None = None
    proc = None
    pidfile, flag = pgroot / "data" / "postmaster.pid", pgroot / "freeze"
    # on_idle freezes the database only while the flag file exists (the LISTEN test
    # below), so that the direct (oracle) sessions never meet a frozen server.
    on_idle = (f"sh -c '[ -e {flag} ] || exit 0; p=$(head -n1 {pidfile});"
               f" kill -STOP $(pgrep -P $p) $p'")
    on_activate = f"sh -c 'p=$(head -n1 {pidfile}); kill -CONT $(pgrep -P $p) $p'"
    try:
        d, client, srv = setup(sb, pgroot, service(
            [{"port": 5432, "target_port": 5432, "activator": WASM}], idle_timeout="1s",
            on_idle=on_idle, on_activate=on_activate))
        proc = sb.popen(client, "env", f"PYTHONPATH={ROOT}", sys.executable, "-c", CLIENT,
                        stdin=subprocess.PIPE, text=True)
        yield Env(sb, d, srv, proc, flag)
    finally:
        if proc is not None:
            if proc.stdin:
                proc.stdin.close()
            proc.kill()
        if srv is not None:
            srv.stop()
        sb.close()
        shutil.rmtree(pgroot, ignore_errors=True)


def test_asyncpg(env: Env) -> None:
    via, direct = env.both("asyncpg")
    assert via["pool_sessions"] == direct["pool_sessions"] == 10, (via["pool_sessions"],
                                                                    direct["pool_sessions"])
    assert via == direct
    assert via["pool"] == [1 if i % 10 == 0 else 2 * i for i in range(200)]
    assert via["copy_out"] == "COPY 70000" and via["copy_out_bytes"] > 5_000_000, via["copy_out"]
    assert via["dup"] == "23505" and via["div"] == "22012"
    env.healthy()


def test_psycopg_pipeline(env: Env) -> None:
    via, direct = env.both("pipeline")
    assert via == direct
    assert via["mixed"] == [[2 * i, f"v{i}"] for i in range(100)]
    assert via["aborted"] == [["DivisionByZero", "22012"]] and via["after"] == 1
    assert via["txn"] == [200, sum(range(200))]
    env.healthy()


def test_large_results(env: Env) -> None:
    via, direct = env.both("large")
    assert via == direct
    assert via["raw_simple"][0] > 20_000_000 and via["psycopg"] == [20, True]
    env.healthy()


def test_errors_mid_session(env: Env) -> None:
    before = stats(env.d, 5432)["guest_counters"].get("keepalives_answered", 0)
    via, direct = env.both("errors")
    assert via["psycopg"] == direct["psycopg"]
    for (name, a), (_, b) in zip(via["raw"], direct["raw"], strict=True):
        assert a == b, (name, bytes.fromhex(a), bytes.fromhex(b))
    failed = dict((n, W.split(bytes.fromhex(h))) for n, h in via["raw"])
    for name in ("select1", "ext", "named", "flush"):
        msgs = failed[name]
        assert msgs[0][0] == b"E" and b"C25P02\0" in msgs[0][1], (name, msgs)
        assert msgs[-1] == (b"Z", b"E"), (name, msgs)
    bind = failed["bind_named"]  # no such statement: checked before the transaction state
    assert bind[0][0] == b"E" and b"C26000\0" in bind[0][1] and bind[-1] == (b"Z", b"E"), bind
    for name in ("empty", "ping"):  # the server answers an empty query even there
        assert failed[name] == [(b"I", b""), (b"Z", b"E")], (name, failed[name])
    assert failed["select1_after"][-1] == (b"Z", b"I")
    # the keep-alives after the ROLLBACK may be answered locally; none while failed
    after = stats(env.d, 5432)["guest_counters"].get("keepalives_answered", 0)
    assert after - before <= 8, (before, after)
    env.healthy()


def test_asyncpg_copy_errors_statements_cursors_large(env: Env) -> None:
    via, direct = env.both("asyncpg_more")
    assert via == direct
    assert via["copy_err"] == "23502" and via["after_copy_err"] == 0
    assert via["large"] == [20, True] and via["cursor"] == list(range(1, 501))
    env.healthy()


def test_psycopg_keepalive_pipelines_copy_error_named_cursor(env: Env) -> None:
    via, direct = env.both("psycopg_more")
    assert via == direct
    assert via["ka_pipeline"] == [[1]] * 20 + [[77]] + [[1]] * 5
    assert via["ka_100"] == 100 and via["named_cursor"] == 3000
    assert via["copy_err"] == [["InvalidTextRepresentation", "22P02"]] and via["after"] == 0
    env.healthy()


def test_listen_notify_idle(env: Env) -> None:
    """The listener sits idle with need none (the service idles, on_idle runs: here it
    freezes nothing); another session's NOTIFY reaches it."""
    assert env.ask("listen", DB_IP)["ok"] and env.ask("notify direct", DB_IP)["ok"]
    oracle = env.ask("recv", DB_IP)["got"]
    assert oracle == [["ch", "direct"]]
    hooks = env.svc()["hooks"]
    assert env.ask("listen", VIP)["ok"]
    wait(lambda: stats(env.d, 5432)["need"] == "none" and env.idle(),
         "need none and the service idle under a listening session")
    wait(lambda: env.svc()["hooks"] != hooks, "on_idle to run")
    assert env.ask("notify via", VIP)["ok"]
    assert env.ask("recv", VIP)["got"] == [["ch", "via"]]
    # and the other way: the notifier idle too, the listener's own session NOTIFYs
    wait(env.idle, "the service to idle again")
    assert env.ask("notify again", VIP)["ok"]
    assert env.ask("recv", VIP)["got"] == [["ch", "again"]]
    env.ask("close", VIP)
    env.ask("close", DB_IP)
    env.healthy()


def test_listen_notify_frozen_database(env: Env) -> None:
    """on_idle freezes the database under the idle listener and the idle notifier; the
    NOTIFY thaws it (a held query wakes the service) and the listener gets it."""
    env.flag.write_text("")
    try:
        assert env.ask("listen", VIP)["ok"] and env.ask("notify first", VIP)["ok"]
        assert env.ask("recv", VIP)["got"] == [["ch", "first"]]
        wait(lambda: frozen(env.srv), "the database to be frozen under a listening session")
        assert stats(env.d, 5432)["need"] == "none"
        wakes = stats(env.d, 5432)["guest_counters"].get("wake_query", 0)
        t0 = time.monotonic()
        assert env.ask("notify thawed", VIP)["ok"]
        assert env.ask("recv", VIP)["got"] == [["ch", "thawed"]]
        assert time.monotonic() - t0 < 15
        assert stats(env.d, 5432)["guest_counters"].get("wake_query", 0) > wakes
        # frozen again, and this time the listener's own query is what thaws it
        wait(lambda: frozen(env.srv), "the database to be frozen again")
        assert env.ask("listen", VIP)["ok"]
        assert env.ask("notify third", VIP)["ok"]
        assert env.ask("recv", VIP)["got"] == [["ch", "third"]]
        # idle asyncpg and psycopg sessions: keep-alives answered while frozen, then
        # real work (a 3 MB parameter held while it thaws, a pipeline, a COPY)
        oracle = env.ask("session open", DB_IP), None
        oracle = oracle[0], env.ask("session work", DB_IP)
        env.ask("session close", DB_IP)
        assert env.ask("session open", VIP) == oracle[0]
        wait(lambda: frozen(env.srv), "the database to be frozen under idle sessions")
        answered = stats(env.d, 5432)["guest_counters"].get("keepalives_answered", 0)
        assert env.ask("session ping", VIP) == [1, "SELECT 1", 1, 1] * 3
        assert frozen(env.srv), "a keep-alive thawed the database"
        assert stats(env.d, 5432)["guest_counters"]["keepalives_answered"] - answered >= 15
        assert env.ask("session work", VIP) == oracle[1]
        env.ask("session close", VIP)
        env.healthy()
    finally:
        env.flag.unlink()
        env.ask("close", VIP)
