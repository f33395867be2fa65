"""The gateway's DNS server core, sans-IO.

Authoritative for one namespace's zone and reverse names (see gateway.records), a
forwarder for everything else. The core never touches a socket or a clock: the shell feeds
it whole DNS messages (TCP length prefixes already stripped) with the time, sends the
`Reply`/`Forward` actions it returns, and calls `handle_timer` at `next_timer()`.

Local answers are built with dnslib once per (lower-cased name, type, class, EDNS, RD/CD)
and cached as wire bytes; a hit only splices in the query's id and its question bytes, so
the client gets its own 0x20 case back (the answer's owner names are compression pointers
into that question). The cache is dropped whenever `Records.version` moves, so record
changes are visible to the next query. A plain query (one uncompressed question, at most
a bare OPT) finds its answer through `_fast`, which reads only the header and the
question with byte ops; everything else, and every miss, goes through the full parser.

Forwarded queries go upstream as the client's raw bytes under a fresh random id (no
cache-poisoning by id guessing, no collisions between clients); the answer is matched on
(upstream, id) *and* the question, and goes back with the client's id, otherwise untouched.

Deliberate departures from a naive reading of RFC 1035, each to keep the gateway safe:
messages with QR set are dropped, never answered (two servers answering each other's
FORMERRs would loop forever on one spoofed packet); unknown opcodes get NOTIMP, which is
what RFC 1035 defines for them and what nsupdate and friends expect.
"""

from __future__ import annotations

import heapq
import secrets
import struct
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from dnslib import EDNS0, NS, PTR, RR, SOA, DNSHeader, DNSLabel, DNSQuestion, DNSRecord
from dnslib import A as A_RD

from fabric.histogram import DNS_BUCKETS, Histogram
from gateway.dns_cache import MAX_ENTRIES, AnswerCache
from gateway.records import Labels, Records

# Header flag bits and codes.
QR = 0x8000
OPCODE_MASK = 0x7800
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
CD = 0x0010
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
T_A, T_NS, T_SOA, T_PTR, T_OPT, T_IXFR, T_AXFR, T_ANY = 1, 2, 6, 12, 41, 251, 252, 255
C_IN, C_ANY = 1, 255

EDNS_PAYLOAD = 1232  # what we advertise: the DNS flag day 2020 size, no IP fragments
MIN_UDP = 512  # RFC 1035 / RFC 6891: smaller advertised sizes count as 512
MAX_TCP = 65535
MAX_CACHE = 4096  # cached local answers (FIFO); a random-name flood only churns it
ID_DRAWS = 64  # tries for a free upstream id before treating the table as full
MAX_POINTERS = 16  # compression pointers followed per name (real names need one or two)
MAX_QUERY_ADDITIONAL = 2  # a query carries its OPT and at most one more (a COOKIE's TSIG)
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 3600, 600, 86400

_HDR = struct.Struct("!HHHHHH")
_HH = struct.Struct("!HH")
_RR_FIXED = struct.Struct("!HHIH")
_OPT_FIXED = struct.Struct("!HHBBHH")

COUNTERS = (
    "queries", "local_answers", "cache_hits", "nxdomain", "nodata", "refused", "notimp",
    "badvers", "formerr", "dropped_malformed", "dropped_responses", "truncated_replies",
    "forwarded", "coalesced", "no_upstream", "inflight_full", "upstream_packets",
    "upstream_answers", "upstream_malformed", "unmatched_answers", "spoofed_answers",
    "ignored_truncated", "retries", "timeouts_servfail", "truncated_retries_tcp",
    "forward_cache_hits", "forward_cache_stored", "forward_cache_expired",
    "forward_cache_evicted", "forward_cache_unparsable", "internal_errors",
)


@dataclass(frozen=True, slots=True)
class Reply:
    """Send `data` to `client` (the same object handle_query was given)."""

    client: object
    data: bytes


@dataclass(frozen=True, slots=True)
class Forward:
    """Send `data` to `upstream` (over TCP when `tcp`); `key` names the in-flight query."""

    upstream: tuple[str, int]
    data: bytes
    tcp: bool
    key: int


