"""The C SDK's PostgreSQL codec (activators/sdk/c/fab_pg.h) and what is built on it.

Three things are checked through the real wasm host: the example ``pgping.wasm``
(fab_pg.h alone answers a session, ``SELECT 1`` with the bytes PostgreSQL 15 sends)
with tests/support/pgwire.py's bytes and with real clients (psycopg, psql) as peers;
that ``postgres/postgres.wasm``, rewritten on the SDK, answers every event batch exactly
as the hand-written one did (``testing/postgres_raw.wasm``, the pre-SDK source kept for
this and for the benchmark); and that random and mutated message streams make neither
module trap nor answer a malformed batch.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.activator import abi
from tests.support import pgwire as W
from tests.support.streambridge import StreamBridge
from tests.support.streamguest import StreamGuest
from tests.unit.test_postgres_activator import CAPTURED, FORMS, GREETING

ROOT = Path(__file__).resolve().parents[2]
PGPING = ROOT / "activators" / "sdk" / "c" / "examples" / "pgping.wasm"
SDK = ROOT / "activators" / "postgres" / "postgres.wasm"
RAW = ROOT / "activators" / "testing" / "postgres_raw.wasm"


def answer(name: str) -> bytes:
    return bytes.fromhex(CAPTURED[name])


def errors(data: bytes) -> list[str]:
    """The SQLSTATE of each ErrorResponse among whole messages."""
    out = []
    for t, body in W.split(data):
        if t == b"E":
            fields = {p[:1]: p[1:] for p in body.rstrip(b"\0").split(b"\0")}
            out.append(fields[b"C"].decode())
    return out


@pytest.fixture
def ping() -> Iterator[StreamGuest]:
    g = StreamGuest(PGPING, {}, port=5432, deadline_ms=5000)
    yield g
    assert g.failed == 0
    g.close()


# ---- pgping: the example ------------------------------------------------------------


def test_pgping_answers_the_handshake_and_select_1_like_postgresql(ping: StreamGuest) -> None:
    g = ping
    g.open(1)
    g.client(1, W.SSL_REQUEST)
    assert g.to_client(1) == b"N"
    g.client(1, W.startup(proto=W.PROTO_32))
    greeting = W.split(g.to_client(1))
    assert greeting[0] == (b"R", struct.pack("!i", 0)) and greeting[-1] == (b"Z", b"I")
    assert (b"S", b"server_version\x0015.0\x00") in greeting
    for name in ("q_select1", "q_select1_semi", "q_semi", "q_empty", "q_comment_dash",
                 "q_comment_nested", "q_comment_select1_semi"):
        g.client(1, FORMS[name])
        assert g.to_client(1) == answer(name), name
    assert g.need is None and not g.streams[1].connects  # nothing to wake


def test_pgping_frames_messages_split_over_many_reads(ping: StreamGuest) -> None:
    g = ping
    g.open(1)
    data = W.startup() + W.query("select 1;") + W.query("SELECT 1") + W.query(";")
    for i in range(len(data)):
        g.client(1, data[i:i + 1])
    out = g.to_client(1)
    assert W.count_rfq(out) == 4
    assert out.endswith(answer("q_select1_semi") + answer("q_select1") + answer("q_semi"))


def test_pgping_refuses_other_queries_and_keeps_the_session(ping: StreamGuest) -> None:
    g = ping
    g.open(1)
    g.client(1, W.startup())
    g.to_client(1)
    g.client(1, W.query("SELECT 2"))
    out = g.to_client(1)
    assert errors(out) == ["0A000"] and out.endswith(W.msg(b"Z", b"I"))
    g.client(1, W.parse("SELECT 1") + W.bind() + W.execute() + W.FLUSH + W.SYNC)
    out = g.to_client(1)
    assert errors(out) == ["0A000"] and W.split(out)[-1] == (b"Z", b"I")
    g.client(1, W.query("SELECT 1"))
    assert g.to_client(1) == answer("q_select1")
    g.client(1, W.TERMINATE)
    assert g.streams[1].downstream_closed


@pytest.mark.parametrize("data,code", [
    (struct.pack("!ii", 8, 2 << 16), "0A000"),  # protocol 2
    (struct.pack("!ii", 4, 3 << 16), "08P01"),  # a length below 8
    (W.startup() + b"?\0\0\0\4", "08P01"),  # no such message type
    (W.startup() + b"Q\0\0\0\2", "08P01"),  # a length below 4
    (W.startup() + b"Q\0\0\x10\0" + b"x" * 40, "08P01"),  # over the session's buffer
])
def test_pgping_answers_malformed_input_with_fatal_and_a_close(ping: StreamGuest, data: bytes,
                                                               code: str) -> None:
    g = ping
    g.open(1)
    g.client(1, data)
    assert errors(g.to_client(1))[-1:] == [code]
    assert g.streams[1].downstream_closed


def test_pgping_closes_a_cancel_request_and_direct_tls(ping: StreamGuest) -> None:
    g = ping
    cancel = struct.pack("!iii", 268, 80877102, 7) + b"k" * 256  # a 3.2 cancel key
    for sid, data in ((1, cancel), (2, b"\x16\x03\x01\x00\x05")):
        g.open(sid)
        g.client(sid, data)
        assert g.to_client(sid) == b"" and g.streams[sid].downstream_closed
    assert [a.name for a in g.actions if isinstance(a, abi.Count)] == ["cancels"]


def test_pgping_wants_a_user_name_like_postgresql(ping: StreamGuest) -> None:
    g = ping
    g.open(1)
    params = b"database\0d\0\0"
    g.client(1, struct.pack("!ii", 8 + len(params), 3 << 16) + params)
    assert errors(g.to_client(1)) == ["28000"] and g.streams[1].downstream_closed


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[W.PgServer]:
    if not W.available():
        pytest.skip("PostgreSQL 15 is not installed (scripts/install-debs)")
    with W.PgServer(tmp_path_factory.mktemp("pg")) as srv:
        yield srv


def test_pgping_row_builders_write_what_the_live_server_sends(ping: StreamGuest,
                                                              pg: W.PgServer) -> None:
    """``SHOW server_version`` is built with fab_pg_row_description / fab_pg_data_row /
    fab_pg_command_complete: every message as the server's, but for the version text."""
    g = ping
    g.open(1)
    g.client(1, W.startup())
    g.to_client(1)
    g.client(1, W.query("SHOW server_version"))
    ours = W.split(g.to_client(1))
    direct = W.RawPg.unix(pg.socket_path)
    theirs = W.split(direct.exchange(W.query("SHOW server_version"), 1))
    direct.close()
    assert [t for t, _ in ours] == [t for t, _ in theirs] == [b"T", b"D", b"C", b"Z"]
    assert ours[0] == theirs[0] and ours[2:] == theirs[2:]
    assert ours[1] == (b"D", b"\0\1" + struct.pack("!i", 4) + b"15.0")


