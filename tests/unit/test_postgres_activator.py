"""The PostgreSQL stream activator (activators/postgres/) through the real wasm host.

Two kinds of peers: ``StreamGuest`` for exact, step-by-step checks of what the guest
does with bytes (both sides played by the test, with requests built by
tests/support/pgwire.py and answers checked against what a real PostgreSQL 15 sent,
captured below), and ``StreamBridge`` with real peers on both sides (psycopg, psql and
a raw client on one, a real PostgreSQL on a unix socket on the other).

The captured answers: a PostgreSQL 15.18 (Debian 15.18-0+deb12u1) started by
``PgServer`` (initdb -A trust, unix socket), one raw session sending each request of
``FORMS`` in order and recording every byte up to its ReadyForQuery. Recapture with
``sh scripts/unprivileged .venv/bin/python -m tests.unit.test_postgres_activator``,
which prints the table below; ``test_captured_answers_are_still_what_the_server_sends``
re-checks it against the installed server on every run.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.activator import abi
from tests.support import pgwire as W
from tests.support.streambridge import StreamBridge
from tests.support.streamguest import StreamGuest, fuzz_step

ROOT = Path(__file__).resolve().parents[2]
WASM = ROOT / "activators" / "postgres" / "postgres.wasm"
NONE, ACTIVE = abi.NEED_NONE, abi.NEED_ACTIVE

SELECT1 = W.parse("SELECT 1") + W.bind() + W.describe(b"P") + W.execute() + W.SYNC

ASYNCPG_STMT = "__asyncpg_stmt_1__"
ASYNCPG_PREPARE = W.parse("SELECT 1", ASYNCPG_STMT) + W.describe(b"S", ASYNCPG_STMT) + W.FLUSH
ASYNCPG_FETCHVAL = W.msg(b"B", b"\0" + ASYNCPG_STMT.encode() + b"\0" + bytes.fromhex(
    "0001" "0001" "0000" "0001" "0001")) + W.execute(max_rows=1) + W.SYNC

#: request -> what the server answers; in this order on one session (named statements)
FORMS: dict[str, bytes] = {
    "q_select1": W.query("SELECT 1"),
    "q_select1_semi": W.query("  select 1 ;  "),
    "q_semi": W.query(";"),
    "q_empty": W.query(""),
    "x_select1": SELECT1,
    "x_select1_bin": W.parse("SELECT 1") + W.bind(result_formats=(1,)) + W.describe(b"P")
    + W.execute() + W.SYNC,
    "x_select1_nofmt": W.parse("SELECT 1") + W.bind(result_formats=()) + W.describe(b"P")
    + W.execute() + W.SYNC,
    "x_semi": W.parse(";") + W.bind() + W.describe(b"P") + W.execute() + W.SYNC,
    "x_empty": W.parse("") + W.bind() + W.describe(b"P") + W.execute() + W.SYNC,
    "x_prepare": W.parse("SELECT 1", "s1") + W.SYNC,
    "x_exec_named": W.bind("", "s1") + W.describe(b"P") + W.execute() + W.SYNC,
    "x_desc_named": W.describe(b"S", "s1") + W.SYNC,
    "x_close_named": W.close(b"S", "s1") + W.SYNC,
    "x_desc_unnamed": W.parse("SELECT 1") + W.describe(b"S") + W.SYNC,
    "x_desc_empty_stmt": W.parse("") + W.describe(b"S") + W.SYNC,
    "x_named_portal": W.parse("SELECT 1") + W.bind("p1") + W.describe(b"P", "p1")
    + W.execute("p1") + W.close(b"P", "p1") + W.SYNC,
    "x_sync": W.SYNC,
    "x_maxrows2": W.parse("SELECT 1") + W.bind() + W.execute(max_rows=2) + W.SYNC,
    "x_maxrows1": W.parse("SELECT 1") + W.bind() + W.execute(max_rows=1) + W.SYNC,
    # asyncpg's fetchval: Parse + Describe statement + Flush, then (on the answers) a
    # binary Bind of that statement, Execute with max_rows 1, Sync
    "x_asyncpg": ASYNCPG_PREPARE + ASYNCPG_FETCHVAL,
    "x_asyncpg_again": ASYNCPG_FETCHVAL,
    # Parse with declared parameter types (unused by the query): the Bind supplies them
    "x_types": W.parse("SELECT 1", "", (23,)) + W.describe(b"S") + W.bind(params=(b"5",))
    + W.describe(b"P") + W.execute() + W.SYNC,
    "x_types_named": W.parse("select 1;", "st", (23, 25, 20, 1043)) + W.describe(b"S", "st")
    + W.SYNC,
    "x_types_bind": W.bind("", "st", params=(b"-2147483648", b"hi there", None, b""))
    + W.execute() + W.SYNC,
    "x_types_bin": W.parse("SELECT 1", "", (21, 20)) + W.msg(b"B", b"\0\0" + bytes.fromhex(
        "0001" "0001" "0002" "00000002" "7fff" "00000008" "8000000000000000" "0001" "0001"))
    + W.execute() + W.SYNC,
    "x_types_empty": W.parse(";", "", (21,)) + W.describe(b"S") + W.bind(params=(b"+7",))
    + W.execute() + W.SYNC,
    # comments are whitespace to the server's lexer: pgx's pgconn.Ping sends "-- ping"
    "q_comment_dash": W.query("-- ping"),
    "q_comment_block": W.query("/* ping */"),
    "q_comment_nested": W.query("/* a /* b */ c */\n-- d\r"),
    "q_comment_select1": W.query("SELECT 1 -- health"),
    "q_comment_select1_semi": W.query("/* ping */ SELECT 1;  -- x"),
    "q_comment_select1_inside": W.query("select/**/1/*/ x */"),
    "x_comment_dash": W.parse("-- ping") + W.bind() + W.describe(b"P") + W.execute() + W.SYNC,
    "x_comment_desc": W.parse("/* ping */") + W.describe(b"S") + W.SYNC,
    "x_comment_select1": W.parse("select -- x\n 1 /* y */") + W.bind() + W.describe(b"P")
    + W.execute() + W.SYNC,
}

#: texts that look like keep-alives but are the server's to answer (its error): unterminated
#: comments, and the vertical tab, which is no whitespace to PostgreSQL 15's lexer
NOT_KEEPALIVES = ["/* ping", "/* a /* b */", "SELECT 1 /*", "SELECT 1 */", "SELECT\v1", "\v"]

_T = "540000002100013f636f6c756d6e3f00000000000000000000170004ffffffff0000"  # RowDescription
_D = "440000000b0001000000013143"[:-2]  # DataRow "1"
_C = "430000000d53454c4543542031005a0000000549"  # CommandComplete SELECT 1, ReadyForQuery I
CAPTURED: dict[str, str] = {
    "q_select1": _T + _D + _C,
    "q_select1_semi": _T + _D + _C,
    "q_semi": "49000000045a0000000549",
    "q_empty": "49000000045a0000000549",
    "x_select1": "3100000004" "3200000004" + _T + _D + _C,
    "x_select1_bin": "3100000004" "3200000004" + _T[:-4] + "0001"
    + "440000000e00010000000400000001" + _C,
    "x_select1_nofmt": "3100000004" "3200000004" + _T + _D + _C,
    "x_semi": "310000000432000000046e0000000449000000045a0000000549",
    "x_empty": "310000000432000000046e0000000449000000045a0000000549",
    "x_prepare": "31000000045a0000000549",
    "x_exec_named": "3200000004" + _T + _D + _C,
    "x_desc_named": "7400000006" "0000" + _T + "5a0000000549",
    "x_close_named": "33000000045a0000000549",
    "x_desc_unnamed": "3100000004" "7400000006" "0000" + _T + "5a0000000549",
    "x_desc_empty_stmt": "3100000004740000000600006e000000045a0000000549",
    "x_named_portal": "3100000004" "3200000004" + _T + _D + _C[:-12] + "3300000004"
    + "5a0000000549",
    "x_sync": "5a0000000549",
    "x_maxrows2": "3100000004" "3200000004" + _D + _C,
    "x_maxrows1": "3100000004" "3200000004" + _D + "7300000004" "5a0000000549",
    "x_asyncpg": "3100000004" "7400000006" "0000" + _T + "3200000004"
    + "440000000e00010000000400000001" "7300000004" "5a0000000549",
    "x_asyncpg_again": "3200000004" "440000000e00010000000400000001" "7300000004" "5a0000000549",
    "x_types": "3100000004" "740000000a000100000017" + _T + "3200000004" + _T + _D + _C,
    "x_types_named": "3100000004" "7400000016" "0004" "00000017" "00000019" "00000014" "00000413"
    + _T + "5a0000000549",
    "x_types_bind": "3200000004" + _D + _C,
    "x_types_bin": "3100000004" "3200000004" "440000000e00010000000400000001" + _C,
    "x_types_empty": "3100000004" "740000000a000100000015" "6e00000004" "3200000004"
    "49000000045a0000000549",
    "q_comment_dash": "49000000045a0000000549",
    "q_comment_block": "49000000045a0000000549",
    "q_comment_nested": "49000000045a0000000549",
    "q_comment_select1": _T + _D + _C,
    "q_comment_select1_semi": _T + _D + _C,
    "q_comment_select1_inside": _T + _D + _C,
    "x_comment_dash": "310000000432000000046e0000000449000000045a0000000549",
    "x_comment_desc": "3100000004740000000600006e000000045a0000000549",
    "x_comment_select1": "3100000004" "3200000004" + _T + _D + _C,
}

#: asyncpg's reset query (every pool release sends it) and what PostgreSQL 15 answers on
#: a session that changed nothing it resets (captured the same way; re-checked below)
ASYNCPG_RESET = W.query("SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;")
RESET_ANSWER = (
    "540000002f000170675f61647669736f72795f756e6c6f636b5f616c6c00000000000000000008e60004"
    "ffffffff0000440000000a000100000000430000000d53454c4543542031004300000015434c4f534520"
    "435552534f5220414c4c00430000000d554e4c495354454e00430000000a5245534554005a0000000549")

GREETING = W.msg(b"R", struct.pack("!i", 0)) + W.msg(b"S", b"server_version\x0015.18\x00") \
    + W.msg(b"K", struct.pack("!ii", 4242, 77)) + W.msg(b"Z", b"I")


def rfq(status: bytes = b"I") -> bytes:
    return W.msg(b"Z", status)


def errors(data: bytes) -> list[dict[str, str]]:
    """The fields of each ErrorResponse among whole messages."""
    out = []
    for t, body in W.split(data):
        if t == b"E":
            fields = {}
            for part in body.rstrip(b"\0").split(b"\0"):
                fields[part[:1].decode()] = part[1:].decode()
            out.append(fields)
    return out


@pytest.fixture
def guest() -> Iterator[Callable[..., StreamGuest]]:
    made: list[StreamGuest] = []

    def make(**config: object) -> StreamGuest:
        # need_debounce 0: "none" at once, so each step's level can be checked
        g = StreamGuest(WASM, {"need_debounce": 0, **config}, port=5432)
        made.append(g)
        return g

    yield make
    for g in made:
        assert g.failed == 0, "a guest call failed (trap, fuel or malformed answer)"
        g.close()


def session(g: StreamGuest, sid: int = 1, startup: bytes | None = None) -> None:
    """Open an established, idle session on stream sid (backend played by the test)."""
    g.open(sid)
    g.client(sid, startup or W.startup())
    assert g.streams[sid].connects[-1:] == [0]
    g.connected(sid)
    assert g.to_backend(sid) == (startup or W.startup())
    g.backend(sid, GREETING)
    assert g.to_client(sid) == GREETING
    assert g.need == NONE


# ---- the handshake -----------------------------------------------------------------


def test_ssl_and_gssenc_requests_are_answered_n_without_waking(guest) -> None:
    g = guest()
    g.open(1)
    g.client(1, W.GSSENC_REQUEST)
    assert g.to_client(1) == b"N"
    g.client(1, W.SSL_REQUEST)
    assert g.to_client(1) == b"N"
    assert g.streams[1].connects == [] and g.need in (None, NONE)
    g.client(1, W.startup())
    assert g.streams[1].connects == [0] and g.need == ACTIVE


def test_a_second_ssl_request_is_a_protocol_violation(guest) -> None:
    g = guest()
    g.open(1)
    g.client(1, W.SSL_REQUEST + W.SSL_REQUEST)
    out = g.to_client(1)
    assert out[:1] == b"N"
    assert errors(out[1:])[0]["C"] == "08P01" and g.streams[1].downstream_closed


def test_ssl_passthrough_wakes_forwards_the_request_and_splices(guest) -> None:
    g = guest(ssl="passthrough")
    g.open(1)
    g.client(1, W.SSL_REQUEST)
    assert g.to_client(1) == b"" and g.need == ACTIVE and g.streams[1].connects == [0]
    g.client(1, b"early")  # bytes before the answer are relayed, not parsed
    g.connected(1)
    assert g.to_backend(1) == W.SSL_REQUEST + b"early"
    # spliced at the backend's answer, not at the connect (a frozen backend never answers)
    assert not g.streams[1].spliced
    g.client(1, b"more")
    assert g.to_backend(1) == b"more"
    g.backend(1, b"S")
    assert g.to_client(1) == b"S"
    # The session inside TLS is invisible: a query may be running in it at any time, and
    # a database suspended under it would never be woken (spliced bytes bypass the
    # guest). So it keeps the database up until it ends.
    assert g.streams[1].spliced and g.need == ACTIVE
    g.tick(100)
    assert g.need == ACTIVE
    g.client_close(1)
    assert g.need == NONE


def test_direct_tls_is_passed_through_without_config(guest) -> None:
    g = guest()
    g.open(1)
    hello = bytes.fromhex("160301") + b"\x00\x05hello"
    g.client(1, hello)
    assert g.need == ACTIVE and g.streams[1].connects == [0]
    g.connected(1, ok=False)  # no backend yet: wait for one
    g.available()
    assert g.streams[1].connects == [0, 0]
    g.connected(1)
    assert g.to_backend(1) == hello and not g.streams[1].spliced
    g.backend(1, bytes.fromhex("160303") + b"\x00\x02sh")  # the ServerHello's first bytes
    assert g.to_client(1) == bytes.fromhex("160303") + b"\x00\x02sh" and g.streams[1].spliced


def test_startup_is_held_until_a_backend_is_up_then_relayed(guest) -> None:
    g = guest()
    g.open(1)
    g.client(1, W.startup(application_name="held"))
    g.connected(1, ok=False)
    assert g.need == ACTIVE and g.to_backend(1) == b""
    g.available()
    g.connected(1)
    assert g.to_backend(1) == W.startup(application_name="held")
    # The authentication exchange is relayed both ways while the session is set up.
    g.backend(1, W.msg(b"R", struct.pack("!i", 10) + b"SCRAM-SHA-256\0\0"))
    assert g.to_client(1)[:1] == b"R"
    g.client(1, W.msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", 3) + b"n,,"))
    assert g.to_backend(1)[:1] == b"p" and g.need == ACTIVE
    g.backend(1, GREETING)
    assert g.to_client(1) == GREETING and g.need == NONE


def test_protocol_32_startup_and_long_cancel_keys_are_relayed_untouched(guest) -> None:
    g = guest()
    st32 = W.startup(proto=W.PROTO_32, _pq_x="1")
    session(g, 1, st32)
    key = bytes(range(32))
    g.backend(1, W.msg(b"K", struct.pack("!i", 99) + key))
    assert g.to_client(1) == W.msg(b"K", struct.pack("!i", 99) + key)
    for klen in (4, 32, 256):
        cancel = struct.pack("!iii", 12 + klen, 80877102, 99) + bytes(klen)
        g.open(2)
        g.client(2, cancel)
        assert g.streams[2].connects == [0]
        g.connected(2)
        assert g.to_backend(2) == cancel
        assert g.streams[2].upstream_closed and g.streams[2].downstream_closed
        g.streams.pop(2)
    assert g.need == NONE  # a cancel does not wake


def test_cancel_request_with_no_backend_closes(guest) -> None:
    g = guest()
    g.open(1)
    g.client(1, struct.pack("!iiii", 16, 80877102, 1, 2))
    g.connected(1, ok=False)
    assert g.streams[1].downstream_closed and g.to_backend(1) == b""
    assert g.need in (None, NONE)


@pytest.mark.parametrize("data,code", [
    (struct.pack("!ii", 20000, 3 << 16), ""),           # startup packet too long: closed,
    (struct.pack("!ii", 4, 3 << 16), ""),               # too short: as the server, no word
    (struct.pack("!ii", 8, 4 << 16), "0A000"),          # protocol 4.0
    (struct.pack("!ii", 8, 3 << 16), "08P01"),          # no parameters, no terminator
])
def test_malformed_startup_gets_a_fatal_error_and_a_close(guest, data: bytes, code: str) -> None:
    """More, compared with the live server: tests/unit/test_postgres_hostile.py."""
    g = guest()
    g.open(1)
    g.client(1, data)
    e = errors(g.to_client(1))
    assert [(x["S"], x["C"]) for x in e] == ([("FATAL", code)] if code else [])
    assert g.streams[1].downstream_closed and g.streams[1].connects == []


@pytest.mark.parametrize("data,code", [(b"\x01\0\0\0\x05x", "08P01"), (b"Q\0\0\0\x02", ""),
                                       (b"Q\x7f\0\0\0", "")])
def test_malformed_messages_in_a_session_get_08p01_and_a_close(guest, data: bytes,
                                                               code: str) -> None:
    """An unknown type is FATAL 08P01, a bad length a close without a word (the server's
    COMMERROR); more in tests/unit/test_postgres_hostile.py."""
    g = guest(max_message_bytes=1 << 20)
    session(g)
    g.client(1, data)
    e = errors(g.to_client(1))
    assert [(x["S"], x["C"]) for x in e] == ([("FATAL", code)] if code else [])
    assert g.streams[1].downstream_closed and g.streams[1].upstream_closed


# ---- keep-alives answered locally ----------------------------------------------------


def test_keepalives_are_answered_locally_with_the_servers_exact_bytes(guest) -> None:
    g = guest()
    session(g)
    for name, request in FORMS.items():
        g.client(1, request)
        assert g.to_client(1).hex() == CAPTURED[name], name
        assert g.to_backend(1) == b"", name
        assert g.need == NONE, name


def test_keepalives_split_across_reads_are_still_answered_locally(guest) -> None:
    g = guest()
    session(g)
    for i in range(len(SELECT1)):
        g.client(1, SELECT1[i:i + 1])
    assert g.to_client(1).hex() == CAPTURED["x_select1"] and g.to_backend(1) == b""
    q = W.query("SELECT 1")
    g.client(1, q[:7])
    g.client(1, q[7:])
    assert g.to_client(1).hex() == CAPTURED["q_select1"] and g.to_backend(1) == b""
    # a real query split the same way is relayed whole, in order
    q = W.query("SELECT 2")
    g.client(1, q[:7])
    g.client(1, q[7:])
    assert g.to_backend(1) == q and g.to_client(1) == b""

def test_asyncpg_reset_on_a_clean_session_is_answered_locally(guest) -> None:
    """An asyncpg pool sends its reset query at every release, a pool keep-alive
    included: on a session that sent the backend nothing since its startup (or since a
    reset the backend completed) it changes nothing, and is answered locally; after any
    relayed message it goes to the backend, and its success makes the session clean."""
    g = guest()
    session(g)
    for _ in range(2):
        g.client(1, W.query("SELECT 1") + ASYNCPG_RESET)
        assert g.to_client(1).hex() == CAPTURED["q_select1"] + RESET_ANSWER
        assert g.to_backend(1) == b"" and g.need == NONE
    g.client(1, W.query("SET work_mem = '8MB'"))
    assert g.to_backend(1) == W.query("SET work_mem = '8MB'")
    g.backend(1, W.msg(b"C", b"SET\0") + rfq())
    g.to_client(1)
    g.client(1, ASYNCPG_RESET)  # the SET must be undone by the server
    assert g.to_backend(1) == ASYNCPG_RESET and g.to_client(1) == b"" and g.need == ACTIVE
    answer = bytes.fromhex(RESET_ANSWER)
    g.backend(1, answer)
    assert g.to_client(1) == answer
    g.client(1, ASYNCPG_RESET)  # clean again
    assert g.to_client(1) == answer and g.to_backend(1) == b""
    # a relayed reset that fails (or has company in flight) leaves the session dirty
    g.client(1, W.query("LISTEN x"))
    assert g.to_backend(1) == W.query("LISTEN x")
    g.backend(1, W.msg(b"C", b"LISTEN\0") + rfq())
    g.client(1, ASYNCPG_RESET)
    g.backend(1, W.msg(b"E", b"SERROR\0C57014\0Mcanceled\0\0") + rfq())
    g.to_client(1)
    g.client(1, ASYNCPG_RESET)
    assert g.to_backend(1) == ASYNCPG_RESET * 2
    g.backend(1, answer)  # that one went through: clean
    g.client(1, W.query("SET a.b = 1") + ASYNCPG_RESET)
    g.client(1, ASYNCPG_RESET)  # behind the SET: relayed, in order
    assert g.to_backend(1) == W.query("SET a.b = 1") + ASYNCPG_RESET * 2


def test_asyncpg_reset_after_the_startup_pipeline_is_relayed(guest) -> None:
    """A query pipelined behind the StartupMessage reached the backend: not clean."""
    g = guest()
    g.open(1)
    g.client(1, W.startup() + W.query("SET work_mem = '8MB'"))
    g.connected(1)
    g.backend(1, GREETING + W.msg(b"C", b"SET\0") + rfq())
    g.to_backend(1)
    g.to_client(1)
    g.client(1, ASYNCPG_RESET)
    assert g.to_backend(1) == ASYNCPG_RESET and g.to_client(1) == b""


@pytest.mark.parametrize("sql", ["SELECT 2", "SELECT 1; SELECT 1", "SELECT 10", "select1",
                                 "SELECT 1;;", "BEGIN", *NOT_KEEPALIVES, "-- x\n\v",
                                 "-- x\nSELECT 2", "SELECT /* 1 */ 2", "select 1-- x\n;x"])
def test_other_queries_are_relayed(guest, sql: str) -> None:
    g = guest()
    session(g)
    g.client(1, W.query(sql))
    assert g.to_backend(1) == W.query(sql) and g.to_client(1) == b"" and g.need == ACTIVE
    g.backend(1, W.msg(b"C", b"X\0") + rfq())
    assert g.need == NONE


def test_pgx_ping_and_commented_keepalives_are_answered_locally(guest) -> None:
    """pgx v5's pgconn.Ping is the simple Query "-- ping" (pgxpool pings on acquire,
    database/sql's PingContext too): relayed, it woke a frozen database on every probe."""
    g = guest()
    session(g)
    g.unavailable()  # asleep: a relayed one would be held and wake it
    for sql, name in (("-- ping", "q_comment_dash"), ("/* ping */", "q_comment_block"),
                      ("SELECT 1 -- health", "q_comment_select1"),
                      ("/* ping */ SELECT 1;", "q_comment_select1"),
                      ("select\n-- a\n1 -- b", "q_comment_select1"),
                      ("/* /* nested */ */ select 1", "q_comment_select1")):
        g.client(1, W.query(sql))
        assert g.to_client(1).hex() == CAPTURED[name], sql
        assert g.to_backend(1) == b"" and g.need == NONE, sql
    # split over reads (the buffered path, not the whole-body fast path)
    q = W.query("-- ping")
    for i in range(len(q)):
        g.client(1, q[i:i + 1])
    assert g.to_client(1).hex() == CAPTURED["q_comment_dash"] and g.need == NONE
    counts: dict[str, int] = {}
    for a in g.actions:
        if isinstance(a, abi.Count):
            counts[a.name] = counts.get(a.name, 0) + a.n
    assert counts.get("keepalives_answered") == 7 and "wake_query" not in counts


