"""The local answers' fast path (DnsCore._plain, _fast): byte for byte the parser's.

Every query goes to two cores over the same records: one as shipped, one whose fast path
is switched off, so each reply and each counter of the fast path is checked against what
`_query` (the full parser) gives for the same bytes, through both entry points (the data
plane's answer_local, the server's handle_query over UDP and TCP): many names, types,
classes, cases, RD/CD, with and without EDNS, and random and mutated queries.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

from dnslib import EDNS0, RCODE, DNSRecord, EDNSOption
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.dns import DnsCore
from gateway.records import Records
from tests.unit.test_dns import CLIENT, PODS, ZONE, query, records

NAMES = [*(f"{p}.{ZONE}" for p in PODS), ZONE, f"nope.{ZONE}", f"a.b.web-1.{ZONE}",
         f"v1.{ZONE}", "2.0.10.10.in-addr.arpa.", "99.0.10.10.in-addr.arpa.",
         "0.10.10.in-addr.arpa.", "10.in-addr.arpa.", "www.example.com.", "com.", "."]
TYPES = [1, 2, 6, 12, 15, 16, 28, 33, 65, 251, 252, 255, 0x4141, 0x6161]
CLASSES = [1, 3, 255, 0x41]


def pair(recs: Records | None = None) -> tuple[DnsCore, DnsCore]:
    """(as shipped, slow path only) over the same records."""
    recs = recs or records()
    fast, slow = DnsCore(recs, []), DnsCore(recs, [])
    slow._fast = lambda data: None  # type: ignore[method-assign]
    return fast, slow


def same(fast: DnsCore, slow: DnsCore, data: bytes, times: int = 2) -> bytes | None:
    """Both cores give the same reply and counters, `times` times in a row (the first
    builds the answer, the later ones are the fast path's hits)."""
    out = None
    for _ in range(times):
        out = fast.answer_local(data, 0.0)
        assert out == slow.answer_local(data, 0.0)
        assert fast.counters == slow.counters
        for tcp in (False, True):  # the full server's entry point, over UDP and TCP
            assert fast.handle_query(data, CLIENT, 0.0, tcp) == \
                slow.handle_query(data, CLIENT, 0.0, tcp)
            assert fast.counters == slow.counters
    assert fast.counters["internal_errors"] == 0, fast.last_error
    return out


def flip_case(name: str, mask: int) -> str:
    return "".join(ch.upper() if mask >> (i % 60) & 1 else ch for i, ch in enumerate(name))


def bare_opt(q: bytes, udp: int, do: bool = False, version: int = 0) -> bytes:
    """`q` (no additional records) with an OPT of no options appended."""
    return (q[:10] + b"\x00\x01" + q[12:] + b"\x00" +
            struct.pack("!HHBBHH", 41, udp, 0, version, 0x8000 if do else 0, 0))


query_args = st.tuples(st.sampled_from(NAMES), st.integers(0, 2 ** 60 - 1),
                       st.sampled_from(TYPES), st.sampled_from(CLASSES), st.booleans(),
                       st.booleans(), st.sampled_from([None, 0, 511, 512, 1232, 4096]),
                       st.booleans(), st.integers(0, 0xFFFF))


def build(args: tuple) -> bytes:
    name, mask, qtype, qclass, rd, cd, edns, do, qid = args
    q = query(flip_case(name, mask), qtype, qid=qid, rd=rd, qclass=qclass)
    if cd:
        q = q[:3] + bytes((q[3] | 0x10,)) + q[4:]
    return q if edns is None else bare_opt(q, edns, do)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(query_args)
def test_fast_path_replies_are_the_slow_paths(args):
    fast, slow = pair()
    data = build(args)
    name, mask, qtype, qclass, rd, cd, edns, do, qid = args
    for v_rd in (False, True):  # the other variants' answers sit in the cache alongside
        for v_cd in (False, True):
            for v_edns, v_do in ((None, False), (512, False), (4096, True)):
                same(fast, slow, build((name, 0, qtype, qclass, v_rd, v_cd, v_edns, v_do, 7)))
    out = same(fast, slow, data, times=3)
    if out:  # the reply keeps the client's id and its question's letter case (0x20)
        assert out[:2] == data[:2] and out[12:len(data) - (11 if args[6] is not None else 0)] \
            == data[12:len(data) - (11 if args[6] is not None else 0)]


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(query_args, st.lists(st.tuples(st.integers(0, 120), st.integers(0, 255)), max_size=4),
       st.integers(0, 20))
def test_mutated_queries_get_what_the_slow_path_gives(args, flips, cut):
    fast, slow = pair()
    base = build(args)
    same(fast, slow, base)  # warm both caches with the unmutated answer
    data = bytearray(base)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    same(fast, slow, bytes(data[:len(data) - cut] if cut < 12 else data))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=80))
def test_random_bytes_get_what_the_slow_path_gives(data):
    fast, slow = pair()
    same(fast, slow, query(f"web-1.{ZONE}"))
    same(fast, slow, bytes(data))
    same(fast, slow, query(f"web-1.{ZONE}")[:2] + bytes(data))


