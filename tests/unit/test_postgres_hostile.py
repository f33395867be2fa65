"""The PostgreSQL activator against hostile input, answered the way PostgreSQL 15 answers it.

Each case is what a broken or malicious client (or backend) may send: startup packets
of impossible lengths or unknown versions, parameter lists without their terminator or
a user, message lengths below 4 or far above any limit, garbage pipelined behind a valid
query, a Terminate inside a pipeline, CancelRequests of the wrong length, SSLRequest
twice, bytes sent after an SSLRequest before its answer, messages cut at every byte, a
backend sending a huge message. What is right is what the server does with the same
bytes: the ``pg`` cases send them to the live server (tests/support/pgwire.py's
``PgServer``) and to the guest and compare the answers (severity, SQLSTATE, text; or a
close without a word, which is what the server does where it only logs, COMMERROR).
Nothing of it may wake a sleeping database, and everything is counted
(``protocol_errors``).
"""

from __future__ import annotations

import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.activator import abi
from tests.support import pgwire as W
from tests.support.streamguest import StreamGuest, fuzz_step
from tests.unit import test_postgres_activator as pa
from tests.unit.test_postgres_activator import (
    ACTIVE,
    ASYNCPG_FETCHVAL,
    ASYNCPG_PREPARE,
    CAPTURED,
    NONE,
    SELECT1,
    WASM,
    errors,
    rfq,
    session,
)

guest = pa.guest  # the fixtures: a guest per test, the live server per module
pg = pa.pg

EOF = b"<EOF>"


def counts(g: StreamGuest) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in g.actions:
        if isinstance(a, abi.Count):
            out[a.name] = out.get(a.name, 0) + a.n
    return out


def fields(data: bytes) -> list[tuple[str, str, str]]:
    """(severity, SQLSTATE, message) of each ErrorResponse, the parts a client shows."""
    return [(e["S"], e["C"], e["M"]) for e in errors(data)]


