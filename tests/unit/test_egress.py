"""gateway.egress: source NAT of pods to their namespace's egress address.

Packets are built with fabric.net.packets, translated in place (embedded at an offset inside
a bigger buffer, as the data plane hands them over), and every checksum is then checked
independently with scapy; frames with partial (NEEDS_CSUM) checksums are completed first,
as the kernel or software GSO would, and then checked the same way.
"""

from __future__ import annotations

import dataclasses
import struct
import time
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, defragment
from scapy.utils import checksum as scapy_checksum

from fabric.flows.rewrite import delta
from fabric.net import checksum, packets
from fabric.net.packets import (
    ICMP_TIME_EXCEEDED,
    ICMP_UNREACH,
    IP_MF,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    UNREACH_FRAG_NEEDED,
    UNREACH_PORT,
)
from gateway.egress import (
    ALWAYS_PROTECTED,
    DENIED,
    EGRESS_FLOWS,
    FULL,
    MALFORMED,
    NO_FLOW,
    OK,
    UNSUPPORTED,
    EgressNat,
    PortPool,
)
from tests.support.packets import at_offset, complete, finished, make_partial, valid

POD_A = bytes([10, 0, 0, 2])
POD_B = bytes([10, 0, 0, 3])
EIP = bytes([192, 0, 2, 10])
EIP2 = bytes([192, 0, 2, 11])
REMOTE = bytes([198, 51, 100, 7])
REMOTE2 = bytes([198, 51, 100, 8])
HOP = bytes([203, 0, 113, 1])  # a router on the path, sending ICMP errors
ALL = (IPv4Network("0.0.0.0/0"),)

def nat(eip: bytes = EIP, allow: tuple[IPv4Network, ...] = ALL,
        port_range: tuple[int, int] = (20000, 59999), pod_flows: int | None = 1 << 20,
        **policy: Any) -> EgressNat:
    """A NAT with the egress flow policy, `policy` overriding some of it (and no pod
    quota unless `pod_flows` says so: most tests are about one pod)."""
    return EgressNat(IPv4Address(eip), allow, port_range=port_range, pod_flows=pod_flows,
                     policy=dataclasses.replace(EGRESS_FLOWS, **policy))


def out(n: EgressNat, pkt: bytes, now: float = 0.0, partial: bool = False) -> tuple[int, bytes]:
    """Run `pkt` through outbound at an offset; the verdict and the (maybe) rewritten pkt."""
    return at_offset(n.outbound, pkt, now, partial, OK)


def inn(n: EgressNat, pkt: bytes, now: float = 0.0,
        partial: bool = False) -> tuple[IPv4Address | None, bytes]:
    """Run `pkt` through inbound at an offset: the pod it is for now, and the packet."""
    verdict, got = at_offset(n.inbound, pkt, now, partial, OK)
    return (IPv4Address(got[16:20]) if verdict == OK else None), got


def ports(pkt: bytes) -> tuple[int, int]:
    ihl = (pkt[0] & 15) * 4
    return struct.unpack_from("!HH", pkt, ihl)


def icmp_id(pkt: bytes) -> int:
    return struct.unpack_from("!H", pkt, (pkt[0] & 15) * 4 + 4)[0]


def udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes = b"hello",
        **kw: int) -> bytes:
    return packets.udp_packet(src, dst, sport, dport, payload, **kw)