def test_plain_queries_take_the_fast_path_with_0x20_case():
    fast, slow = pair()
    for q in (query(f"web-1.{ZONE}"), bare_opt(query(f"db.{ZONE}", "AAAA"), 1232, True),
              query(f"nope.{ZONE}", rd=False), query("2.0.10.10.in-addr.arpa.", "PTR")):
        same(fast, slow, q, times=1)  # builds the answer
        hit = fast._fast(q)  # a hit: no parser, no builder
        assert hit is not None and hit == slow.answer_local(q, 0.0)
        assert fast.counters == slow.counters
    first = query(f"web-1.{ZONE}", qid=1)
    same(fast, slow, first)
    mixed = query(f"wEb-1.{ZONE.upper()}", qid=0xBEEF)
    hits = fast.counters["cache_hits"]
    out = fast._fast(mixed)
    assert out is not None and fast.counters["cache_hits"] == hits + 1
    r = DNSRecord.parse(out)
    assert r.header.id == 0xBEEF and str(r.q.qname) == f"wEb-1.{ZONE.upper()}"
    assert str(r.rr[0].rname) == f"wEb-1.{ZONE.upper()}" and str(r.rr[0].rdata) == "10.10.0.2"


def test_what_the_fast_path_leaves_to_the_parser():
    fast, slow = pair()
    plain = query(f"web-1.{ZONE}", edns=1232)
    same(fast, slow, plain)
    cookie = DNSRecord.question(f"web-1.{ZONE}")
    cookie.add_ar(EDNS0(udp_len=1232, opts=[EDNSOption(10, b"12345678")]))
    compressed = (query(f"web-1.{ZONE}")[:12] + b"\x05web-1" + b"\xc0\x12" +
                  b"\x00\x01\x00\x01")
    for q in (bytes(cookie.pack()), bare_opt(query(f"web-1.{ZONE}"), 1232, version=1),
              compressed, plain[:-1], plain + b"\x00", query(f"web-1.{ZONE}", "A")[:-2]):
        assert fast._fast(q) is None
        same(fast, slow, q)


def test_a_change_to_the_names_takes_the_old_answer_away_at_once():
    recs = records()
    fast, slow = pair(recs)
    q = query(f"web-1.{ZONE}")
    ptr = query("2.0.10.10.in-addr.arpa.", "PTR")
    assert str(DNSRecord.parse(same(fast, slow, q)).rr[0].rdata) == "10.10.0.2"
    same(fast, slow, ptr)
    recs.set("web-1", IPv4Address("10.10.0.99"))  # a pod's address moves
    assert str(DNSRecord.parse(same(fast, slow, q)).rr[0].rdata) == "10.10.0.99"
    assert DNSRecord.parse(same(fast, slow, ptr)).header.rcode == RCODE.NXDOMAIN
    recs.remove("web-1")  # detached and gone from the table
    assert fast._fast(q) is None
    assert DNSRecord.parse(same(fast, slow, q)).header.rcode == RCODE.NXDOMAIN
    recs.replace_all({"renamed": IPv4Address("10.10.0.2")})  # a rename
    assert DNSRecord.parse(same(fast, slow, query(f"db.{ZONE}"))).header.rcode == RCODE.NXDOMAIN
    assert str(DNSRecord.parse(same(fast, slow, query(f"renamed.{ZONE}"))).rr[0].rdata) \
        == "10.10.0.2"
    assert fast.counters["internal_errors"] == 0


def test_answers_over_the_client_size_are_truncated_by_the_slow_path(monkeypatch):
    fast, slow = pair()
    for c in (fast, slow):
        real = c._answer

        def many(labels, qtype, qclass, real=real):  # ~1 KB of answers
            from dnslib import QTYPE, RR, A
            rcode, an, ns, ar, kind = real(labels, qtype, qclass)
            if not an:
                return rcode, an, ns, ar, kind
            return rcode, [RR(an[0].rname, QTYPE.A, rdata=A(f"10.10.1.{i}"), ttl=5)
                           for i in range(60)], ns, ar, kind

        monkeypatch.setattr(c, "_answer", many)
    small, big = query(f"web-1.{ZONE}"), bare_opt(query(f"web-1.{ZONE}"), 4096)
    assert DNSRecord.parse(same(fast, slow, small, times=3)).header.tc == 1
    assert len(DNSRecord.parse(same(fast, slow, big, times=3)).rr) == 60
    assert fast._fast(small) is None and fast._fast(big) is not None
    assert fast.counters["truncated_replies"] == 6  # 3 rounds of answer_local + UDP