def server(pg: W.PgServer, *parts: bytes, pause: float = 0.0) -> bytes:
    """What the live server sends for `parts` (one write each), up to its close (EOF)
    or a second of silence; `pause` between the writes lets each be read on its own."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(pg.socket_path)
    s.settimeout(1.0)
    got = b""
    try:
        for p in parts:
            try:
                s.sendall(p)
            except OSError:
                break
            if pause:
                time.sleep(pause)
        while True:
            try:
                c = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return got + EOF
            if not c:
                return got + EOF
            got += c
    except TimeoutError:
        return got
    finally:
        s.close()


def after_greeting(data: bytes) -> bytes:
    """The server's answer past its greeting's ReadyForQuery."""
    i = data.find(rfq())
    return data[i + 6:] if i >= 0 else data


def guest_answer(g: StreamGuest, sid: int) -> bytes:
    v = g.streams[sid]
    return g.to_client(sid) + (EOF if v.downstream_closed else b"")


def startup_raw(body: bytes, proto: int = W.PROTO_30) -> bytes:
    return struct.pack("!ii", 8 + len(body), proto) + body


def big_startup(total: int) -> bytes:
    """A valid StartupMessage of exactly `total` bytes (an option value pads it)."""
    head = b"user\0postgres\0application_name\0"
    pad = total - 8 - len(head) - 2
    return startup_raw(head + b"a" * pad + b"\0\0")


# ---- startup packets ------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 4, 7, 10005, 20000, 0x7FFFFFFF])
def test_startup_lengths_the_server_refuses_close_without_a_word_or_a_wake(guest, length: int
                                                                         ) -> None:
    g = guest()
    g.open(1)
    g.client(1, struct.pack("!ii", length, W.PROTO_30) + b"\0" * 8)
    assert guest_answer(g, 1) == EOF  # the server only logs it (COMMERROR)
    assert g.streams[1].connects == [] and g.need in (None, NONE)
    assert counts(g).get("protocol_errors") == 1


@pytest.mark.parametrize("word", [b"\0\0\0\x04", b"\0\0\0\x07", b"\0\0\x27\x15"])
def test_a_bad_length_word_alone_is_judged_at_once(guest, word: bytes) -> None:
    """The server reads the length word and closes; it does not wait for more."""
    g = guest()
    g.open(1)
    g.client(1, word)
    assert guest_answer(g, 1) == EOF and g.streams[1].connects == []


def test_the_longest_startup_the_server_takes_is_relayed(guest) -> None:
    g = guest()
    g.open(1)
    pkt = big_startup(10004)  # 10000 bytes past the length word: PostgreSQL's bound
    g.client(1, pkt)
    assert g.streams[1].connects == [0] and g.need == ACTIVE
    g.connected(1)
    assert g.to_backend(1) == pkt


@pytest.mark.parametrize("data", [
    startup_raw(b"", 2 << 16),                                # 2.0: the old protocol
    W.startup(proto=2 << 16),
    W.startup(proto=4 << 16),                                 # 4.0
    W.startup(proto=(4 << 16) | 2),
    W.startup(proto=(1234 << 16) | 5681),                     # a "request" code nobody has
    struct.pack("!ii", 12, 80877103) + b"????",               # SSLRequest code, 12 bytes: taken
])
def test_versions_other_than_3_get_the_servers_answer(guest, pg, data: bytes) -> None:
    want = server(pg, data)
    g = guest()
    g.open(1)
    g.client(1, data)
    got = guest_answer(g, 1)
    if want.startswith(b"E\0"):  # protocol 3 ErrorResponse: the fields a client shows
        assert fields(got[:-len(EOF)]) == fields(want[:-len(EOF)]) and got.endswith(EOF)
    else:  # the old protocol's 'E' text, or 'N' (the SSLRequest of 12 bytes)
        assert got == want
    assert g.streams[1].connects == [] and g.need in (None, NONE)


@pytest.mark.parametrize("minor", [1, 2, 3, 0xFFFF])
def test_any_protocol_3_minor_is_relayed_for_the_server_to_negotiate(guest, minor: int) -> None:
    g = guest()
    pkt = W.startup(proto=(3 << 16) | minor)
    g.open(1)
    g.client(1, pkt)
    g.connected(1)
    assert g.to_backend(1) == pkt


@pytest.mark.parametrize("body", [
    b"",                                # no parameters, no terminator
    b"user\0",                          # a name without its value
    b"user\0postgres\0",                # the list's terminator missing
    b"user\0postgres\0database",        # cut in a name
    b"user\0postgres\0\0\0",            # a byte after the terminator
    b"\0",                              # no user
    b"user\0\0\0",                      # an empty user
    b"database\0postgres\0\0",          # a database but no user
    b"User\0postgres\0\0",              # names are case-sensitive
])
def test_startup_layouts_and_users_the_server_refuses_are_refused_without_a_wake(
        guest, pg, body: bytes) -> None:
    data = startup_raw(body)
    want = server(pg, data)
    g = guest()
    g.open(1)
    g.client(1, data)
    got = guest_answer(g, 1)
    assert fields(got[:-len(EOF)]) == fields(want[:-len(EOF)]) != []
    assert got.endswith(EOF) and want.endswith(EOF)
    assert g.streams[1].connects == [] and g.need in (None, NONE)
    assert counts(g).get("protocol_errors") == 1


def test_a_good_startup_with_the_user_last_or_twice_is_relayed(guest) -> None:
    g = guest()
    pkt = startup_raw(b"database\0postgres\0user\0\0user\0postgres\0\0")
    g.open(1)
    g.client(1, pkt)
    assert g.streams[1].connects == [0]


# ---- SSLRequest, GSSENCRequest, CancelRequest ---------------------------------------------


@pytest.mark.parametrize("parts", [
    [W.SSL_REQUEST, W.SSL_REQUEST],
    [W.GSSENC_REQUEST, W.GSSENC_REQUEST],
    [W.SSL_REQUEST, W.GSSENC_REQUEST, W.SSL_REQUEST],  # one of each is all there is
])
def test_a_second_request_of_a_kind_is_an_unsupported_protocol(guest, pg,
                                                               parts: list[bytes]) -> None:
    """Sent after the answer came: the server reads it as protocol version 1234.5679."""
    want = server(pg, *parts, pause=0.3)
    g = guest()
    g.open(1)
    got = b""
    for p in parts:
        g.client(1, p)
        got += g.to_client(1)
    got += guest_answer(g, 1)
    n = want.count(b"N")
    assert got[:n] == want[:n] == b"N" * n
    assert fields(got[n:-len(EOF)]) == fields(want[n:-len(EOF)]) != []
    assert fields(got[n:-len(EOF)])[0][1] == "0A000"
    assert g.streams[1].connects == [] and g.need in (None, NONE)


@pytest.mark.parametrize("request_", [W.SSL_REQUEST, W.GSSENC_REQUEST])
@pytest.mark.parametrize("after", [W.startup(), W.SSL_REQUEST, W.GSSENC_REQUEST, b"x"])
def test_bytes_sent_after_a_request_before_its_answer_are_refused(guest, pg, request_: bytes,
                                                                  after: bytes) -> None:
    """They may have been injected in clear ahead of the encryption the client asked
    for (CVE-2021-23214): the server answers, then refuses them, FATAL 08P01."""
    want = server(pg, request_ + after)
    g = guest()
    g.open(1)
    g.client(1, request_ + after)
    got = guest_answer(g, 1)
    assert got[:1] == want[:1] == b"N"
    assert fields(got[1:-len(EOF)]) == fields(want[1:-len(EOF)])
    assert fields(got[1:-len(EOF)])[0][:2] == ("FATAL", "08P01")
    assert g.streams[1].connects == [] and g.need in (None, NONE)


def test_bytes_after_a_request_are_the_servers_to_judge_with_passthrough(guest) -> None:
    g = guest(ssl="passthrough")
    g.open(1)
    g.client(1, W.SSL_REQUEST + b"\x16\x03\x01")
    g.connected(1)
    assert g.to_backend(1) == W.SSL_REQUEST + b"\x16\x03\x01"
    g.backend(1, b"N")  # spliced at the backend's answer
    assert g.to_client(1) == b"N" and g.streams[1].spliced


@pytest.mark.parametrize("data", [
    struct.pack("!ii", 8, 80877102),                       # no pid, no key
    struct.pack("!iii", 12, 80877102, 7),                  # a pid, no key
    struct.pack("!iii", 300, 80877102, 7) + bytes(288),    # a key longer than 256 bytes
])
def test_cancel_requests_of_the_wrong_length_close_without_a_word(guest, pg, data: bytes) -> None:
    assert server(pg, data) == EOF
    g = guest()
    g.open(1)
    g.client(1, data)
    assert guest_answer(g, 1) == EOF
    assert g.streams[1].connects == [] and g.need in (None, NONE)
    assert counts(g).get("protocol_errors") == 1


# ---- framing errors in a session ----------------------------------------------------------


BAD_HEADERS = {
    "len0": b"Q\0\0\0\0",
    "len3": b"Q\0\0\0\x03",
    "huge": b"Q\x7f\xff\xff\xff",
    "negative": b"P\xff\xff\xff\xff",
    "small_type_over_10000": b"S\0\0\x27\x11" + bytes(10001),
    "type1": b"\x01\0\0\0\x05x",
    "type_p": W.msg(b"p", b"secret\0"),  # a password message outside authentication
    "type_255": b"\xff\0\0\0\x04",
}


@pytest.mark.parametrize("name", list(BAD_HEADERS))
def test_a_bad_header_on_an_idle_session_is_answered_as_the_server_does(guest, pg,
                                                                         name: str) -> None:
    data = BAD_HEADERS[name]
    want = after_greeting(server(pg, W.startup() + data))
    g = guest()
    session(g)
    g.client(1, data)
    got = guest_answer(g, 1)
    assert fields(got[:-len(EOF)]) == fields(want[:-len(EOF)])
    assert got.endswith(EOF) and want.endswith(EOF)
    assert g.to_backend(1) == b""  # nothing for the backend to answer: not handed to it
    assert counts(g).get("protocol_errors") == 1


def test_a_bad_header_on_a_sleeping_database_does_not_wake_it(guest) -> None:
    g = guest()
    session(g)
    g.unavailable()
    n = len(g.streams[1].connects)
    g.client(1, b"\x01\0\0\0\x05")
    assert errors(g.to_client(1))[0]["C"] == "08P01" and g.streams[1].downstream_closed
    assert len(g.streams[1].connects) == n and g.need == NONE


@pytest.mark.parametrize("tail", [b"\x01\0\0\0\x05x", b"Q\0\0\0\x01"])
def test_garbage_after_a_relayed_query_is_the_backends_to_answer_after_the_query(
        guest, pg, tail: bytes) -> None:
    """The server answers the query, then the garbage (FATAL, or a close): the guest
    must not close first and lose the query's answer."""
    q = W.query("SELECT 2")
    want = after_greeting(server(pg, W.startup() + q + tail))
    assert W.count_rfq(want) == 1 and want.endswith(EOF)
    g = guest()
    session(g)
    g.client(1, q + tail + W.query("SELECT 1"))
    assert g.to_backend(1) == q + tail[:5]  # the bad header, nothing after it
    assert g.to_client(1) == b"" and not g.streams[1].downstream_closed
    g.client(1, W.query("SELECT 1"))  # dropped: the server reads nothing after the garbage
    assert g.to_backend(1) == b"" and g.to_client(1) == b""
    g.backend(1, want[:-len(EOF)])  # what the real server sent
    g.backend_close(1)
    assert guest_answer(g, 1) == want
    assert counts(g).get("protocol_errors") == 1 and "keepalives_answered" not in counts(g)


