"""Classic libpcap files: a writer for live captures and a small reader for tests and replay.

Classic pcap (not pcapng) because every tool reads it and it can be streamed: a fixed global
header followed by self-delimiting records, so `fabricd capture | tcpdump -r -` works live.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

MAGIC_US = 0xA1B2C3D4
MAGIC_NS = 0xA1B23C4D
PCAPNG_MAGIC = 0x0A0D0D0A
LINKTYPE_ETHERNET = 1
DEFAULT_SNAPLEN = 262144
GLOBAL_HEADER_LEN = 24
RECORD_HEADER_LEN = 16


def global_header(snaplen: int = DEFAULT_SNAPLEN, linktype: int = LINKTYPE_ETHERNET) -> bytes:
    """Little-endian, microsecond resolution: the most widely understood variant."""
    return struct.pack("<IHHiIII", MAGIC_US, 2, 4, 0, 0, snaplen, linktype)


def record(ts: float, frame: bytes, snaplen: int = DEFAULT_SNAPLEN) -> bytes:
    """One record; frames longer than snaplen are cut but keep their original length."""
    if ts < 0:
        raise ValueError(f"pcap timestamp must not be negative: {ts}")
    sec, usec = divmod(round(ts * 1_000_000), 1_000_000)
    data = bytes(frame[:snaplen])
    return struct.pack("<IIII", sec, usec, len(data), len(frame)) + data


def write_pcap(frames: Iterable[tuple[float, bytes]], snaplen: int = DEFAULT_SNAPLEN) -> bytes:
    """A whole file in memory, for tests and replay fixtures."""
    return global_header(snaplen) + b"".join(record(ts, f, snaplen) for ts, f in frames)


def _parse_global(data: bytes) -> tuple[str, float]:
    """Return (struct endianness, seconds per fraction unit), rejecting what we cannot replay."""
    if len(data) < GLOBAL_HEADER_LEN:
        raise ValueError(f"not a pcap file: {len(data)} bytes is shorter than the global header")
    for endian in ("<", ">"):
        (magic,) = struct.unpack_from(endian + "I", data)
        if magic in (MAGIC_US, MAGIC_NS):
            break
    else:
        (magic,) = struct.unpack_from("<I", data)
        if magic == PCAPNG_MAGIC:
            raise ValueError("pcapng is not supported; convert with: editcap -F pcap IN OUT")
        raise ValueError(f"not a pcap file: bad magic 0x{magic:08x}")
    major, _minor, _tz, _sigfigs, _snap, linktype = struct.unpack_from(endian + "HHiIII", data, 4)
    if major != 2:
        raise ValueError(f"unsupported pcap version {major}")
    if linktype & 0xFFFF != LINKTYPE_ETHERNET:
        raise ValueError(
            f"unsupported pcap link type {linktype & 0xFFFF}: only Ethernet (1) can be replayed"
        )
    return endian, (1e-6 if magic == MAGIC_US else 1e-9)


def read_pcap(data: bytes) -> list[tuple[float, bytes]]:
    """Parse a whole classic pcap (either byte order, us or ns) into (ts, frame) pairs."""
    endian, unit = _parse_global(data)
    out: list[tuple[float, bytes]] = []
    off = GLOBAL_HEADER_LEN
    fmt = endian + "IIII"
    while off < len(data):
        if len(data) - off < RECORD_HEADER_LEN:
            raise ValueError(f"truncated pcap: partial record header at offset {off}")
        sec, frac, incl, _orig = struct.unpack_from(fmt, data, off)
        off += RECORD_HEADER_LEN
        if len(data) - off < incl:
            raise ValueError(f"truncated pcap: record at offset {off - 16} needs {incl} bytes")
        out.append((sec + frac * unit, bytes(data[off : off + incl])))
        off += incl
    return out


class StreamSplitter:
    """Cuts a live pcap byte stream at record boundaries, so an interrupted capture never
    ends with half a record and the frame count can be reported."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._endian: str | None = None
        self.frames = 0

    def feed(self, data: bytes) -> bytes:
        """Return the complete units (global header, whole records) available so far."""
        self._buf += data
        out = bytearray()
        if self._endian is None:
            if len(self._buf) < GLOBAL_HEADER_LEN:
                return b""
            self._endian, _ = _parse_global(bytes(self._buf[:GLOBAL_HEADER_LEN]))
            out += self._buf[:GLOBAL_HEADER_LEN]
            del self._buf[:GLOBAL_HEADER_LEN]
        fmt = self._endian + "I"
        while len(self._buf) >= RECORD_HEADER_LEN:
            (incl,) = struct.unpack_from(fmt, self._buf, 8)
            size = RECORD_HEADER_LEN + incl
            if len(self._buf) < size:
                break
            out += self._buf[:size]
            del self._buf[:size]
            self.frames += 1
        return bytes(out)

    @property
    def pending(self) -> int:
        """Bytes held back because they do not yet form a whole record."""
        return len(self._buf)
