"""fabric.net.packets: builders and parsers checked against scapy's view of the same bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, defragment
from scapy.layers.l2 import ARP, Ether

from fabric.net import checksum, packets
from fabric.net.packets import IPv4, Malformed

A = bytes([10, 0, 0, 2])
B = bytes([10, 0, 0, 3])
MAC_A = bytes.fromhex("0200000000aa")
MAC_B = bytes.fromhex("0200000000bb")

# Router alert (copied), record route (not copied), NOP, LSRR (copied), EOL: 20 bytes.
OPTS = bytes([0x94, 4, 0, 0, 0x07, 7, 4, 10, 0, 0, 1, 1, 0x83, 7, 4, 1, 2, 3, 4, 0])
COPIED = bytes([0x94, 4, 0, 0, 0x83, 7, 4, 1, 2, 3, 4, 0])


def rebuilt(pkt):
    """Scapy's own serialisation of a parsed packet with every checksum recomputed."""
    pkt = pkt.copy()
    for layer in (IP, TCP, UDP, ICMP):
        if layer in pkt:
            del pkt[layer].chksum
    return bytes(pkt)


# --- addresses --------------------------------------------------------------------------


def test_mac_and_ip_conversions() -> None:
    assert packets.mac_bytes("02:fb:00:00:00:01") == b"\x02\xfb\x00\x00\x00\x01"
    assert packets.mac_str(b"\x02\xfb\x00\x00\x00\x01") == "02:fb:00:00:00:01"
    assert packets.mac_bytes("FF:ff:0:1:2:3") == b"\xff\xff\x00\x01\x02\x03"
    with pytest.raises(ValueError):
        packets.mac_bytes("02:fb:00:00:00")
    with pytest.raises(ValueError):
        packets.mac_bytes("02:fb:00:00:00:zz")
    assert packets.ip_bytes("10.1.2.3") == b"\x0a\x01\x02\x03"
    assert packets.ip_str(b"\x0a\x01\x02\x03") == "10.1.2.3"
    with pytest.raises(ValueError):
        packets.ip_bytes("10.1.2.256")


# --- Ethernet and ARP -------------------------------------------------------------------


def test_ethernet_parse_and_build() -> None:
    frame = bytes(Ether(dst="02:00:00:00:00:bb", src="02:00:00:00:00:aa", type=0x0800))
    eth = packets.Ethernet.parse(frame)
    assert (eth.dst, eth.src, eth.ethertype) == (MAC_B, MAC_A, 0x0800)
    assert packets.eth_header(MAC_B, MAC_A, 0x0800) == frame
    assert packets.Ethernet.parse(memoryview(frame + b"xx")) == eth
    with pytest.raises(Malformed):
        packets.Ethernet.parse(frame[:13])


@pytest.mark.parametrize("op", [packets.ARP_REQUEST, packets.ARP_REPLY])
def test_arp_frame_matches_scapy(op: int) -> None:
    ours = packets.arp_frame(op, MAC_A, A, MAC_B if op == 2 else bytes(6), B,
                             packets.BROADCAST_MAC if op == 1 else MAC_B)
    theirs = Ether(dst="ff:ff:ff:ff:ff:ff" if op == 1 else "02:00:00:00:00:bb",
                   src="02:00:00:00:00:aa") / ARP(
        op=op, hwsrc="02:00:00:00:00:aa", psrc="10.0.0.2",
        hwdst="02:00:00:00:00:bb" if op == 2 else "00:00:00:00:00:00", pdst="10.0.0.3")
    assert ours == bytes(theirs)
    arp = packets.Arp.parse(ours[14:])
    assert arp == packets.Arp(op, MAC_A, A, MAC_B if op == 2 else bytes(6), B)


def test_arp_parse_scapy_built_and_padded() -> None:
    frame = bytes(Ether() / ARP(op=2, hwsrc="02:11:22:33:44:55", psrc="192.168.9.1",
                                hwdst="02:00:00:00:00:01", pdst="192.168.9.2"))
    frame += bytes(18)  # Ethernet minimum-size padding
    arp = packets.Arp.parse(memoryview(frame)[14:])
    assert arp.op == 2
    assert arp.sha == bytes.fromhex("021122334455")
    assert arp.spa == bytes([192, 168, 9, 1])
    assert arp.tha == bytes.fromhex("020000000001")
    assert arp.tpa == bytes([192, 168, 9, 2])


@pytest.mark.parametrize("field,value", [("hwtype", 6), ("ptype", 0x86DD), ("hwlen", 8),
                                         ("plen", 16)])