@pytest.mark.parametrize("tail", [b"\x01\0\0\0\x05x", b"Q\0\0\0\x01"])
def test_garbage_after_a_local_keepalive_group_gets_what_the_server_flushes(
        guest, pg, tail: bytes) -> None:
    """P/B/E unsynced then garbage: a bad type flushes the answers with the FATAL, a bad
    length ends the session with nothing flushed."""
    group = W.parse("SELECT 1") + W.bind() + W.execute()
    want = after_greeting(server(pg, W.startup() + group + tail))
    g = guest()
    session(g)
    g.unavailable()
    g.client(1, group + tail)
    got = guest_answer(g, 1)
    w = W.split(want[:-len(EOF)])
    gg = W.split(got[:-len(EOF)])
    assert [t for t, _ in gg] == [t for t, _ in w]
    assert fields(got[:-len(EOF)]) == fields(want[:-len(EOF)])
    assert got.endswith(EOF) and g.to_backend(1) == b"" and g.need == NONE


def test_garbage_after_a_held_query_wakes_for_the_query_and_times_out_like_the_server(guest
                                                                                      ) -> None:
    g = guest(hold_timeout_ms=1000)
    session(g)
    g.unavailable()
    g.client(1, W.query("SELECT 2") + b"\x01\0\0\0\x05")
    assert g.need == ACTIVE and g.to_client(1) == b""
    g.tick(10)
    g.tick(2000)
    out = g.to_client(1)
    msgs = W.split(out)
    assert [t for t, _ in msgs] == [b"E", b"Z", b"E"]  # 57P03 for the query, then the FATAL
    assert [e["C"] for e in errors(out)] == ["57P03", "08P01"]
    assert g.streams[1].downstream_closed


