"""fabric.net.checksum against a naive word-by-word reference and against scapy."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, in4_chksum
from scapy.utils import checksum as scapy_checksum

from fabric.net import checksum

# --- the reference ----------------------------------------------------------------------


def naive_sum(data: bytes) -> int:
    """RFC 1071 one's complement sum, one 16-bit word at a time, end-around carry."""
    data = bytes(data)
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += data[i] << 8 | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


def naive_checksum(data: bytes, initial: int = 0) -> int:
    s = naive_sum(data) + initial
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip_header(ttl: int, ident: int, proto: int = 6, src: bytes = b"\x0a\x00\x00\x02",
              dst: bytes = b"\x0a\x00\x00\x03", tos: int = 0, total: int = 84) -> bytearray:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, tos, total, ident, 0x4000, ttl, proto,
                                0, src, dst))
    hdr[10:12] = naive_checksum(hdr).to_bytes(2, "big")
    return hdr


# --- ones_sum / checksum ----------------------------------------------------------------


def test_rfc1071_example() -> None:
    # RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert checksum.ones_sum(data) == 0xDDF2
    assert checksum.checksum(data) == 0x220D
    assert naive_sum(data) == 0xDDF2


def test_zero_and_negative_zero() -> None:
    assert checksum.ones_sum(b"") == 0
    assert checksum.ones_sum(b"\0" * 7) == 0
    assert checksum.checksum(b"\0\0") == 0xFFFF
    # Non-zero data summing to a multiple of 0xFFFF is negative zero, not 0.
    assert checksum.ones_sum(b"\xff\xff") == 0xFFFF
    assert checksum.ones_sum(b"\x80\x00\x7f\xff") == 0xFFFF
    assert checksum.checksum(b"\x80\x00\x7f\xff") == 0
    assert checksum.ones_sum(b"\xff\xff\xff\xff\x00\x01") == 1


def test_odd_length_pads_with_zero() -> None:
    assert checksum.ones_sum(b"\x12") == 0x1200
    assert checksum.ones_sum(b"\x12\x34\x56") == 0x1234 + 0x5600
    assert checksum.ones_sum(memoryview(b"\x12\x34\x56")) == 0x6834
    assert checksum.ones_sum(bytearray(b"\xff\xff\x01")) == 0x0100


@given(st.binary(max_size=3000))
def test_ones_sum_matches_naive(data: bytes) -> None:
    assert checksum.ones_sum(data) == naive_sum(data)
    assert checksum.ones_sum(bytearray(data)) == naive_sum(data)
    assert checksum.ones_sum(memoryview(data)) == naive_sum(data)


@given(st.binary(max_size=3000), st.integers(0, 0xFFFF))
def test_checksum_matches_naive(data: bytes, initial: int) -> None:
    assert checksum.checksum(data, initial) == naive_checksum(data, initial)


@given(st.binary(max_size=3000))
def test_checksum_matches_scapy(data: bytes) -> None:
    assert checksum.checksum(data) == scapy_checksum(data)


@given(st.binary(min_size=1, max_size=200))
def test_verify_after_inserting_checksum(data: bytes) -> None:
    buf = bytearray(b"\0\0" + data)
    buf[0:2] = checksum.checksum(buf).to_bytes(2, "big")
    assert checksum.verify(buf)
    assert checksum.ones_sum(buf) == 0xFFFF
    buf[0] ^= 0x01
    assert not checksum.verify(buf)


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_add_is_ones_complement_addition(a: int, b: int) -> None:
    s = a + b
    expected = (s & 0xFFFF) + (s >> 16)
    assert checksum.add(a, b) == expected
    assert checksum.add(a, b) == checksum.add(b, a)
    assert 0 <= checksum.add(a, b) <= 0xFFFF


def test_add_edges() -> None:
    assert checksum.add(0xFFFF, 0xFFFF) == 0xFFFF
    assert checksum.add(0xFFFF, 1) == 1
    assert checksum.add(0x8000, 0x8000) == 1
    assert checksum.add(0, 0) == 0


# --- pseudo-header and L4 checksums vs scapy --------------------------------------------


@given(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4),
       st.sampled_from([6, 17]), st.integers(0, 0xFFFF))
