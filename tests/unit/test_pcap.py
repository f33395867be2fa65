"""pcap writer/reader: round trips, foreign variants (ns, big-endian), and clear failures."""

from __future__ import annotations

import struct

import pytest

from fabric.net.pcap import (
    StreamSplitter,
    global_header,
    read_pcap,
    record,
    write_pcap,
)

FRAMES = [(1700000000.123456, b"\x00" * 14 + b"hello"), (1700000001.0, b"\xff" * 1514)]


def test_round_trip() -> None:
    assert read_pcap(write_pcap(FRAMES)) == FRAMES


def test_header_layout() -> None:
    hdr = global_header()
    assert len(hdr) == 24
    assert struct.unpack("<IHHiIII", hdr) == (0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)


def test_snaplen_truncates_but_keeps_original_length() -> None:
    rec = record(1.0, b"x" * 100, snaplen=10)
    assert struct.unpack_from("<IIII", rec) == (1, 0, 10, 100)
    assert rec[16:] == b"x" * 10


def test_timestamp_rounding_carries() -> None:
    rec = record(5.9999999, b"")
    assert struct.unpack_from("<II", rec) == (6, 0)
    with pytest.raises(ValueError):
        record(-1.0, b"")


def _foreign(endian: str, magic: int, frac: int, linktype: int = 1) -> bytes:
    hdr = struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)
    return hdr + struct.pack(endian + "IIII", 7, frac, 3, 3) + b"abc"


@pytest.mark.parametrize("endian", ["<", ">"])
def test_nanosecond_and_big_endian(endian: str) -> None:
    assert read_pcap(_foreign(endian, 0xA1B23C4D, 500_000_000)) == [(7.5, b"abc")]
    assert read_pcap(_foreign(endian, 0xA1B2C3D4, 250_000)) == [(7.25, b"abc")]


def test_rejects_other_link_types() -> None:
    with pytest.raises(ValueError, match="link type 101"):
        read_pcap(_foreign("<", 0xA1B2C3D4, 0, linktype=101))


def test_rejects_garbage_pcapng_and_truncation() -> None:
    with pytest.raises(ValueError, match="bad magic"):
        read_pcap(b"\x00" * 24)
    with pytest.raises(ValueError, match="pcapng"):
        read_pcap(struct.pack("<I", 0x0A0D0D0A) + b"\x00" * 28)
    with pytest.raises(ValueError, match="shorter"):
        read_pcap(b"\xd4\xc3")
    data = write_pcap(FRAMES)
    with pytest.raises(ValueError, match="truncated"):
        read_pcap(data[:-1])
    with pytest.raises(ValueError, match="truncated"):
        read_pcap(data[:30])


def test_scapy_reads_our_files(tmp_path: object) -> None:
    from scapy.utils import RawPcapReader

    path = f"{tmp_path}/x.pcap"
    with open(path, "wb") as f:
        f.write(write_pcap(FRAMES))
    with RawPcapReader(path) as reader:
        got = [(meta.sec + meta.usec / 1e6, data) for data, meta in reader]
    assert [d for _, d in got] == [f for _, f in FRAMES]
    assert got[0][0] == pytest.approx(FRAMES[0][0], abs=1e-6)


def test_stream_splitter_only_emits_whole_records() -> None:
    data = write_pcap(FRAMES)
    splitter = StreamSplitter()
    out = b""
    for i in range(0, len(data), 7):
        piece = splitter.feed(data[i : i + 7])
        out += piece
        assert len(out) in (0, 24, 24 + 16 + 19, len(data))
    assert out == data
    assert splitter.frames == 2
    assert splitter.pending == 0