def test_garbage_after_a_held_query_reaches_the_backend_behind_it(guest) -> None:
    g = guest()
    session(g)
    g.unavailable()
    q = W.query("SELECT 2")
    g.client(1, q + b"Q\0\0\0\x02")
    g.available()
    g.client(1, b"")
    assert g.to_backend(1) == q + b"Q\0\0\0\x02"


def test_a_length_over_our_own_limit_makes_the_backend_end_the_session(guest) -> None:
    """max_message_bytes below the server's: the header goes up with length 0, which the
    server refuses without a word, after answering what came before."""
    g = guest(max_message_bytes=1 << 20)
    session(g)
    q = W.query("SELECT 2")
    g.client(1, q + b"Q" + struct.pack("!i", 2 << 20) + b"x" * 100)
    assert g.to_backend(1) == q + b"Q\0\0\0\0"


# ---- Terminate inside a pipeline ---------------------------------------------------------


def test_terminate_after_an_unsynced_keepalive_group_closes_without_a_wake(guest, pg) -> None:
    group = W.parse("SELECT 1") + W.bind() + W.execute()
    assert after_greeting(server(pg, W.startup() + group + W.TERMINATE)) == EOF
    g = guest()
    session(g)
    g.unavailable()
    g.client(1, group + W.TERMINATE)
    assert guest_answer(g, 1) == EOF
    assert g.to_backend(1) == b"" and g.need == NONE