def test_an_unterminated_comment_is_relayed_for_the_servers_error(guest) -> None:
    g = guest()
    session(g)
    for sql in ("-- ping\n/* x", "/* a /* b */ c", "SELECT 1 /* x"):
        g.client(1, W.parse(sql) + W.bind() + W.execute() + W.SYNC)
        assert g.to_client(1) == b"" and g.need == ACTIVE, sql
        assert g.to_backend(1) == W.parse(sql) + W.bind() + W.execute() + W.SYNC, sql
        g.backend(1, W.msg(b"E", b"SERROR\0C42601\0Munterminated /* comment\0\0") + rfq())
        assert errors(g.to_client(1))[0]["C"] == "42601" and g.need == NONE


def test_keepalives_inside_a_transaction_or_behind_a_query_are_relayed(guest) -> None:
    g = guest()
    session(g)
    g.client(1, W.query("BEGIN"))
    g.backend(1, W.msg(b"C", b"BEGIN\0") + rfq(b"T"))
    assert g.need == ACTIVE
    g.to_backend(1)
    g.client(1, W.query("SELECT 1"))
    assert g.to_backend(1) == W.query("SELECT 1")  # status T: the backend answers
    g.backend(1, bytes.fromhex(CAPTURED["q_select1"])[:-1] + b"T")
    g.client(1, W.query("COMMIT"))
    g.backend(1, W.msg(b"C", b"COMMIT\0") + rfq())
    assert g.need == NONE
    g.to_backend(1)
    g.to_client(1)
    # pipelined behind a real query: relayed in order
    g.client(1, W.query("SELECT pg_sleep(1)") + W.query("SELECT 1"))
    assert g.to_backend(1) == W.query("SELECT pg_sleep(1)") + W.query("SELECT 1")
    assert g.to_client(1) == b""
    g.backend(1, rfq())
    assert g.need == ACTIVE  # one ReadyForQuery still to come
    g.backend(1, rfq())
    assert g.need == NONE