Action = Reply | Forward


class _Malformed(Exception):
    pass


def read_name(data: bytes, pos: int) -> tuple[list[bytes], int, bool]:
    """Labels (case as sent), the offset after the name, and whether a pointer was used.

    Every compression pointer must point strictly before the previous one (a suffix is
    always written earlier), which rules out loops; and a name may follow at most
    MAX_POINTERS of them, which rules out chains (record k pointing at record k-1 ...)
    that would make a message of R records cost R * R hops.
    """
    labels: list[bytes] = []
    n = len(data)
    total = 1
    end = -1
    bound = pos
    hops = 0
    while True:
        if pos >= n:
            raise _Malformed("name runs past the end")
        length = data[pos]
        if length == 0:
            return labels, (pos + 1 if end < 0 else end), end >= 0
        if length < 0x40:
            start = pos + 1
            pos = start + length
            total += length + 1
            if pos > n or total > 255:
                raise _Malformed("label past the end or name over 255 bytes")
            labels.append(data[start:pos])
        elif length >= 0xC0:
            if pos + 1 >= n:
                raise _Malformed("truncated pointer")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if end < 0:
                end = pos + 2
            if target >= bound:
                raise _Malformed("compression pointer does not point backwards")
            hops += 1
            if hops > MAX_POINTERS:
                raise _Malformed("too many compression pointers")
            bound = pos = target
        else:
            raise _Malformed("extended label type")


def _wire(labels: list[bytes] | Labels) -> bytes:
    return b"".join(bytes((len(lab),)) + lab for lab in labels) + b"\x00"


def _wire_labels(wire: bytes) -> Labels:
    out = []
    i = 0
    while wire[i]:
        j = i + 1 + wire[i]
        out.append(wire[i + 1:j])
        i = j
    return tuple(out)


def _opt(estate: int, ext_rcode: int = 0) -> bytes:
    """Our OPT record: 1232 bytes, version 0, DO copied from the query (RFC 3225)."""
    return b"\x00" + _OPT_FIXED.pack(T_OPT, EDNS_PAYLOAD, ext_rcode, 0,
                                     0x8000 if estate == 2 else 0, 0)


def _minimal(qid: int, flags: int, question: bytes, estate: int, ext_rcode: int = 0) -> bytes:
    """A reply with the question (if any), no records, and our OPT when the query had one."""
    opt = _opt(estate, ext_rcode) if estate else b""
    return _HDR.pack(qid, flags, 1 if question else 0, 0, 0, 1 if opt else 0) + question + opt


class _Pending:
    """One forwarded query, alive until answered or given up on."""

    __slots__ = ("key", "client", "client_tcp", "query", "qmatch", "question", "flags",
                 "estate", "limit", "attempt", "up_index", "gen", "deadline", "use_tcp",
                 "wire_keys", "ckey", "arrived")

    def __init__(self, key: int, client: object, client_tcp: bool, query: bytes,
                 qmatch: tuple[bytes, int, int], question: bytes, flags: int, estate: int,
                 limit: int, ckey: tuple) -> None:
        self.key = key
        self.client = client
        self.client_tcp = client_tcp
        self.query = query
        self.qmatch = qmatch
        self.question = question
        self.flags = flags
        self.estate = estate
        self.limit = limit
        self.attempt = 0
        self.up_index = 0
        self.gen = 0
        self.deadline = 0.0
        self.use_tcp = False
        self.wire_keys: list[tuple[tuple[str, int], int]] = []
        self.ckey = ckey
        self.arrived = 0.0  # when the client's query came


