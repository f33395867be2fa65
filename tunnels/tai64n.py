"""TAI64N timestamps: the initiation payload that makes replayed initiations detectable.

Twelve bytes, big-endian as TAI64N defines it (so byte strings compare like the times
they encode): 8 bytes of seconds with the TAI64 label 2^62 + 10 added, then 4 bytes of
nanoseconds.
"""

from __future__ import annotations

import struct

TAI64N_LEN = 12
_BASE = (1 << 62) + 10
_PACK = struct.Struct(">QI")


def encode(seconds: float) -> bytes:
    """The TAI64N stamp of a Unix time in seconds (negative times clamp to the epoch)."""
    if seconds < 0:
        seconds = 0.0
    whole = int(seconds)
    nanos = int((seconds - whole) * 1e9)
    if nanos > 999_999_999:
        nanos = 999_999_999
    return _PACK.pack(_BASE + whole, nanos)


def decode(stamp: bytes) -> float:
    """Back to Unix seconds; only for display and tests."""
    secs, nanos = _PACK.unpack(stamp)
    return (secs - _BASE) + nanos / 1e9


def after(stamp: bytes) -> bytes:
    """The smallest stamp strictly later than ``stamp`` (one nanosecond on)."""
    secs, nanos = _PACK.unpack(stamp)
    nanos += 1
    if nanos > 999_999_999:
        secs, nanos = secs + 1, 0
    return _PACK.pack(secs, nanos)