def test_a_group_that_is_not_all_keepalive_is_relayed_whole(guest) -> None:
    g = guest()
    session(g)
    req = W.parse("SELECT 1") + W.bind() + W.execute() + W.parse("SELECT 2") + W.SYNC
    g.client(1, req)
    assert g.to_backend(1) == req and g.to_client(1) == b""
    assert g.need == ACTIVE
    # A Flush in a keep-alive group is answered at once (what the server sends by then).
    g.backend(1, rfq())
    g.to_client(1)
    g.client(1, W.parse("SELECT 1") + W.FLUSH)
    assert g.to_client(1) == W.msg(b"1") and g.to_backend(1) == b"" and g.need == NONE
    # max_rows = 1: the row, then PortalSuspended
    g.client(1, W.bind() + W.execute(max_rows=1) + W.SYNC)
    assert g.to_client(1) == W.msg(b"2") + bytes.fromhex(_D) + W.msg(b"s") + rfq()
    # a second Execute of a suspended portal is the backend's to answer
    req = W.parse("SELECT 1") + W.bind() + W.execute(max_rows=1) + W.execute() + W.SYNC
    g.client(1, req)
    assert g.to_backend(1) == req


def test_local_named_statements_are_created_upstream_before_anything_is_relayed(guest) -> None:
    g = guest()
    session(g)
    g.client(1, W.parse("SELECT 1", "ka") + W.SYNC)
    assert g.to_client(1).hex() == CAPTURED["x_prepare"] and g.to_backend(1) == b""
    g.client(1, W.query("SELECT now()"))
    # The backend first learns "ka", then sees the real query.
    assert g.to_backend(1) == W.parse("SELECT 1", "ka") + W.SYNC + W.query("SELECT now()")
    assert g.need == ACTIVE
    # Its answer to the injected Parse/Sync is swallowed; the query's answer is relayed.
    answer = W.msg(b"C", b"SELECT 1\0") + rfq()
    g.backend(1, W.msg(b"1") + rfq()[:3])
    g.backend(1, rfq()[3:] + answer)
    assert g.to_client(1) == answer and g.need == NONE
    # "ka" is still answered locally, and a Close of a backend statement is relayed.
    g.client(1, FORMS["x_exec_named"].replace(b"s1", b"ka"))
    assert g.to_client(1).hex() == CAPTURED["x_exec_named"] and g.to_backend(1) == b""
    g.client(1, W.close(b"S", "ka") + W.SYNC)
    assert g.to_backend(1) == W.close(b"S", "ka") + W.SYNC


# ---- need, holding, timeouts -----------------------------------------------------------


def test_a_query_on_a_sleeping_database_is_held_then_relayed_in_order(guest) -> None:
    g = guest()
    session(g)
    g.unavailable()
    g.client(1, W.query("SELECT 1"))  # keep-alive: answered, no wake
    assert g.to_client(1).hex() == CAPTURED["q_select1"] and g.need == NONE
    g.client(1, W.query("INSERT 1") + W.query("SELECT 1"))
    assert g.to_backend(1) == b"" and g.need == ACTIVE
    g.available()
    assert g.to_backend(1) == W.query("INSERT 1") + W.query("SELECT 1")
    g.backend(1, rfq() + rfq())
    assert g.need == NONE


def test_the_hold_bound_pauses_the_client_and_resumes_it(guest) -> None:
    g = guest(stream_hold_bytes=4096)
    session(g)
    g.unavailable()
    big = W.query("SELECT '" + "x" * 5000 + "'")
    g.client(1, big)
    assert g.streams[1].paused and g.to_backend(1) == b""
    g.available()
    assert g.to_backend(1) == big and not g.streams[1].paused


def test_hold_timeout_in_a_session_is_error_57p03_then_ready(guest) -> None:
    g = guest(hold_timeout_ms=1000)
    session(g)
    g.unavailable()
    g.client(1, W.query("SELECT now()") + W.parse("SELECT now()") + W.bind() + W.execute()
             + W.SYNC + W.parse("x"))
    g.tick(10)
    g.tick(500)
    assert g.to_client(1) == b""
    g.tick(1020)
    out = g.to_client(1)
    types = [t for t, _ in W.split(out)]
    assert types == [b"E", b"Z", b"E", b"Z", b"E"]
    assert errors(out)[0] == {"S": "ERROR", "V": "ERROR", "C": "57P03",
                              "M": errors(out)[0]["M"]}
    assert g.need == NONE and not g.streams[1].downstream_closed
    # The unfinished group is skipped up to its Sync, which gets a ReadyForQuery.
    g.client(1, W.bind() + W.execute() + W.SYNC)
    assert g.to_client(1) == rfq() and g.to_backend(1) == b""
    # And the session goes on: keep-alives answered, a query held again.
    g.client(1, W.query("select 1"))
    assert g.to_client(1).hex() == CAPTURED["q_select1"]


def test_hold_timeout_before_the_session_is_fatal_57p03(guest) -> None:
    g = guest(hold_timeout_ms=1000)
    g.open(1)
    g.client(1, W.startup())
    g.connected(1, ok=False)
    g.tick(5)
    g.tick(1010)
    e = errors(g.to_client(1))
    assert e[0]["S"] == "FATAL" and e[0]["C"] == "57P03" and g.streams[1].downstream_closed
    assert g.need == NONE