def udp_no_checksum(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    p = bytearray(udp(src, dst, sport, dport, payload))
    p[26:28] = b"\0\0"
    return bytes(p)


# --- the incremental update -------------------------------------------------------------


@given(st.integers(0, 0xFFFF), st.binary(min_size=6, max_size=6),
       st.binary(min_size=6, max_size=6))
def test_precomputed_delta_equals_rfc1624_adjust(check: int, old: bytes, new: bytes) -> None:
    """The per-flow delta applied on the fast path gives what checksum.adjust and
    checksum.adjust_partial give."""
    d = delta(old, new)
    assert ~checksum.add(~check & 0xFFFF, d) & 0xFFFF == checksum.adjust(check, old, new)
    assert checksum.add(check, d) == checksum.adjust_partial(check, old, new)


# --- TCP --------------------------------------------------------------------------------


class Conn:
    """One TCP connection from a pod through the NAT, checking every packet both ways."""

    def __init__(self, n: EgressNat, pod: bytes, sport: int, partial: bool,
                 remote: bytes = REMOTE, dport: int = 443) -> None:
        self.n, self.pod, self.sport, self.partial = n, pod, sport, partial
        self.remote, self.dport = remote, dport
        self.ext = -1
        self.seq, self.rseq = 1000, 50000

    def send(self, flags: int, payload: bytes = b"", now: float = 0.0) -> bytes:
        pkt = packets.tcp_packet(self.pod, self.remote, self.sport, self.dport, self.seq,
                                 self.rseq, flags, payload)
        if self.partial:
            pkt = make_partial(pkt)
        verdict, t = out(self.n, pkt, now, self.partial)
        assert verdict == OK
        t = finished(t, self.partial)
        p = IP(t)
        assert p.src == str(self.n.egress_ip) and p.dst == packets.ip_str(self.remote)
        assert p[TCP].dport == self.dport and p[TCP].flags == flags
        assert bytes(p[TCP].payload) == payload and p[TCP].seq == self.seq
        if self.ext < 0:
            self.ext = p[TCP].sport
        assert p[TCP].sport == self.ext
        self.seq += len(payload) + bool(flags & (TCP_SYN | TCP_FIN))
        return t

    def receive(self, flags: int, payload: bytes = b"", now: float = 0.0) -> bytes:
        pkt = packets.tcp_packet(self.remote, self.n.egress_ip.packed, self.dport, self.ext,
                                 self.rseq, self.seq, flags, payload)
        if self.partial:
            pkt = make_partial(pkt)
        pod, t = inn(self.n, pkt, now, self.partial)
        assert pod == IPv4Address(self.pod)
        t = finished(t, self.partial)
        p = IP(t)
        assert p.src == packets.ip_str(self.remote) and p.dst == packets.ip_str(self.pod)
        assert (p[TCP].sport, p[TCP].dport) == (self.dport, self.sport)
        assert bytes(p[TCP].payload) == payload and p[TCP].flags == flags
        self.rseq += len(payload) + bool(flags & (TCP_SYN | TCP_FIN))
        return t


@pytest.mark.parametrize("partial", [False, True])
def test_tcp_handshake_data_and_fin_both_ways(partial: bool) -> None:
    n = nat()
    c = Conn(n, POD_A, 40123, partial)
    c.send(TCP_SYN)
    assert c.ext == 40123  # the pod's port was free, so it is kept
    c.receive(TCP_SYN | TCP_ACK)
    c.send(TCP_ACK)
    c.send(TCP_ACK | TCP_PSH, b"GET / HTTP/1.1\r\n\r\n" * 7)
    c.receive(TCP_ACK | TCP_PSH, bytes(range(256)) * 5 + b"odd")
    c.send(TCP_ACK)
    c.send(TCP_FIN | TCP_ACK)
    c.receive(TCP_ACK)
    c.receive(TCP_FIN | TCP_ACK)
    c.send(TCP_ACK)
    assert n.flows == 1
    cnt = n.counters
    assert cnt["flows_created"] == 1 and cnt["translations_out"] == 6
    assert cnt["translations_in"] == 4
    # FIN both ways: the short timeout applies.
    assert n.expire(239.0) == 0 and n.expire(241.0) == 1 and n.flows == 0


def test_tcp_with_ip_and_tcp_options_and_odd_payload() -> None:
    n = nat()
    mss = b"\x02\x04\x05\xb4"
    pkt = packets.tcp_packet(POD_A, REMOTE, 1234, 80, 1, 0, TCP_SYN, b"", options=mss)
    # Re-wrap with IP options (record route) so the L4 header is not at 20.
    seg = pkt[20:]
    pkt = packets.ipv4_header(POD_A, REMOTE, PROTO_TCP, len(seg), options=b"\x07\x07\x04" +
                              bytes(5)) + seg
    for payload_pkt in (pkt,):
        verdict, t = out(n, payload_pkt)
        assert verdict == OK
        valid(t)
        assert IP(t)[TCP].sport == 20000  # 1234 is outside the range: first free port
        assert IP(t)[TCP].options[0] == ("MSS", 1460)


def test_tcp_states_choose_timeouts() -> None:
    n = nat()
    # SYN only: transitory.
    c1 = Conn(n, POD_A, 30001, False)
    c1.send(TCP_SYN)
    # Established.
    c2 = Conn(n, POD_A, 30002, False)
    c2.send(TCP_SYN)
    c2.receive(TCP_SYN | TCP_ACK)
    c2.send(TCP_ACK)
    # Established, then reset by the remote.
    c3 = Conn(n, POD_A, 30003, False)
    c3.send(TCP_SYN)
    c3.receive(TCP_SYN | TCP_ACK)
    c3.send(TCP_ACK)
    c3.receive(TCP_RST)
    # Established, FIN from the pod only: half-closed keeps the long timeout.
    c4 = Conn(n, POD_A, 30004, False)
    c4.send(TCP_SYN)
    c4.receive(TCP_SYN | TCP_ACK)
    c4.send(TCP_ACK)
    c4.send(TCP_FIN | TCP_ACK)
    assert n.flows == 4
    assert n.expire(239.0) == 0
    assert n.expire(241.0) == 2 and n.flows == 2  # SYN-only and reset
    assert n.expire(7439.0) == 0
    assert n.expire(7441.0) == 2 and n.flows == 0
    assert n.counters["flows_expired"] == 4


@pytest.mark.parametrize("close", ["fin", "pod-rst"])
def test_tcp_close_after_a_long_established_life(close: str) -> None:
    """Closing moves the deadline earlier than the flow is scheduled for: the flow must be
    rescheduled, and the bucket it leaves empty costs nothing later."""
    n = nat()
    c = Conn(n, POD_A, 45003, False)
    c.send(TCP_SYN)
    c.receive(TCP_SYN | TCP_ACK)
    c.send(TCP_ACK)
    assert n.expire(300.0) == 0  # re-checked and put into the bucket of 7440 s
    assert n.next_timer() == 7440.0
    c.send(TCP_ACK | TCP_PSH, b"x", now=1000.0)
    if close == "fin":
        c.receive(TCP_FIN | TCP_ACK, now=1000.0)
        c.send(TCP_FIN | TCP_ACK, now=1000.0)
    else:
        c.send(TCP_RST, now=1000.0)
    assert n.next_timer() == 1240.0
    assert n.expire(1239.0) == 0 and n.expire(1240.0) == 1
    if close == "fin":
        assert n.next_timer() is None  # the emptied 7440 s bucket is skipped
    assert n.expire(8000.0) == 0 and n.next_timer() is None


def test_tcp_reset_then_new_connection_on_the_same_tuple() -> None:
    n = nat()
    c = Conn(n, POD_A, 45000, False)
    c.send(TCP_SYN)
    c.receive(TCP_RST | TCP_ACK)
    c.send(TCP_SYN, now=100.0)  # reuse: back to SYN sent
    c.receive(TCP_SYN | TCP_ACK, now=100.0)
    c.send(TCP_ACK, now=100.0)
    assert n.flows == 1 and n.counters["flows_created"] == 1
    assert n.expire(100.0 + 241.0) == 0  # established now
    assert n.flows == 1


def test_tcp_picked_up_mid_stream() -> None:
    """After a restart the NAT sees a connection without its SYN: both sides talking
    makes it established."""
    n = nat()
    c = Conn(n, POD_A, 45001, False)
    c.send(TCP_ACK | TCP_PSH, b"late")
    c.receive(TCP_ACK)
    assert n.expire(300.0) == 0 and n.flows == 1
    assert n.expire(7500.0) == 1


def test_tcp_activity_keeps_a_transitory_flow() -> None:
    n = nat()
    c = Conn(n, POD_A, 45002, False)
    c.send(TCP_SYN, now=0.0)
    for t in range(100, 1000, 100):
        c.send(TCP_SYN, now=float(t))  # retransmitted SYNs
        assert n.expire(float(t) + 1) == 0
    assert n.expire(900.0 + 241.0) == 1


# --- UDP --------------------------------------------------------------------------------


@pytest.mark.parametrize("partial", [False, True])
def test_udp_round_trip(partial: bool) -> None:
    n = nat()
    pkt = udp(POD_A, REMOTE, 5353, 53, b"query" * 9)
    verdict, t = out(n, make_partial(pkt) if partial else pkt, 1.0, partial)
    assert verdict == OK
    p = IP(finished(t, partial))
    assert p.src == "192.0.2.10" and p[UDP].sport == 20000 and p[UDP].dport == 53
    reply = udp(REMOTE, EIP, 53, p[UDP].sport, b"answer!")
    pod, back = inn(n, make_partial(reply) if partial else reply, 1.5, partial)
    assert pod == IPv4Address("10.0.0.2")
    q = IP(finished(back, partial))
    assert q.dst == "10.0.0.2" and q[UDP].dport == 5353 and q[UDP].sport == 53
    assert bytes(q[UDP].payload) == b"answer!"


def test_udp_with_ip_options_both_ways() -> None:
    n = nat()
    opts = b"\x94\x04\0\0"  # router alert
    seg = udp(POD_A, REMOTE, 41000, 53, b"opt")[20:]
    verdict, t = out(n, packets.ipv4_header(POD_A, REMOTE, PROTO_UDP, len(seg), options=opts)
                     + seg)
    assert verdict == OK and valid(t)[UDP].sport == 41000
    seg = udp(REMOTE, EIP, 53, 41000, b"back")[20:]
    pod, back = inn(n, packets.ipv4_header(REMOTE, EIP, PROTO_UDP, len(seg), options=opts)
                    + seg)
    assert pod == IPv4Address(POD_A)
    q = valid(back)
    assert q.dst == "10.0.0.2" and q[UDP].dport == 41000 and q.options


def test_udp_checksum_zero_stays_zero() -> None:
    n = nat()
    verdict, t = out(n, udp_no_checksum(POD_A, REMOTE, 7000, 9999, b"no checksum"))
    assert verdict == OK
    p = valid(t)
    assert p[UDP].chksum == 0 and p.src == "192.0.2.10"
    pod, back = inn(n, udp_no_checksum(REMOTE, EIP, 9999, p[UDP].sport, b"nor here"))
    assert pod is not None
    q = valid(back)
    assert q[UDP].chksum == 0 and q[UDP].dport == 7000 and q.dst == "10.0.0.2"


def _zero_sum_payload(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    """A payload whose UDP checksum from src:sport is exactly 0 (sent as 0xFFFF)."""
    body = bytearray(b"pad!" + b"\0\0")
    seg = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(body), 0) + body)
    s = checksum.add(checksum.ones_sum(seg),
                     checksum.pseudo_header_sum(src, dst, PROTO_UDP, len(seg)))
    body[4:6] = (~s & 0xFFFF).to_bytes(2, "big")
    return bytes(body)