def test_arp_parse_rejects_non_ethernet_ipv4(field: str, value: int) -> None:
    pkt = ARP(op=1, psrc="10.0.0.2", pdst="10.0.0.3")
    setattr(pkt, field, value)
    raw = bytes(pkt)
    with pytest.raises(Malformed):
        packets.Arp.parse(raw)


def test_arp_parse_short() -> None:
    raw = bytes(ARP(op=1, psrc="10.0.0.2", pdst="10.0.0.3"))
    assert len(raw) == 28
    packets.Arp.parse(raw)
    with pytest.raises(Malformed):
        packets.Arp.parse(raw[:27])


# --- IPv4 header ------------------------------------------------------------------------


@given(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4),
       st.integers(0, 255), st.integers(0, 1480), st.integers(1, 255), st.integers(0, 0xFFFF),
       st.integers(0, 0xFFFF), st.integers(0, 255),
       st.binary(max_size=40).map(lambda b: b[: len(b) // 4 * 4]))
def test_ipv4_header_matches_scapy(src: bytes, dst: bytes, proto: int, plen: int, ttl: int,
                                   ident: int, ff: int, tos: int, options: bytes) -> None:
    hdr = packets.ipv4_header(src, dst, proto, plen, ttl=ttl, ident=ident, flags_frag=ff,
                              tos=tos, options=options)
    assert len(hdr) == 20 + len(options)
    assert checksum.verify(hdr)
    pkt = IP(hdr + bytes(plen))
    assert pkt.version == 4 and pkt.ihl * 4 == len(hdr)
    assert pkt.len == len(hdr) + plen
    assert (pkt.ttl, pkt.id, pkt.proto, pkt.tos) == (ttl, ident, proto, tos)
    assert int(pkt.flags) << 13 | pkt.frag == ff
    assert pkt.src == packets.ip_str(src) and pkt.dst == packets.ip_str(dst)
    assert hdr[20:] == options
    # scapy recomputes the checksum and gets the same header back.
    pkt2 = IP(hdr)
    del pkt2.chksum
    assert bytes(pkt2)[:len(hdr)] == hdr
    parsed = IPv4.parse(hdr + bytes(plen))
    assert parsed == IPv4(len(hdr), tos, len(hdr) + plen, ident, ff, ttl, proto, pkt.chksum,
                          src, dst)


def test_ipv4_header_rejects_unpadded_options() -> None:
    with pytest.raises(ValueError):
        packets.ipv4_header(A, B, 6, 0, options=b"\x01\x01\x01")


def test_ipv4_parse_scapy_packet_and_flags() -> None:
    raw = bytes(IP(src="10.0.0.2", dst="10.0.0.3", ttl=9, id=77, flags="MF", frag=100,
                   tos=0xB8) / UDP(sport=1, dport=2) / b"abc")
    ip = IPv4.parse(raw + b"\0" * 10)  # trailing Ethernet padding is allowed
    assert ip.ihl == 20 and ip.total_length == len(raw) and ip.ttl == 9 and ip.ident == 77
    assert ip.proto == 17 and ip.tos == 0xB8 and ip.src == A and ip.dst == B
    assert ip.more_fragments and not ip.df and ip.frag_offset == 800 and ip.is_fragment
    assert ip.check == IP(raw).chksum
    df = IPv4.parse(bytes(IP(flags="DF", src="1.2.3.4", dst="5.6.7.8")))
    assert df.df and not df.more_fragments and not df.is_fragment and df.frag_offset == 0
    last = IPv4.parse(bytes(IP(frag=3, src="1.2.3.4", dst="5.6.7.8")))
    assert last.is_fragment and not last.more_fragments and last.frag_offset == 24


@pytest.mark.parametrize("mutate", [
    lambda b: b[:19],                                   # short
    lambda b: bytes([0x65]) + b[1:],                    # version 6
    lambda b: bytes([0x44]) + b[1:],                    # ihl 16 bytes
    lambda b: bytes([0x46]) + b[1:20],                  # ihl 24 but only 20 bytes
    lambda b: b[:2] + struct.pack("!H", 19) + b[4:],    # total < ihl
    lambda b: b[:2] + struct.pack("!H", len(b) + 1) + b[4:],  # total > buffer
])
def test_ipv4_parse_malformed(mutate) -> None:
    raw = bytes(IP(src="10.0.0.2", dst="10.0.0.3") / b"0123456789")
    IPv4.parse(raw)
    with pytest.raises(Malformed):
        IPv4.parse(mutate(raw))


# --- L4 builders ------------------------------------------------------------------------


@given(st.binary(max_size=600), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
       st.integers(1, 255), st.integers(0, 0xFFFF))
@settings(max_examples=50)
def test_udp_packet_matches_scapy(payload: bytes, sport: int, dport: int, ttl: int,
                                  ident: int) -> None:
    raw = packets.udp_packet(A, B, sport, dport, payload, ttl=ttl, ident=ident)
    pkt = IP(raw)
    assert rebuilt(pkt) == raw
    assert pkt.flags == "DF" and pkt.ttl == ttl and pkt.id == ident
    assert (pkt[UDP].sport, pkt[UDP].dport, pkt[UDP].len) == (sport, dport, 8 + len(payload))
    assert bytes(pkt[UDP].payload) == payload
    assert raw == bytes(IP(src="10.0.0.2", dst="10.0.0.3", ttl=ttl, id=ident, flags="DF")
                        / UDP(sport=sport, dport=dport) / payload)


def test_udp_checksum_zero_is_sent_as_ffff() -> None:
    # Choose the last two payload bytes so the sum is negative zero: the computed
    # checksum is then 0, which UDP must send as 0xFFFF (0 means "no checksum").
    base = packets.udp_packet(A, B, 1000, 2000, b"\0\0")
    seg = bytearray(base[20:])
    seg[6:8] = b"\0\0"
    s = checksum.add(checksum.ones_sum(seg),
                     checksum.pseudo_header_sum(A, B, packets.PROTO_UDP, len(seg)))
    filler = (~s & 0xFFFF).to_bytes(2, "big")
    raw = packets.udp_packet(A, B, 1000, 2000, filler)
    assert raw[26:28] == b"\xff\xff"
    seg = bytearray(raw[20:])
    seg[6:8] = b"\0\0"
    assert packets.l4_checksum(A, B, packets.PROTO_UDP, seg) == 0xFFFF
    assert IP(raw)[UDP].chksum == 0xFFFF
    assert rebuilt(IP(raw)) == raw  # scapy also sends 0xFFFF


@given(st.binary(max_size=600), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF),
       st.integers(0, 0xFF), st.sampled_from([b"", b"\x02\x04\x05\xb4",
                                               b"\x01\x01\x08\x0a" + bytes(range(8))]))
@settings(max_examples=50)
def test_tcp_packet_matches_scapy(payload: bytes, seq: int, ack: int, flags: int,
                                  options: bytes) -> None:
    raw = packets.tcp_packet(A, B, 40000, 80, seq, ack, flags, payload, window=1234,
                             options=options, ident=5)
    pkt = IP(raw)
    assert rebuilt(pkt) == raw
    tcp = pkt[TCP]
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack, int(tcp.flags), tcp.window) == (
        40000, 80, seq, ack, flags, 1234)
    assert tcp.dataofs * 4 == 20 + len(options)
    assert bytes(tcp.payload) == payload
    assert pkt.flags == "DF" and pkt.id == 5 and pkt.len == len(raw)