def _counts(g: StreamGuest) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in g.actions:
        if isinstance(a, abi.Count):
            out[a.name] = out.get(a.name, 0) + a.n
    return out


def test_a_startup_relayed_to_a_backend_that_never_answers_is_fatal_57p03(guest) -> None:
    """A SIGSTOPped postmaster still completes TCP handshakes (the kernel does), so the
    readiness probe passes and the startup is relayed; if it is never thawed, the client
    used to wait for ever with need active."""
    g = guest(hold_timeout_ms=1000)
    g.tick(1)
    g.open(1)
    g.client(1, W.startup())
    g.tick(500)
    g.connected(1)  # held for 500 ms, then relayed
    assert g.to_backend(1) == W.startup() and g.need == ACTIVE
    g.tick(600)
    g.tick(1550)  # over 1 s since the startup came, 0.95 s since the relay: waiting
    assert g.to_client(1) == b"" and not g.streams[1].downstream_closed
    g.tick(1700)
    e = errors(g.to_client(1))
    assert [(x["S"], x["C"]) for x in e] == [("FATAL", "57P03")]
    assert "hold timeout" in e[0]["M"]
    assert g.streams[1].downstream_closed and g.streams[1].upstream_closed
    assert g.need == NONE
    assert _counts(g).get("startup_timeouts") == 1 and "hold_timeouts" not in _counts(g)


def test_a_backend_that_answers_the_startup_is_not_timed_out(guest) -> None:
    g = guest(hold_timeout_ms=1000)
    g.tick(1)
    g.open(1)
    g.client(1, W.startup())
    g.connected(1)
    g.tick(500)
    # any answer shows a running backend: an AuthenticationRequest that waits for the
    # user to type a password (the server's own authentication_timeout covers it) ...
    g.backend(1, W.msg(b"R", struct.pack("!i", 3)))
    g.open(2)
    g.client(2, W.startup())
    g.connected(2)
    g.tick(600)
    g.backend(2, W.msg(b"E", b"SFATAL\0C28000\0Mno such role\0\0")[:7])  # ... or a part of one
    g.tick(10_000)
    g.tick(20_000)
    assert not g.streams[1].downstream_closed and not g.streams[2].downstream_closed
    assert g.to_client(1) == W.msg(b"R", struct.pack("!i", 3))
    assert "startup_timeouts" not in _counts(g)


def test_a_query_on_an_established_session_is_never_timed_out(guest) -> None:
    """A long query is legitimate: only the startup has a deadline."""
    g = guest(hold_timeout_ms=1000)
    g.tick(1)
    session(g)
    g.client(1, W.query("SELECT pg_sleep(3600)"))
    assert g.to_backend(1) == W.query("SELECT pg_sleep(3600)")
    for t in range(100, 120_000, 5000):
        g.tick(t)
    assert g.to_client(1) == b"" and not g.streams[1].downstream_closed and g.need == ACTIVE
    assert not {"startup_timeouts", "hold_timeouts"} & set(_counts(g))


def test_need_follows_queries_and_transactions_over_many_sessions(guest) -> None:
    g = guest()
    for sid in range(1, 21):
        session(g, sid)
    assert g.need == NONE
    g.client(7, W.query("BEGIN"))
    assert g.need == ACTIVE
    g.backend(7, rfq(b"T"))
    assert g.need == ACTIVE
    for sid in range(1, 21):
        if sid != 7:
            g.client(sid, W.query("SELECT 1"))
            assert g.to_backend(sid) == b""
    g.client(7, W.query("ROLLBACK"))
    g.backend(7, rfq(b"I"))
    assert g.need == NONE
    g.client_close(3)
    assert g.streams[3].downstream_closed and g.streams[3].upstream_closed


def test_passthrough_hold_timeout_answers_the_ssl_request_with_57p03(guest) -> None:
    g = guest(ssl="passthrough", hold_timeout_ms=500)
    g.open(1)
    g.client(1, W.SSL_REQUEST)
    g.connected(1, ok=False)
    g.open(2)
    g.client(2, b"\x16\x03\x01\x00\x02hi")  # direct TLS: no plaintext answer possible
    g.connected(2, ok=False)
    g.tick(1)
    g.tick(600)
    e = errors(g.to_client(1))
    assert e[0]["S"] == "FATAL" and e[0]["C"] == "57P03" and g.streams[1].downstream_closed
    assert g.to_client(2) == b"" and g.streams[2].downstream_closed
    assert g.need == NONE


# ---- a backend that is starting up, in recovery or shutting down (57P03) -------------------

#: what PostgreSQL 15 answers a startup while it shuts down (captured: a smart shutdown
#: waiting for a session), and before it for a 3.2 startup: NegotiateProtocolVersion
SHUTTING_DOWN = W.msg(b"E", b"SFATAL\0VFATAL\0C57P03\0Mthe database system is shutting down\0"
                      b"Fpostmaster.c\0L2432\0RProcessStartupPacket\0\0")
STARTING_UP = W.msg(b"E", b"SFATAL\0VFATAL\0C57P03\0Mthe database system is starting up\0\0")
NEGOTIATE_30 = W.msg(b"v", bytes.fromhex("0003000000000000"))


def test_a_57p03_startup_is_resent_until_the_backend_takes_it(guest) -> None:
    """A postmaster accepts TCP before it takes sessions (starting up, crash recovery) and
    after it stopped taking them (a smart shutdown): its FATAL 57P03 used to reach the
    client, which failed although the database was up a moment later."""
    g = guest(hold_timeout_ms=5000)
    g.tick(1)
    g.open(1)
    g.client(1, W.startup(application_name="retry"))
    g.connected(1)
    assert g.to_backend(1) == W.startup(application_name="retry")
    g.backend(1, STARTING_UP)
    assert g.to_client(1) == b"" and not g.streams[1].downstream_closed
    assert g.streams[1].upstream_closed and g.need == ACTIVE
    g.backend_close(1)  # its close after the FATAL: nothing for the client
    assert not g.streams[1].downstream_closed
    g.streams[1].upstream_closed = False
    g.tick(50)
    assert g.streams[1].connects == [0]  # not at once: 100 ms later
    g.tick(150)
    assert g.streams[1].connects == [0, 0]
    g.connected(1)
    assert g.to_backend(1) == W.startup(application_name="retry")
    g.backend(1, SHUTTING_DOWN)  # again: 200 ms now
    g.tick(250)
    assert g.streams[1].connects == [0, 0]
    g.tick(350)
    assert g.streams[1].connects == [0, 0, 0] and g.streams[1].upstream_closed
    g.streams[1].upstream_closed = False
    g.connected(1, ok=False)  # the postmaster is gone: refused until the new one listens
    g.available()
    assert g.streams[1].connects == [0, 0, 0, 0]
    g.connected(1)
    assert g.to_backend(1) == W.startup(application_name="retry")
    g.backend(1, GREETING)
    assert g.to_client(1) == GREETING and g.need == NONE
    assert not g.streams[1].upstream_closed and not g.streams[1].downstream_closed
    c = _counts(g)
    assert c.get("startup_retries") == 2 and "startup_timeouts" not in c, c
    g.client(1, W.query("SELECT 2"))
    assert g.to_backend(1) == W.query("SELECT 2")


def test_bytes_after_the_startup_wait_for_the_backend_to_take_it(guest) -> None:
    """What a client pipelines behind its startup goes after it on every connection."""
    g = guest(hold_timeout_ms=5000)
    g.tick(1)
    g.open(1)
    g.client(1, W.startup())
    g.connected(1)
    assert g.to_backend(1) == W.startup()
    g.client(1, W.query("SELECT 3"))
    assert g.to_backend(1) == b""  # held until the backend takes the startup
    g.backend(1, STARTING_UP)
    g.tick(200)
    g.connected(1)
    assert g.to_backend(1) == W.startup()
    g.backend(1, W.msg(b"R", struct.pack("!i", 0)))
    assert g.to_backend(1) == W.query("SELECT 3")
    assert g.to_client(1) == W.msg(b"R", struct.pack("!i", 0))


def test_a_32_startup_gets_negotiate_then_57p03_and_is_resent(guest) -> None:
    """PostgreSQL 15 answers a 3.2 startup with NegotiateProtocolVersion before it checks
    whether it takes sessions: 'v' then the 57P03 (captured). Neither reaches the client;
    the 'v' of the connection that takes the startup does, with its 'R'."""
    g = guest(hold_timeout_ms=5000)
    st32 = W.startup(proto=W.PROTO_32)
    g.tick(1)
    g.open(1)
    g.client(1, st32)
    g.connected(1)
    assert g.to_backend(1) == st32
    g.backend(1, NEGOTIATE_30)
    assert g.to_client(1) == b""
    g.backend(1, SHUTTING_DOWN[:9])  # split anywhere
    g.backend(1, SHUTTING_DOWN[9:])
    assert g.to_client(1) == b"" and g.streams[1].upstream_closed
    g.tick(200)
    g.connected(1)
    assert g.to_backend(1) == st32
    g.backend(1, NEGOTIATE_30)
    assert g.to_client(1) == b""
    g.backend(1, GREETING)
    assert g.to_client(1) == NEGOTIATE_30 + GREETING and g.need == NONE


@pytest.mark.parametrize("code", ["28P01", "3D000", "53300", "28000", "57P01"])
def test_other_startup_errors_are_relayed_at_once(guest, code: str) -> None:
    g = guest(hold_timeout_ms=5000)
    g.tick(1)
    for sid, first in ((1, b""), (2, NEGOTIATE_30)):
        g.open(sid)
        g.client(sid, W.startup())
        g.connected(sid)
        err = W.msg(b"E", b"SFATAL\0VFATAL\0C" + code.encode() + b"\0Mno\0\0")
        g.backend(sid, first + err)
        g.backend_close(sid)
        assert g.to_client(sid) == first + err and g.streams[sid].downstream_closed
        assert g.streams[sid].connects == [0]
    assert "startup_retries" not in _counts(g)