def test_udp_computed_zero_is_sent_as_ffff() -> None:
    n = nat()
    payload = _zero_sum_payload(EIP, REMOTE, 40000, 53)  # zero after translation
    verdict, t = out(n, udp(POD_A, REMOTE, 40000, 53, payload))
    assert verdict == OK and ports(t)[0] == 40000
    assert struct.unpack_from("!H", t, 26)[0] == 0xFFFF
    valid(t)
    # And back: zero once the pod's address is in.
    payload = _zero_sum_payload(REMOTE, POD_A, 53, 40000)
    pod, back = inn(n, udp(REMOTE, EIP, 53, 40000, payload))
    assert pod is not None and struct.unpack_from("!H", back, 26)[0] == 0xFFFF
    valid(back)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 65535), st.integers(1, 65535),
       st.binary(min_size=4, max_size=4), st.booleans())
def test_udp_translation_property(payload: bytes, sport: int, dport: int, dst: bytes,
                                  partial: bool) -> None:
    n = nat()
    pkt = udp(POD_B, dst, sport, dport, payload)
    verdict, t = out(n, make_partial(pkt) if partial else pkt, 0.0, partial)
    if n.is_protected(dst):
        assert verdict == DENIED and n.counters["denied_protected"] == 1
        return
    assert verdict == OK
    p = IP(finished(t, partial))
    ext = p[UDP].sport
    assert 20000 <= ext <= 59999 and (ext == sport or not 20000 <= sport <= 59999)
    reply = udp(dst, EIP, dport, ext, payload[::-1])
    pod, back = inn(n, make_partial(reply) if partial else reply, 0.0, partial)
    assert pod == IPv4Address(POD_B)
    q = IP(finished(back, partial))
    assert q[UDP].dport == sport and bytes(q[UDP].payload) == payload[::-1]


def test_udp_timeouts_unreplied_replied_and_activity() -> None:
    n = nat()
    assert out(n, udp(POD_A, REMOTE, 30001, 53), 0.0)[0] == OK  # never answered
    assert out(n, udp(POD_A, REMOTE, 30002, 53), 0.0)[0] == OK  # answered
    assert inn(n, udp(REMOTE, EIP, 53, 30002), 1.0)[0] is not None
    assert out(n, udp(POD_A, REMOTE, 30003, 53), 0.0)[0] == OK  # kept busy
    for t in range(20, 200, 20):
        assert out(n, udp(POD_A, REMOTE, 30003, 53), float(t))[0] == OK
    assert n.expire(29.0) == 0
    assert n.expire(31.0) == 1 and n.flows == 2
    assert n.expire(60.5) == 0
    assert n.expire(61.5) == 1 and n.flows == 1
    assert inn(n, udp(REMOTE, EIP, 53, 30002), 62.0)[0] is None  # gone
    assert n.counters["no_flow"] == 1
    assert n.expire(180.0 + 29.0) == 0
    assert n.expire(180.0 + 31.0) == 1 and n.flows == 0


def test_timers_for_the_shell() -> None:
    n = nat()
    assert n.next_timer() is None
    out(n, udp(POD_A, REMOTE, 30001, 53), 10.0)
    t = n.next_timer()
    assert t is not None and 40.0 <= t <= 41.0
    n.handle_timer(t - 1.0)
    assert n.flows == 1
    n.handle_timer(t)
    assert n.flows == 0 and n.next_timer() is None


def test_expire_is_cheap_when_nothing_is_due() -> None:
    n = nat(max_flows=70000)
    for i in range(20000):
        pod = bytes([10, 0, i >> 8, i & 0xFF])
        assert out(n, udp(pod, REMOTE, 1000, 53), float(i % 10))[0] == OK
    assert n.flows == 20000
    start = time.perf_counter()
    for i in range(5000):
        assert n.expire(20.0 + i / 1000) == 0
        n.next_timer()
    assert time.perf_counter() - start < 0.5  # O(flows) per call would take seconds
    assert n.expire(41.0) == 20000


# --- ICMP echo --------------------------------------------------------------------------