@pytest.fixture
def ping_bridge(tmp_path: Path) -> Iterator[StreamBridge]:
    sockdir = Path(tempfile.mkdtemp(prefix="pgping-", dir=tmp_path))
    b = StreamBridge(PGPING, {}, str(sockdir / ".s.PGSQL.5433"), str(sockdir / "none"),
                     backend_up=False)
    b.sockdir = sockdir  # type: ignore[attr-defined]
    yield b
    b.close()
    assert b.counters.failed_calls == 0 and b.counters.connects == 0


def test_pgping_with_psycopg_and_psql(ping_bridge: StreamBridge) -> None:
    psycopg = pytest.importorskip("psycopg")
    sockdir = str(ping_bridge.sockdir)  # type: ignore[attr-defined]
    with psycopg.connect(host=sockdir, port=5433, user="u", dbname="d", autocommit=True,
                         cursor_factory=psycopg.ClientCursor) as conn:
        for sql in ("SELECT 1", "select 1;", ";"):
            cur = conn.execute(sql)
            assert (cur.fetchone() if cur.description else None) == ((1,) if "1" in sql else None)
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("SELECT now()")
        assert conn.execute("SELECT 1").fetchone() == (1,)
    psql = shutil.which("psql")
    if psql:
        env = {**os.environ, "PGHOST": sockdir, "PGPORT": "5433", "PGUSER": "u",
               "PGDATABASE": "d"}
        done = subprocess.run([psql, "-XAtc", "SELECT 1"], env=env, capture_output=True,
                              text=True, timeout=30)
        assert (done.returncode, done.stdout.strip()) == (0, "1"), done.stderr