def test_57p03_past_the_hold_is_relayed_as_the_backend_said_it(guest) -> None:
    """The retries last hold_timeout_ms from the client's startup; then the client gets
    the backend's last answer (its 'v' too), and a 57P03 that comes too late for another
    try is relayed at once."""
    g = guest(hold_timeout_ms=1000)
    g.tick(1)
    g.open(1)
    g.client(1, W.startup(proto=W.PROTO_32))
    g.connected(1)
    now, n = 1, 0
    while not g.streams[1].downstream_closed and now < 3000:
        if g.streams[1].connects and len(g.streams[1].connects) > n:
            n = len(g.streams[1].connects)
            if n > 1:
                g.connected(1)
            g.backend(1, NEGOTIATE_30 + SHUTTING_DOWN)
            g.backend_close(1)  # ignored after a retry's own close
        now += 100
        g.tick(now)
    assert g.streams[1].downstream_closed and 800 <= now <= 1100, now
    assert g.to_client(1) == NEGOTIATE_30 + SHUTTING_DOWN
    assert 2 <= _counts(g).get("startup_retries", 0) <= 4, _counts(g)
    # a refusing backend (connects fail) after a 57P03: the activator's own 57P03
    g.open(2)
    g.client(2, W.startup())
    g.connected(2)
    g.backend(2, STARTING_UP)
    start = now
    while not g.streams[2].downstream_closed and now < start + 3000:
        now += 100
        g.tick(now)
        if len(g.streams[2].connects) > 1:
            g.connected(2, ok=False)
            g.streams[2].connects = [0]
    assert g.streams[2].downstream_closed and now - start <= 1200
    assert errors(g.to_client(2))[0]["M"] == "the database system is starting up"


def test_57p03_from_a_backend_that_then_freezes_ends_at_the_hold(guest) -> None:
    g = guest(hold_timeout_ms=1000)
    g.tick(1)
    g.open(1)
    g.client(1, W.startup())
    g.connected(1)
    g.backend(1, STARTING_UP)
    g.tick(200)
    g.connected(1)  # ... and then not a byte
    for t in range(300, 1000, 100):
        g.tick(t)
        assert not g.streams[1].downstream_closed, t
    g.tick(1100)
    assert g.streams[1].downstream_closed
    assert errors(g.to_client(1))[0]["C"] == "57P03"
    assert _counts(g).get("startup_timeouts") == 1


def test_a_cancel_request_answered_57p03_is_not_retried(guest) -> None:
    g = guest(hold_timeout_ms=5000)
    g.tick(1)
    g.open(1)
    cancel = struct.pack("!iiii", 16, 80877102, 7, 8)
    g.client(1, cancel)
    g.connected(1)
    assert g.to_backend(1) == cancel and g.streams[1].downstream_closed
    g.tick(300)
    assert g.streams[1].connects == [0] and "startup_retries" not in _counts(g)


# ---- TLS passthrough to a backend that accepts and never answers --------------------------


def test_passthrough_to_a_frozen_backend_gets_57p03_after_the_hold(guest) -> None:
    """A SIGSTOPped postmaster still completes TCP handshakes: the connect succeeds and
    the SSLRequest goes, then nothing. Spliced at once, the client hung for ever."""
    g = guest(ssl="passthrough", hold_timeout_ms=1000)
    g.tick(1)
    g.open(1)
    g.client(1, W.SSL_REQUEST)
    g.tick(300)
    g.connected(1)  # 300 ms held; the backend has the hold from now
    assert g.to_backend(1) == W.SSL_REQUEST and not g.streams[1].spliced
    for t in range(400, 1300, 100):
        g.tick(t)
        assert not g.streams[1].downstream_closed, t
    g.tick(1400)
    e = errors(g.to_client(1))
    assert [(x["S"], x["C"]) for x in e] == [("FATAL", "57P03")]
    assert g.streams[1].downstream_closed and g.streams[1].upstream_closed
    assert not g.streams[1].spliced and g.need == NONE
    assert _counts(g).get("startup_timeouts") == 1


def test_direct_tls_to_a_frozen_backend_is_closed_after_the_hold(guest) -> None:
    g = guest(hold_timeout_ms=1000)
    g.tick(1)
    g.open(1)
    hello = bytes.fromhex("160301") + b"\x00\x05hel"
    g.client(1, hello)
    g.connected(1)
    g.client(1, b"lo")  # the rest of the ClientHello goes on
    assert g.to_backend(1) == hello + b"lo" and not g.streams[1].spliced
    for t in range(100, 1100, 100):
        g.tick(t)
    assert not g.streams[1].downstream_closed
    g.tick(1200)
    assert g.to_client(1) == b"" and g.streams[1].downstream_closed
    assert g.streams[1].upstream_closed and g.need == NONE
    assert _counts(g).get("startup_timeouts") == 1


def test_many_held_sessions_are_all_relayed_when_the_backend_returns(guest) -> None:
    g = guest()
    for sid in range(1, 41):
        session(g, sid)
    g.unavailable()
    for sid in range(1, 41):
        g.client(sid, W.query(f"SELECT {sid} + 1"))
    assert g.need == ACTIVE and all(g.to_backend(sid) == b"" for sid in range(1, 41))
    g.available()
    g.tick(100)
    for sid in range(1, 41):
        assert g.to_backend(sid) == W.query(f"SELECT {sid} + 1"), sid
        g.backend(sid, rfq())
    assert g.need == NONE


def test_the_backend_going_away_closes_the_client(guest) -> None:
    g = guest()
    session(g)
    fatal = W.msg(b"E", b"SFATAL\0C57P01\0Mterminating\0\0")
    g.backend(1, fatal)
    g.backend_close(1)
    assert g.to_client(1) == fatal and g.streams[1].downstream_closed


def test_a_backend_stream_that_does_not_parse_is_spliced(guest) -> None:
    g = guest()
    session(g)
    g.client(1, W.query("SELECT 2"))
    g.backend(1, b"Z\0\0\0\x09Ixxxx")  # ReadyForQuery of the wrong length
    assert g.streams[1].spliced and g.to_client(1) == b"Z\0\0\0\x09Ixxxx"
    assert any("does not parse" in m for _, m in g.logs)


def test_terminate_on_a_sleeping_database_closes_without_waking(guest) -> None:
    g = guest()
    session(g)
    g.unavailable()
    g.client(1, W.TERMINATE)
    assert g.streams[1].downstream_closed and g.need == NONE and g.to_backend(1) == b""


def test_counters_say_what_was_answered_and_why_it_woke(guest) -> None:
    g = guest()
    g.open(1)
    g.client(1, W.startup())
    g.connected(1, ok=False)
    g.available()
    g.connected(1)
    g.backend(1, GREETING)
    for _ in range(3):
        g.client(1, W.query("SELECT 1"))
    g.unavailable()
    g.client(1, W.query("SELECT 2"))
    counts: dict[str, int] = {}
    for a in g.actions:
        if isinstance(a, abi.Count):
            counts[a.name] = counts.get(a.name, 0) + a.n
    assert counts == {"wake_startup": 1, "keepalives_answered": 3, "wake_query": 1}


def test_need_none_is_reported_at_the_next_tick_by_default(guest) -> None:
    g = guest(need_debounce=1)
    g.open(1)
    g.client(1, W.startup())
    g.connected(1)
    g.backend(1, GREETING)
    assert g.need == ACTIVE
    g.tick(1)
    assert g.need == NONE
    g.client(1, W.query("SELECT 2"))
    assert g.need == ACTIVE
    g.backend(1, rfq())
    assert g.need == ACTIVE  # not flipped back per query
    g.client(1, W.query("SELECT 3"))
    g.backend(1, rfq())
    g.tick(101)
    assert g.need == NONE


# ---- review: protocol corners (each failed before its fix) -------------------------------


def test_a_keepalive_never_lands_inside_a_backend_message_still_arriving(guest) -> None:
    """A NotificationResponse split over backend reads: whatever answers the keep-alive
    comes after the whole notification, never inside it."""
    g = guest()
    session(g)
    note = W.msg(b"A", struct.pack("!i", 77) + b"chan\0payload\0")
    g.backend(1, note[:9])
    g.client(1, W.query("SELECT 1"))
    g.backend(1, note[9:])
    if g.to_backend(1) == W.query("SELECT 1"):  # relayed: the backend answers it
        g.backend(1, bytes.fromhex(CAPTURED["q_select1"]))
    out = g.to_client(1)
    assert [t for t, _ in W.split(out)] == [b"A", b"T", b"D", b"C", b"Z"]
    assert out.startswith(note)
    assert g.need == NONE


def test_a_keepalive_group_never_lands_inside_a_backend_message_either(guest) -> None:
    g = guest()
    session(g)
    note = W.msg(b"A", struct.pack("!i", 77) + b"chan\0payload\0")
    g.client(1, W.parse("SELECT 1") + W.bind())  # buffered: quiescent so far
    g.backend(1, note[:9])
    g.client(1, W.describe(b"P") + W.execute() + W.SYNC)
    g.backend(1, note[9:])
    if g.to_backend(1):  # relayed: the backend answers it
        g.backend(1, bytes.fromhex(CAPTURED["x_select1"]))
    out = g.to_client(1)
    assert out.startswith(note)
    assert out[len(note):].hex() == CAPTURED["x_select1"] and g.need == NONE
    # a simple Query whose body comes in two reads, the notification between them
    q = W.query("SELECT 1")
    g.client(1, q[:7])
    g.backend(1, note[:9])
    g.client(1, q[7:])
    g.backend(1, note[9:])
    if g.to_backend(1):
        g.backend(1, bytes.fromhex(CAPTURED["q_select1"]))
    out = g.to_client(1)
    assert out.startswith(note) and out[len(note):].hex() == CAPTURED["q_select1"]


def test_a_client_that_never_completes_its_startup_is_closed(guest) -> None:
    """A connection that sends part of a startup packet (or nothing after an 'N') and
    waits would hold one of the port's streams forever; PostgreSQL closes it after
    authentication_timeout (60 s), silently."""
    g = guest()
    for sid, data in ((1, W.startup()[:5]), (2, W.SSL_REQUEST), (3, b"")):
        g.open(sid)
        g.client(sid, data)
    g.tick(10)
    g.tick(59_000)
    assert not any(g.streams[sid].downstream_closed for sid in (1, 2, 3))
    g.tick(60_100)
    assert all(g.streams[sid].downstream_closed for sid in (1, 2, 3))
    assert g.to_client(1) == b"" and g.to_client(2) == b"N" and g.need in (None, NONE)
    # an established session is not touched, nor is a startup held for a backend
    session(g, 4)
    g.unavailable()
    g.open(5)
    g.client(5, W.startup())
    g.connected(5, ok=False)
    g.tick(200_000)
    g.tick(231_000)
    assert not g.streams[4].downstream_closed
    e = errors(g.to_client(5))
    assert e and e[0]["C"] == "57P03"  # the hold timeout (30 s by default), not this