@pytest.mark.parametrize("partial", [False, True])
def test_icmp_echo_identifier_translation(partial: bool) -> None:
    n = nat()
    exts = []
    for pod in (POD_A, POD_B):
        pkt = packets.icmp_echo(pod, REMOTE, 0x9C41, 7, b"ping payload")  # id 40001
        verdict, t = out(n, make_partial(pkt) if partial else pkt, 0.0, partial)
        assert verdict == OK
        p = IP(finished(t, partial))
        assert p.src == "192.0.2.10" and p[ICMP].seq == 7
        exts.append(p[ICMP].id)
    assert exts[0] == 40001 and exts[1] != 40001  # same id from two pods
    for pod, ext in zip((POD_A, POD_B), exts, strict=True):
        reply = packets.icmp_echo(REMOTE, EIP, ext, 7, b"ping payload", reply=True)
        got, back = inn(n, make_partial(reply) if partial else reply, 0.5, partial)
        assert got == IPv4Address(pod)
        q = IP(finished(back, partial))
        assert q.dst == packets.ip_str(pod) and q[ICMP].id == 40001 and q[ICMP].type == 0
    assert n.expire(29.0) == 0 and n.expire(31.0) == 2


def test_icmp_other_than_echo_is_unsupported() -> None:
    n = nat()
    ts = packets.ipv4_header(POD_A, REMOTE, PROTO_ICMP, 20) + packets.icmp_message(
        13, 0, 0x00010002, bytes(12))
    assert out(n, ts)[0] == UNSUPPORTED
    reply = packets.icmp_echo(POD_A, REMOTE, 1, 1, b"x", reply=True)
    assert out(n, reply)[0] == UNSUPPORTED
    # An echo request to the egress address is not ours to answer.
    assert inn(n, packets.icmp_echo(REMOTE, EIP, 1, 1, b"x"))[0] is None
    assert n.counters["unsupported"] == 3


# --- flows and ports --------------------------------------------------------------------


def test_two_pods_same_source_port_get_different_external_ports() -> None:
    n = nat()
    _, a = out(n, udp(POD_A, REMOTE, 33333, 53))
    _, b = out(n, udp(POD_B, REMOTE, 33333, 53))
    assert ports(a)[0] == 33333 and ports(b)[0] != 33333
    for pod, t in ((POD_A, a), (POD_B, b)):
        got, back = inn(n, udp(REMOTE, EIP, 53, ports(t)[0], b"re"))
        assert got == IPv4Address(pod) and ports(back) == (53, 33333)
        valid(back)


def test_same_five_tuple_reuses_its_flow() -> None:
    n = nat()
    _, a = out(n, udp(POD_A, REMOTE, 1111, 53, b"1"))
    _, b = out(n, udp(POD_A, REMOTE, 1111, 53, b"2"))
    assert ports(a) == ports(b) and n.flows == 1
    _, c = out(n, udp(POD_A, REMOTE, 1111, 54, b"3"))  # another destination port
    _, d = out(n, udp(POD_A, REMOTE2, 1111, 53, b"4"))  # another destination
    assert n.flows == 3 and len({ports(a)[0], ports(c)[0], ports(d)[0]}) == 3
    # TCP and UDP have their own ports: the same number may serve both.
    _, e = out(n, packets.tcp_packet(POD_A, REMOTE, 1111, 53, 1, 0, TCP_SYN))
    assert ports(e)[0] == ports(a)[0]
    assert n.counters["flows_created"] == 4


def test_replies_only_from_the_flows_remote_endpoint() -> None:
    n = nat()
    _, t = out(n, udp(POD_A, REMOTE, 2222, 53))
    ext = ports(t)[0]
    assert inn(n, udp(REMOTE2, EIP, 53, ext))[0] is None  # another host
    assert inn(n, udp(REMOTE, EIP, 54, ext))[0] is None  # another port
    assert inn(n, udp(REMOTE, EIP, 53, ext + 1))[0] is None  # another mapping
    assert inn(n, packets.tcp_packet(REMOTE, EIP, 53, ext, 1, 1, TCP_ACK))[0] is None
    assert inn(n, udp(REMOTE, EIP2, 53, ext))[0] is None  # not our address
    assert n.counters["no_flow"] == 5
    assert inn(n, udp(REMOTE, EIP, 53, ext))[0] == IPv4Address(POD_A)


def test_namespaces_with_the_same_pod_addresses_do_not_interfere() -> None:
    a, b = nat(EIP), nat(EIP2)
    _, ta = out(a, udp(POD_A, REMOTE, 5000, 53, b"from a"))
    _, tb = out(b, udp(POD_A, REMOTE, 5000, 53, b"from b"))
    assert IP(ta).src == "192.0.2.10" and IP(tb).src == "192.0.2.11"
    assert ports(ta) == ports(tb)  # independent port spaces
    # A reply to each namespace's address only translates in that namespace.
    ra = udp(REMOTE, EIP, 53, ports(ta)[0], b"to a")
    rb = udp(REMOTE, EIP2, 53, ports(tb)[0], b"to b")
    assert inn(b, ra)[0] is None and inn(a, rb)[0] is None
    pa, back_a = inn(a, ra)
    pb, back_b = inn(b, rb)
    assert pa == pb == IPv4Address(POD_A)
    assert bytes(valid(back_a)[UDP].payload) == b"to a"
    assert bytes(valid(back_b)[UDP].payload) == b"to b"
    # Expiry in one leaves the other alone.
    assert out(b, udp(POD_A, REMOTE, 5000, 53), 25.0)[0] == OK
    assert a.expire(59.0) == 0 and a.expire(62.0) == 1
    assert b.flows == 1


def test_allowlist() -> None:
    n = nat(allow=(IPv4Network("198.51.100.0/24"), IPv4Network("203.0.113.128/25")))
    assert n.allowed(REMOTE) and n.allowed(bytes([203, 0, 113, 200]))
    assert not n.allowed(bytes([203, 0, 113, 1])) and not n.allowed(bytes([8, 8, 8, 8]))
    assert out(n, udp(POD_A, bytes([8, 8, 8, 8]), 1, 53))[0] == DENIED
    assert out(n, packets.icmp_echo(POD_A, bytes([1, 1, 1, 1]), 1, 1, b""))[0] == DENIED
    assert out(n, packets.ipv4_header(POD_A, HOP, 47, 4) + bytes(4))[0] == DENIED
    assert out(n, udp(POD_A, REMOTE, 1, 53))[0] == OK
    assert n.counters["denied"] == 3 and n.flows == 1
    assert nat(allow=()).allowed(REMOTE) is False
    assert nat(allow=ALL).allowed(bytes([8, 8, 8, 8])) is True
    assert nat(allow=("192.168.0.0/16",)).allowed(bytes([192, 168, 3, 4]))  # type: ignore


