"""Forwarded DNS answers kept within their TTL, sans-IO.

A pod that asks for the same external name a thousand times a second should cost the
upstream one query per TTL, not a thousand. An answer is kept as wire bytes with the
offsets of its TTL fields. A hit copies it and lowers each TTL by the answer's age, so
a client never caches a record longer than the upstream allowed. The answer leaves with
the client's id and question.

What is kept: NOERROR answers with at least one record, and negative answers
(NXDOMAIN, NODATA) for as long as RFC 2308 allows: the SOA's TTL, capped by its
MINIMUM field. Not kept: SERVFAIL, REFUSED and other errors, truncated answers, answers
with no TTL to go by, and anything that does not parse. Entries are bounded in count
and in bytes, and the oldest go first. TTLs are capped at `max_ttl`, so a poisoned or
mistaken upstream answer cannot live here for days.

The key is the question (lower-cased name, type, class) together with what changes the
answer: whether the client sent EDNS and asked for DNSSEC records (DO), and its RD and
CD bits. An answer built for an EDNS client carries an OPT record, which a client
without EDNS must never receive.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable

_HDR = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
_TTL = struct.Struct("!I")
T_SOA, T_OPT = 6, 41
NOERROR, NXDOMAIN = 0, 3
TC = 0x0200

MAX_ENTRIES = 4096
MAX_BYTES = 4 * 1024 * 1024
MAX_TTL = 3600
MAX_POINTERS = 16

Key = tuple[bytes, int, int, int, int]


class Unparsable(Exception):
    pass


def _skip_name(data: bytes, pos: int) -> int:
    """The position after the name at `pos` (pointers end it); bounded, strict."""
    n = len(data)
    for _ in range(128):
        if pos >= n:
            raise Unparsable("name runs past the end")
        length = data[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            if pos + 2 > n:
                raise Unparsable("pointer runs past the end")
            return pos + 2
        if length > 63:
            raise Unparsable("bad label length")
        pos += length + 1
    raise Unparsable("name has too many labels")


def ttl_fields(data: bytes) -> tuple[list[int], int, int]:
    """The TTL offsets of every record but OPT, the lowest TTL, and the answer's rcode.
    For a negative answer the lowest TTL is RFC 2308's: min(SOA TTL, SOA MINIMUM)."""
    if len(data) < 12:
        raise Unparsable("short header")
    _, flags, qd, an, ns, ar = _HDR.unpack_from(data)
    if qd != 1:
        raise Unparsable("not one question")
    rcode = flags & 0xF
    pos = _skip_name(data, 12) + 4
    offsets: list[int] = []
    lowest: int | None = None
    negative_ttl: int | None = None
    n = len(data)
    for i in range(an + ns + ar):
        pos = _skip_name(data, pos)
        if pos + 10 > n:
            raise Unparsable("record header past the end")
        rtype, _, ttl, rdlen = _RR.unpack_from(data, pos)
        end = pos + 10 + rdlen
        if end > n:
            raise Unparsable("rdata past the end")
        if rtype != T_OPT:
            offsets.append(pos + 4)
            if i < an:
                lowest = ttl if lowest is None else min(lowest, ttl)
            elif i < an + ns and rtype == T_SOA:
                rd = _skip_name(data, _skip_name(data, pos + 10))
                if rd + 20 > end:
                    raise Unparsable("short SOA")
                minimum = _TTL.unpack_from(data, rd + 16)[0]
                negative_ttl = min(ttl, minimum)
        pos = end
    if pos != n:
        raise Unparsable("trailing bytes")
    if an == 0 or rcode == NXDOMAIN:
        if negative_ttl is None:
            raise Unparsable("negative answer without an SOA")
        lowest = negative_ttl
    assert lowest is not None
    return offsets, lowest, rcode


class _Entry:
    __slots__ = ("data", "offsets", "ttls", "stored", "expires")

    def __init__(self, data: bytes, offsets: list[int], ttls: list[int], stored: float,
                 expires: float) -> None:
        self.data = data
        self.offsets = offsets
        self.ttls = ttls
        self.stored = stored
        self.expires = expires


class AnswerCache:
    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES,
                 max_ttl: int = MAX_TTL,
                 count: Callable[[str], None] | None = None) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_ttl = max_ttl
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self.bytes = 0
        self._count = count or (lambda _name: None)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def store(self, key: Key, answer: bytes, now: float) -> bool:
        """Keep an upstream's answer (its own id and question) if it may be kept."""
        if len(answer) < 12 or _HDR.unpack_from(answer)[1] & TC:
            return False
        try:
            offsets, lowest, rcode = ttl_fields(answer)
        except Unparsable:
            self._count("forward_cache_unparsable")
            return False
        if rcode not in (NOERROR, NXDOMAIN) or lowest <= 0:
            return False
        lifetime = min(lowest, self.max_ttl)
        if len(answer) > self.max_bytes:
            return False
        # A negative answer's SOA says how long the negation holds (RFC 2308 §5): its TTL
        # leaves as min(TTL, MINIMUM), aged, so clients downstream do not keep it longer.
        negative = rcode == NXDOMAIN or _HDR.unpack_from(answer)[3] == 0
        cap = lifetime if negative else self.max_ttl
        ttls = [min(_TTL.unpack_from(answer, o)[0], cap) for o in offsets]
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old.data)
        self._entries[key] = _Entry(answer, offsets, ttls, now, now + lifetime)
        self.bytes += len(answer)
        while self._entries and (len(self._entries) > self.max_entries
                                 or self.bytes > self.max_bytes):
            _, gone = self._entries.popitem(last=False)
            self.bytes -= len(gone.data)
            self._count("forward_cache_evicted")
        self._count("forward_cache_stored")
        return True

    def get(self, key: Key, now: float) -> bytes | None:
        """The kept answer with its TTLs lowered by its age, or None."""
        e = self._entries.get(key)
        if e is None:
            return None
        if now >= e.expires:
            del self._entries[key]
            self.bytes -= len(e.data)
            self._count("forward_cache_expired")
            return None
        age = int(now - e.stored)
        out = bytearray(e.data)
        pack = _TTL.pack_into
        for off, ttl in zip(e.offsets, e.ttls, strict=True):
            pack(out, off, ttl - age if ttl > age else 0)
        return bytes(out)