# ---- the rewrite answers as the hand-written activator did --------------------------

_PIECES = [W.startup(), W.startup(proto=W.PROTO_32), W.SSL_REQUEST, W.GSSENC_REQUEST,
           struct.pack("!iiii", 16, 80877102, 1, 2), struct.pack("!ii", 268, 80877102)
           + b"k" * 260, b"\x16\x03\x01\x00\x02hi", *FORMS.values(), W.query("SELECT 2"),
           W.query("BEGIN"), W.query("DEALLOCATE ALL"), W.FLUSH, W.TERMINATE,
           W.parse("SELECT 1", "a") + W.SYNC, W.bind("", "a") + W.execute() + W.SYNC,
           W.parse("SELECT 1") + W.bind() + W.execute(max_rows=1) + W.SYNC,
           W.query("x" * 3000)]
_ANSWERS = [GREETING, W.msg(b"Z", b"I"), W.msg(b"Z", b"T"), W.msg(b"Z", b"E"),
            W.msg(b"1") + W.msg(b"Z", b"I"), answer("q_select1"), W.msg(b"E", b"SERROR\0\0"),
            b"Z\0\0", b"Z\0\0\0\6xy", W.msg(b"N", b"x\0\0") + W.msg(b"Z", b"I")]


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    out = []
    for c in cuts:
        if data:
            out.append(data[:c])
            data = data[c:]
    return [*out, data] if data else out


#: What the hand-written reference still answers as postgres.c does. postgres.c has since
#: been fixed where the reference was wrong (the protocol review of issue 10: a Flush in a
#: keep-alive group, Execute max_rows 1 and declared parameter types answered locally,
#: spliced TLS sessions keep
#: need active, COPY FROM STDIN by Execute, the unnamed statement after a local Query,
#: backend statement names, no answer inside a backend message), so those inputs are
#: left out of the comparison; tests/unit/test_postgres_activator.py checks them.
#: Since the hostile-input review (tests/unit/test_postgres_hostile.py), a Terminate ends
#: the session where it stands (an unsynced keep-alive group before it is dropped, bytes
#: after it are not read), and malformed input is answered as PostgreSQL answers it: a
#: batch where postgres.c refuses a client (it logs why) ends the comparison.
#: Since the keep-alive review (docs/reliability.md), comments are skipped (pgx's
#: "-- ping" is answered locally), and a startup relayed to a backend that sends nothing
#: back within the hold timeout gets FATAL 57P03 (logged; that ends the comparison too).
_CHANGED = {FORMS["x_asyncpg"], FORMS["x_asyncpg_again"], FORMS["x_maxrows1"], W.FLUSH,
            *(FORMS[k] for k in FORMS if k.startswith("x_types") or "comment" in k),
            b"\x16\x03\x01\x00\x02hi", W.TERMINATE,
            W.parse("SELECT 1") + W.bind() + W.execute(max_rows=1) + W.SYNC}
_EQ_PIECES = [p for p in _PIECES if p not in _CHANGED]

_EVENT = st.tuples(st.integers(0, 10), st.integers(1, 3),
                   st.one_of(st.sampled_from(_EQ_PIECES), st.sampled_from(_ANSWERS),
                             st.binary(max_size=40)),
                   st.lists(st.integers(1, 30), max_size=3))


def _events(ops: list[tuple[int, int, bytes, list[int]]]) -> Iterator[list[abi.Event]]:
    """Batches of host events (several per batch, as the host sends them)."""
    now = 0
    batch: list[abi.Event] = []
    for op, sid, data, cuts in ops:
        if op == 0:
            batch.append(abi.StreamOpen(sid, 5432))
        elif op in (1, 2):
            batch.extend(abi.StreamData(sid, piece) for piece in _cut(data, cuts))
        elif op == 3:
            batch.extend(abi.UpstreamData(sid, piece) for piece in _cut(data, cuts))
        elif op == 4:
            batch.append(abi.UpstreamConnectResult(sid, len(data) % 2))
        elif op == 5:
            now += 150
            batch.append(abi.Tick(now))
        elif op == 6:
            batch.append(abi.BackendAvailable())
        elif op == 7:
            batch.append(abi.BackendUnavailable())
        elif op == 8:
            batch.append(abi.StreamClose(sid))
        elif op == 9:
            batch.append(abi.UpstreamClosed(sid))
        else:
            yield batch
            batch = []
    yield batch


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_EVENT, max_size=50), ssl=st.just(""),
       keepalive=st.sampled_from([0, 1]), debounce=st.sampled_from([0, 1]))