def test_copy_in_through_the_extended_protocol_leaves_the_session_idle(guest) -> None:
    """libpq's PQexecParams("COPY ... FROM STDIN") sends a Sync before the data and one
    after CopyDone; the server ignores the first (copy-in mode) and answers only one
    ReadyForQuery (checked against PostgreSQL 15). The session must end up idle."""
    g = guest()
    session(g)
    req = W.parse("COPY t FROM STDIN") + W.bind() + W.describe(b"P") + W.execute() + W.SYNC
    g.client(1, req)
    assert g.to_backend(1) == req
    g.backend(1, W.msg(b"1") + W.msg(b"2") + W.msg(b"n") + W.msg(b"G", b"\0\0\1\0\0"))
    data = W.msg(b"d", b"1\n") + W.msg(b"c") + W.SYNC
    g.client(1, data)
    assert g.to_backend(1) == data and g.need == ACTIVE
    g.backend(1, W.msg(b"C", b"COPY 1\0") + rfq())
    assert g.need == NONE
    g.to_client(1)
    g.client(1, W.query("SELECT 1"))
    assert g.to_backend(1) == b"" and g.to_client(1).hex() == CAPTURED["q_select1"]


def test_copy_in_with_a_copy_fail_and_simple_copy_keep_the_count(guest) -> None:
    g = guest()
    session(g)
    g.client(1, W.parse("COPY t FROM STDIN") + W.bind() + W.execute() + W.SYNC)
    g.backend(1, W.msg(b"1") + W.msg(b"2") + W.msg(b"G", b"\0\0\1\0\0"))
    g.client(1, W.msg(b"f", b"no\0") + W.SYNC)
    g.backend(1, W.msg(b"E", b"SERROR\0C57014\0Mno\0\0") + rfq())
    assert g.need == NONE
    # simple-protocol COPY: no Sync involved, the count stays right too
    g.client(1, W.query("COPY t FROM STDIN"))
    g.backend(1, W.msg(b"G", b"\0\0\1\0\0"))
    g.client(1, W.msg(b"d", b"2\n") + W.msg(b"c"))
    g.backend(1, W.msg(b"C", b"COPY 1\0") + rfq())
    assert g.need == NONE
    g.to_backend(1)
    g.client(1, W.query("select 1"))
    assert g.to_backend(1) == b""


def test_a_simple_query_answered_locally_destroys_the_unnamed_statement(guest) -> None:
    """PostgreSQL: a simple Query drops the unnamed statement, so a later Bind of it
    fails with 26000; answering it locally must not keep it alive."""
    g = guest()
    session(g)
    g.client(1, W.parse("SELECT 1") + W.SYNC)
    assert g.to_client(1).hex() == CAPTURED["x_prepare"]
    g.client(1, W.query("SELECT 1"))
    assert g.to_client(1).hex() == CAPTURED["q_select1"]
    req = W.bind() + W.execute() + W.SYNC
    g.client(1, req)
    assert g.to_backend(1) == req  # the backend answers 26000; no Parse recreated


def test_a_locally_answered_query_also_drops_the_backends_unnamed_statement(guest) -> None:
    g = guest()
    session(g)
    g.client(1, W.parse("SELECT 2") + W.SYNC)  # the backend holds the unnamed statement
    g.backend(1, W.msg(b"1") + rfq())
    g.to_backend(1)
    g.to_client(1)
    g.client(1, W.query("SELECT 1"))
    assert g.to_backend(1) == b"" and g.to_client(1).hex() == CAPTURED["q_select1"]
    req = W.bind() + W.execute() + W.SYNC
    g.client(1, req)
    # the backend first forgets its unnamed statement, as the real query would have made it
    assert g.to_backend(1) == W.close(b"S") + W.SYNC + req
    g.backend(1, W.msg(b"3") + rfq())
    assert g.to_client(1) == b""  # swallowed
    err = W.msg(b"E", b"SERROR\0C26000\0Mnope\0\0") + rfq()
    g.backend(1, err)
    assert g.to_client(1) == err and g.need == NONE


def test_a_parse_of_a_name_the_backend_already_has_is_relayed(guest) -> None:
    """The real server answers 42P05 to a Parse of an existing name: a keep-alive Parse
    of a name the backend was given must reach the backend, not be answered locally."""
    g = guest()
    session(g)
    g.client(1, W.parse("SELECT 2", "s2") + W.SYNC)
    g.backend(1, W.msg(b"1") + rfq())
    g.to_backend(1)
    g.to_client(1)
    req = W.parse("SELECT 1", "s2") + W.SYNC
    g.client(1, req)
    assert g.to_backend(1) == req
    g.backend(1, W.msg(b"E", b"SERROR\0C42P05\0Mexists\0\0") + rfq())
    # and a Bind of it runs the backend's statement
    g.client(1, FORMS["x_exec_named"].replace(b"s1", b"s2"))
    assert g.to_backend(1) == FORMS["x_exec_named"].replace(b"s1", b"s2")


@pytest.mark.parametrize("sql", ["DEALLOCATE ALL", "deallocate prepare all ;", "DISCARD ALL"])
def test_deallocate_all_lets_the_backends_names_be_parsed_locally_again(guest, sql: str) -> None:
    """psycopg clears its prepared cache on DEALLOCATE ALL / DISCARD ALL and reuses its
    names (_pg3_0, ...): once the backend has none, a keep-alive Parse of such a name is
    answered locally again."""
    g = guest()
    session(g)
    g.client(1, W.parse("SELECT 2", "_pg3_0") + W.SYNC)
    g.backend(1, W.msg(b"1") + rfq())
    g.client(1, W.query(sql))
    g.backend(1, W.msg(b"C", b"DEALLOCATE ALL\0") + rfq())
    g.to_backend(1)
    g.to_client(1)
    g.client(1, W.parse("SELECT 1", "_pg3_0") + W.SYNC)
    assert g.to_backend(1) == b"" and g.to_client(1).hex() == CAPTURED["x_prepare"]
    # but not after a mere DEALLOCATE of one name
    g.client(1, W.parse("SELECT 2", "_pg3_1") + W.SYNC)
    g.backend(1, W.msg(b"1") + W.msg(b"1") + rfq() + rfq())
    g.client(1, W.query("DEALLOCATE _pg3_9"))
    g.backend(1, rfq())
    g.to_backend(1)
    g.client(1, W.parse("SELECT 1", "_pg3_1") + W.SYNC)
    assert g.to_backend(1) == W.parse("SELECT 1", "_pg3_1") + W.SYNC


@pytest.mark.parametrize("bind", [
    W.bind(params=()),                       # fewer values than declared types
    W.bind(params=(b"5", b"6")),             # more
    W.bind(params=(b"abc",)),                # not an int4
    W.bind(params=(b"2147483648",)),         # out of range
    W.bind(params=(b" 5",)),                 # accepted by the server, not checked here
    W.msg(b"B", b"\0\0" + bytes.fromhex("0001" "0001" "0001" "00000002" "0005" "0000")),
])
def test_declared_parameters_the_server_may_refuse_are_relayed(guest, bind: bytes) -> None:
    g = guest()
    session(g)
    req = W.parse("SELECT 1", "", (23,)) + bind + W.execute() + W.SYNC
    g.client(1, req)
    assert g.to_backend(1) == req and g.to_client(1) == b""


def test_a_statement_with_declared_types_is_recreated_upstream_with_them(guest) -> None:
    g = guest()
    session(g)
    g.client(1, FORMS["x_types_named"])
    assert g.to_client(1).hex() == CAPTURED["x_types_named"] and g.to_backend(1) == b""
    g.client(1, W.query("SELECT now()"))
    assert g.to_backend(1) == W.parse("SELECT 1", "st", (23, 25, 20, 1043)) + W.SYNC \
        + W.query("SELECT now()")


def test_a_pipeline_of_several_keepalives_before_one_sync_is_answered_locally(guest) -> None:
    g = guest()
    session(g)
    one = W.parse("SELECT 1") + W.bind() + W.describe(b"P") + W.execute()
    g.client(1, one * 8 + W.SYNC)
    assert g.to_backend(1) == b""
    body = "3100000004" "3200000004" + _T + _D + _C[:-12]
    assert g.to_client(1).hex() == body * 8 + "5a0000000549"


def test_asyncpg_prepare_with_flush_is_answered_at_the_flush(guest) -> None:
    """asyncpg prepares with Parse + Describe + Flush and waits for the answers before
    it sends Bind/Execute/Sync: the Flush must be answered locally, at once."""
    g = guest()
    session(g)
    g.client(1, ASYNCPG_PREPARE)
    assert g.to_client(1).hex() == "3100000004" "7400000006" "0000" + _T
    assert g.to_backend(1) == b"" and g.need == NONE
    g.client(1, ASYNCPG_FETCHVAL)
    assert g.to_client(1).hex() == CAPTURED["x_asyncpg_again"] and g.to_backend(1) == b""
    for _ in range(3):  # the statement cache: Bind/Execute/Sync only
        g.client(1, ASYNCPG_FETCHVAL)
        assert g.to_client(1).hex() == CAPTURED["x_asyncpg_again"]
    assert g.to_backend(1) == b"" and g.need == NONE
    # a real query: the backend first learns the statement, then runs the query
    g.client(1, W.query("SELECT 2"))
    assert g.to_backend(1) == W.parse("SELECT 1", ASYNCPG_STMT) + W.SYNC + W.query("SELECT 2")


