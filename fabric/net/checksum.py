"""Internet checksums (RFC 1071), incremental updates (RFC 1624) and partial sums.

The one's complement sum of 16-bit words equals the buffer read as one big-endian
integer modulo 0xFFFF (because 2**16 == 1 mod 0xFFFF), which CPython computes in C:
a 64 KiB super-frame sums in microseconds instead of milliseconds.
"""

from __future__ import annotations

_from_bytes = int.from_bytes


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """One's complement sum of `data` as 16-bit big-endian words, folded to 16 bits.

    Returns 0xFFFF (negative zero) rather than 0 for non-zero input, as real
    end-around-carry addition does.
    """
    if len(data) & 1:
        data = bytes(data) + b"\0"
    n = _from_bytes(data, "big")
    if n == 0:
        return 0
    s = n % 0xFFFF
    return s if s else 0xFFFF


def add(a: int, b: int) -> int:
    """One's complement addition of two 16-bit values."""
    s = a + b
    s = (s & 0xFFFF) + (s >> 16)
    return (s & 0xFFFF) + (s >> 16)


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum (complement of the sum) of `data` plus a prior partial sum."""
    return ~add(ones_sum(data), initial) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Sum of the IPv4 pseudo-header used by TCP and UDP (not complemented)."""
    return ones_sum(src + dst + bytes((0, proto, length >> 8, length & 0xFF)))


def adjust(check: int, old: bytes, new: bytes) -> int:
    """Update a stored (complemented) checksum when `old` bytes become `new` (RFC 1624, eq. 3).

    `old` and `new` must have the same even length and sit at the same 16-bit alignment.
    """
    s = add(~check & 0xFFFF, ~ones_sum(old) & 0xFFFF)
    s = add(s, ones_sum(new))
    return ~s & 0xFFFF


def adjust_partial(psum: int, old: bytes, new: bytes) -> int:
    """Update a partial checksum (the uncomplemented pseudo-header sum a NEEDS_CSUM frame
    carries in its checksum field) when pseudo-header bytes change: plain one's complement
    arithmetic, no complement of the stored value."""
    s = add(psum, ~ones_sum(old) & 0xFFFF)
    s = add(s, ones_sum(new))
    # A partial sum of 0xFFFF and 0 are the same number; the kernel stores the folded form.
    return s


def verify(data: bytes | bytearray | memoryview) -> bool:
    """True when a header including its checksum field sums to negative zero."""
    return ones_sum(data) == 0xFFFF


def ttl_decrement_check(check: int) -> int:
    """New IPv4 header checksum after TTL is decremented by one (as Linux ip_decrease_ttl)."""
    check += 0x0100
    return (check + (check >= 0xFFFF)) & 0xFFFF