def test_the_sdk_rewrite_answers_every_batch_as_the_hand_written_one(
        ops: list[tuple[int, int, bytes, list[int]]], ssl: str, keepalive: int,
        debounce: int) -> None:
    cfg = {"ssl": ssl, "hold_timeout_ms": 200, "stream_hold_bytes": 1024, "hold_bytes": 65536,
           "local_keepalive": keepalive, "need_debounce": debounce}
    old, new = StreamGuest(RAW, cfg, port=5432, deadline_ms=5000), \
        StreamGuest(SDK, cfg, port=5432, deadline_ms=5000)
    try:
        for batch in _events(ops):
            got = new.send(*batch)
            if any(isinstance(a, abi.Log) and a.level == abi.LOG_WARNING
                   and ("closing a client" in a.message or "a client sent" in a.message
                        or "did not answer a relayed startup" in a.message)
                   for a in got):
                break  # refused as the server refuses it; the reference did otherwise
            assert got == old.send(*batch), batch
        assert old.failed == new.failed == 0
    finally:
        old.close()
        new.close()


# ---- fuzz: random and mutated message streams ---------------------------------------


def _stream() -> st.SearchStrategy[bytes]:
    base = b"".join(FORMS.values()) + W.query("SELECT 2") + W.parse("SELECT 1", "a") + W.SYNC
    return st.one_of(
        st.binary(max_size=800),
        st.builds(lambda i, b: base[:i] + b + base[i + len(b):], st.integers(0, len(base)),
                  st.binary(min_size=1, max_size=8)),
        st.lists(st.sampled_from(_PIECES + _ANSWERS), max_size=16).map(b"".join),
        st.lists(st.tuples(st.sampled_from(b"BCdcfDEHFPpQSXZT?\0"), st.binary(max_size=12)),
                 max_size=10).map(lambda ms: b"".join(
                     bytes([t]) + struct.pack("!i", len(b) + 4) + b for t, b in ms)),
    )


def _well_formed(actions: list[abi.Action], opened: set[int]) -> None:
    for a in actions:
        sid = getattr(a, "stream_id", None)
        assert sid is None or sid in opened, a
        if isinstance(a, abi.Log):
            assert a.level < abi.LOG_ERROR, a


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wasm=st.sampled_from([SDK, PGPING]), pre=st.binary(max_size=40), client=_stream(),
       backend=_stream(), cuts=st.lists(st.integers(1, 64), max_size=10),
       down=st.booleans())
def test_fuzz_message_streams_never_trap_nor_answer_a_malformed_batch(
        wasm: Path, pre: bytes, client: bytes, backend: bytes, cuts: list[int],
        down: bool) -> None:
    g = StreamGuest(wasm, {"hold_timeout_ms": 300, "stream_hold_bytes": 2048}, port=5432,
                    deadline_ms=5000)
    try:
        g.open(1)
        g.client(1, pre + client)
        g.open(2)
        g.client(2, W.startup())
        g.connected(2)
        g.backend(2, GREETING)
        if down:
            g.unavailable()
        for piece in _cut(client, cuts):
            g.client(2, piece)
        for piece in _cut(backend, cuts[::-1]):
            g.backend(2, piece)
        g.connected(1)
        g.tick(1)
        g.tick(400)
        g.available()
        g.client_close(1)
        g.client_close(2)
        assert g.failed == 0  # a trap, exhausted fuel or a batch the host refused
        _well_formed(g.actions, {1, 2})
    finally:
        g.close()


# ---- cost ---------------------------------------------------------------------------


def test_the_sdk_costs_at_most_20_percent_more_guest_fuel_than_hand_written_code() -> None:
    """Fuel is what the guest executed, the same on every machine: the issue's bound on
    what the SDK may cost, checked on each workload of tests/bench/sdk_postgres.py."""
    from tests.bench.sdk_postgres import WORKLOADS, measure

    res = measure(0.02, rounds=1)
    for name in WORKLOADS:
        assert res[name]["fuel_sdk"] <= 1.2 * res[name]["fuel_raw"], (name, res[name])
    assert res["within_target"]
