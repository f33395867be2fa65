"""UdpRun: a flow's small datagrams gathered into one UDP GSO super-frame that segments
back into exactly the datagrams that went in (checked with the software segmenter, which
numbers and checksums segments as the kernel does)."""

from __future__ import annotations

import pytest

from fabric.net import checksum, gso, packets
from fabric.net.coalesce import UDP_RUN_MAX, UdpRun
from fabric.net.vnet import F_NEEDS_CSUM, GSO_UDP_L4, VnetHdr
from fabric.net.vnet import pack as vnet_pack

A, B = packets.ip_bytes("10.9.0.2"), packets.ip_bytes("10.9.0.3")
MAC_A, MAC_B = packets.mac_bytes("02:00:00:00:00:02"), packets.mac_bytes("02:00:00:00:00:03")
PORT = object()


def pod_frame(payload: bytes, ident: int, *, sport: int = 4000, ttl: int = 63,
              partial: bool = True) -> bytearray:
    """A datagram as a pod's stack sends it over a TAP with checksum offload: NEEDS_CSUM,
    the UDP checksum field holding the pseudo-header sum."""
    pkt = bytearray(packets.udp_packet(A, B, sport, 5201, payload, ttl=ttl, ident=ident))
    if partial:
        ps = checksum.pseudo_header_sum(A, B, 17, 8 + len(payload))
        pkt[26:28] = ps.to_bytes(2, "big")
        hdr = vnet_pack(F_NEEDS_CSUM, 0, 0, 0, 34, 6)
    else:
        hdr = bytes(10)
    return bytearray(hdr + packets.eth_header(MAC_B, MAC_A, packets.ETH_P_IP) + pkt)


def completed(frame: bytes) -> bytes:
    """The Ethernet frame with its UDP checksum finished (what the kernel delivers)."""
    f = bytearray(frame[10:])
    gso.complete_checksum(f, 34, 6)
    return bytes(f)


def gather(frames: list[bytearray]) -> tuple[UdpRun, list[bytearray]]:
    """Feed frames as the data plane does; returns the run and the frames written."""
    run = UdpRun()
    written: list[bytearray] = []
    for f in frames:
        if run.count and run.extend(f, len(f)):
            continue
        if run.count:
            written.append(run.take())
        if not run.start(PORT, f, len(f)):
            written.append(bytearray(f))
    if run.count:
        written.append(run.take())
    return run, written


def test_a_run_segments_back_into_its_datagrams() -> None:
    frames = [pod_frame(bytes([i]) * 64, 100 + i) for i in range(7)]
    frames.append(pod_frame(b"end", 107))  # the last may be shorter
    _, written = gather(frames)
    assert len(written) == 1
    sup = written[0]
    hdr = VnetHdr.parse(sup)
    assert (hdr.flags, hdr.gso_type, hdr.gso_size, hdr.csum_start, hdr.csum_offset) == (
        F_NEEDS_CSUM, GSO_UDP_L4, 64, 34, 6)
    assert checksum.verify(sup[24:44])  # the IPv4 header checksum covers the new length
    # The partial sum is the pseudo-header's with the super-frame's UDP length.
    ulen = len(sup) - 44
    assert sup[50] << 8 | sup[51] == checksum.pseudo_header_sum(A, B, 17, ulen)
    segs = gso.segment(memoryview(sup)[10:], hdr)
    assert segs == [completed(f) for f in frames]


def test_a_run_of_one_is_written_as_it_came() -> None:
    f = pod_frame(b"x" * 64, 5)
    _, written = gather([f])
    assert written == [f]


@pytest.mark.parametrize("change", ["sport", "ident", "ttl", "bigger", "after_short",
                                    "full_checksum"])
def test_what_does_not_continue_a_run_starts_another(change: str) -> None:
    first = pod_frame(b"a" * 64, 1)
    second = {
        "sport": pod_frame(b"b" * 64, 2, sport=4001),
        "ident": pod_frame(b"b" * 64, 3),
        "ttl": pod_frame(b"b" * 64, 2, ttl=62),
        "bigger": pod_frame(b"b" * 65, 2),
        "after_short": pod_frame(b"b" * 64, 3),
        "full_checksum": pod_frame(b"b" * 64, 2, partial=False),
    }[change]
    frames = [first, second]
    if change == "after_short":
        frames = [first, pod_frame(b"s", 2), second]
    _, written = gather(frames)
    assert len(written) == 2
    segs = [s for w in written for s in (
        gso.segment(memoryview(w)[10:], VnetHdr.parse(w)) if w[1] == GSO_UDP_L4
        else [completed(w) if w[0] else bytes(w[10:])])]
    assert segs == [completed(f) if f[0] else bytes(f[10:]) for f in frames]


def test_fragments_options_and_padding_are_never_gathered() -> None:
    frag = pod_frame(b"a" * 64, 1)
    frag[30] |= 0x20  # MF
    padded = pod_frame(b"a" * 64, 1) + b"\0\0"
    options = pod_frame(b"a" * 64, 1)
    options[24] = 0x46
    run = UdpRun()
    for f in (frag, padded, options):
        assert not run.start(PORT, f, len(f))


def test_a_run_stops_at_its_bound() -> None:
    frames = [pod_frame(b"z" * 64, i) for i in range(UDP_RUN_MAX + 3)]
    _, written = gather(frames)
    assert len(written) == 2
    assert (len(written[0]) - 52) // 64 == UDP_RUN_MAX