METADATA = bytes([169, 254, 169, 254])
HOST = bytes([192, 0, 2, 10])  # the worker's own address
POOL = IPv4Network("100.64.0.0/16")


def guarded(allow: tuple[IPv4Network, ...] = ALL) -> EgressNat:
    return EgressNat(IPv4Address(EIP), allow, protected=ALWAYS_PROTECTED + (
        POOL, IPv4Network("192.0.2.10/32")))


def test_default_egress_refuses_the_worker_metadata_loopback_and_the_pool() -> None:
    """`egress: true` is not a way into the host: its addresses, loopback, link-local
    (cloud metadata), the pool (other namespaces) and unroutable ranges are refused."""
    n = guarded()
    for dst in (METADATA, HOST, bytes([127, 0, 0, 1]), bytes([100, 64, 0, 7]),
                bytes([0, 0, 0, 0]), bytes([224, 0, 0, 251]), bytes([255] * 4)):
        assert not n.allowed(dst), dst
        assert out(n, udp(POD_A, dst, 4000, 80))[0] == DENIED
    assert out(n, packets.icmp_echo(POD_A, METADATA, 1, 1, b""))[0] == DENIED
    assert n.counters["denied_protected"] == 8 and n.flows == 0
    assert n.counters["denied"] == 0  # the allow list said yes; protection said no
    # Next door to a protected address is fine.
    assert out(n, udp(POD_A, bytes([192, 0, 2, 11]), 4000, 80))[0] == OK
    assert out(n, udp(POD_A, bytes([169, 255, 0, 1]), 4000, 80))[0] == OK


def test_a_protected_range_is_reached_only_by_naming_it() -> None:
    n = guarded(allow=(IPv4Network("0.0.0.0/0"), IPv4Network("169.254.169.254/32"),
                       IPv4Network("192.0.2.10/32")))
    assert n.allowed(METADATA) and n.allowed(HOST)
    assert not n.allowed(bytes([169, 254, 0, 1]))  # the rest of link-local stays closed
    assert out(n, udp(POD_A, METADATA, 4000, 80))[0] == OK
    # A wide entry covering a protected range is not a way in.
    wide = guarded(allow=(IPv4Network("192.0.0.0/8"), IPv4Network("169.0.0.0/8")))
    assert not wide.allowed(HOST) and not wide.allowed(METADATA)
    # Existing flows keep going when the worker gains the address they talk to.
    n = guarded()
    assert out(n, udp(POD_A, bytes([192, 0, 2, 11]), 4000, 80))[0] == OK
    n.set_protected(n.protected + (IPv4Network("192.0.2.11/32"),))
    assert out(n, udp(POD_A, bytes([192, 0, 2, 11]), 4000, 80))[0] == OK
    assert out(n, udp(POD_A, bytes([192, 0, 2, 11]), 4001, 80))[0] == DENIED


def test_flow_table_full() -> None:
    n = nat(max_flows=2)
    assert out(n, udp(POD_A, REMOTE, 1, 53), 0.0)[0] == OK
    assert out(n, udp(POD_A, REMOTE, 2, 53), 10.0)[0] == OK
    assert out(n, udp(POD_A, REMOTE, 3, 53), 20.0)[0] == FULL
    assert out(n, udp(POD_A, REMOTE, 1, 53), 20.0)[0] == OK  # existing flows still work
    assert n.counters["table_full"] == 1 and n.flows == 2
    # The second flow idles out at 40 s; a new flow takes its slot without a timer call.
    assert out(n, udp(POD_A, REMOTE, 3, 53), 41.0)[0] == OK
    assert n.flows == 2 and n.counters["flows_expired"] == 1


def test_one_pod_cannot_take_its_neighbours_egress() -> None:
    """A pod that opens flows without end hits its quota (a quarter of the table by
    default); its neighbour still gets out, and the quota comes back as flows end."""
    n = nat(max_flows=16, pod_flows=None)
    assert n.pod_flows == 4
    for sport in range(1, 10):
        out(n, udp(POD_A, REMOTE, sport, 53), 0.0)
    assert n.flows == 4 and n.counters["pod_quota"] == 5
    assert out(n, udp(POD_B, REMOTE, 1, 53), 0.0)[0] == OK
    assert out(n, packets.tcp_packet(POD_A, REMOTE, 7, 53, 0, 0, TCP_SYN), 0.0)[0] == OK
    assert out(n, udp(POD_A, REMOTE, 50, 53), 31.0)[0] == OK  # the first four idled out
    assert n._per_pod[(PROTO_UDP, bytes(IPv4Address(POD_A).packed))] == 1


def test_port_exhaustion_with_a_tiny_range() -> None:
    n = nat(port_range=(30000, 30002))
    got = []
    for sport in (30001, 5, 6):
        verdict, t = out(n, udp(POD_A, REMOTE, sport, 53), 0.0)
        assert verdict == OK
        got.append(ports(t)[0])
    assert got == [30001, 30000, 30002]
    assert out(n, udp(POD_A, REMOTE, 7, 53), 1.0)[0] == FULL
    assert out(n, packets.tcp_packet(POD_A, REMOTE, 7, 53, 0, 0, TCP_SYN), 1.0)[0] == OK
    assert n.counters["table_full"] == 1
    # Busy flows keep their ports; the idle one's port is reused by the next flow.
    out(n, udp(POD_A, REMOTE, 30001, 53), 20.0)
    out(n, udp(POD_A, REMOTE, 6, 53), 20.0)
    verdict, t = out(n, udp(POD_A, REMOTE, 8, 53), 31.0)
    assert verdict == OK and ports(t)[0] == 30000
    assert inn(n, udp(REMOTE, EIP, 53, 30000), 31.0)[0] == IPv4Address(POD_A)
    assert n.ports_in_use(PROTO_UDP) == 3 and n.ports_in_use(PROTO_TCP) == 1