def test_nothing_after_a_terminate_is_answered_or_relayed(guest) -> None:
    g = guest()
    session(g)
    q = W.query("SELECT 2")
    g.client(1, q + W.TERMINATE + W.query("SELECT 1") + W.query("SELECT 3"))
    assert g.to_backend(1) == q + W.TERMINATE
    g.client(1, W.query("SELECT 1"))
    assert g.to_client(1) == b"" and g.to_backend(1) == b""
    assert "keepalives_answered" not in counts(g)


def test_terminate_behind_a_held_query_wakes_for_the_query(guest) -> None:
    g = guest()
    session(g)
    g.unavailable()
    q = W.query("INSERT INTO t VALUES (1)")
    g.client(1, q + W.TERMINATE)
    assert g.need == ACTIVE
    g.available()
    g.client(1, b"")
    assert g.to_backend(1) == q + W.TERMINATE


# ---- every byte boundary -----------------------------------------------------------------


CLIENT_SCRIPT = (W.query("SELECT 1") + SELECT1 + ASYNCPG_PREPARE + ASYNCPG_FETCHVAL
                 + W.parse("SELECT 1", "s1") + W.SYNC + W.query(";") + W.query("SELECT 2"))


def _run_client(g: StreamGuest, sid: int, pieces: list[bytes]) -> tuple[bytes, bytes]:
    session(g, sid)
    for p in pieces:
        g.client(sid, p)
    return g.to_client(sid), g.to_backend(sid)


def test_client_bytes_cut_at_every_boundary_are_answered_the_same(guest) -> None:
    g = guest()
    want = _run_client(g, 1, [CLIENT_SCRIPT])
    # six keep-alive groups answered here, the local statements recreated before the query
    assert want[1].endswith(W.SYNC + W.query("SELECT 2")) and W.count_rfq(want[0]) == 5
    g.client_close(1)  # its query in flight keeps the level up
    for i in range(1, len(CLIENT_SCRIPT)):
        sid = 100 + i
        got = _run_client(g, sid, [CLIENT_SCRIPT[:i], CLIENT_SCRIPT[i:]])
        assert got == want, i
        g.client_close(sid)
        g.streams.pop(sid)
    # and one byte per read
    assert _run_client(g, 1000, [CLIENT_SCRIPT[i:i + 1] for i in range(len(CLIENT_SCRIPT))]) == want


def test_backend_bytes_cut_at_every_boundary_are_relayed_the_same(guest) -> None:
    """The answers to a recreated statement's prefix are cut out (swallowed) wherever
    the reads split them; everything else reaches the client byte for byte."""
    answer = (W.msg(b"1") + W.msg(b"Z", b"I")  # the prefix's ParseComplete, ReadyForQuery
              + W.msg(b"A", struct.pack("!i", 5) + b"ch\0hi\0")
              + bytes.fromhex(CAPTURED["q_select1"])[:-6] + W.msg(b"S", b"a\0b\0") + rfq(b"T"))
    want_client = answer[11:]

    def run(sid: int, pieces: list[bytes]) -> bytes:
        session(g, sid)
        g.client(sid, W.parse("SELECT 1", "s9") + W.SYNC)  # answered locally
        g.to_client(sid)
        g.client(sid, W.query("BEGIN"))  # relayed: s9 recreated first
        assert g.to_backend(sid) == W.parse("SELECT 1", "s9") + W.SYNC + W.query("BEGIN")
        for p in pieces:
            g.backend(sid, p)
        return g.to_client(sid)

    g = guest()
    assert run(1, [answer]) == want_client
    g.client_close(1)
    for i in range(1, len(answer)):
        sid = 100 + i
        assert run(sid, [answer[:i], answer[i:]]) == want_client, i
        assert g.need == ACTIVE  # inside the transaction the answer opened
        g.client_close(sid)
        g.streams.pop(sid)
    assert run(2, [answer[i:i + 1] for i in range(len(answer))]) == want_client