def test_repeated_queries_and_any_bytes_type():
    """The same bytes again (another id) are one lookup; a bytearray or memoryview from
    an embedder is answered the same."""
    fast, slow = pair()
    q = bare_opt(query(f"Web-1.{ZONE}", qid=1), 1232)
    same(fast, slow, q, times=3)
    assert q[2:] in fast._exact
    again = b"\x99\x98" + q[2:]
    out = same(fast, slow, again)
    assert out is not None and out[:2] == b"\x99\x98" and out[2:] == fast._exact[q[2:]][0]
    for kind in (bytearray, memoryview):
        assert fast.answer_local(kind(again), 0.0) == out  # type: ignore[arg-type]
        slow.answer_local(again, 0.0)
        assert fast.handle_query(kind(again), CLIENT, 0.0)[0].data == out  # type: ignore
        slow.handle_query(again, CLIENT, 0.0)
    nx = query(f"nope.{ZONE}")
    same(fast, slow, nx, times=3)
    assert fast.counters["nxdomain"] == slow.counters["nxdomain"] == 9


def test_hostile_variants_of_a_repeated_query_never_come_from_the_repeat_table():
    """answer_local looks repeats up inline: with the plain query's answer in the table,
    broken or odd variants of it (cut short, a bad label length, a compression loop,
    QDCOUNT 0 or 2, an answer record, an OPT with a huge size, options or a long
    rdata, trailing bytes, a response) get what the parser gives, byte for byte and
    counter for counter, and a malformed one is dropped and counted, not answered."""
    fast, slow = pair()
    q = query(f"web-1.{ZONE}", qid=7)
    opt = bare_opt(q, 1232)
    for warm in (q, opt):
        same(fast, slow, warm, times=3)
        assert warm[2:] in fast._exact
    name_end = 12 + len(f"web-1.{ZONE}") + 1
    variants = [
        *(q[:k] for k in (0, 1, 2, 3, 11, 12, 13, 20, name_end, len(q) - 1)),
        q[:12] + b"\x3f" + q[13:],  # the first label says 63 bytes
        q[:12] + b"\x40" + q[13:],  # an extended label type
        q[:12] + b"\xc0\x0c" + q[name_end:],  # a pointer to itself
        q[:12] + b"\x05web-1\xc0\x12\xc0\x0c" + q[name_end:],  # a loop of two pointers
        q[:4] + b"\x00\x00" + q[6:],  # QDCOUNT 0
        q[:4] + b"\x00\x02" + q[6:],  # QDCOUNT 2, one question
        q[:4] + b"\x00\x02" + q[6:] + q[12:],  # QDCOUNT 2, two questions
        q[:6] + b"\x00\x01" + q[8:],  # ANCOUNT 1, no record
        q[:2] + bytes((q[2] | 0x80,)) + q[3:],  # a response
        q + b"\x00",  # trailing byte
        opt[:-11] + b"\x00" + struct.pack("!HHBBHH", 41, 65535, 0, 0, 0, 0),  # huge size
        opt[:-2] + b"\xff\xff",  # rdata of 65535 bytes, absent
        opt[:-2] + b"\x00\x0c" + b"\x00\x0a\x00\x08" + b"12345678",  # a cookie
        opt[:-2] + b"\x00\x04" + b"\x00\x0a\x00\x08",  # an option past its rdata
        opt[:-11] + b"\x00" + struct.pack("!HHBBHH", 41, 1232, 0, 1, 0, 0),  # version 1
        opt[:10] + b"\x00\x02" + opt[12:] + opt[-11:],  # two OPTs
    ]
    for v in variants:
        for qid in (b"\x00\x07", b"\xab\xcd"):
            data = qid + v[2:] if len(v) >= 2 else v
            out = same(fast, slow, data)
            if data[2:] in fast._exact:  # only a plain query the parser answers the same
                assert out == data[:2] + fast._exact[data[2:]][0]
            else:
                assert fast._fast(data) is None or out is not None
    assert fast.counters["dropped_malformed"] > 0 and fast.counters["formerr"] > 0
    assert fast.counters["dropped_responses"] > 0 and fast.counters["badvers"] > 0


def test_repeats_are_counted_once_each_whenever_the_counters_are_read():
    """A repeat costs one increment, folded into `counters` when they are read: every
    repeat counts as a query, a cache hit, a local answer and its kind, once, whether
    the counters are read after each query, after many, twice in a row, or across a
    change of zone that empties the repeat table."""
    fast, slow = pair()
    a, nx = query(f"web-1.{ZONE}"), query(f"nope.{ZONE}")
    same(fast, slow, a)
    same(fast, slow, nx)
    before = dict(fast.counters)
    for i in range(50):
        for q in (a, nx):
            data = bytes((i, 7)) + q[2:]
            assert fast.answer_local(data, 0.0) == slow.answer_local(data, 0.0)
            assert fast.handle_query(data, CLIENT, 0.0) == slow.handle_query(data, CLIENT, 0.0)
        if i % 7 == 0:
            assert fast.counters == slow.counters
    assert fast.counters == fast.counters == slow.counters
    grew = {k: fast.counters[k] - before[k] for k in before if fast.counters[k] != before[k]}
    assert grew == {"queries": 200, "cache_hits": 200, "local_answers": 200, "nxdomain": 100}
    fast.answer_local(b"\x00\x01" + a[2:], 0.0)
    fast.reconfigure(fast.records, [])  # the table goes, the count of what it answered stays
    assert not fast._exact and fast.counters["queries"] == before["queries"] + 201
