"""The virtio-net header that TAPs (IFF_VNET_HDR) and AF_PACKET (PACKET_VNET_HDR) put
in front of every frame, carrying GSO and checksum-offload metadata."""

from __future__ import annotations

import struct
from typing import NamedTuple

VNET_HDR_LEN = 10

F_NEEDS_CSUM = 1
F_DATA_VALID = 2

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

_HDR = struct.Struct("<BBHHHH")
ZERO_HDR = bytes(VNET_HDR_LEN)


class VnetHdr(NamedTuple):
    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int

    @classmethod
    def parse(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> VnetHdr:
        return cls(*_HDR.unpack_from(buf, offset))

    def pack(self) -> bytes:
        return _HDR.pack(*self)

    @property
    def gso(self) -> int:
        """The GSO kind without the ECN bit."""
        return self.gso_type & ~GSO_ECN

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & F_NEEDS_CSUM)


def pack(
    flags: int = 0,
    gso_type: int = GSO_NONE,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
) -> bytes:
    return _HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)