def test_port_pool_is_bounded_and_prefers_the_pods_port() -> None:
    pool = PortPool(100, 109)
    for _ in range(1000):  # a pod that always uses the same port, flow after flow
        assert pool.take(105) == 105
        pool.release(105)
    taken = [pool.take(0) for _ in range(10)]
    assert sorted(taken) == list(range(100, 110)) and pool.take(0) == -1
    for p in taken:
        pool.release(p)
    for _ in range(1000):
        a, b = pool.take(103), pool.take(103)
        assert a == 103 and b != 103 and b >= 0
        pool.release(a)
        pool.release(b)
    assert len(pool.free) <= 10 and len(pool.queued) <= 10 and len(pool) == 0
    # Freed ports come back least recently used first.
    pool2 = PortPool(1, 3)
    a, b, _ = pool2.take(0), pool2.take(0), pool2.take(0)
    pool2.release(b)
    pool2.release(a)
    assert pool2.take(0) == b and pool2.take(0) == a


# --- ICMP errors ------------------------------------------------------------------------


def _check_error_back(back: bytes, original: bytes, pod: bytes, mtu: int) -> None:
    """An ICMP error translated back: valid outer checksums, and a quote that is exactly
    what the pod sent (header and the first 8 bytes of L4)."""
    p = valid(back)
    assert p.dst == packets.ip_str(pod) and p.src == packets.ip_str(HOP)
    assert scapy_checksum(back[20:]) == 0  # the ICMP checksum covers the quote
    inner = back[28:]
    ihl = (original[0] & 15) * 4
    assert inner[:ihl + 8] == original[:ihl + 8]
    assert scapy_checksum(inner[:ihl]) == 0
    assert p[ICMP].type == ICMP_UNREACH or p[ICMP].type == ICMP_TIME_EXCEEDED
    if p[ICMP].type == ICMP_UNREACH and p[ICMP].code == UNREACH_FRAG_NEEDED:
        assert p[ICMP].nexthopmtu == mtu


@pytest.mark.parametrize("kind", ["udp", "tcp", "udp-no-checksum", "echo"])
def test_fragmentation_needed_is_translated_back(kind: str) -> None:
    n = nat()
    big = bytes(range(256)) * 5
    if kind == "udp":
        original = udp(POD_A, REMOTE, 6000, 4500, big)
    elif kind == "udp-no-checksum":
        original = udp_no_checksum(POD_A, REMOTE, 6000, 4500, big)
    elif kind == "tcp":
        original = packets.tcp_packet(POD_A, REMOTE, 6000, 443, 77, 88, TCP_ACK, big)
    else:
        original = packets.icmp_echo(POD_A, REMOTE, 6000, 3, big)
    verdict, t = out(n, original)
    assert verdict == OK
    err = packets.icmp_error(HOP, t, ICMP_UNREACH, UNREACH_FRAG_NEEDED, mtu=1280)
    assert IP(err).dst == "192.0.2.10"
    pod, back = inn(n, err, 1.0)
    assert pod == IPv4Address(POD_A)
    _check_error_back(back, original, POD_A, 1280)
    assert n.counters["icmp_errors_translated"] == 1


def test_time_exceeded_for_traceroute_probes() -> None:
    n = nat()
    probe = udp(POD_B, REMOTE, 44444, 33434, b"\0" * 32, ttl=1)
    _, t = out(n, probe)
    err = packets.icmp_error(HOP, t, ICMP_TIME_EXCEEDED, 0)
    pod, back = inn(n, err)
    assert pod == IPv4Address(POD_B)
    _check_error_back(back, probe, POD_B, 0)
    # The remote's own port unreachable, from the remote itself.
    err2 = bytearray(packets.icmp_error(REMOTE, t, ICMP_UNREACH, UNREACH_PORT))
    pod, back2 = inn(n, bytes(err2))
    assert pod == IPv4Address(POD_B) and valid(back2).src == packets.ip_str(REMOTE)


def test_icmp_error_without_a_flow_or_with_a_bad_quote() -> None:
    n = nat()
    stranger = udp(EIP, REMOTE, 1, 2)  # never sent through this NAT
    assert inn(n, packets.icmp_error(HOP, stranger, ICMP_UNREACH, 1))[0] is None
    other = udp(EIP2, REMOTE, 1, 2)  # quote from another namespace's address
    assert inn(n, packets.icmp_error(HOP, other, ICMP_UNREACH, 1))[0] is None
    assert n.counters["no_flow"] == 2
    # A quote cut short: not even 8 bytes of L4.
    _, t = out(n, udp(POD_A, REMOTE, 1, 2))
    msg = packets.icmp_message(ICMP_UNREACH, 1, 0, t[:24])
    short = packets.ipv4_header(HOP, EIP, PROTO_ICMP, len(msg)) + msg
    assert inn(n, short)[0] is None and n.counters["malformed"] == 1


def test_icmp_error_quotes_that_cannot_be_mapped() -> None:
    n = nat()
    _, t = out(n, udp(POD_A, REMOTE, 1, 2))
    # A quoted protocol without ports.
    gre = packets.ipv4_header(EIP, REMOTE, 47, 8) + bytes(8)
    assert inn(n, packets.icmp_error(HOP, gre, ICMP_UNREACH, 2))[0] is None
    # A quoted later fragment: no ports to look up.
    frag = packets.ipv4_header(EIP, REMOTE, PROTO_UDP, 8, flags_frag=3) + t[20:28]
    assert inn(n, packets.icmp_error(HOP, frag, ICMP_TIME_EXCEEDED, 1))[0] is None
    assert n.counters["no_flow"] == 2
    # A quote that is not IPv4.
    bad = bytearray(t)
    bad[0] = 0x65
    assert inn(n, packets.icmp_error(HOP, bytes(bad), ICMP_UNREACH, 1))[0] is None
    assert n.counters["malformed"] == 1
    # The same from the pod's side.
    assert out(n, packets.icmp_error(POD_A, bytes(bad), ICMP_UNREACH, 1))[0] == MALFORMED
    assert out(n, packets.icmp_error(POD_A, gre, ICMP_UNREACH, 1))[0] == UNSUPPORTED


def test_partial_icmp_error_leaves_the_outer_checksum_to_completion() -> None:
    n = nat()
    original = udp(POD_A, REMOTE, 6001, 4500, b"x" * 100)
    _, t = out(n, original)
    err = make_partial(packets.icmp_error(HOP, t, ICMP_UNREACH, UNREACH_FRAG_NEEDED, mtu=1400))
    pod, back = inn(n, err, 0.0, partial=True)
    assert pod == IPv4Address(POD_A)
    _check_error_back(complete(back), original, POD_A, 1400)