def test_tcp_packet_rejects_unpadded_options() -> None:
    with pytest.raises(ValueError):
        packets.tcp_packet(A, B, 1, 2, 0, 0, packets.TCP_SYN, options=b"\x02\x04\x05")


@pytest.mark.parametrize("reply", [False, True])
def test_icmp_echo_matches_scapy(reply: bool) -> None:
    raw = packets.icmp_echo(A, B, 0x1234, 7, b"ping payload!", reply=reply, ttl=33)
    expected = IP(src="10.0.0.2", dst="10.0.0.3", ttl=33, id=0) / ICMP(
        type=0 if reply else 8, id=0x1234, seq=7) / b"ping payload!"
    assert raw == bytes(expected)
    assert rebuilt(IP(raw)) == raw


def test_icmp_message_checksum() -> None:
    msg = packets.icmp_message(3, 1, 0, b"odd")
    assert checksum.verify(msg)
    assert msg[:2] == b"\x03\x01" and msg[4:8] == b"\0\0\0\0" and msg[8:] == b"odd"


def test_icmp_error_quotes_header_and_8_bytes() -> None:
    offending = packets.udp_packet(A, B, 5353, 53, b"x" * 100, ttl=1, ident=99)
    gw = bytes([10, 0, 0, 1])
    raw = packets.icmp_error(gw, offending, packets.ICMP_TIME_EXCEEDED, 0)
    pkt = IP(raw)
    assert rebuilt(pkt) == raw
    assert pkt.src == "10.0.0.1" and pkt.dst == "10.0.0.2" and pkt.ttl == 64
    assert pkt[ICMP].type == 11 and pkt[ICMP].code == 0
    assert bytes(pkt[ICMP])[4:8] == b"\0\0\0\0"
    assert bytes(pkt[ICMP])[8:] == offending[:28]
    assert pkt[IPerror].id == 99
    assert pkt.len == 20 + 8 + 28


