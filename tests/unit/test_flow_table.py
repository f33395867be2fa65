"""fabric.flows: the flow table, its wheel and the rewrite/quote module, on their own
(egress NAT and service DNAT exercise them again through their own tests). Checksums
are checked against scapy's computation."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, IPerror, TCPerror, UDPerror

from fabric.flows import rewrite, tcpstate
from fabric.flows.headers import ip_total
from fabric.flows.table import (
    Flow,
    FlowPolicy,
    FlowTable,
    error_to_origin,
    error_to_peer,
    fragment_key,
)
from fabric.flows.wheel import TimingWheel
from fabric.net import checksum, packets
from fabric.net.packets import (
    ICMP_UNREACH,
    IP_MF,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    UNREACH_PORT,
)
from tests.support.packets import completed, make_partial, valid

A = bytes([10, 0, 0, 2])  # originator
B = bytes([10, 0, 0, 100])  # what it talks to
B2 = bytes([10, 0, 0, 11])  # what B is translated to
A2 = bytes([192, 0, 2, 1])  # what A is translated to


def flow(proto: int = PROTO_TCP, sport: int = 40000, dport: int = 80, nport: int = 30000,
         tport: int = 8080, a2: bytes = A2, b2: bytes = B2) -> Flow:
    return Flow(proto, A + B, sport.to_bytes(2, "big") + dport.to_bytes(2, "big"), a2 + b2,
                nport.to_bytes(2, "big") + tport.to_bytes(2, "big"))


def table(**policy: object) -> FlowTable:
    return FlowTable(dataclasses.replace(FlowPolicy(), **policy))  # type: ignore[arg-type]


def tcp(src: bytes, dst: bytes, sport: int, dport: int, flags: int, payload: bytes = b"",
        **kw: int) -> bytearray:
    return bytearray(packets.tcp_packet(src, dst, sport, dport, 1000, 0, flags, payload, **kw))


def translate(t: FlowTable, f: Flow, pkt: bytearray, way: str, now: float = 0.0,
              partial: bool = False) -> bytes:
    ihl = (pkt[0] & 15) * 4
    cf = ihl + (16 if pkt[9] == PROTO_TCP else 6 if pkt[9] == PROTO_UDP else 2)
    ff = pkt[6] << 8 | pkt[7]
    (t.forward if way == "fwd" else t.reverse)(f, pkt, 0, ihl, cf, ff, now, partial)
    return bytes(pkt)


# --- the flow record ------------------------------------------------------------------------


def test_keys_and_translations_both_ways() -> None:
    f = flow()
    assert f.key == (int.from_bytes(A + B, "big"), 40000 << 16 | 80)
    assert f.rkey == (int.from_bytes(B2 + A2, "big"), 8080 << 16 | 30000)
    assert f.rev_addrs == B + A and f.rev_ports == (80).to_bytes(2, "big") + (40000).to_bytes(
        2, "big")


@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("proto", [PROTO_TCP, PROTO_UDP])
def test_forward_and_reverse_rewrite_with_valid_checksums(proto: int, partial: bool) -> None:
    t = table()
    f = flow(proto)
    t.add(f, 0.0)
    if proto == PROTO_TCP:
        pkt = tcp(A, B, 40000, 80, TCP_SYN, b"hello", options=b"\x02\x04\x05\xb4")
    else:
        pkt = bytearray(packets.udp_packet(A, B, 40000, 80, b"hello world"))
    pkt = bytearray(make_partial(bytes(pkt))) if partial else pkt
    out = (valid(completed(translate(t, f, pkt, "fwd", partial=partial), partial)))
    l4 = out[TCP] if proto == PROTO_TCP else out[UDP]
    assert (out.src, l4.sport, out.dst, l4.dport) == ("192.0.2.1", 30000, "10.0.0.11", 8080)
    if proto == PROTO_TCP:
        back = tcp(B2, A2, 8080, 30000, TCP_SYN | TCP_ACK)
    else:
        back = bytearray(packets.udp_packet(B2, A2, 8080, 30000, b"answer"))
    back = bytearray(make_partial(bytes(back))) if partial else back
    ret = (valid(completed(translate(t, f, back, "rev", partial=partial), partial)))
    l4 = ret[TCP] if proto == PROTO_TCP else ret[UDP]
    assert (ret.src, l4.sport, ret.dst, l4.dport) == ("10.0.0.100", 80, "10.0.0.2", 40000)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 65535), st.integers(1, 65535),
       st.integers(1, 65535), st.binary(min_size=4, max_size=4),
       st.binary(min_size=4, max_size=4), st.booleans())
def test_rewrite_matches_a_full_recompute(payload: bytes, sport: int, nport: int,
                                          tport: int, a2: bytes, b2: bytes,
                                          udp: bool) -> None:
    """The incremental update gives exactly the checksums a full recompute gives."""
    proto = PROTO_UDP if udp else PROTO_TCP
    f = flow(proto, sport=sport, nport=nport, tport=tport, a2=a2, b2=b2)
    t = table()
    t.add(f, 0.0)
    if udp:
        pkt = bytearray(packets.udp_packet(A, B, sport, 80, payload))
    else:
        pkt = tcp(A, B, sport, 80, TCP_ACK, payload)
    got = translate(t, f, pkt, "fwd")
    p = IP(got)
    if udp and p[UDP].chksum == 0:  # zero means none: the original had one
        raise AssertionError("a UDP checksum became 0")
    valid(got)


def test_udp_checksum_zero_stays_zero_and_a_computed_zero_is_ffff() -> None:
    t = table()
    f = flow(PROTO_UDP)
    t.add(f, 0.0)
    pkt = bytearray(packets.udp_packet(A, B, 40000, 80, b"x" * 11))
    pkt[26:28] = b"\0\0"
    assert translate(t, f, pkt, "fwd")[26:28] == b"\0\0"
    c = bytearray(2)
    rewrite.adjust_udp(c, 0, 0)
    assert c == b"\0\0"
    c = bytearray(b"\xff\xfe")  # ~0xfffe + 0xfffe folds to 0: sent as 0xffff
    rewrite.adjust_udp(c, 0, 0xFFFE)
    assert c == b"\xff\xff"


def test_icmp_echo_rewrites_the_identifier() -> None:
    t = table()
    f = Flow(PROTO_ICMP, A + B, (77).to_bytes(2, "big") + b"\0\0", A2 + B,
             (20001).to_bytes(2, "big") + b"\0\0")
    t.add(f, 0.0)
    assert f.rkey == (int.from_bytes(B + A2, "big"), 20001)
    req = bytearray(packets.icmp_echo(A, B, 77, 1, b"ping"))
    out = (valid(translate(t, f, req, "fwd")))
    assert out.src == "192.0.2.1" and out["ICMP"].id == 20001
    rep = bytearray(packets.icmp_echo(B, A2, 20001, 1, b"ping", reply=True))
    back = (valid(translate(t, f, rep, "rev")))
    assert back.dst == "10.0.0.2" and back["ICMP"].id == 77


# --- ICMP errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("proto", [PROTO_TCP, PROTO_UDP])
def test_error_about_a_forwarded_packet_goes_back_untranslated(proto: int) -> None:
    f = flow(proto)
    if proto == PROTO_TCP:
        sent = bytes(tcp(A2, B2, 30000, 8080, TCP_SYN, b"0123456789abcdef"))
    else:
        sent = packets.udp_packet(A2, B2, 30000, 8080, b"query")
    # Quoted whole, as Linux does up to 576 bytes: the quote reaches the TCP checksum.
    msg = packets.icmp_message(ICMP_UNREACH, UNREACH_PORT, 0, sent)
    err = bytearray(packets.ipv4_header(B2, A2, PROTO_ICMP, len(msg)) + msg)
    ihl = 20
    inner, il4 = rewrite.quote(err, 0, ihl, len(err))
    assert inner == 28 and il4 == 48
    qk = rewrite.quoted_key(err, inner, il4)
    assert qk == (proto, f.rkey)
    error_to_origin(f, err, 0, ihl, len(err), False, inner, il4)
    p = (valid(bytes(err)))
    assert (p.src, p.dst) == ("10.0.0.100", "10.0.0.2")  # from the peer's original address
    q = p[IPerror]
    assert (q.src, q.dst) == ("10.0.0.2", "10.0.0.100")
    ql4 = q[TCPerror] if proto == PROTO_TCP else q[UDPerror]
    assert (ql4.sport, ql4.dport) == (40000, 80)
    if proto == PROTO_TCP:  # the quote reaches the TCP checksum: it stays right
        orig = IP(bytes(tcp(A, B, 40000, 80, TCP_SYN, b"0123456789abcdef")))
        assert ql4.chksum == orig[TCP].chksum


def test_error_from_a_router_on_the_way_keeps_its_source() -> None:
    f = flow(PROTO_UDP)
    hop = bytes([203, 0, 113, 1])
    err = bytearray(packets.icmp_error(hop, packets.udp_packet(A2, B2, 30000, 8080, b"q"),
                                       ICMP_UNREACH, 4, mtu=1200))
    inner, il4 = rewrite.quote(err, 0, 20, len(err))
    error_to_origin(f, err, 0, 20, len(err), False, inner, il4)
    p = (valid(bytes(err)))
    assert (p.src, p.dst) == ("203.0.113.1", "10.0.0.2")


def test_error_about_a_reply_goes_on_to_the_peer() -> None:
    f = flow(PROTO_UDP)
    delivered = packets.udp_packet(B, A, 80, 40000, b"answer")
    err = bytearray(packets.icmp_error(A, delivered, ICMP_UNREACH, UNREACH_PORT))
    inner, il4 = rewrite.quote(err, 0, 20, len(err))
    assert rewrite.quoted_key(err, inner, il4) == (PROTO_UDP, f.key)
    error_to_peer(f, err, 0, 20, len(err), False, inner, il4)
    p = (valid(bytes(err)))
    assert (p.src, p.dst) == ("192.0.2.1", "10.0.0.11")
    q = p[IPerror]
    assert (q.src, q.dst, q[UDPerror].sport, q[UDPerror].dport) == (
        "10.0.0.11", "192.0.2.1", 8080, 30000)


def test_quote_bounds() -> None:
    err = bytearray(packets.icmp_error(B2, packets.udp_packet(A2, B2, 1, 2, b"q"),
                                       ICMP_UNREACH, UNREACH_PORT))
    assert rewrite.quote(err, 0, 20, 20 + 8 + 27) == (-1, -1)  # too short for a quote
    frag = bytearray(err)
    frag[28 + 6] = 0x00
    frag[28 + 7] = 0x10  # the quote is a later fragment: no ports to map
    assert rewrite.quote(frag, 0, 20, len(frag)) == (0, 0)
    bad = bytearray(err)
    bad[28] = 0x65
    assert rewrite.quote(bad, 0, 20, len(bad)) == (-1, -1)


def test_ip_total() -> None:
    p = bytearray(packets.udp_packet(A, B, 1, 2, b"abc"))
    assert ip_total(p, 0, len(p)) == len(p)
    assert ip_total(p, 0, len(p) - 1) == 0
    assert ip_total(p, 1, len(p)) == 0
    assert ip_total(p, -1, 10) == 0
    assert ip_total(p, 0, 19) == 0


# --- the table --------------------------------------------------------------------------------


def test_add_remove_and_the_hook() -> None:
    gone: list[Flow] = []
    t = FlowTable(FlowPolicy(), on_remove=gone.append)
    f = flow()
    assert t.add(f, 0.0) and len(t) == 1 and t.open == 1
    assert t.get(PROTO_TCP, f.key) is f and t.get_reply(PROTO_TCP, f.rkey) is f
    assert t.reply_taken(PROTO_TCP, f.rkey)
    with pytest.raises(ValueError):
        t.add(flow(), 0.0)
    t.remove(f)
    t.remove(f)  # twice is harmless
    assert gone == [f] and len(t) == 0 and t.open == 0 and f.dead


def test_full_table_evicts_the_oldest_closed_flow_or_refuses() -> None:
    for evict in (True, False):
        t = table(max_flows=2, evict_closed=evict)
        f1, f2, f3 = flow(sport=1, nport=1), flow(sport=2, nport=2), flow(sport=3, nport=3)
        assert t.add(f1, 0.0) and t.add(f2, 0.0)
        assert not t.add(f3, 0.0) and t.counters["table_full"] == 1
        t.track_tcp(f2, tcpstate.ORIG, TCP_RST)
        t.track_tcp(f1, tcpstate.ORIG, TCP_RST)
        assert t.open == 0 and t.counters["closed"] == 2
        assert t.add(f3, 1.0) is evict
        if evict:
            assert f2.dead and not f1.dead and t.counters["evicted"] == 1


def test_timeouts_follow_the_state() -> None:
    t = table(tcp_syn=20.0, tcp_established=100.0, tcp_closed=5.0)
    f = flow()
    t.add(f, 0.0)
    assert f.timeout == 20.0
    t.track_tcp(f, tcpstate.ORIG, TCP_SYN)
    t.track_tcp(f, tcpstate.REPLY, TCP_SYN | TCP_ACK)
    t.track_tcp(f, tcpstate.ORIG, TCP_ACK)
    assert f.state == tcpstate.ESTABLISHED and f.timeout == 100.0
    f.last = 50.0
    t.track_tcp(f, tcpstate.ORIG, TCP_FIN | TCP_ACK)
    assert f.timeout == 100.0  # half-closed keeps the established timeout
    t.track_tcp(f, tcpstate.REPLY, TCP_FIN | TCP_ACK)
    assert f.state == tcpstate.CLOSED and f.timeout == 5.0
    assert t.next_timer() == 20.0  # the first bucket: lazily re-checked when due
    assert t.expire(20.0) == 0 and t.next_timer() == 55.0
    assert t.expire(54.9) == 0 and t.expire(55.0) == 1 and len(t) == 0


def test_reopened_flow_is_open_again() -> None:
    t = table()
    f = flow()
    t.add(f, 0.0)
    t.track_tcp(f, tcpstate.ORIG, TCP_RST)
    assert t.open == 0
    t.track_tcp(f, tcpstate.ORIG, TCP_SYN)
    assert f.state == tcpstate.SYN_SENT and t.open == 1
    t.track_tcp(f, tcpstate.ORIG, TCP_RST)
    assert t.open == 0 and t.counters["closed"] == 2


def test_the_close_hook_sees_closes_and_reopens() -> None:
    seen: list[tuple[Flow, bool]] = []
    t = FlowTable(FlowPolicy(), on_close=lambda f, closed: seen.append((f, closed)))
    f = flow()
    t.add(f, 0.0)
    t.track_tcp(f, tcpstate.ORIG, TCP_SYN)
    assert seen == []
    t.track_tcp(f, tcpstate.ORIG, TCP_RST)
    t.track_tcp(f, tcpstate.ORIG, TCP_RST)  # no change: no call
    t.track_tcp(f, tcpstate.ORIG, TCP_SYN)
    assert seen == [(f, True), (f, False)]


def test_udp_first_reply_lengthens_the_timeout() -> None:
    t = table(udp_unreplied=30.0, udp_replied=120.0)
    f = flow(PROTO_UDP)
    t.add(f, 0.0)
    assert f.timeout == 30.0
    translate(t, f, bytearray(packets.udp_packet(B2, A2, 8080, 30000, b"a")), "rev", 10.0)
    assert f.timeout == 120.0 and t.expire(31.0) == 0 and t.expire(130.0) == 1


def test_fragments_follow_their_first_fragment_both_ways() -> None:
    t = table(max_fragments=2, fragment_timeout=30.0)
    f = flow(PROTO_UDP)
    t.add(f, 0.0)
    dgram = packets.udp_packet(A, B, 40000, 80, bytes(200), ident=7, flags_frag=0)
    first, second = (bytearray(x) for x in packets.fragment(dgram, 128)[:2])
    assert first[6] << 8 & 0xFF00 | first[7] and first[6] & 0x20
    translate(t, f, first, "fwd", 1.0)
    assert len(t.frag_orig) == 1
    assert t.readdress_fragment(t.frag_orig, second, 0, 2.0) is f
    assert bytes(second[12:20]) == A2 + B2 and checksum.verify(second[:20])
    assert t.readdress_fragment(t.frag_reply, bytearray(second), 0, 2.0) is None
    # Bounded: the oldest entry goes, and counts.
    for ident in (8, 9):
        d = bytearray(packets.udp_packet(A, B, 40000, 80, bytes(200), ident=ident,
                                         flags_frag=0))
        translate(t, f, bytearray(packets.fragment(bytes(d), 128)[0]), "fwd", 3.0)
    assert len(t.frag_orig) == 2 and t.frag_orig.dropped == 1
    assert fragment_key(first, 0) not in t.frag_orig.entries
    # And they expire.
    assert t.frag_orig.next_deadline() == 33.0 and t.next_timer() == 30.0  # the flow's
    t.expire(33.0)
    assert len(t.frag_orig) == 0


def test_fragment_of_a_removed_flow_is_forgotten() -> None:
    t = table()
    f = flow(PROTO_UDP)
    t.add(f, 0.0)
    first = bytearray(packets.fragment(
        packets.udp_packet(A, B, 40000, 80, bytes(200), ident=7, flags_frag=0), 128)[0])
    assert first[6] & (IP_MF >> 8)
    translate(t, f, first, "fwd")
    t.remove(f)
    later = bytearray(packets.fragment(
        packets.udp_packet(A, B, 40000, 80, bytes(200), ident=7, flags_frag=0), 128)[1])
    assert t.readdress_fragment(t.frag_orig, later, 0, 1.0) is None


def test_policy_checks() -> None:
    with pytest.raises(ValueError):
        FlowPolicy(max_flows=0)
    with pytest.raises(ValueError):
        FlowPolicy(tcp_closed=0.0)
    with pytest.raises(ValueError):
        FlowPolicy(max_fragments=0)


# --- the wheel --------------------------------------------------------------------------------


class _Item:
    __slots__ = ("bucket", "due")

    def __init__(self, due: float) -> None:
        self.bucket = 0
        self.due = due


def test_wheel_hands_back_what_is_due_and_reschedules_the_rest() -> None:
    w: TimingWheel[_Item] = TimingWheel(lambda i: i.due)
    a, b, c = _Item(1.5), _Item(1.2), _Item(5.0)
    for i in (a, b, c):
        w.schedule(i, i.due)
    assert w.next_deadline() == 2.0 and len(w) == 3
    a.due = 3.0  # activity: later, found lazily
    assert w.expire(2.0) == [b]
    assert w.holds(a) and a.bucket == 3 and w.next_deadline() == 3.0
    c.due = 2.5  # earlier: must be told
    w.move_earlier(c, c.due)
    assert sorted(map(id, w.expire(3.0))) == sorted(map(id, (a, c)))
    assert len(w) == 0 and w.next_deadline() is None


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100), st.floats(-50, 50)), min_size=1, max_size=40),
       st.floats(0, 200))
def test_wheel_never_expires_early_nor_more_than_a_second_late(
        items: list[tuple[float, float]], now: float) -> None:
    w: TimingWheel[_Item] = TimingWheel(lambda i: i.due)
    objs = []
    for due, move in items:
        it = _Item(due)
        w.schedule(it, due)
        new = max(0.0, due + move)
        if new < due:
            it.due = new
            w.move_earlier(it, new)
        else:
            it.due = new
        objs.append(it)
    gone = set(map(id, w.expire(now)))
    for it in objs:
        if id(it) in gone:
            assert it.due <= now
        else:
            assert it.due > now - 1.0  # kept: at most one second late
            assert w.holds(it)