def test_pods_icmp_error_about_an_inbound_packet_goes_out_translated() -> None:
    """A pod (or its gateway) answering a reply with port unreachable: the quote has the
    pod as destination, which must become the egress address and external port."""
    n = nat()
    _, t = out(n, udp(POD_A, REMOTE, 1000, 53))
    ext = ports(t)[0]
    reply = udp(REMOTE, EIP, 53, ext, b"late answer")
    _, delivered = inn(n, reply)
    for sender in (POD_A, bytes([10, 0, 0, 1])):
        err = packets.icmp_error(sender, delivered, ICMP_UNREACH, UNREACH_PORT)
        verdict, sent = out(n, err)
        assert verdict == OK
        p = valid(sent)
        assert p.src == "192.0.2.10" and p.dst == packets.ip_str(REMOTE)
        assert scapy_checksum(sent[20:]) == 0
        assert sent[28:28 + 28] == reply[:28]  # the quote is what the remote sent
    # About a packet no flow knows: not translated.
    stray = packets.icmp_error(POD_A, udp(REMOTE2, POD_A, 9, 9), ICMP_UNREACH, UNREACH_PORT)
    assert out(n, stray)[0] == UNSUPPORTED
    assert n.counters["icmp_errors_translated"] == 2


# --- fragments --------------------------------------------------------------------------


def test_outbound_fragments() -> None:
    n = nat()
    big = udp(POD_A, REMOTE, 37777, 9000, bytes(range(256)) * 8, ident=0x4242, flags_frag=0)
    frags = packets.fragment(big, 576)
    assert len(frags) == 4
    translated = []
    for f in frags:
        verdict, t = out(n, f, 1.0)
        assert verdict == OK
        valid(t)  # IP header checksums
        assert IP(t).src == "192.0.2.10"
        translated.append(IP(t))
    (whole,) = defragment(translated)
    assert whole[UDP].sport == 37777
    valid(bytes(whole))  # the UDP checksum over the whole datagram
    assert bytes(whole[UDP].payload) == bytes(range(256)) * 8
    assert n.counters["fragments_translated"] == 4 and n.flows == 1
    # A later fragment of a datagram whose first one was never seen.
    other = packets.fragment(udp(POD_A, REMOTE, 37777, 9000, bytes(2000), ident=1,
                                 flags_frag=0), 576)
    assert out(n, other[1], 2.0)[0] == UNSUPPORTED
    # The first fragment is remembered for 30 s only.
    assert out(n, other[0], 2.0)[0] == OK
    assert out(n, other[1], 20.0)[0] == OK
    assert out(n, other[2], 32.5)[0] == UNSUPPORTED
    assert n.counters["unsupported"] == 2


def test_inbound_fragments_and_tcp_first_fragment() -> None:
    n = nat()
    _, t = out(n, udp(POD_B, REMOTE, 8888, 53, b"q"))
    ext = ports(t)[0]
    big = udp(REMOTE, EIP, 53, ext, bytes(range(200)) * 10, ident=0x77, flags_frag=0)
    frags = packets.fragment(big, 1000)
    back = []
    assert inn(n, frags[1])[0] is None  # before its first fragment: unknown
    for f in frags:
        pod, b = inn(n, f, 1.0)
        assert pod == IPv4Address(POD_B)
        valid(b)
        back.append(IP(b))
    (whole,) = defragment(back)
    assert whole.dst == "10.0.0.3" and whole[UDP].dport == 8888
    valid(bytes(whole))
    # A first fragment too short to hold the TCP header is refused.
    tcp = packets.tcp_packet(POD_B, REMOTE, 1, 2, 0, 0, TCP_SYN)
    tiny = packets.ipv4_header(POD_B, REMOTE, PROTO_TCP, 8, flags_frag=IP_MF) + tcp[20:28]
    assert out(n, tiny)[0] == MALFORMED


def test_fragment_table_is_bounded() -> None:
    n = nat(max_fragments=4)
    for i in range(10):
        dgram = udp(POD_A, REMOTE, 1000 + i, 53, bytes(100), ident=i, flags_frag=0)
        first, _ = packets.fragment(dgram, 96)[:2]
        assert out(n, first)[0] == OK
    assert len(n.table.frag_orig) == 4
    later = packets.fragment(udp(POD_A, REMOTE, 1009, 53, bytes(100), ident=9, flags_frag=0),
                             96)[1]
    assert out(n, later)[0] == OK  # the newest are kept
    early = packets.fragment(udp(POD_A, REMOTE, 1000, 53, bytes(100), ident=0, flags_frag=0),
                             96)[1]
    assert out(n, early)[0] == UNSUPPORTED
    assert n.next_timer() is not None
    n.expire(31.0)
    assert not n.table.frag_orig


# --- refusals and robustness ------------------------------------------------------------


def test_unsupported_and_malformed_outbound() -> None:
    n = nat()
    gre = packets.ipv4_header(POD_A, REMOTE, 47, 4) + bytes(4)
    assert out(n, gre)[0] == UNSUPPORTED
    tcp = packets.tcp_packet(POD_A, REMOTE, 1, 2, 0, 0, TCP_SYN)
    short = packets.ipv4_header(POD_A, REMOTE, PROTO_TCP, 12) + tcp[20:32]
    assert out(n, short)[0] == MALFORMED
    short_udp = packets.ipv4_header(POD_A, REMOTE, PROTO_UDP, 4) + bytes(4)
    assert out(n, short_udp)[0] == MALFORMED
    assert out(n, packets.ipv4_header(POD_A, REMOTE, PROTO_ICMP, 4) + bytes(4))[0] == MALFORMED
    good = udp(POD_A, REMOTE, 1, 2)
    buf = bytearray(good)
    assert n.outbound(buf, 0, len(good) + 1, 0.0, False) == MALFORMED  # past the buffer
    assert n.outbound(buf, 0, 10, 0.0, False) == MALFORMED
    assert n.outbound(buf, -1, 20, 0.0, False) == MALFORMED
    assert n.outbound(bytearray(b"\x4f" + good[1:]), 0, len(good), 0.0, False) == MALFORMED
    assert n.outbound(bytearray(b"\x65" + good[1:]), 0, len(good), 0.0, False) == MALFORMED
    assert n.counters["malformed"] == 8 and n.counters["unsupported"] == 1
    assert n.flows == 0