def test_icmp_error_frag_needed_carries_mtu() -> None:
    opts = bytes([0x94, 4, 0, 0])
    offending = packets.ipv4_header(A, B, 6, 1476, flags_frag=packets.IP_DF,
                                    options=opts) + bytes(1476)
    raw = packets.icmp_error(bytes([10, 0, 0, 1]), offending, packets.ICMP_UNREACH,
                             packets.UNREACH_FRAG_NEEDED, mtu=1400)
    pkt = IP(raw)
    assert pkt[ICMP].type == 3 and pkt[ICMP].code == 4
    assert pkt[ICMP].nexthopmtu == 1400
    assert bytes(pkt[ICMP])[8:] == offending[:24 + 8]  # options are quoted too
    assert rebuilt(pkt) == raw
    # The MTU goes only into fragmentation-needed.
    other = packets.icmp_error(bytes([10, 0, 0, 1]), offending, packets.ICMP_UNREACH,
                               packets.UNREACH_HOST, mtu=1400)
    assert other[20 + 4:20 + 8] == b"\0\0\0\0"


def test_icmp_error_short_offending_packet() -> None:
    offending = packets.ipv4_header(A, B, 17, 3) + b"abc"
    raw = packets.icmp_error(bytes([10, 0, 0, 1]), offending, packets.ICMP_UNREACH, 1)
    assert raw[28:] == offending
    assert checksum.verify(raw[20:])


@pytest.mark.parametrize("icmp_type,is_error", [(0, False), (8, False), (13, False),
                                                (14, False), (17, False), (18, False),
                                                (3, True), (11, True), (12, True), (5, True),
                                                (4, True)])
def test_is_icmp_error(icmp_type: int, is_error: bool) -> None:
    raw = bytes(IP(src="10.0.0.2", dst="10.0.0.3") / ICMP(type=icmp_type))
    assert packets.is_icmp_error(raw, 20) is is_error
    udp = packets.udp_packet(A, B, 1, 2, bytes([icmp_type]))
    assert packets.is_icmp_error(udp, 20) is False
    assert packets.is_icmp_error(raw[:20], 20) is False  # no ICMP type byte


def test_l4_ports() -> None:
    raw = packets.tcp_packet(A, B, 1234, 443, 0, 0, packets.TCP_SYN)
    assert packets.l4_ports(raw, 20) == packets.Ports(1234, 443)
    raw = packets.udp_packet(A, B, 53, 5353, b"")
    assert packets.l4_ports(raw, 20) == packets.Ports(53, 5353)
    assert packets.l4_ports(packets.icmp_echo(A, B, 1, 1, b""), 20) is None
    assert packets.l4_ports(raw[:23], 20) is None


# --- fragmentation ----------------------------------------------------------------------


def _check_fragments(orig: bytes, frags: list[bytes], mtu: int, options: bytes) -> None:
    o = IPv4.parse(orig)
    payload = orig[o.ihl:o.total_length]
    expect_off = o.frag_offset
    got = bytearray()
    for i, f in enumerate(frags):
        ip = IPv4.parse(f)
        assert len(f) == ip.total_length <= mtu
        assert checksum.verify(f[:ip.ihl])
        assert (ip.ident, ip.ttl, ip.tos, ip.proto, ip.src, ip.dst) == (
            o.ident, o.ttl, o.tos, o.proto, o.src, o.dst)
        assert not ip.df
        first, last = i == 0, i == len(frags) - 1
        assert f[20:ip.ihl] == (options if first else packets._copied_options(options))
        assert ip.frag_offset == expect_off
        assert ip.more_fragments == (not last or o.more_fragments)
        if not last:
            assert (ip.total_length - ip.ihl) % 8 == 0
        expect_off += ip.total_length - ip.ihl
        got += f[ip.ihl:]
        # scapy agrees on every fragment header
        pkt = IP(f)
        assert pkt.frag * 8 == ip.frag_offset and pkt.len == len(f)
        del pkt.chksum
        assert bytes(pkt) == f
    assert bytes(got) == payload