def test_pseudo_header_sum_matches_naive(src: bytes, dst: bytes, proto: int,
                                         length: int) -> None:
    ph = src + dst + struct.pack("!BBH", 0, proto, length)
    assert checksum.pseudo_header_sum(src, dst, proto, length) == naive_sum(ph)


@given(st.binary(max_size=1500), st.integers(1, 0xFFFF), st.integers(1, 0xFFFF))
@settings(max_examples=60)
def test_tcp_and_udp_checksums_match_scapy(payload: bytes, sport: int, dport: int) -> None:
    src, dst = "10.1.2.3", "10.200.0.77"
    for l4 in (TCP(sport=sport, dport=dport, seq=12345, flags="PA"), UDP(sport=sport,
                                                                          dport=dport)):
        pkt = IP(bytes(IP(src=src, dst=dst) / l4 / payload))
        seg = bytearray(bytes(pkt.payload))
        field = 16 if pkt.proto == 6 else 6
        scapy_value = int.from_bytes(seg[field:field + 2], "big")
        seg[field:field + 2] = b"\0\0"
        psum = checksum.pseudo_header_sum(bytes([10, 1, 2, 3]), bytes([10, 200, 0, 77]),
                                          pkt.proto, len(seg))
        ours = checksum.checksum(seg, psum)
        if pkt.proto == 17 and ours == 0:
            ours = 0xFFFF
        assert ours == scapy_value
        assert ours == in4_chksum(pkt.proto, pkt, bytes(seg)) or (pkt.proto == 17
                                                                   and ours == 0xFFFF)


# --- incremental updates -----------------------------------------------------------------


@given(st.binary(min_size=20, max_size=120).filter(lambda b: len(b) % 2 == 0),
       st.data())