class DnsCore:
    """DNS for one namespace: answers its zone, forwards the rest. Nothing here raises."""

    def __init__(self, records: Records, upstreams: list[tuple[str, int]], *, ttl: int = 5,
                 timeout: float = 2.0, attempts: int = 3, max_inflight: int = 1024,
                 cache: int = MAX_ENTRIES,
                 randbits: Callable[[int], int] = secrets.randbits) -> None:
        if attempts < 1 or max_inflight < 1 or timeout <= 0 or ttl < 0:
            raise ValueError("attempts and max_inflight >= 1, timeout > 0, ttl >= 0")
        if max_inflight * (attempts + 1) > 32768:
            raise ValueError("max_inflight * (attempts + 1) must leave free upstream ids")
        self.records = records
        self.upstreams: tuple[tuple[str, int], ...] = tuple(
            (str(h), int(p)) for h, p in upstreams)
        self.ttl = ttl
        self.timeout = timeout
        self.attempts = attempts
        self.max_inflight = max_inflight
        self._randbits = randbits
        self._counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        # Queries answered from `_exact`, by their answer's own counter (None: an answer
        # with records): one increment a repeat instead of four, folded into the
        # counters when they are read (`counters`). Each core is read on the thread
        # that drives it (the data plane's in its snapshot, the server's on the event
        # loop), so a fold never runs between another thread's read and write.
        self._repeats: defaultdict[str | None, int] = defaultdict(int)
        # Forwarded answers within their TTL (gateway.dns_cache); 0 entries: none kept.
        self.answers = AnswerCache(max_entries=cache, count=self._bump)
        # Forwarded queries, from the client's query to its answer (or SERVFAIL).
        self.upstream_seconds = Histogram(DNS_BUCKETS)
        self._cache: dict[tuple, tuple[bytes, str | None]] = {}
        # Plain queries' bytes after the id -> the reply's bytes after the id (and its
        # counter): a client that asks the same way again costs one lookup.
        self._exact: dict[bytes, tuple[bytes, str | None]] = {}
        self._cache_version = records.version
        self._pending: dict[int, _Pending] = {}
        self._wire: dict[tuple[tuple[str, int], int], _Pending] = {}
        self._coalesce: dict[tuple, _Pending] = {}
        self._heap: list[tuple[float, int, int]] = []
        self._next_key = 1
        self.last_error: str | None = None
        self._preferred = 0  # the upstream new queries try first; moves on when one times out
        self._local_only = False
        self._needs_forward = False

    def _bump(self, name: str) -> None:
        self._counters[name] += 1

    @property
    def counters(self) -> dict[str, int]:
        """Every counter of COUNTERS, the repeats answered since the last read included."""
        if self._repeats:
            c = self._counters
            for kind, k in self._repeats.items():
                c["queries"] += k
                c["cache_hits"] += k
                c["local_answers"] += k
                if kind is not None:
                    c[kind] += k
            self._repeats.clear()
        return self._counters

    @property
    def inflight(self) -> int:
        return len(self._pending)

    def reconfigure(self, records: Records, upstreams: list[tuple[str, int]]) -> None:
        """A new zone or new upstreams (a config change), without losing the counters.

        Queries in flight finish (or are retried on the new upstreams); cached answers
        go with the old zone.
        """
        self.records = records
        self.upstreams = tuple((str(h), int(p)) for h, p in upstreams)
        self._preferred = 0
        self._cache.clear()
        self._exact.clear()
        self._cache_version = records.version
        self.answers.clear()  # what the old upstreams said

    # --- queries from clients ----------------------------------------------------------

    def handle_query(self, data: bytes, client: Hashable, now: float,
                     tcp: bool = False) -> list[Action]:
        """One whole DNS message from a client (`client` must be hashable)."""
        if not tcp and type(data) is bytes:
            reply = self._plain(data)
            if reply is not None:
                return [Reply(client, reply)]
        return self._handle(data, client, now, tcp)

    def _handle(self, data: bytes, client: Hashable, now: float, tcp: bool) -> list[Action]:
        self._counters["queries"] += 1
        try:
            if type(data) is not bytes:  # bytearray/memoryview from the shell: hashable copy
                data = bytes(data)
            return self._query(data, client, now, tcp)
        except Exception as e:
            self._internal_error(e)
            try:
                qid, flags = _HH.unpack_from(data)
                return [Reply(client, _HDR.pack(qid, QR | RA | (flags & RD) | SERVFAIL,
                                                0, 0, 0, 0))]
            except Exception:
                return []

    def answer_local(self, data: bytes, now: float) -> bytes | None:
        """The reply to a UDP query when it needs no upstream (the zone, the reverse zone,
        errors), b"" when it is to be dropped, None when it must be forwarded.

        This is what lets the data plane answer local names straight from the router,
        without the trip through the local stack's kernel sockets; everything else
        takes that trip to the full server."""
        if type(data) is not bytes:
            data = bytes(data)
        # _plain's exact-repeat lookup, inline: this is the data plane's per-query call.
        if self.records.version == self._cache_version:
            seen = self._exact.get(data[2:])
            if seen is not None:
                self._repeats[seen[1]] += 1
                return data[:2] + seen[0]
        reply = self._fast(data)
        if reply is not None:
            return reply
        self._local_only = True
        try:
            actions = self._handle(data, None, now, False)
        finally:
            self._local_only = False
        if self._needs_forward:
            self._needs_forward = False
            self._counters["queries"] -= 1  # the full server counts it
            return None
        return actions[0].data if actions else b""

    def _plain(self, data: bytes) -> bytes | None:
        """The reply to a plain UDP query with a prebuilt answer (counted), or None."""
        if self.records.version == self._cache_version:
            seen = self._exact.get(data[2:])
            if seen is not None:  # these very bytes were answered: only the id differs
                self._repeats[seen[1]] += 1
                return data[:2] + seen[0]
        return self._fast(data)

    def _fast(self, data: bytes) -> bytes | None:
        """The reply to a plain UDP query whose answer is already built, or None.

        Plain: one uncompressed question, nothing else but at most one bare OPT (version
        0, no options), opcode QUERY. Only header and question are read, with byte ops;
        the lookup is the slow path's own key into the same cache, so the reply (the
        template with the query's id and question spliced in) and every counter are
        exactly what `_query` would give. Anything else is left to `_query` (None)."""
        n = len(data)
        if (n < 17 or data[2] & 0xF8 or data[4] or data[5] != 1 or data[6] or data[7]
                or data[8] or data[9] or data[10]):
            return None
        pos = 12
        while pos < n:
            length = data[pos]
            if length == 0 or length > 63:
                break
            pos += length + 1
        else:
            return None
        if length or pos > 266:  # a pointer or a bad label; a name over 255 bytes
            return None
        pos += 1
        q = pos + 4
        ar = data[11]
        if ar == 0:
            if q != n:
                return None
            estate = 0
            limit = MIN_UDP
        elif ar == 1:
            # OPT: root owner, type 41, class = UDP size, ext-rcode, version 0, flags,
            # RDLENGTH 0.
            if (q + 11 != n or data[q] or data[q + 1] or data[q + 2] != T_OPT
                    or data[q + 6] or data[q + 9] or data[q + 10]):
                return None
            estate = 2 if data[q + 7] & 0x80 else 1
            limit = data[q + 3] << 8 | data[q + 4]
            if limit < MIN_UDP:
                limit = MIN_UDP
        else:
            return None
        if self.records.version != self._cache_version:
            return None
        hit = self._cache.get((data[12:pos].lower(), data[pos] << 8 | data[pos + 1],
                               data[pos + 2] << 8 | data[pos + 3], estate,
                               (data[2] & 1) << 8 | (data[3] & 0x10)))
        if hit is None:
            return None
        template, kind = hit
        if len(template) > limit:
            return None
        c = self._counters
        c["queries"] += 1
        c["cache_hits"] += 1
        c["local_answers"] += 1
        if kind is not None:
            c[kind] += 1
        reply = data[:2] + template[2:12] + data[12:q] + template[q:]
        exact = self._exact
        if len(exact) >= MAX_CACHE:
            del exact[next(iter(exact))]
        exact[data[2:]] = (reply[2:], kind)
        return reply

    def _query(self, data: bytes, client: Hashable, now: float, tcp: bool) -> list[Action]:
        c = self._counters
        n = len(data)
        if n < 12:
            c["dropped_malformed"] += 1
            return []
        qid, flags, qd, an, ns, ar = _HDR.unpack_from(data)
        if flags & QR:
            c["dropped_responses"] += 1
            return []
        if flags & OPCODE_MASK:
            c["notimp"] += 1
            return [Reply(client, _HDR.pack(qid, QR | RA | (flags & (OPCODE_MASK | RD)) | NOTIMP,
                                            0, 0, 0, 0))]
        if qd != 1 or an or ns or ar > MAX_QUERY_ADDITIONAL:
            # A query has one question, no answers or authority, and its OPT: anything
            # else is not a query we answer (and would cost a walk over its records).
            return self._formerr(client, qid, flags)
        # The question: the common uncompressed name is scanned inline.
        pos = 12
        length = 1
        while pos < n:
            length = data[pos]
            if length == 0 or length > 63:
                break
            pos += length + 1
        try:
            if length == 0 and pos < n and pos - 11 <= 255:
                pos += 1
                qname = data[12:pos]
                compressed = False
            else:
                labels, pos, _ = read_name(data, 12)
                qname = _wire(labels)
                compressed = True
            if pos + 4 > n:
                raise _Malformed("question runs past the end")
            qtype, qclass = _HH.unpack_from(data, pos)
            pos += 4
            qend = pos
            estate, udp, version, pos = self._records_after_question(data, pos, an + ns, ar)
            if pos != n:
                raise _Malformed("trailing bytes")
        except _Malformed:
            return self._formerr(client, qid, flags)
        question = qname + data[qend - 4:qend] if compressed else data[12:qend]
        if version:
            c["badvers"] += 1
            return [Reply(client, _minimal(qid, QR | RA | (flags & (RD | CD)), question,
                                           estate, ext_rcode=1))]
        limit = MAX_TCP if tcp else (max(MIN_UDP, udp) if estate else MIN_UDP)
        qlower = qname.lower()
        if self.records.version != self._cache_version:
            self._cache.clear()
            self._exact.clear()
            self._cache_version = self.records.version
        key = (qlower, qtype, qclass, estate, flags & (RD | CD))
        hit = self._cache.get(key)
        if hit is None:
            built = self._build_local(qlower, qtype, qclass, estate, flags)
            if built is None:
                if self._local_only:
                    self._needs_forward = True
                    return []
                if self.answers.max_entries:
                    cached = self.answers.get(key, now)
                    if cached is not None:
                        reply = data[:2] + cached[2:12] + question + cached[12 + len(question):]
                        if len(reply) <= limit:
                            c["forward_cache_hits"] += 1
                            return [Reply(client, reply)]
                return self._forward(data, client, now, tcp, qid, flags, (qlower, qtype, qclass),
                                     question, estate, limit)
            if len(self._cache) >= MAX_CACHE:
                del self._cache[next(iter(self._cache))]
            self._cache[key] = hit = built
        else:
            c["cache_hits"] += 1
        template, kind = hit
        c["local_answers"] += 1
        if kind is not None:
            c[kind] += 1
        reply = data[:2] + template[2:12] + question + template[12 + len(question):]
        if len(reply) > limit:
            c["truncated_replies"] += 1
            (tflags,) = struct.unpack_from("!H", template, 2)
            reply = _minimal(qid, tflags | TC, question, estate)
        return [Reply(client, reply)]

    @staticmethod
    def _records_after_question(data: bytes, pos: int, skip: int,
                                ar: int) -> tuple[int, int, int, int]:
        """Walk answer/authority (ignored) and additional records; find the one OPT.

        Returns (estate, udp_size, edns_version, end): estate 0 = no EDNS, 1 = EDNS,
        2 = EDNS with DO.
        """
        n = len(data)
        for _ in range(skip):
            _, pos, _ = read_name(data, pos)
            if pos + 10 > n:
                raise _Malformed("record header past the end")
            pos += 10 + _RR_FIXED.unpack_from(data, pos)[3]
            if pos > n:
                raise _Malformed("rdata past the end")
        estate = udp = version = 0
        for _ in range(ar):
            labels, pos, _ = read_name(data, pos)
            if pos + 10 > n:
                raise _Malformed("record header past the end")
            rtype, rclass, rttl, rdlen = _RR_FIXED.unpack_from(data, pos)
            pos += 10
            end = pos + rdlen
            if end > n:
                raise _Malformed("rdata past the end")
            if rtype == T_OPT:
                if estate or labels:
                    raise _Malformed("second OPT, or OPT not owned by the root")
                while pos < end:  # options must frame the rdata exactly (RFC 6891 6.1.2)
                    if pos + 4 > end:
                        raise _Malformed("truncated EDNS option")
                    pos += 4 + _HH.unpack_from(data, pos)[1]
                if pos != end:
                    raise _Malformed("EDNS option past the rdata")
                estate = 2 if rttl & 0x8000 else 1
                udp = rclass
                version = (rttl >> 16) & 0xFF
            pos = end
        return estate, udp, version, pos

    def _formerr(self, client: object, qid: int, flags: int) -> list[Action]:
        self._counters["formerr"] += 1
        return [Reply(client, _HDR.pack(qid, QR | RA | (flags & RD) | FORMERR, 0, 0, 0, 0))]

    # --- local answers ---------------------------------------------------------------

    def _build_local(self, qlower: bytes, qtype: int, qclass: int, estate: int,
                     flags: int) -> tuple[bytes, str | None] | None:
        """The reply template for a name we own, or None to forward."""
        labels = _wire_labels(qlower)
        answer = self._answer(labels, qtype, qclass)
        if answer is None:
            return None
        rcode, an, ns, ar, kind = answer
        header = DNSHeader(id=0, qr=1, aa=int(rcode != REFUSED), ra=1, rd=int(bool(flags & RD)),
                           cd=int(bool(flags & CD)), rcode=rcode)
        rec = DNSRecord(header, q=DNSQuestion(DNSLabel(labels), qtype, qclass))
        for rr in an:
            rec.add_answer(rr)
        for rr in ns:
            rec.add_auth(rr)
        for rr in ar:
            rec.add_ar(rr)
        if estate:
            rec.add_ar(EDNS0(udp_len=EDNS_PAYLOAD, flags="do" if estate == 2 else ""))
        template = rec.pack()
        qlen = len(qlower) + 4
        if template[12:12 + qlen] != qlower + _HH.pack(qtype, qclass):
            raise RuntimeError("dnslib did not encode the question as it came")
        return template, kind

    def _answer(self, labels: Labels, qtype: int, qclass: int
                ) -> tuple[int, list, list, list, str | None] | None:
        """(rcode, answer, authority, additional, counter) for a name we own, else None."""
        r = self.records
        rel = r.zone_rel(labels)
        if rel is not None:
            soa_owner: Labels = r.zone_labels
            is_apex = not rel
            ip = r.a_rel(rel)
            exists_ptr = None
            found = is_apex or ip is not None or r.exists_rel(rel)
        else:
            rev = r.reverse(labels)
            if rev is None:
                return None
            soa_owner, is_apex, state = rev
            ip = None
            exists_ptr = state if state is not None and state >= 0 else None
            found = state is not None
        if qclass not in (C_IN, C_ANY) or qtype in (T_AXFR, T_IXFR):
            return REFUSED, [], [], [], "refused"
        if not found:
            return NXDOMAIN, [], [self._soa(soa_owner)], [], "nxdomain"
        an: list = []
        ar: list = []
        ttl = self.ttl
        if ip is not None and qtype in (T_A, T_ANY):
            an.append(RR(DNSLabel(labels), T_A, C_IN, ttl, A_RD(str(ip))))
        if exists_ptr is not None and qtype in (T_PTR, T_ANY):
            target = r.ptr_ip(exists_ptr)
            an.append(RR(DNSLabel(labels), T_PTR, C_IN, ttl, PTR(DNSLabel(target))))
        if is_apex and qtype in (T_SOA, T_ANY):
            an.append(self._soa(labels))
        if is_apex and qtype in (T_NS, T_ANY):
            gw = (b"gateway",) + r.zone_labels
            an.append(RR(DNSLabel(labels), T_NS, C_IN, ttl, NS(DNSLabel(gw))))
            ar.append(RR(DNSLabel(gw), T_A, C_IN, ttl, A_RD(str(r.gateway))))
        if an:
            return NOERROR, an, [], ar, None
        return NOERROR, [], [self._soa(soa_owner)], [], "nodata"

    def _soa(self, owner: Labels) -> RR:
        """The SOA for `owner`; its minimum (and TTL) is the negative-caching TTL."""
        zone = self.records.zone_labels
        serial = self.records.version % 0xFFFFFFFF + 1
        return RR(DNSLabel(owner), T_SOA, C_IN, self.ttl,
                  SOA(DNSLabel((b"gateway",) + zone), DNSLabel((b"hostmaster",) + zone),
                      (serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, self.ttl)))

    # --- forwarding ------------------------------------------------------------------

    def _forward(self, data: bytes, client: Hashable, now: float, tcp: bool, qid: int,
                 flags: int, qmatch: tuple[bytes, int, int], question: bytes, estate: int,
                 limit: int) -> list[Action]:
        c = self._counters
        servfail = QR | RA | (flags & (RD | CD)) | SERVFAIL
        if not self.upstreams:
            c["no_upstream"] += 1
            return [Reply(client, _minimal(qid, servfail, question, estate))]
        ckey = (client, tcp, qid, qmatch)
        if ckey in self._coalesce:
            c["coalesced"] += 1
            return []
        if len(self._pending) >= self.max_inflight:
            c["inflight_full"] += 1
            return [Reply(client, _minimal(qid, servfail, question, estate))]
        p = _Pending(self._next_key, client, tcp, data, qmatch, question, flags, estate, limit,
                     ckey)
        p.arrived = now
        forward = self._send(p, self._preferred, now, False)
        if forward is None:
            c["inflight_full"] += 1
            return [Reply(client, _minimal(qid, servfail, question, estate))]
        self._next_key += 1
        self._pending[p.key] = p
        self._coalesce[ckey] = p
        p.attempt = 1
        c["forwarded"] += 1
        return [forward]

    def _send(self, p: _Pending, index: int, now: float, tcp: bool) -> Forward | None:
        """Register a fresh (upstream, id) for `p` and arm its deadline."""
        upstream = self.upstreams[index]
        for _ in range(ID_DRAWS):
            wid = self._randbits(16) & 0xFFFF
            if (upstream, wid) not in self._wire:
                break
        else:
            return None
        self._wire[(upstream, wid)] = p
        p.wire_keys.append((upstream, wid))
        p.up_index = index
        p.gen += 1
        p.deadline = now + self.timeout
        heapq.heappush(self._heap, (p.deadline, p.key, p.gen))
        if len(self._heap) > 2 * len(self._pending) + 64:  # drop entries of finished queries
            self._heap = [(q.deadline, q.key, q.gen) for q in self._pending.values()]
            if p.key not in self._pending:
                self._heap.append((p.deadline, p.key, p.gen))
            heapq.heapify(self._heap)
        return Forward(upstream, wid.to_bytes(2, "big") + p.query[2:], tcp, p.key)

    def _finish(self, p: _Pending, now: float) -> None:
        """`p` is answered (or given up on) now."""
        self.upstream_seconds.observe(now - p.arrived)
        self._pending.pop(p.key, None)
        for wk in p.wire_keys:
            if self._wire.get(wk) is p:
                del self._wire[wk]
        if self._coalesce.get(p.ckey) is p:
            del self._coalesce[p.ckey]

    def handle_upstream(self, data: bytes, upstream: tuple[str, int], now: float,
                        tcp: bool = False) -> list[Action]:
        """One whole DNS message from `upstream` (the address it came from)."""
        self._counters["upstream_packets"] += 1
        try:
            data = bytes(data)
            return self._upstream(data, (str(upstream[0]), int(upstream[1])), now, tcp)
        except Exception as e:
            self._internal_error(e)
            return []

    def _upstream(self, data: bytes, upstream: tuple[str, int], now: float,
                  tcp: bool) -> list[Action]:
        c = self._counters
        if len(data) < 12:
            c["upstream_malformed"] += 1
            return []
        wid, flags, qd = struct.unpack_from("!HHH", data)
        p = self._wire.get((upstream, wid))
        if p is None:
            c["unmatched_answers"] += 1  # late (already answered or given up), or a guess
            return []
        try:
            if not flags & QR or flags & OPCODE_MASK or qd != 1:
                raise _Malformed("not an answer to a one-question query")
            labels, pos, _ = read_name(data, 12)
            if pos + 4 > len(data):
                raise _Malformed("question runs past the end")
            qtype, qclass = _HH.unpack_from(data, pos)
        except _Malformed:
            c["spoofed_answers"] += 1
            return []
        if (_wire(labels).lower(), qtype, qclass) != p.qmatch:
            c["spoofed_answers"] += 1
            return []
        if flags & TC and not tcp:
            if p.use_tcp:
                c["ignored_truncated"] += 1
                return []
            ups = self.upstreams
            index = ups.index(upstream) if upstream in ups else 0
            forward = self._send(p, index, now, True)
            if forward is None:
                self._finish(p, now)
                c["inflight_full"] += 1
                return [Reply(p.client, self._servfail(p))]
            p.use_tcp = True
            c["truncated_retries_tcp"] += 1
            return [forward]
        self._finish(p, now)
        c["upstream_answers"] += 1
        if self.answers.max_entries and pos + 4 - 12 == len(p.question):
            self.answers.store((*p.qmatch, p.estate, p.flags & (RD | CD)), data, now)
        reply = p.query[:2] + data[2:]
        if len(reply) > p.limit:
            c["truncated_replies"] += 1
            reply = _minimal(_HH.unpack_from(p.query)[0], flags | TC, p.question, p.estate)
        return [Reply(p.client, reply)]

    def _servfail(self, p: _Pending) -> bytes:
        qid = _HH.unpack_from(p.query)[0]
        return _minimal(qid, QR | RA | (p.flags & (RD | CD)) | SERVFAIL, p.question, p.estate)

    # --- timers ----------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """When `handle_timer` next has work: the earliest upstream deadline."""
        heap = self._heap
        while heap:
            deadline, key, gen = heap[0]
            p = self._pending.get(key)
            if p is not None and p.gen == gen:
                return deadline
            heapq.heappop(heap)
        return None

    def handle_timer(self, now: float) -> list[Action]:
        """Retry on the next upstream, or SERVFAIL after `attempts` tries."""
        try:
            return self._timer(now)
        except Exception as e:
            self._internal_error(e)
            return []

    def _internal_error(self, e: Exception) -> None:
        """A bug, not bad input: counted, and the latest kept for logs and tests."""
        self._counters["internal_errors"] += 1
        self.last_error = f"{type(e).__name__}: {e}"

    def _timer(self, now: float) -> list[Action]:
        c = self._counters
        out: list[Action] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, key, gen = heapq.heappop(heap)
            p = self._pending.get(key)
            if p is None or p.gen != gen:
                continue
            if not self.upstreams:  # all removed by a config change
                self._finish(p, now)
                c["timeouts_servfail"] += 1
                out.append(Reply(p.client, self._servfail(p)))
                continue
            if p.up_index == self._preferred:
                self._preferred = (p.up_index + 1) % len(self.upstreams)
            if p.attempt < self.attempts:
                forward = self._send(p, (p.up_index + 1) % len(self.upstreams), now, p.use_tcp)
                if forward is not None:
                    p.attempt += 1
                    c["retries"] += 1
                    out.append(forward)
                    continue
            self._finish(p, now)
            c["timeouts_servfail"] += 1
            out.append(Reply(p.client, self._servfail(p)))
        return out