@pytest.mark.parametrize("mtu", [68, 100, 576, 1000, 1280, 1499])
@pytest.mark.parametrize("options", [b"", OPTS, bytes([0x94, 4, 0, 0]), bytes([7, 3, 4, 0])])
def test_fragment_offsets_flags_options(mtu: int, options: bytes) -> None:
    payload = bytes(i * 7 % 251 for i in range(3001))
    udp = packets.udp_packet(A, B, 4000, 5000, payload, flags_frag=0, ident=0xABCD)
    orig = packets.ipv4_header(A, B, 17, len(udp) - 20, ident=0xABCD, ttl=17, tos=0x10,
                               options=options) + udp[20:]
    frags = packets.fragment(orig, mtu)
    assert len(frags) > 1
    _check_fragments(orig, frags, mtu, options)
    # scapy reassembles them into the original datagram.
    (whole,) = defragment([IP(f) for f in frags])
    assert bytes(whole[UDP].payload) == payload
    assert whole[UDP].chksum == IP(orig)[UDP].chksum
    assert bytes(whole[UDP]) == udp[20:]


def test_fragment_copied_options_only_in_later_fragments() -> None:
    orig = packets.ipv4_header(A, B, 17, 2000, options=OPTS) + bytes(2000)
    frags = packets.fragment(orig, 1000)
    assert IP(frags[0]).ihl == 10 and frags[0][20:40] == OPTS
    assert [o.option for o in IP(frags[0]).options] == [20, 7, 1, 3, 0]
    for f in frags[1:]:
        assert IP(f).ihl == 8 and f[20:32] == COPIED
        assert [o.copy_flag for o in IP(f).options if o.option != 0] == [1, 1]
    none_copied = packets.ipv4_header(A, B, 17, 2000, options=bytes([7, 7, 4]) + bytes(5))
    frags = packets.fragment(none_copied + bytes(2000), 1000)
    assert IP(frags[0]).ihl == 7
    assert all(IP(f).ihl == 5 for f in frags[1:])


def test_fragment_of_a_fragment_keeps_offset_and_mf() -> None:
    # A middle fragment (offset 1480, MF set) refragmented for a smaller MTU.
    inner = packets.ipv4_header(A, B, 17, 1480, ident=3,
                                flags_frag=packets.IP_MF | 185) + bytes(range(256)) * 5 + bytes(200)
    frags = packets.fragment(inner, 600)
    _check_fragments(inner, frags, 600, b"")
    assert IPv4.parse(frags[0]).frag_offset == 1480
    assert all(IPv4.parse(f).more_fragments for f in frags)
    # The last fragment of a datagram keeps MF clear on its last piece.
    last = packets.ipv4_header(A, B, 17, 1000, flags_frag=185) + bytes(1000)
    frags = packets.fragment(last, 600)
    assert [IPv4.parse(f).more_fragments for f in frags] == [True, False]
    assert [IPv4.parse(f).frag_offset for f in frags] == [1480, 1480 + 576]


def test_fragment_small_packet_unchanged_and_padding_removed() -> None:
    raw = packets.udp_packet(A, B, 1, 2, b"hello", flags_frag=0)
    assert packets.fragment(raw, 1500) == [raw]
    assert packets.fragment(raw + b"\0" * 6, 1500) == [raw]
    assert packets.fragment(raw, len(raw)) == [raw]


def test_fragment_refuses_df_and_tiny_mtu() -> None:
    with pytest.raises(ValueError, match="DF"):
        packets.fragment(packets.udp_packet(A, B, 1, 2, bytes(2000)), 1500)
    raw = packets.udp_packet(A, B, 1, 2, bytes(100), flags_frag=0)
    with pytest.raises(ValueError):
        packets.fragment(raw, 27)
    with pytest.raises(Malformed):
        packets.fragment(raw[:10], 1500)


@given(st.integers(68, 1500), st.integers(0, 4000), st.sampled_from([b"", OPTS, COPIED]))
@settings(max_examples=60)
def test_fragment_property_reassembles(mtu: int, size: int, options: bytes) -> None:
    payload = bytes((i * 13 + size) & 0xFF for i in range(size))
    orig = packets.ipv4_header(A, B, 253, size, ident=size, options=options) + payload
    frags = packets.fragment(orig, mtu)
    if 20 + len(options) + size <= mtu:
        assert frags == [orig]
        return
    _check_fragments(orig, frags, mtu, options)
    (whole,) = defragment([IP(f) for f in frags])
    assert bytes(whole.payload) == payload


def test_copied_options_parser() -> None:
    assert packets._copied_options(b"") == b""
    assert packets._copied_options(OPTS) == COPIED
    # NOPs and non-copied options vanish; the result is padded to 4 bytes.
    assert packets._copied_options(bytes([1, 1, 0x89, 3, 4, 0])) == bytes([0x89, 3, 4, 0])
    # A broken length stops parsing instead of looping forever.
    assert packets._copied_options(bytes([0x83, 0, 1, 1])) == b""
    assert packets._copied_options(bytes([0x83])) == b""