def test_adjust_matches_recompute(data: bytes, draw: st.DataObject) -> None:
    buf = bytearray(data)
    buf[0:2] = b"\0\0"
    buf[2] |= 0x45  # never all zero, like any real header (there +0 and -0 differ)
    buf[0:2] = checksum.checksum(buf).to_bytes(2, "big")
    check = int.from_bytes(buf[0:2], "big")
    # Change an aligned run of 2..8 bytes somewhere after the checksum and version.
    start = draw.draw(st.integers(2, len(buf) // 2 - 1)) * 2
    length = draw.draw(st.sampled_from([2, 4, 6, 8]))
    length = min(length, len(buf) - start)
    new = draw.draw(st.binary(min_size=length, max_size=length))
    old = bytes(buf[start:start + length])
    buf[start:start + length] = new
    buf[0:2] = b"\0\0"
    expected = checksum.checksum(buf)
    assert checksum.adjust(check, old, new) == expected


@given(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4),
       st.binary(min_size=4, max_size=4), st.integers(0, 65535), st.sampled_from([6, 17]))
def test_adjust_partial_matches_recompute(src: bytes, dst: bytes, new_src: bytes,
                                          length: int, proto: int) -> None:
    psum = checksum.pseudo_header_sum(src, dst, proto, length)
    expected = checksum.pseudo_header_sum(new_src, dst, proto, length)
    assert checksum.adjust_partial(psum, src, new_src) == expected
    # Both addresses at once (a NAT rewriting src and dst).
    expected2 = checksum.pseudo_header_sum(new_src, src, proto, length)
    assert checksum.adjust_partial(psum, src + dst, new_src + src) == expected2


def test_adjust_partial_then_complete_equals_full_checksum() -> None:
    src, dst, nsrc = bytes([10, 0, 0, 2]), bytes([10, 0, 0, 3]), bytes([192, 168, 7, 9])
    seg = bytearray(struct.pack("!HHIIBBHHH", 1234, 80, 1, 2, 0x50, 0x18, 512, 0, 0) + b"xyz")
    psum = checksum.pseudo_header_sum(src, dst, 6, len(seg))
    psum = checksum.adjust_partial(psum, src, nsrc)
    seg[16:18] = psum.to_bytes(2, "big")
    full = ~checksum.ones_sum(seg) & 0xFFFF
    seg[16:18] = b"\0\0"
    assert full == checksum.checksum(seg, checksum.pseudo_header_sum(nsrc, dst, 6, len(seg)))


def test_adjust_known_nat_rewrite() -> None:
    hdr = ip_header(64, 0x1234)
    check = int.from_bytes(hdr[10:12], "big")
    new_src = bytes([172, 16, 9, 1])
    new = ip_header(64, 0x1234, src=new_src)
    assert checksum.adjust(check, bytes(hdr[12:16]), new_src) == int.from_bytes(new[10:12],
                                                                                  "big")


# --- TTL decrement ------------------------------------------------------------------------


def _recomputed_after_decrement(hdr: bytearray) -> int:
    h = bytearray(hdr)
    h[8] -= 1
    h[10:12] = b"\0\0"
    return naive_checksum(h)


def test_ttl_decrement_every_checksum_value() -> None:
    # Varying the IP id walks the stored checksum through every value a computed checksum
    # can take (all but 0xFFFF); for each, the incremental result must equal a full
    # recomputation of the decremented header, bit for bit.
    seen = set()
    for ttl in (2, 64, 255):
        hdr = ip_header(ttl, 0)
        for ident in range(0x10000):
            hdr[4] = ident >> 8
            hdr[5] = ident & 0xFF
            hdr[10] = hdr[11] = 0
            c = naive_checksum(hdr)
            hdr[8] = ttl - 1
            expected = naive_checksum(hdr)
            hdr[8] = ttl
            assert checksum.ttl_decrement_check(c) == expected, (ttl, ident, hex(c))
            seen.add(c)
    assert len(seen) == 0xFFFF and 0xFFFF not in seen


@pytest.mark.parametrize("ttl", [2, 3, 17, 64, 128, 255])
@pytest.mark.parametrize("ident", [0, 1, 0x00FF, 0x7FFF, 0xBEEF, 0xFFFF])
def test_ttl_decrement_matches_recompute(ttl: int, ident: int) -> None:
    hdr = ip_header(ttl, ident)
    check = int.from_bytes(hdr[10:12], "big")
    assert checksum.ttl_decrement_check(check) == _recomputed_after_decrement(hdr)


def test_ttl_decrement_0xffff_edge() -> None:
    # A header whose other fields sum to negative zero has two valid checksums, 0x0000 (the
    # computed one) and 0xFFFF (also verifies). Both must decrement to a valid header.
    hdr = ip_header(64, 0)
    for ident in range(0x10000):
        hdr[4:6] = ident.to_bytes(2, "big")
        hdr[10:12] = b"\0\0"
        if naive_checksum(hdr) == 0:
            break
    else:
        raise AssertionError("no ident gives a zero checksum")
    for stored in (0x0000, 0xFFFF):
        h = bytearray(hdr)
        h[10:12] = stored.to_bytes(2, "big")
        assert checksum.verify(h)
        new = checksum.ttl_decrement_check(stored)
        h[8] -= 1
        h[10:12] = new.to_bytes(2, "big")
        assert checksum.verify(h), hex(stored)
        assert new == _recomputed_after_decrement(hdr) == 0x0100
    # The carry cases: 0xFEFF + 0x0100 is negative zero, stored as 0x0000 like Linux does.
    assert checksum.ttl_decrement_check(0xFEFF) == 0x0000
    assert checksum.ttl_decrement_check(0xFF00) == 0x0001
    assert checksum.ttl_decrement_check(0xFFFE) == 0x00FF
    assert checksum.ttl_decrement_check(0x0000) == 0x0100


@given(st.integers(2, 255), st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4),
       st.integers(0, 0xFFFF), st.integers(0, 255), st.integers(0, 255))
def test_ttl_decrement_random_headers(ttl: int, src: bytes, dst: bytes, ident: int, tos: int,
                                      proto: int) -> None:
    hdr = ip_header(ttl, ident, proto=proto, src=src, dst=dst, tos=tos)
    check = int.from_bytes(hdr[10:12], "big")
    assert checksum.ttl_decrement_check(check) == _recomputed_after_decrement(hdr)
    # And against scapy's own computation of the decremented header.
    pkt = IP(bytes(hdr))
    pkt.ttl -= 1
    del pkt.chksum
    assert checksum.ttl_decrement_check(check) == IP(bytes(pkt)).chksum