# ---- a backend's huge message ---------------------------------------------------------------


def test_a_large_backend_message_streams_through_unbuffered(guest) -> None:
    g = guest()
    session(g)
    g.client(1, W.query("SELECT repeat('x', 3000000)"))
    row = W.msg(b"D", struct.pack("!hi", 1, 3_000_000) + b"x" * 3_000_000)
    answer = row + W.msg(b"C", b"SELECT 1\0") + rfq()
    for i in range(0, len(answer), 65536):
        g.backend(1, answer[i:i + 65536])
    assert g.to_client(1) == answer and g.need == NONE
    g.client(1, W.query("SELECT 1"))
    assert g.to_client(1).hex() == CAPTURED["q_select1"]


def test_a_backend_message_over_1_gib_is_relayed_raw(guest) -> None:
    """No PostgreSQL sends one (MaxAllocSize): the stream is no longer read as the
    protocol, the pair is spliced and what came is relayed, nothing lost."""
    g = guest()
    session(g)
    g.client(1, W.query("SELECT 2"))
    data = b"D\x7f\xff\xff\xff" + b"y" * 70000
    g.backend(1, data[:3])
    g.backend(1, data[3:])
    assert g.to_client(1) == data and g.streams[1].spliced
    assert any("does not parse" in m for _, m in g.logs)


# ---- fuzz: the hostile pieces in any order ----------------------------------------------

_HOSTILE = [W.startup(), W.SSL_REQUEST, W.GSSENC_REQUEST, struct.pack("!ii", 12, 80877103) + b"zz",
            struct.pack("!iiii", 16, 80877102, 4242, 77), struct.pack("!ii", 7, 0),
            W.startup(proto=2 << 16), startup_raw(b"user\0"), startup_raw(b"\0"),
            W.query("SELECT 1"), W.query("SELECT 2"), SELECT1, W.TERMINATE, W.FLUSH,
            W.parse("SELECT 1") + W.bind() + W.execute(), *BAD_HEADERS.values(),
            W.msg(b"p", b"pw\0"), b"Q\x7f\xff\xff\xff" + b"x" * 300]
_BACKEND = [pa.GREETING, rfq(), rfq(b"T"), W.msg(b"1") + rfq(), W.msg(b"K", bytes(40)),
            W.msg(b"E", b"SFATAL\0C08P01\0\0"), b"D\x7f\xff\xff\xff", W.msg(b"G", bytes(3))]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(1, 3),
                          st.sampled_from(_HOSTILE + _BACKEND), st.integers(1, 40)),
                max_size=40))
def test_fuzz_hostile_pieces_in_any_order_never_fail_a_call(
        ops: list[tuple[int, int, bytes, int]]) -> None:
    g = StreamGuest(WASM, {"hold_timeout_ms": 200, "stream_hold_bytes": 1024,
                           "max_message_bytes": 4096}, port=5432)
    now = 0
    opened: set[int] = set()
    try:
        for op, sid, data, cut in ops:
            if op == 0:
                opened.add(sid)
            now = fuzz_step(g, op, sid, [data[:cut], data[cut:]], cut % 2 == 1, now)
        assert g.failed == 0
        for a in g.actions:
            assert getattr(a, "stream_id", None) in (None, *opened), a
            assert not isinstance(a, abi.Log) or a.level < abi.LOG_ERROR, a
    finally:
        g.close()