def test_a_group_answered_up_to_a_flush_then_not_a_keepalive_is_relayed_exactly(guest) -> None:
    """Answered at the Flush, then the group goes on with a real query: the backend gets
    the whole group, and its answers to what was answered already are dropped, so the
    client sees each answer once, in order."""
    g = guest()
    session(g)
    g.client(1, W.parse("SELECT 1", "k") + W.describe(b"S", "k") + W.FLUSH)
    first = g.to_client(1)
    assert first.hex() == "3100000004" "7400000006" "0000" + _T
    rest = W.parse("SELECT now()") + W.bind() + W.execute() + W.SYNC
    g.client(1, rest)
    assert g.to_backend(1) == W.parse("SELECT 1", "k") + W.describe(b"S", "k") + W.FLUSH + rest
    assert g.need == ACTIVE
    real = W.msg(b"1") + W.msg(b"2") + W.msg(b"D", b"\0\1\0\0\0\1x") + W.msg(b"C", b"SELECT 1\0")
    g.backend(1, W.msg(b"1") + W.msg(b"t", b"\0\0") + bytes.fromhex(_T) + W.msg(b"N", b"\0")
              + real + rfq())
    assert g.to_client(1) == W.msg(b"N", b"\0") + real + rfq() and g.need == NONE
    # "k" lives on the backend now: a Bind of it is relayed
    g.client(1, W.bind("", "k") + W.execute() + W.SYNC)
    assert g.to_backend(1) == W.bind("", "k") + W.execute() + W.SYNC


def test_statements_known_locally_survive_real_queries_in_a_transaction(guest) -> None:
    """asyncpg's cached keep-alive statement stays answerable after the application's own
    queries (relayed while the session was busy), so the pool's next keep-alive does not
    wake a suspended database."""
    g = guest()
    session(g)
    g.client(1, ASYNCPG_PREPARE + ASYNCPG_FETCHVAL)
    assert g.to_client(1).hex() == CAPTURED["x_asyncpg"]
    g.client(1, W.query("BEGIN"))
    assert g.to_backend(1) == W.parse("SELECT 1", ASYNCPG_STMT) + W.SYNC + W.query("BEGIN")
    g.backend(1, W.msg(b"1") + rfq() + W.msg(b"C", b"BEGIN\0") + rfq(b"T"))
    for req in (W.query("SELECT 2"), W.parse("SELECT 3", "other") + W.SYNC,
                W.close(b"S", "other") + W.SYNC):
        g.client(1, req)
        g.backend(1, rfq(b"T"))
    g.client(1, W.query("COMMIT"))
    g.backend(1, W.msg(b"C", b"COMMIT\0") + rfq())
    g.to_backend(1)
    g.to_client(1)
    g.client(1, ASYNCPG_FETCHVAL)
    assert g.to_backend(1) == b"" and g.to_client(1).hex() == CAPTURED["x_asyncpg_again"]


# ---- fuzz --------------------------------------------------------------------------


def _mutations() -> st.SearchStrategy[bytes]:
    base = b"".join(FORMS.values()) + W.query("SELECT 2") + W.parse("SELECT 1", "a") + W.SYNC
    return st.one_of(
        st.binary(max_size=600),
        st.builds(lambda i, b: base[:i] + b + base[i + len(b):], st.integers(0, len(base)),
                  st.binary(min_size=1, max_size=8)),
        st.lists(st.sampled_from(list(FORMS.values()) + [W.query("x"), W.FLUSH, W.TERMINATE,
                                                         W.close(b"S", "s1"), W.bind("", "zz")]),
                 max_size=12).map(b"".join),
    )


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                   HealthCheck.too_slow])
@given(pre=st.binary(max_size=40), client=_mutations(), backend=st.binary(max_size=300),
       cuts=st.lists(st.integers(1, 64), max_size=8), down=st.booleans(),
       ssl=st.sampled_from(["", "passthrough"]))
def test_fuzz_never_traps(pre: bytes, client: bytes, backend: bytes, cuts: list[int],
                          down: bool, ssl: str) -> None:
    g = StreamGuest(WASM, {"ssl": ssl, "hold_timeout_ms": 300, "stream_hold_bytes": 2048},
                    port=5432)
    try:
        g.open(1)
        g.client(1, pre)
        g.open(2)
        g.client(2, W.startup())
        g.connected(2)
        g.backend(2, GREETING)
        if down:
            g.unavailable()
        data = client
        for c in cuts:
            g.client(2, data[:c])
            data = data[c:]
        g.client(2, data)
        g.backend(2, backend)
        g.connected(1)
        g.tick(1)
        g.tick(400)
        g.available()
        g.backend(2, rfq() * 3)
        g.client_close(1)
        g.client_close(2)
        assert g.failed == 0
        for a in g.actions:
            assert not isinstance(a, abi.Log) or a.level < abi.LOG_ERROR
    finally:
        g.close()


_PIECES = [W.startup(), W.startup(proto=W.PROTO_32), W.SSL_REQUEST, W.GSSENC_REQUEST,
           struct.pack("!iiii", 16, 80877102, 1, 2), b"\x16\x03\x01\x00\x02hi",
           *FORMS.values(), W.query("SELECT 2"), W.query("BEGIN"), W.FLUSH, W.TERMINATE,
           W.parse("SELECT 1", "a") + W.SYNC, W.bind("", "a") + W.execute() + W.SYNC]
_ANSWERS = [GREETING, rfq(), rfq(b"T"), rfq(b"E"), W.msg(b"1") + rfq(),
            bytes.fromhex(CAPTURED["q_select1"]), W.msg(b"E", b"SERROR\0\0"), b"Z\0\0"]


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(1, 3),
                          st.one_of(st.sampled_from(_PIECES), st.sampled_from(_ANSWERS),
                                    st.binary(max_size=40))), max_size=40),
       st.sampled_from(["", "passthrough"]))
def test_fuzz_random_event_orders_never_trap(ops: list[tuple[int, int, bytes]], ssl: str) -> None:
    """Any order of the host's events over three streams, including events for streams
    that are gone and answers nobody asked for: no trap, no failed call."""
    g = StreamGuest(WASM, {"ssl": ssl, "hold_timeout_ms": 200, "stream_hold_bytes": 1024},
                    port=5432)
    now = 0
    try:
        for op, sid, data in ops:
            now = fuzz_step(g, op, sid, [data], bool(len(data) % 2), now)
        assert g.failed == 0
    finally:
        g.close()


# ---- real peers on both sides -----------------------------------------------------------


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[W.PgServer]:
    if not W.available():
        pytest.skip("PostgreSQL 15 is not installed (scripts/install-debs)")
    with W.PgServer(tmp_path_factory.mktemp("pg")) as srv:
        yield srv


@pytest.fixture
def bridge(pg: W.PgServer, tmp_path: Path) -> Iterator[Callable[..., StreamBridge]]:
    made: list[StreamBridge] = []

    def make(**config: object) -> StreamBridge:
        sockdir = Path(tempfile.mkdtemp(prefix="pgb-", dir=tmp_path))
        b = StreamBridge(WASM, dict(config), str(sockdir / ".s.PGSQL.5433"), pg.socket_path)
        b.sockdir = sockdir  # type: ignore[attr-defined]
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()
        assert b.counters.failed_calls == 0


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_captured_answers_are_still_what_the_server_sends(pg: W.PgServer) -> None:
    assert capture(pg.socket_path) == CAPTURED


def test_keepalives_through_the_guest_match_the_live_server(bridge, pg: W.PgServer) -> None:
    b = bridge()
    direct = W.RawPg.unix(pg.socket_path)
    via = W.RawPg.unix(b.listen_path)
    sent = b.counters.upstream_bytes
    for name, request in FORMS.items():
        assert via.exchange(request, 1) == direct.exchange(request, 1), name
    assert b.counters.upstream_bytes == sent  # nothing reached the backend
    assert via.exchange(W.query("SELECT 41 + 1"), 1) == direct.exchange(
        W.query("SELECT 41 + 1"), 1)
    via.close()
    direct.close()


def test_unterminated_comments_reach_the_live_server_for_its_error(bridge, pg: W.PgServer
                                                                   ) -> None:
    b = bridge()
    direct = W.RawPg.unix(pg.socket_path)
    via = W.RawPg.unix(b.listen_path)
    for sql in NOT_KEEPALIVES:
        sent = b.counters.upstream_bytes
        want = direct.exchange(W.query(sql), 1)
        assert [t for t, _ in W.split(want)] == [b"E", b"Z"], sql
        assert via.exchange(W.query(sql), 1) == want, sql
        assert b.counters.upstream_bytes > sent, sql
    via.close()
    direct.close()


def _msgs() -> st.SearchStrategy[bytes]:
    sql = st.sampled_from(["SELECT 1", "select 1 ;", ";", "", "SELECT 2", "SELECT 'x'",
                           "-- ping", "/* x */ select 1 -- y", "/* x"])
    name = st.sampled_from(["", "a", "b"])
    portal = st.sampled_from(["", "p"])
    types = st.sampled_from([(), (), (23,), (25, 20), (0,)])
    values = st.sampled_from([(), (), (b"5",), (b"x",), (None,), (b"7", None)])
    return st.one_of(
        st.builds(lambda q, n, t: W.parse(q, n, t), sql, name, types),
        st.builds(lambda pt, n, f, v: W.bind(pt, n, result_formats=f, params=v), portal, name,
                  st.sampled_from([(0,), (1,), ()]), values),
        st.builds(lambda n: W.describe(b"S", n), name),
        st.builds(lambda pt: W.describe(b"P", pt), portal),
        st.builds(lambda pt, m: W.execute(pt, m), portal, st.sampled_from([0, 1, 2])),
        st.builds(lambda n: W.close(b"S", n), name),
        st.builds(lambda pt: W.close(b"P", pt), portal),
        st.just(W.FLUSH), st.just(W.SYNC), st.just(W.SYNC),
        st.builds(W.query, st.sampled_from(["SELECT 1", ";", "SELECT 3", "BEGIN", "COMMIT"])),
    )


def _answer(c: W.RawPg, data: bytes) -> bytes:
    """Everything the server says to data: up to its ReadyForQuery count, or (after a
    Flush, or an error waiting for a Sync) what comes within a short while."""
    c.sock.sendall(data)
    want = sum(1 for t, _ in W.split(data) if t in (b"S", b"Q"))
    got = b""
    # a Query inside a group that failed is discarded by the server up to the Sync: then
    # fewer ReadyForQuery come than counted, and the wait ends after a quiet second
    c.sock.settimeout(0.2 if not want else 1)
    try:
        while not want or W.count_rfq(got) < want:
            chunk = c.sock.recv(65536)
            if not chunk:
                break
            got += chunk
    except TimeoutError:
        pass
    finally:
        c.sock.settimeout(10)
    return got