def test_inbound_refusals() -> None:
    n = nat()
    _, t = out(n, udp(POD_A, REMOTE, 1, 2))
    reply = bytearray(udp(REMOTE, EIP, 2, ports(t)[0]))
    bad = bytearray(reply)
    bad[8] ^= 1  # TTL changed, header checksum not: corrupted on the way
    assert n.inbound(bad, 0, len(bad), 0.0, False) == MALFORMED
    assert n.inbound(reply, 0, len(reply) + 1, 0.0, False) == MALFORMED
    assert n.inbound(reply, 0, 19, 0.0, False) == MALFORMED
    assert n.counters["malformed"] == 3
    assert inn(n, packets.ipv4_header(REMOTE, EIP, PROTO_ICMP, 4) + bytes(4))[0] is None
    assert n.counters["malformed"] == 4
    assert inn(n, packets.ipv4_header(REMOTE, EIP, 47, 0))[0] is None
    assert n.counters["unsupported"] == 1
    assert inn(n, bytes(reply))[0] == IPv4Address(POD_A)


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        nat(port_range=(0, 10))
    with pytest.raises(ValueError):
        nat(port_range=(100, 99))
    with pytest.raises(ValueError):
        nat(max_flows=0)


# --- fuzz -------------------------------------------------------------------------------

VERDICTS = {OK, DENIED, FULL, UNSUPPORTED, MALFORMED, NO_FLOW}


def _seeded() -> tuple[EgressNat, list[bytes], list[bytes]]:
    """A NAT with a few flows, valid pod packets and valid replies (incl. ICMP errors)."""
    n = nat(allow=(IPv4Network("198.51.100.0/24"),), max_flows=64, max_fragments=8)
    pod_pkts = [
        udp(POD_A, REMOTE, 1000, 53, b"dns?"),
        udp_no_checksum(POD_A, REMOTE, 1001, 53, b"no sum"),
        packets.tcp_packet(POD_A, REMOTE, 40000, 443, 1, 0, TCP_SYN),
        packets.tcp_packet(POD_B, REMOTE, 40000, 443, 5, 6, TCP_ACK | TCP_FIN, b"bye"),
        packets.icmp_echo(POD_B, REMOTE, 77, 1, b"ping"),
        *packets.fragment(udp(POD_A, REMOTE, 1002, 53, bytes(300), flags_frag=0, ident=5),
                          128),
    ]
    replies = []
    for p in pod_pkts[:5]:
        verdict, t = out(n, p)
        assert verdict == OK
        ihl = 20
        if p[9] == PROTO_ICMP:
            replies.append(packets.icmp_echo(REMOTE, EIP, icmp_id(t), 1, b"pong", reply=True))
        elif p[9] == PROTO_UDP:
            replies.append(udp(REMOTE, EIP, ports(t)[1], ports(t)[0], b"answer"))
        else:
            sport, dport = struct.unpack_from("!HH", t, ihl)
            replies.append(packets.tcp_packet(REMOTE, EIP, dport, sport, 9, 9,
                                              TCP_SYN | TCP_ACK))
        replies.append(packets.icmp_error(HOP, t, ICMP_UNREACH, UNREACH_FRAG_NEEDED, mtu=600))
        pod_pkts.append(packets.icmp_error(POD_A, replies[-2], ICMP_UNREACH, UNREACH_PORT))
    replies += packets.fragment(udp(REMOTE, EIP, 53, 1000, bytes(400), flags_frag=0, ident=9),
                                128)
    return n, pod_pkts, replies


def _repair(b: bytearray) -> None:
    """Make a mutated packet's IPv4 header plausible, so it gets past the first checks."""
    if len(b) < 20:
        return
    b[0] = 0x45
    b[2:4] = min(len(b), 0xFFFF).to_bytes(2, "big")
    b[10:12] = b"\0\0"
    b[10:12] = checksum.checksum(b[:20]).to_bytes(2, "big")


def _run_both(n: EgressNat, data: bytes, off: int, partial: bool, now: float) -> None:
    for direction in ("out", "in"):
        buf = bytearray(bytes(off) + data + b"\x99")
        length = len(data)
        if direction == "out":
            assert n.outbound(buf, off, length, now, partial) in VERDICTS
        else:
            assert n.inbound(buf, off, length, now, partial) in VERDICTS
        assert len(buf) == off + len(data) + 1 and buf[-1] == 0x99 and buf[:off] == bytes(off)
    n.expire(now)
    n.next_timer()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.integers(0, 30), st.booleans(), st.floats(0, 1e5))
def test_fuzz_random_bytes_never_raise(data: bytes, off: int, partial: bool,
                                       now: float) -> None:
    n, _, _ = _seeded()
    _run_both(n, data, off, partial, now)
    b = bytearray(data)
    _repair(b)
    _run_both(n, bytes(b), off, partial, now)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.booleans(), st.booleans(), st.floats(0, 100))
def test_fuzz_mutated_valid_packets_never_raise(data: st.DataObject, partial: bool,
                                                repair: bool, now: float) -> None:
    n, pod_pkts, replies = _seeded()
    pkt = bytearray(data.draw(st.sampled_from(pod_pkts + replies)))
    for _ in range(data.draw(st.integers(0, 6))):
        i = data.draw(st.integers(0, len(pkt) - 1))
        pkt[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(pkt)))
    if data.draw(st.booleans()):
        pkt = pkt[:cut]
    if repair:
        _repair(pkt)
    _run_both(n, bytes(pkt), data.draw(st.integers(0, 24)), partial, now)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1000, 1010), st.floats(0, 5)),
                min_size=1, max_size=60))
def test_fuzz_flow_churn_keeps_tables_consistent(steps: list[tuple[int, int, float]]) -> None:
    """Random traffic and clock steps: forward and reverse tables and the port pools always
    agree, and ports are never shared."""
    n = nat(port_range=(30000, 30005), max_flows=5)
    now = 0.0
    for which, sport, dt in steps:
        now += dt * 10
        pod = (POD_A, POD_B)[which & 1]
        if which < 4:
            v, t = out(n, udp(pod, REMOTE, sport, 53), now)
            if v == OK:
                inn(n, udp(REMOTE, EIP, 53, ports(t)[0]), now)
        else:
            out(n, packets.tcp_packet(pod, REMOTE, sport, 80, 0, 0, TCP_SYN), now)
        n.expire(now)
        fwd, rev = n.table.fwd, n.table.rev
        assert sum(map(len, fwd.values())) == sum(map(len, rev.values())) == n.flows <= 5
        for proto, table in fwd.items():
            exts = [f.tag for f in table.values()]
            assert len(exts) == len(set(exts)) == n.ports_in_use(proto)
        for f in n.table:
            assert rev[f.proto][f.rkey] is f and not f.dead
            assert n.table.wheel.holds(f)