@settings(max_examples=20, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(_msgs(), min_size=1, max_size=14))
def test_random_extended_sequences_get_what_the_live_server_sends(
        pg: W.PgServer, tmp_path: Path, msgs: list[bytes]) -> None:
    """Any sequence of keep-alive and other extended/simple messages, sent in pieces
    ending at each Sync, Flush or Query: the client through the guest receives exactly
    the bytes a direct client of the same server receives."""
    sockdir = Path(tempfile.mkdtemp(prefix="pgr-", dir=tmp_path))
    b = StreamBridge(WASM, {}, str(sockdir / ".s.PGSQL.5433"), pg.socket_path)
    direct = W.RawPg.unix(b.backend_path)
    via = W.RawPg.unix(b.listen_path)
    try:
        unit = b""
        for m in msgs + [W.SYNC]:
            unit += m
            if m[:1] in (b"S", b"H", b"Q"):
                want = _answer(direct, unit)
                via.sock.sendall(unit)
                got = b""
                via.sock.settimeout(10)
                while len(got) < len(want):
                    chunk = via.sock.recv(65536)
                    assert chunk, "the guest closed the connection"
                    got += chunk
                assert got == want, (unit, msgs)
                unit = b""
    finally:
        direct.close()
        via.close()
        b.close()
    assert b.counters.failed_calls == 0


def test_protocol_32_startup_is_negotiated_by_the_real_server_through_the_guest(
        bridge, pg: W.PgServer) -> None:
    """A PG 18 client asks for 3.2; PostgreSQL 15 answers NegotiateProtocolVersion (3.0)
    and goes on: relayed untouched both ways, and the session then works as any."""
    b = bridge()
    direct = W.RawPg.unix(pg.socket_path, proto=W.PROTO_32)
    via = W.RawPg.unix(b.listen_path, proto=W.PROTO_32)
    types = [t for t, _ in W.split(via.greeting)]
    assert types[:1] == [b"v"] and types == [t for t, _ in W.split(direct.greeting)]
    assert W.split(via.greeting)[0] == W.split(direct.greeting)[0]
    assert via.exchange(SELECT1, 1).hex() == CAPTURED["x_select1"]
    via.close()
    direct.close()


def test_psycopg_extended_protocol_through_the_guest(bridge) -> None:
    psycopg = pytest.importorskip("psycopg")
    b = bridge()
    with psycopg.connect(host=str(b.sockdir), port=5433, user="postgres", dbname="postgres",
                         autocommit=True) as conn:
        up = b.counters.upstream_bytes
        for _ in range(8):  # past psycopg's prepare threshold (5): named statements
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.cursor(binary=True).execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("select 1", prepare=True).fetchone() == (1,)
        assert b.counters.upstream_bytes == up
        wait_for(lambda: b.need == NONE, "need none on idle sessions")
        conn.execute("CREATE TEMP TABLE t (a int)")
        conn.execute("INSERT INTO t VALUES (%s), (%s)", (1, 2))
        assert conn.execute("SELECT sum(a) FROM t").fetchone() == (3,)
        for _ in range(3):  # prepared keep-alives the backend now knows too
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.execute("select 1", prepare=True).fetchone() == (1,)
        with conn.transaction():
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert b.need == ACTIVE
        conn.execute("DEALLOCATE ALL")
        assert conn.execute("SELECT 1").fetchone() == (1,)
        wait_for(lambda: b.need == NONE, "need none on idle sessions")


def test_asyncpg_through_the_guest(bridge) -> None:
    """asyncpg (named statements prepared with Flush, binary results, max_rows 1): its
    keep-alives never reach the backend, also while the backend is down and after real
    work; COPY both ways and transactions are relayed."""
    asyncpg = pytest.importorskip("asyncpg")
    import asyncio

    b = bridge()

    async def run() -> None:
        conn = await asyncpg.connect(host=str(b.sockdir), port=5433, user="postgres",
                                     database="postgres")
        up = b.counters.upstream_bytes
        for q in ("SELECT 1", "select 1 ;", "SELECT 1"):
            assert await conn.fetchval(q) == 1
        assert await conn.fetch("SELECT 1") == [(1,)]
        assert await (await conn.prepare("SELECT 1")).fetchval() == 1
        assert await conn.execute("SELECT 1") == "SELECT 1"
        assert b.counters.upstream_bytes == up
        assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
        async with conn.transaction():
            assert await conn.fetchval("SELECT 1") == 1
            assert b.need == ACTIVE
        await conn.execute("CREATE TEMP TABLE t (a int)")
        await conn.copy_records_to_table("t", records=[(1,), (2,)])
        assert await conn.fetchval("SELECT sum(a) FROM t") == 3
        assert await conn.copy_from_query("SELECT a FROM t", output=lambda d: asyncio.sleep(0)) \
            == "COPY 2"
        wait_for(lambda: b.need == NONE, "need none on the idle session")
        b.set_backend(False)
        up = b.counters.upstream_bytes
        for _ in range(3):
            assert await conn.fetchval("SELECT 1") == 1
        assert b.counters.upstream_bytes == up and b.need == NONE
        b.set_backend(True)
        assert await conn.fetchval("SELECT 7") == 7
        await conn.close()

    asyncio.run(run())


def test_an_asyncpg_pool_keepalive_does_not_reach_a_sleeping_backend(bridge, pg: W.PgServer
                                                                     ) -> None:
    """pool.fetchval("SELECT 1") is the keep-alive and the reset query of the release:
    with the backend down both are answered (the reset was held until the hold timeout,
    and asyncpg then dropped the connection); the local answer is the live server's."""
    asyncpg = pytest.importorskip("asyncpg")
    import asyncio

    direct = W.RawPg.unix(pg.socket_path)
    assert direct.exchange(ASYNCPG_RESET, 1).hex() == RESET_ANSWER
    direct.close()
    b = bridge(hold_timeout_ms=1000)

    async def run() -> None:
        pool = await asyncpg.create_pool(host=str(b.sockdir), port=5433, user="postgres",
                                         database="postgres", min_size=2, max_size=2)
        assert await pool.fetchval("SELECT $1::int", 5) == 5  # relayed, then its reset
        wait_for(lambda: b.need == NONE, "need none on the idle pool")
        b.set_backend(False)
        up = b.counters.upstream_bytes
        for _ in range(4):
            assert await pool.fetchval("SELECT 1") == 1
            assert await pool.execute("SELECT 1") == "SELECT 1"
        assert b.counters.upstream_bytes == up and b.need == NONE
        b.set_backend(True)
        async with pool.acquire() as c:
            await c.execute("SET work_mem = '8MB'")
        async with pool.acquire() as c:
            assert await c.fetchval("SHOW work_mem") == "4MB"  # the reset was the server's
        await pool.close()

    asyncio.run(run())


def test_copy_both_ways_through_the_guest_and_the_live_server(bridge) -> None:
    """COPY FROM STDIN sent as libpq's PQexecParams does (a Sync before the data and one
    after CopyDone, the first ignored by the server), COPY TO STDOUT, and psycopg's COPY:
    relayed byte for byte, and the session is idle (need none, keep-alives local) after."""
    b = bridge()
    via = W.RawPg.unix(b.listen_path)
    via.exchange(W.query("CREATE TEMP TABLE c (a int)"), 1)
    via.sock.sendall(W.parse("COPY c FROM STDIN") + W.bind() + W.describe(b"P") + W.execute()
                     + W.SYNC)
    got = b""
    while not got.endswith(W.msg(b"G", b"\0\0\1\0\0")):
        got += via.sock.recv(65536)
    out = via.exchange(W.msg(b"d", b"1\n") + W.msg(b"d", b"2\n") + W.msg(b"c") + W.SYNC, 1)
    assert [t for t, _ in W.split(out)] == [b"C", b"Z"]
    out = via.exchange(W.query("COPY c TO STDOUT"), 1)
    assert [t for t, _ in W.split(out)] == [b"H", b"d", b"d", b"c", b"C", b"Z"]
    wait_for(lambda: b.need == NONE, "need none after the COPYs")
    up = b.counters.upstream_bytes
    assert via.exchange(W.query("SELECT 1"), 1).hex() == CAPTURED["q_select1"]
    assert via.exchange(SELECT1, 1).hex() == CAPTURED["x_select1"]
    assert b.counters.upstream_bytes == up
    via.close()
    psycopg = pytest.importorskip("psycopg")
    with psycopg.connect(host=str(b.sockdir), port=5433, user="postgres", dbname="postgres",
                         autocommit=True) as conn:
        with conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE c (a int)")
            with cur.copy("COPY c FROM STDIN") as cp:
                cp.write_row((5,))
            with cur.copy("COPY (SELECT a FROM c WHERE a > %s) TO STDOUT", (1,)) as cp:
                assert [bytes(r) for r in cp] == [b"5\n"]
        wait_for(lambda: b.need == NONE, "need none after psycopg's COPYs")
        up = b.counters.upstream_bytes
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert b.counters.upstream_bytes == up


def test_psql_and_a_sleeping_backend_through_the_guest(bridge) -> None:
    b = bridge(hold_timeout_ms=30000)
    env = {"PGHOST": str(b.sockdir), "PGPORT": "5433", "PGUSER": "postgres",
           "PGCONNECT_TIMEOUT": "20", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["psql", "-X", "-At", "-c", "select 40 + 2", "-c", "select 1"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["42", "1"]
    b.set_backend(False)
    proc = subprocess.Popen(["psql", "-X", "-At", "-c", "select 7"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while b.need != ACTIVE and time.monotonic() < deadline:
        time.sleep(0.02)
    assert b.need == ACTIVE and proc.poll() is None  # held, not refused
    b.set_backend(True)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0 and stdout.split() == ["7"], stderr


def test_the_hold_timeout_reaches_psql_as_57p03(bridge) -> None:
    b = bridge(hold_timeout_ms=300)
    b.set_backend(False)
    env = {"PGHOST": str(b.sockdir), "PGPORT": "5433", "PGUSER": "postgres",
           "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["psql", "-X", "-At", "-c", "select 1"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "not available (hold timeout)" in out.stderr


# ---- capturing -------------------------------------------------------------------------


def capture(path: str) -> dict[str, str]:
    """What a real server answers to each of FORMS, in order, on one session."""
    c = W.RawPg.unix(path)
    try:
        return {name: c.exchange(req, 1).hex() for name, req in FORMS.items()}
    finally:
        c.close()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="pgcap-") as tmp, W.PgServer(Path(tmp)) as srv:
        for name, hexed in capture(srv.socket_path).items():
            print(f"    {name!r}: {hexed!r},")
    return 0


if __name__ == "__main__":
    sys.exit(main())
