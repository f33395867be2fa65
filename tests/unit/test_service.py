"""fabric.services.core on the shared flow table: the service core (DNAT to backends,
reverse NAT, hairpin, holding while no backend is ready, release order, demand signals).

Packets are built with fabric.net.packets and handed over inside a bigger buffer (framing in
front, bytes past the packet that must never be touched), time is explicit, and every
rewritten packet's checksums are checked independently with scapy; partial (NEEDS_CSUM)
checksums are completed first, as the kernel or software GSO would.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP

from fabric.config.specs import HoldSpec, PortSpec, ServiceSpec
from fabric.net import checksum, packets
from fabric.net.packets import (
    ICMP_UNREACH,
    IP_MF,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    UNREACH_PORT,
)
from fabric.services.core import (
    CLIENT_QUOTA,
    FORWARD,
    HELD,
    HOLD_BUDGET,
    HOLD_FULL,
    NO_BACKEND,
    NO_FLOW,
    NOT_OURS,
    NOT_SERVICE,
    QUEUED,
    SERVICE_FLOWS,
    TABLE_FULL,
    FlowId,
    HoldBudget,
    HoldTimeout,
    Released,
    Service,
    Signal,
    reject_response,
)
from fabric.services.demand import FELL
from tests.support.packets import PREFIX, at_offset, completed, make_partial, valid

VIP = bytes([10, 0, 0, 100])
CLIENT = bytes([10, 0, 0, 2])
CLIENT2 = bytes([10, 0, 0, 3])
B1 = bytes([10, 0, 0, 11])
B2 = bytes([10, 0, 0, 12])
VIP_ADDR = ipaddress.IPv4Address("10.0.0.100")
PORTS = (PortSpec(80, 8080, "tcp"), PortSpec(53, 5353, "udp"))

def ip_s(b: bytes) -> str:
    return packets.ip_str(b)


def service(*backends: bytes, readiness: str = "external", **kw: object) -> Service:
    s = Service("web", ip_s(VIP), PORTS, readiness=readiness, **kw)  # type: ignore[arg-type]
    for i, b in enumerate(backends):
        s.set_backend(f"web-{i + 1}", ip_s(b), True, 0.0)
    return s


def finished(pkt: bytes, partial: bool) -> IP:
    """The packet with its partial checksum completed, every checksum checked by scapy."""
    return valid(completed(pkt, partial))


def tcp(src: bytes, dst: bytes, sport: int, dport: int, flags: int, payload: bytes = b"",
        seq: int = 1000, ack: int = 0) -> bytes:
    return packets.tcp_packet(src, dst, sport, dport, seq, ack, flags, payload)


def syn(src: bytes = CLIENT, sport: int = 40000, dst: bytes = VIP, dport: int = 80) -> bytes:
    return tcp(src, dst, sport, dport, TCP_SYN)


def udp(src: bytes = CLIENT, sport: int = 50000, dst: bytes = VIP, dport: int = 53,
        payload: bytes = b"query") -> bytes:
    return packets.udp_packet(src, dst, sport, dport, payload)


def out(s: Service, pkt: bytes, now: float = 0.0, partial: bool = False) -> tuple[int, bytes]:
    if partial:
        pkt = make_partial(pkt)
    return at_offset(s.outbound, pkt, now, partial, FORWARD)


def back(s: Service, pkt: bytes, now: float = 0.0, partial: bool = False) -> tuple[int, bytes]:
    if partial:
        pkt = make_partial(pkt)
    return at_offset(s.reply, pkt, now, partial, FORWARD)


def addrs(p: IP) -> tuple[str, int, str, int]:
    l4 = p[TCP] if TCP in p else p[UDP]
    return p.src, l4.sport, p.dst, l4.dport


# --- DNAT and reverse NAT -------------------------------------------------------------------


@pytest.mark.parametrize("partial", [False, True])
def test_tcp_connection_dnat_and_reverse_nat(partial: bool) -> None:
    s = service(B1)
    seq = [
        ("out", TCP_SYN, b""), ("back", TCP_SYN | TCP_ACK, b""), ("out", TCP_ACK, b""),
        ("out", TCP_ACK | TCP_PSH, b"GET / HTTP/1.1\r\n\r\n"),
        ("back", TCP_ACK | TCP_PSH, b"HTTP/1.1 200 OK\r\n\r\nhi"),
        ("out", TCP_FIN | TCP_ACK, b""), ("back", TCP_FIN | TCP_ACK, b""), ("out", TCP_ACK, b""),
    ]
    for i, (way, flags, payload) in enumerate(seq):
        now = float(i)
        if way == "out":
            v, t = out(s, tcp(CLIENT, VIP, 40000, 80, flags, payload), now, partial)
            assert v == FORWARD
            p = finished(t, partial)
            assert addrs(p) == ("10.0.0.2", 40000, "10.0.0.11", 8080)
        else:
            v, t = back(s, tcp(B1, CLIENT, 8080, 40000, flags, payload), now, partial)
            assert v == FORWARD
            p = finished(t, partial)
            assert addrs(p) == ("10.0.0.100", 80, "10.0.0.2", 40000)
        assert bytes(p[TCP].payload) == payload
        assert p[TCP].flags == flags
        assert s.table.open == (1 if i < 6 else 0)
    assert s.counters["dnat_flows"] == 1
    assert s.counters["dnat_packets"] == 5 and s.counters["reverse_nat"] == 3
    assert s.backends["web-1"].flows == 1


@pytest.mark.parametrize("partial", [False, True])
def test_udp_dnat_and_reverse_nat(partial: bool) -> None:
    s = service(B1)
    v, t = out(s, udp(payload=b"odd-length"), 1.0, partial)
    assert v == FORWARD
    p = finished(t, partial)
    assert addrs(p) == ("10.0.0.2", 50000, "10.0.0.11", 5353)
    assert bytes(p[UDP].payload) == b"odd-length"
    v, t = back(s, packets.udp_packet(B1, CLIENT, 5353, 50000, b"answer!"), 1.5, partial)
    assert v == FORWARD
    p = finished(t, partial)
    assert addrs(p) == ("10.0.0.100", 53, "10.0.0.2", 50000)


def test_udp_without_checksum_stays_without() -> None:
    s = service(B1)
    pkt = bytearray(udp())
    pkt[26:28] = b"\0\0"
    v, t = out(s, bytes(pkt))
    assert v == FORWARD and t[26:28] == b"\0\0"
    valid(t)


def test_ip_options() -> None:
    s = service(B1)
    seg = bytearray(struct.pack("!HHHH", 50000, 53, 12, 0) + b"data")
    seg[6:8] = packets.l4_checksum(CLIENT, VIP, PROTO_UDP, seg).to_bytes(2, "big")
    pkt = packets.ipv4_header(CLIENT, VIP, PROTO_UDP, len(seg), options=b"\x01\x01\x01\x00") + seg
    v, t = out(s, pkt)
    assert v == FORWARD
    assert addrs(valid(t)) == ("10.0.0.2", 50000, "10.0.0.11", 5353)


def test_not_for_a_service_port() -> None:
    s = service(B1)
    assert out(s, syn(dport=81))[0] == NOT_SERVICE
    assert out(s, udp(dport=80))[0] == NOT_SERVICE  # 80 is TCP only
    assert out(s, packets.icmp_echo(CLIENT, VIP, 1, 1, b"ping"))[0] == NOT_SERVICE
    assert out(s, syn(dst=B2))[0] == NOT_SERVICE
    assert back(s, tcp(B1, CLIENT, 8080, 40000, TCP_ACK))[0] == NOT_OURS


# --- backend choice --------------------------------------------------------------------------


def test_flows_stick_and_spread_across_two_backends() -> None:
    s = service(B1, B2)
    chosen: dict[int, str] = {}
    for sport in range(30000, 30200):
        v, t = out(s, syn(sport=sport))
        assert v == FORWARD
        chosen[sport] = IP(t).dst
    for sport in range(30000, 30200):  # the same flows again: same backends
        v, t = out(s, tcp(CLIENT, VIP, sport, 80, TCP_ACK))
        assert IP(t).dst == chosen[sport]
    n1 = sum(1 for d in chosen.values() if d == "10.0.0.11")
    assert 60 < n1 < 140
    assert s.backends["web-1"].flows == n1 and s.backends["web-2"].flows == 200 - n1


def test_unready_backend_takes_no_new_flows_but_keeps_its_flows() -> None:
    s = service(B1, B2)
    pinned = {}
    for sport in range(30000, 30040):
        _, t = out(s, syn(sport=sport))
        pinned[sport] = IP(t).dst
    s.set_backend("web-2", ip_s(B2), False, 1.0)
    for sport in range(30000, 30040):  # existing flows keep going, both ways
        _, t = out(s, tcp(CLIENT, VIP, sport, 80, TCP_ACK), 2.0)
        assert IP(t).dst == pinned[sport]
        if pinned[sport] == "10.0.0.12":
            v, r = back(s, tcp(B2, CLIENT, 8080, sport, TCP_ACK), 2.0)
            assert v == FORWARD and IP(r).src == "10.0.0.100"
    for sport in range(31000, 31040):  # new flows only to the ready one
        _, t = out(s, syn(sport=sport), 3.0)
        assert IP(t).dst == "10.0.0.11"


def test_removed_backend_loses_its_flows() -> None:
    s = service(B1)
    out(s, syn())
    s.remove_backend("web-1")
    assert len(s.table) == 0 and s.table.open == 0
    assert back(s, tcp(B1, CLIENT, 8080, 40000, TCP_SYN | TCP_ACK))[0] == NOT_OURS
    assert out(s, tcp(CLIENT, VIP, 40000, 80, TCP_ACK))[0] == HELD  # no backend: held


def test_readiness_probe() -> None:
    s = Service("web", ip_s(VIP), PORTS, probe_interval=0.5)
    s.set_backend("web-1", ip_s(B1), True, 10.0)
    assert s.state == "dormant" and not s.releasable
    assert s.next_probe() == 10.0 and s.next_timer() is None  # probes are the shell's
    assert s.probes_due(10.0) == [("web-1", "10.0.0.11", 8080)]
    assert s.probes_due(10.2) == []  # in flight
    assert s.next_probe() == 10.5
    s.probe_result("web-1", False, 10.3)
    assert s.probes_due(10.5) == []
    assert s.probes_due(10.8) == [("web-1", "10.0.0.11", 8080)]
    assert out(s, syn(), 10.9)[0] == HELD
    s.probe_result("web-1", True, 11.0)
    assert s.releasable and s.state == "ready"
    assert s.probes_due(20.0) == []
    # Unready and ready again: probed again.
    s.set_backend("web-1", ip_s(B1), False, 21.0)
    s.set_backend("web-1", ip_s(B1), True, 22.0)
    assert s.status()["backends"][0]["ready"] is False
    assert s.probes_due(22.0) == [("web-1", "10.0.0.11", 8080)]


def test_external_readiness_and_udp_only_services_need_no_probe() -> None:
    s = Service("dns", ip_s(VIP), (PortSpec(53, 5353, "udp"),))
    s.set_backend("dns-1", ip_s(B1), True, 0.0)
    assert s.probes_due(0.0) == [] and s.state == "idle"


# --- holding ---------------------------------------------------------------------------------


def test_hold_bounded_by_packets_tail_drop() -> None:
    s = service(hold=HoldSpec(packets=3, bytes=1 << 20, timeout=30.0))
    verdicts = [out(s, syn(sport=40000 + i), float(i))[0] for i in range(5)]
    assert verdicts == [HELD, HELD, HELD, HOLD_FULL, HOLD_FULL]
    assert s.counters["held"] == 3 and s.counters["hold_overflow"] == 2
    s.set_backend("web-1", ip_s(B1), True, 5.0)
    rel = s.release(5.0)
    assert [IP(r.packet)[TCP].sport for r in rel] == [40000, 40001, 40002]  # the first ones


def test_hold_bounded_by_bytes() -> None:
    p = udp(payload=b"x" * 100)  # 128 bytes
    s = service(hold=HoldSpec(packets=100, bytes=300, timeout=30.0))
    assert [out(s, p, 0.0)[0] for _ in range(3)] == [HELD, HELD, HOLD_FULL]
    assert s.held_bytes == 256 and s.held_packets == 2
    small = udp(payload=b"")
    assert out(s, small)[0] == HELD  # 28 more bytes still fit
    assert s.status()["held_bytes"] == 284


def test_hold_timeout_answers_syn_with_rst_and_udp_with_icmp() -> None:
    s = service(hold=HoldSpec(packets=10, bytes=1 << 20, timeout=30.0))
    syn_pkt = tcp(CLIENT, VIP, 40000, 80, TCP_SYN, seq=12345)
    assert out(s, syn_pkt, 1.0)[0] == HELD
    udp_pkt = udp()
    assert out(s, udp_pkt, 2.0, partial=True)[0] == HELD
    ack_pkt = tcp(CLIENT, VIP, 40001, 80, TCP_ACK)
    assert out(s, ack_pkt, 3.0)[0] == HELD
    assert s.next_timer() is not None and s.next_timer() <= 31.0
    acts = s.handle_timer(30.5)
    assert not [a for a in acts if isinstance(a, HoldTimeout)]
    acts = [a for a in s.handle_timer(31.0) if isinstance(a, HoldTimeout)]
    assert len(acts) == 1 and acts[0].packet == syn_pkt
    assert acts[0].frame[:len(PREFIX)] == PREFIX  # the frame as handed over
    rst = valid(acts[0].response)
    assert addrs(rst) == ("10.0.0.100", 80, "10.0.0.2", 40000)
    assert rst[TCP].flags == TCP_RST | TCP_ACK and rst[TCP].ack == 12346 and rst[TCP].seq == 0
    acts = [a for a in s.handle_timer(33.0) if isinstance(a, HoldTimeout)]
    assert len(acts) == 2
    for a, orig_sport in zip(acts, (50000, 40001), strict=True):
        icmp = valid(a.response)
        assert icmp.src == "10.0.0.100" and icmp.dst == "10.0.0.2"
        assert icmp[ICMP].type == ICMP_UNREACH and icmp[ICMP].code == UNREACH_PORT
        quoted = bytes(icmp[ICMP].payload)
        assert quoted[12:20] == CLIENT + VIP and struct.unpack("!H", quoted[20:22])[0] == orig_sport
    # the partial UDP checksum was completed in the quote
    assert bytes(IP(acts[0].response)[ICMP].payload)[26:28] == udp_pkt[26:28]
    assert s.counters["hold_timeout"] == 3 and s.held_packets == 0 and s.held_bytes == 0


def test_reject_response_stays_quiet() -> None:
    assert reject_response(tcp(CLIENT, VIP, 1, 80, TCP_RST)) is None
    err = packets.icmp_error(CLIENT, udp(VIP, 53, CLIENT, 50000), ICMP_UNREACH, UNREACH_PORT)
    assert reject_response(err) is None
    frag = bytearray(udp())
    frag[6:8] = b"\0\x10"
    assert reject_response(bytes(frag)) is None
    assert reject_response(b"\x45garbage") is None
    assert reject_response(syn(src=bytes(4))) is None


def test_no_hold_when_disabled() -> None:
    s = service(hold=HoldSpec(packets=0, bytes=0, timeout=0.0))
    assert out(s, syn())[0] == NO_BACKEND
    assert s.counters["no_backend"] == 1 and s.need()


@pytest.mark.parametrize("partial", [False, True])
def test_release_in_arrival_order_and_later_packets_queue_behind(partial: bool) -> None:
    s = service()
    sent = [syn(sport=40000 + i) if i % 2 == 0 else udp(sport=50000 + i) for i in range(6)]
    for i, p in enumerate(sent):
        assert out(s, p, float(i), partial)[0] == HELD
    assert s.state == "activating"
    assert [x.kind for x in s.take_signals()] == ["activate"]
    s.set_backend("web-1", ip_s(B1), True, 10.0)
    assert s.releasable and s.next_timer() == 10.0
    # A packet arriving before the router released the held ones queues behind them.
    assert out(s, syn(sport=41000), 10.1, partial)[0] == QUEUED
    rel = s.release(10.2)
    assert all(isinstance(r, Released) and r.partial == partial for r in rel)
    got = [addrs(finished(r.packet, partial)) for r in rel]
    want = [(ip_s(CLIENT), 40000 + i, "10.0.0.11", 8080) if i % 2 == 0
            else (ip_s(CLIENT), 50000 + i, "10.0.0.11", 5353) for i in range(6)]
    assert got == want + [(ip_s(CLIENT), 41000, "10.0.0.11", 8080)]
    assert all(r.frame[:len(PREFIX)] == PREFIX for r in rel)
    assert s.counters["released"] == 7 and s.held_packets == 0 and not s.releasable
    # Flows are pinned now; later packets go straight through.
    assert out(s, tcp(CLIENT, VIP, 40000, 80, TCP_ACK), 11.0)[0] == FORWARD
    assert out(s, syn(sport=42000), 11.0)[0] == FORWARD
    assert s.state == "ready"


def test_release_is_paced_and_keeps_every_flows_order() -> None:
    s = service(hold=HoldSpec(packets=100, bytes=1 << 20, timeout=30.0, release_burst=2,
                              release_interval=0.005))
    # five connections; the first one's data arrives after the others' SYNs
    for i in range(5):
        assert out(s, syn(sport=40000 + i), 0.1 * i)[0] == HELD
    assert out(s, tcp(CLIENT, VIP, 40000, 80, TCP_ACK, b"one"), 0.6)[0] == HELD
    assert out(s, tcp(CLIENT, VIP, 40004, 80, TCP_ACK, b"five"), 0.7)[0] == HELD
    s.take_signals()
    s.set_backend("web-1", ip_s(B1), True, 1.0)

    def sports(rel: list[object]) -> list[tuple[int, bytes]]:
        return [(IP(r.packet)[TCP].sport, bytes(IP(r.packet)[TCP].payload))  # type: ignore[attr-defined]
                for r in rel]

    # step 1: two new flows; the first flow's data goes with it (it is started)
    assert sports(s.release(1.0)) == [(40000, b""), (40001, b""), (40000, b"one")]
    assert s.held_packets == 4 and s.counters["release_paced"] == 4
    assert s.next_timer() == pytest.approx(1.005)
    # nothing before the step is due, also when a new packet queues behind
    assert out(s, syn(sport=40009), 1.001)[0] == QUEUED
    assert s.release(1.002) == []
    assert s.counters["release_paced"] == 4  # counted once per packet, not per step
    # a started flow goes straight through; it has nothing left in the queue
    assert out(s, tcp(CLIENT, VIP, 40001, 80, TCP_ACK, b"two"), 1.003)[0] == FORWARD
    assert sports(s.release(1.005)) == [(40002, b""), (40003, b"")]
    assert sports(s.handle_timer(1.010)) == [(40004, b""), (40004, b"five"), (40009, b"")]
    assert s.held_packets == 0 and s.counters["released"] == 8
    assert s.counters["release_paced"] == 5  # and the SYN that queued behind
    assert s.next_timer() is None or s.next_timer() > 2.0


def test_release_budget_is_per_ready_backend() -> None:
    s = service(hold=HoldSpec(packets=100, bytes=1 << 20, timeout=30.0, release_burst=1,
                              release_interval=0.001))
    for i in range(5):
        out(s, syn(sport=40000 + i), 0.0)
    s.set_backend("web-1", ip_s(B1), True, 1.0)
    s.set_backend("web-2", ip_s(B2), True, 1.0)
    assert len(s.release(1.0)) == 2
    assert len(s.release(1.001)) == 2
    assert len(s.release(1.002)) == 1


def test_release_from_the_timer() -> None:
    s = service()
    out(s, syn(), 0.0)
    s.take_signals()
    s.set_backend("web-1", ip_s(B1), True, 2.0)
    assert s.next_timer() == 2.0
    acts = s.handle_timer(2.0)
    assert len(acts) == 1 and isinstance(acts[0], Released)
    assert IP(acts[0].packet).dst == "10.0.0.11"


def test_pinned_flows_continue_while_new_flows_are_held() -> None:
    s = service(B1)
    out(s, syn(sport=40000))
    s.set_backend("web-1", ip_s(B1), False, 1.0)
    assert out(s, tcp(CLIENT, VIP, 40000, 80, TCP_ACK), 2.0)[0] == FORWARD
    assert out(s, syn(sport=40001), 2.0)[0] == HELD


def test_fragments_follow_their_first_fragment() -> None:
    s = service(B1)
    big = packets.udp_packet(CLIENT, VIP, 50000, 53, bytes(range(200)) * 10, flags_frag=0,
                             ident=77)
    frags = packets.fragment(big, 600)
    assert len(frags) == 4
    outs = []
    for f in frags:
        v, t = out(s, f, 1.0)
        assert v == FORWARD
        outs.append(valid(t))
    assert all(p.dst == "10.0.0.11" for p in outs)
    # An unknown later fragment goes nowhere.
    stray = bytearray(frags[1])
    stray[4:6] = b"\0\x09"
    stray[10:12] = b"\0\0"
    stray[10:12] = checksum.checksum(stray[:20]).to_bytes(2, "big")
    assert out(s, bytes(stray))[0] == NO_FLOW


def test_held_fragments_are_released_together() -> None:
    s = service()
    big = packets.udp_packet(CLIENT, VIP, 50000, 53, b"z" * 1500, flags_frag=0, ident=5)
    frags = packets.fragment(big, 600)
    assert [out(s, f)[0] for f in frags] == [HELD] * len(frags)
    s.set_backend("web-1", ip_s(B1), True, 1.0)
    rel = s.release(1.0)
    assert len(rel) == len(frags)
    assert all(valid(r.packet).dst == "10.0.0.11" for r in rel)


# --- ICMP errors ----------------------------------------------------------------------------------


def test_icmp_errors_translated_both_ways() -> None:
    s = service(B1)
    _, t = out(s, udp())
    # The backend's port unreachable about the DNATed packet goes back as from the VIP.
    err = packets.icmp_error(B1, t, ICMP_UNREACH, UNREACH_PORT)
    v, r = back(s, err)
    assert v == FORWARD
    p = valid(r)
    assert p.src == "10.0.0.100" and p.dst == "10.0.0.2"
    inner = IP(bytes(p[ICMP].payload))
    assert (inner.src, inner.dst) == ("10.0.0.2", "10.0.0.100")
    assert struct.unpack("!HH", bytes(p[ICMP].payload)[20:24]) == (50000, 53)
    # The inner header is the original packet's, checksums included.
    assert bytes(p[ICMP].payload)[:28] == udp()[:28]
    # The client's error about a reply goes to the backend.
    _, rep = back(s, packets.udp_packet(B1, CLIENT, 5353, 50000, b"late"))
    err = packets.icmp_error(CLIENT, rep, ICMP_UNREACH, UNREACH_PORT)
    v, r = out(s, err)
    assert v == FORWARD
    p = valid(r)
    assert p.src == "10.0.0.2" and p.dst == "10.0.0.11"
    assert bytes(p[ICMP].payload)[:28] == packets.udp_packet(B1, CLIENT, 5353, 50000, b"late")[:28]
    assert s.counters["icmp_errors_translated"] == 2
    # Unrelated errors are not ours.
    err = packets.icmp_error(B1, udp(CLIENT2, 1, B1, 2), ICMP_UNREACH, UNREACH_PORT)
    assert back(s, err)[0] == NOT_OURS


# --- hairpin ---------------------------------------------------------------------------------


@pytest.mark.parametrize("partial", [False, True])
def test_hairpin_snat_to_the_vip(partial: bool) -> None:
    s = service(B1)
    v, t = out(s, tcp(B1, VIP, 40000, 80, TCP_SYN), 0.0, partial)
    assert v == FORWARD
    p = finished(t, partial)
    assert addrs(p) == ("10.0.0.100", 40000, "10.0.0.11", 8080)
    # The backend answers the VIP: that reaches outbound() (destination VIP).
    v, r = out(s, tcp(B1, VIP, 8080, 40000, TCP_SYN | TCP_ACK), 0.1, partial)
    assert v == FORWARD
    assert addrs(finished(r, partial)) == ("10.0.0.100", 80, "10.0.0.11", 40000)
    # reply() takes it as well.
    v, r = back(s, tcp(B1, VIP, 8080, 40000, TCP_ACK), 0.2, partial)
    assert v == FORWARD
    assert addrs(finished(r, partial)) == ("10.0.0.100", 80, "10.0.0.11", 40000)
    v, t = out(s, tcp(B1, VIP, 40000, 80, TCP_ACK, b"hi"), 0.3, partial)
    assert addrs(finished(t, partial)) == ("10.0.0.100", 40000, "10.0.0.11", 8080)
    assert s.counters["hairpin"] == 1


def test_hairpin_source_port_never_a_service_port() -> None:
    s = service(B1)
    _, t = out(s, tcp(B1, VIP, 80, 80, TCP_SYN))  # from port 80: the VIP's own port
    p = valid(t)
    snat_port = p[TCP].sport
    assert p.src == "10.0.0.100" and snat_port not in (80,) and snat_port >= 1024
    v, r = out(s, tcp(B1, VIP, 8080, snat_port, TCP_SYN | TCP_ACK))
    assert v == FORWARD and addrs(valid(r)) == ("10.0.0.100", 80, "10.0.0.11", 80)


def test_other_backend_as_client_is_plain_dnat() -> None:
    s = service(B1)
    s.set_backend("web-2", ip_s(B2), False)
    _, t = out(s, syn(src=B2))
    assert addrs(valid(t)) == ("10.0.0.12", 40000, "10.0.0.11", 8080)


def test_reply_tuple_clash_remaps_the_source_port() -> None:
    s = Service("web", ip_s(VIP), (PortSpec(80, 8080), PortSpec(8080, 8080)),
                readiness="external")
    s.set_backend("web-1", ip_s(B1), True)
    _, a = out(s, syn(dport=80))
    _, b = out(s, syn(dport=8080))
    pa, pb = valid(a), valid(b)
    assert pa[TCP].sport == 40000 and pb[TCP].sport != 40000
    _, ra = back(s, tcp(B1, CLIENT, 8080, pa[TCP].sport, TCP_SYN | TCP_ACK))
    _, rb = back(s, tcp(B1, CLIENT, 8080, pb[TCP].sport, TCP_SYN | TCP_ACK))
    assert addrs(valid(ra)) == ("10.0.0.100", 80, "10.0.0.2", 40000)
    assert addrs(valid(rb)) == ("10.0.0.100", 8080, "10.0.0.2", 40000)


VIP2 = bytes([10, 0, 0, 101])


def _replies_from_shared_backend(services: list[Service], pkt: bytes) -> bytes:
    """A backend's packet offered to each of its services in turn, as the dispatch
    does (fabric.services.dispatch.from_backend): the first that translates it wins."""
    for svc in services:
        v, outp = back(svc, pkt)
        if v == FORWARD:
            return outp
    return pkt


def test_two_services_sharing_a_backend_never_share_a_reply_tuple() -> None:
    """A client uses port 40000 toward two VIPs that both point at web:8080: the
    second flow is remapped, and each SYN-ACK and data reply comes from its own VIP."""
    peers: dict[bytes, list[Service]] = {}
    a = Service("a", ip_s(VIP), PORTS, readiness="external", peers=peers)
    b = Service("b", ip_s(VIP2), PORTS, readiness="external", peers=peers)
    a.set_backend("web", ip_s(B1), True)
    b.set_backend("web", ip_s(B1), True)
    assert peers[B1] == [a, b]
    va, fa = out(a, syn(dst=VIP))
    vb, fb = out(b, syn(dst=VIP2))
    assert va == vb == FORWARD
    pa, pb = valid(fa), valid(fb)
    assert (pa.dst, pa[TCP].dport) == (pb.dst, pb[TCP].dport) == ("10.0.0.11", 8080)
    assert pa[TCP].sport != pb[TCP].sport  # else the backend's replies look alike
    for flags, payload in ((TCP_SYN | TCP_ACK, b""), (TCP_ACK | TCP_PSH, b"hello")):
        for p, vip in ((pa, "10.0.0.100"), (pb, "10.0.0.101")):
            r = valid(_replies_from_shared_backend(
                peers[B1], tcp(B1, CLIENT, 8080, p[TCP].sport, flags, payload)))
            assert addrs(r) == (vip, 80, "10.0.0.2", 40000)
    # Either order of creation, and either service first in the list.
    for s in (a, b):
        s.remove_backend("web")
    assert B1 not in peers


def test_a_service_joins_shared_backends_with_its_existing_backends() -> None:
    """share_backends moves a service's backends to the shared map (the dispatch's),
    and leaving takes them out again."""
    a = service(B1, B2)
    shared: dict[bytes, list[Service]] = {}
    a.share_backends(shared)
    assert shared == {B1: [a], B2: [a]} and a.peers is shared
    a.share_backends({})
    assert shared == {}


# --- signals ---------------------------------------------------------------------------------


def test_activate_once_for_many_held_packets() -> None:
    s = service()
    assert s.state == "dormant" and not s.need()
    for i in range(5):
        out(s, syn(sport=40000 + i), float(i) * 0.1)
    assert s.signals_pending and s.next_timer() == 0.0
    sigs = s.take_signals()
    assert sigs == [Signal("activate", "held", FlowId("tcp", "10.0.0.2", 40000, "10.0.0.100", 80))]
    assert s.need() and s.state == "activating"
    assert s.activate("tcp", 1.0) == []  # already needed: no new edge
    assert s.take_signals() == []


def test_activator_and_debounce() -> None:
    s = service(B1, idle_timeout=5.0, activate_debounce=10.0)
    assert s.state == "idle"
    assert s.activate("http", 0.0) == [Signal("activate", "activator:http", None)]
    acts = s.handle_timer(5.0)
    assert acts == [Signal("idle", "idle_timeout", None)]
    assert not s.need() and s.state == "idle"
    # Need again within the debounce interval: told when it ends.
    assert s.activate("http", 6.0) == []
    assert s.need() and s.next_timer() == 10.0
    assert s.handle_timer(10.0) == [Signal("activate", "activator:http", None)]
    assert s.counters["activations"] == 2 and s.counters["idles"] == 1


def test_signals_coalesce_without_loss_of_the_level() -> None:
    s = service(B1, idle_timeout=1.0, activate_debounce=0.0)
    for i in range(10):  # rise and fall ten times without anyone taking signals
        out(s, syn(sport=40000 + i), float(3 * i))
        out(s, tcp(CLIENT, VIP, 40000 + i, 80, TCP_RST), float(3 * i))
        # The fall, as handle_timer finds it (signals not drained).
        assert s.demand.check_idle(float(3 * i + 2), busy=False) == FELL
        assert s.demand.queued <= 2
    assert not s.need()
    sigs = s.take_signals()
    assert [x.kind for x in sigs] == ["activate", "idle"]
    assert sigs[0].flow is not None and sigs[0].flow.sport == 40000  # the first reason
    assert s.counters["activations"] == 10 and s.counters["idles"] == 10


def test_new_flow_to_an_idle_service_raises_need() -> None:
    s = service(B1)
    out(s, syn(), 1.0)
    assert s.take_signals() == [
        Signal("activate", "traffic", FlowId("tcp", "10.0.0.2", 40000, "10.0.0.100", 80))]
    assert s.state == "ready"


@pytest.mark.parametrize("close", ["fin", "rst_client", "rst_backend"])
def test_idle_after_tcp_close(close: str) -> None:
    s = service(B1, idle_timeout=60.0)
    out(s, syn(), 0.0)
    back(s, tcp(B1, CLIENT, 8080, 40000, TCP_SYN | TCP_ACK), 0.1)
    out(s, tcp(CLIENT, VIP, 40000, 80, TCP_ACK), 0.2)
    s.take_signals()
    # An open connection keeps the service needed however long it is quiet.
    assert s.handle_timer(500.0) == [] and s.need()
    if close == "fin":
        out(s, tcp(CLIENT, VIP, 40000, 80, TCP_FIN | TCP_ACK), 600.0)
        back(s, tcp(B1, CLIENT, 8080, 40000, TCP_FIN | TCP_ACK), 600.1)
        out(s, tcp(CLIENT, VIP, 40000, 80, TCP_ACK), 600.2)
    elif close == "rst_client":
        out(s, tcp(CLIENT, VIP, 40000, 80, TCP_RST), 600.2)
    else:
        back(s, tcp(B1, CLIENT, 8080, 40000, TCP_RST), 600.2)
    assert s.table.open == 0
    assert s.next_timer() is not None
    assert s.handle_timer(660.1) == [] and s.need()
    assert s.handle_timer(660.2) == [Signal("idle", "idle_timeout", None)]
    assert not s.need() and s.state == "idle"
    assert s.status()["need"] is False


def test_idle_after_udp_idle() -> None:
    s = service(B1, idle_timeout=10.0,
                flow_policy=replace(SERVICE_FLOWS, udp_unreplied=30.0, udp_replied=120.0))
    out(s, udp(), 0.0)
    back(s, packets.udp_packet(B1, CLIENT, 5353, 50000, b"a"), 1.0)  # stream: 120 s
    s.take_signals()
    assert s.handle_timer(50.0) == [] and s.table.open == 1
    t = s.next_timer()
    assert t is not None and t <= 122.0
    acts = s.handle_timer(122.0)
    assert acts == [Signal("idle", "idle_timeout", None)]  # idle 10 s after traffic: now
    assert len(s.table) == 0 and s.counters["flows_expired"] == 1


def test_unanswered_udp_flow_expires_sooner() -> None:
    s = service(B1, idle_timeout=10.0, flow_policy=replace(SERVICE_FLOWS, udp_unreplied=30.0))
    out(s, udp(), 0.0)
    s.handle_timer(29.0)
    assert s.table.open == 1
    assert s.handle_timer(31.0) == [Signal("idle", "idle_timeout", None)]


def test_status_row() -> None:
    s = Service.from_spec(ServiceSpec("web", VIP_ADDR, PORTS), now=0.0)
    row = s.status()
    assert row["state"] == "dormant" and row["need"] is False and row["ip"] == "10.0.0.100"
    assert set(row["counters"]) >= {"held", "released", "hold_overflow", "hold_timeout",
                                    "dnat_flows", "reverse_nat", "no_backend", "hairpin"}


# --- the flow table -------------------------------------------------------------------------------


def test_conntrack_bound_evicts_closed_flows_first() -> None:
    s = service(B1, flow_policy=replace(SERVICE_FLOWS, max_flows=2), client_flows=3)
    assert out(s, syn(sport=1), 0.0)[0] == FORWARD
    assert out(s, syn(sport=2), 0.0)[0] == FORWARD
    assert out(s, syn(sport=3), 0.0)[0] == TABLE_FULL
    assert s.counters["table_full"] == 1
    out(s, tcp(CLIENT, VIP, 1, 80, TCP_RST), 1.0)  # closed: may be evicted
    assert out(s, syn(sport=3), 1.0)[0] == FORWARD
    assert s.table.counters["evicted"] == 1 and len(s.table) == 2
    assert s.table.get(PROTO_TCP, (int.from_bytes(CLIENT + VIP, "big"), 1 << 16 | 80)) is None


def test_conntrack_expiry_on_the_wheel() -> None:
    s = service(B1, flow_policy=replace(SERVICE_FLOWS, tcp_syn=20.0, tcp_established=100.0,
                                        tcp_closed=5.0))
    ct = s.table
    out(s, syn(sport=1), 0.0)  # never answered
    out(s, syn(sport=2), 0.0)
    back(s, tcp(B1, CLIENT, 8080, 2, TCP_SYN | TCP_ACK), 0.5)
    out(s, tcp(CLIENT, VIP, 2, 80, TCP_ACK), 1.0)  # established
    assert ct.next_timer() == 20.0
    s.handle_timer(20.0)
    assert len(ct) == 1 and s.backends["web-1"].flows == 1
    out(s, tcp(CLIENT, VIP, 2, 80, TCP_ACK), 50.0)
    s.handle_timer(101.0)
    assert len(ct) == 1  # active since: moved to a later bucket
    out(s, tcp(CLIENT, VIP, 2, 80, TCP_FIN | TCP_ACK), 120.0)
    back(s, tcp(B1, CLIENT, 8080, 2, TCP_FIN | TCP_ACK), 120.0)
    assert ct.open == 0 and len(ct) == 1
    # A straggler after close is still translated.
    assert out(s, tcp(CLIENT, VIP, 2, 80, TCP_ACK), 121.0)[0] == FORWARD
    s.handle_timer(127.0)
    assert len(ct) == 0 and s.backends["web-1"].flows == 0


def test_new_syn_on_a_closed_tuple_is_a_new_connection() -> None:
    s = service(B1, B2)
    for sport in range(30000, 30050):
        _, t = out(s, syn(sport=sport))
        first = IP(t).dst
        out(s, tcp(CLIENT, VIP, sport, 80, TCP_RST))
        unready = "web-1" if first == "10.0.0.11" else "web-2"
        s.set_backend(unready, ip_s(B1 if unready == "web-1" else B2), False)
        _, t = out(s, syn(sport=sport))
        assert IP(t).dst != first  # chosen again among the ready ones
        s.set_backend(unready, ip_s(B1 if unready == "web-1" else B2), True)


# --- a client's share of the flow table -----------------------------------------------------


def _recount(s: Service) -> dict[tuple[int, bytes], int]:
    """The per-client counts as they should be: the open flows in the table by client."""
    want: dict[tuple[int, bytes], int] = {}
    for f in s.table:
        if f.open:
            k = (f.proto, f.orig_addrs[:4])
            want[k] = want.get(k, 0) + 1
    assert s._per_client == want
    return want


def test_default_client_share_is_a_quarter_of_the_table() -> None:
    assert service(B1).client_flows == SERVICE_FLOWS.max_flows // 4 == 16384
    s = service(B1, flow_policy=replace(SERVICE_FLOWS, max_flows=2))
    assert s.client_flows == 1


def test_client_past_its_share_is_refused_others_are_not() -> None:
    s = service(B1, client_flows=3)
    for sport in (1, 2, 3):
        assert out(s, syn(sport=sport), 0.0)[0] == FORWARD
    assert out(s, syn(sport=4), 1.0)[0] == CLIENT_QUOTA  # and left unchanged
    assert out(s, syn(sport=5), 1.0)[0] == CLIENT_QUOTA
    assert s.counters["client_quota"] == 2 and s.counters["table_full"] == 0
    # Its flows go on; another client, and the same client over UDP, get new flows.
    assert out(s, tcp(CLIENT, VIP, 1, 80, TCP_ACK), 1.0)[0] == FORWARD
    assert out(s, syn(src=CLIENT2, sport=4), 1.0)[0] == FORWARD
    assert out(s, udp(), 1.0)[0] == FORWARD
    assert s.client_flow_count(PROTO_TCP, CLIENT) == 3
    assert s.client_flow_count(PROTO_TCP, CLIENT2) == 1
    assert s.client_flow_count(PROTO_UDP, CLIENT) == 1
    assert len(s.table) == 5
    _recount(s)


def test_client_share_frees_as_its_flows_close_expire_or_go() -> None:
    s = service(B1, client_flows=2,
                flow_policy=replace(SERVICE_FLOWS, tcp_syn=20.0, tcp_closed=5.0))
    out(s, syn(sport=1), 0.0)
    out(s, syn(sport=2), 1.0)
    assert out(s, syn(sport=3), 2.0)[0] == CLIENT_QUOTA
    # Closed (RST): no longer counted, though still in the table for stragglers.
    out(s, tcp(CLIENT, VIP, 1, 80, TCP_RST), 3.0)
    assert s.client_flow_count(PROTO_TCP, CLIENT) == 1 and len(s.table) == 2
    assert out(s, syn(sport=3), 3.0)[0] == FORWARD
    assert out(s, syn(sport=4), 3.0)[0] == CLIENT_QUOTA
    _recount(s)
    # A FIN both ways closes as well.
    back(s, tcp(B1, CLIENT, 8080, 3, TCP_SYN | TCP_ACK), 4.0)
    out(s, tcp(CLIENT, VIP, 3, 80, TCP_ACK), 4.0)
    out(s, tcp(CLIENT, VIP, 3, 80, TCP_FIN | TCP_ACK), 5.0)
    back(s, tcp(B1, CLIENT, 8080, 3, TCP_FIN | TCP_ACK), 5.0)
    assert s.client_flow_count(PROTO_TCP, CLIENT) == 1
    _recount(s)
    # Expired: sport 2 (opening since 1.0) is due at 21.0; no timer ran, the refusal
    # expires due flows first.
    assert out(s, syn(sport=4), 21.5)[0] == FORWARD
    assert out(s, syn(sport=5), 21.5)[0] == FORWARD
    assert out(s, syn(sport=6), 21.5)[0] == CLIENT_QUOTA
    assert s.counters["flows_expired"] >= 1
    _recount(s)
    # A removed backend takes its flows, and the count with them.
    s.remove_backend("web-1")
    assert len(s.table) == 0 and s._per_client == {}
    s.set_backend("web-1", ip_s(B1), True)
    assert out(s, syn(sport=7), 22.0)[0] == FORWARD


def test_a_reopened_tuple_counts_once() -> None:
    s = service(B1, client_flows=1)
    out(s, syn(sport=1), 0.0)
    out(s, tcp(CLIENT, VIP, 1, 80, TCP_RST), 0.5)
    assert s.client_flow_count(PROTO_TCP, CLIENT) == 0
    assert out(s, syn(sport=1), 1.0)[0] == FORWARD  # a new connection on the closed tuple
    assert s.client_flow_count(PROTO_TCP, CLIENT) == 1
    assert out(s, syn(sport=2), 1.0)[0] == CLIENT_QUOTA
    _recount(s)


def test_closed_flows_of_a_fast_client_never_refuse_it() -> None:
    """Short connections: the closed ones wait tcp_closed in the table but are evicted
    for new flows; only open ones count."""
    s = service(B1, client_flows=4, flow_policy=replace(SERVICE_FLOWS, max_flows=8))
    for sport in range(1000, 1100):
        assert out(s, syn(sport=sport), 0.0)[0] == FORWARD
        out(s, tcp(CLIENT, VIP, sport, 80, TCP_RST), 0.0)
    assert s.counters["client_quota"] == 0 and len(s.table) == 8
    _recount(s)


def test_hairpin_counts_against_the_original_client() -> None:
    s = service(B1, client_flows=1)
    assert out(s, tcp(B1, VIP, 40000, 80, TCP_SYN), 0.0)[0] == FORWARD  # SNATed to the VIP
    assert s.client_flow_count(PROTO_TCP, B1) == 1
    assert s.client_flow_count(PROTO_TCP, VIP) == 0
    # The backend's answer to the VIP is the flow's reply, not a new flow of the VIP.
    assert out(s, tcp(B1, VIP, 8080, 40000, TCP_SYN | TCP_ACK), 0.1)[0] == FORWARD
    assert out(s, tcp(B1, VIP, 40001, 80, TCP_SYN), 0.2)[0] == CLIENT_QUOTA
    assert out(s, syn(), 0.2)[0] == FORWARD
    _recount(s)


def test_held_packets_past_the_share_are_dropped_at_release() -> None:
    s = service(client_flows=1)
    assert out(s, syn(sport=1), 0.0)[0] == HELD
    assert out(s, syn(sport=2), 0.0)[0] == HELD
    s.set_backend("web-1", ip_s(B1), True, 0.1)
    rel = s.release(0.1)
    assert len(rel) == 1 and s.counters["release_dropped"] == 1
    assert s.counters["client_quota"] == 1
    _recount(s)


# --- the hold budget services share --------------------------------------------------------


def test_a_shared_hold_budget_bounds_what_services_hold_together() -> None:
    n = len(syn())
    budget = HoldBudget(limit=3 * n)
    a = Service("a", "10.0.0.100", PORTS, readiness="external")
    b = Service("b", "10.0.0.101", PORTS, readiness="external")
    for svc in (a, b):
        svc.set_hold_budget(budget)
    assert out(a, syn(sport=1), 0.0)[0] == HELD
    assert out(a, syn(sport=2), 0.0)[0] == HELD
    assert out(b, syn(dst=b.vip.packed, sport=3), 0.0)[0] == HELD
    assert budget.used == 3 * n
    # Both services have room of their own (8 MiB each), the budget has none.
    assert out(b, syn(dst=b.vip.packed, sport=4), 0.1)[0] == HOLD_BUDGET  # and unchanged
    assert out(a, syn(sport=5), 0.1)[0] == HOLD_BUDGET
    assert a.counters["hold_budget"] == 1 and b.counters["hold_budget"] == 1
    assert budget.refused == 2 and a.counters["hold_overflow"] == 0
    assert b.need()  # a refused packet still asks for a backend
    # Released packets give their bytes back...
    a.set_backend("web-1", ip_s(B1), True, 0.2)
    assert len(a.release(0.2)) == 2 and budget.used == n
    assert out(b, syn(dst=b.vip.packed, sport=6), 0.3)[0] == HELD
    # ... and so do timed-out ones, and a service that leaves the budget.
    b.handle_timer(30.05)
    assert b.held_packets == 1 and budget.used == n
    b.set_hold_budget(None)
    assert budget.used == 0 and b.held_bytes == n
    b.handle_timer(31.0)
    assert b.held_bytes == 0 and budget.used == 0
    c = Service("c", "10.0.0.102", PORTS, readiness="external")
    c.set_hold_budget(budget)
    assert out(c, syn(dst=c.vip.packed), 32.0)[0] == HELD
    c.handle_timer(62.0)
    assert c.counters["hold_timeout"] == 1 and budget.used == 0


def test_no_budget_is_each_service_on_its_own() -> None:
    s = service(hold=HoldSpec(packets=2))
    assert s.hold_budget is None
    assert [out(s, syn(sport=i), 0.0)[0] for i in range(3)] == [HELD, HELD, HOLD_FULL]
    assert s.counters["hold_budget"] == 0


# --- robustness ------------------------------------------------------------------------------


def _valid_packets() -> list[bytes]:
    return [syn(), udp(), tcp(B1, CLIENT, 8080, 40000, TCP_ACK, b"x"),
            tcp(B1, VIP, 8080, 40000, TCP_ACK),
            packets.icmp_error(B1, udp(CLIENT, 50000, B1, 5353), ICMP_UNREACH, UNREACH_PORT),
            packets.icmp_error(CLIENT, udp(VIP, 53, CLIENT, 50000), ICMP_UNREACH, UNREACH_PORT),
            packets.udp_packet(CLIENT, VIP, 1, 53, b"f" * 40, flags_frag=IP_MF, ident=3)]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_malformed_input_never_raises(data: st.DataObject) -> None:
    s = service(B1, hold=HoldSpec(packets=4, bytes=1000, timeout=1.0))
    s.set_backend("web-2", ip_s(B2), False)
    out(s, syn(src=CLIENT2))  # one flow to match
    out(s, tcp(B1, VIP, 3, 80, TCP_SYN))  # a hairpin flow
    now = 0.0
    for _ in range(data.draw(st.integers(1, 6))):
        base = data.draw(st.sampled_from(_valid_packets()))
        pkt = bytearray(base)
        for _ in range(data.draw(st.integers(0, 4))):
            i = data.draw(st.integers(0, len(pkt) - 1))
            pkt[i] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(pkt)))
        pkt = pkt[:cut] if data.draw(st.booleans()) else pkt
        if data.draw(st.booleans()):
            pkt = bytearray(data.draw(st.binary(max_size=80)))
        off = data.draw(st.integers(-2, 30))
        buf = bytearray(data.draw(st.binary(min_size=0, max_size=30))) + pkt
        length = data.draw(st.integers(-1, len(buf) + 2))
        partial = data.draw(st.booleans())
        now += data.draw(st.floats(0, 2))
        if data.draw(st.booleans()):
            s.outbound(buf, off, length, now, partial)
        else:
            s.reply(buf, off, length, now, partial)
        if data.draw(st.booleans()):
            s.set_backend("web-2", ip_s(B2), data.draw(st.booleans()), now)
            s.release(now)
        for a in s.handle_timer(now):
            assert isinstance(a, Signal | Released | HoldTimeout)
        reject_response(bytes(pkt), partial)
    assert s.held_bytes == sum(e[3] for e in s._hold)


def test_hairpin_fragmented_reply() -> None:
    s = service(B1)
    out(s, udp(src=B1, sport=50000), 0.0)
    big = packets.udp_packet(B1, VIP, 5353, 50000, b"r" * 1400, flags_frag=0, ident=9)
    frags = packets.fragment(big, 600)
    got = []
    for f in frags:
        v, t = out(s, f, 0.5)
        assert v == FORWARD
        got.append(valid(t))
    assert all((p.src, p.dst) == ("10.0.0.100", "10.0.0.11") for p in got)
    assert got[0][UDP].sport == 53 and got[0][UDP].dport == 50000


def _gone_idle() -> Service:
    """A service whose probed backend served a flow, then went idle at t=100 (parked)."""
    s = Service("web", ip_s(VIP), PORTS, probe_interval=0.5, idle_timeout=5.0)
    s.set_backend("web-1", ip_s(B1), True, 0.0)
    assert s.probes_due(0.0)
    s.probe_result("web-1", True, 0.1)
    assert out(s, udp(dport=53), 1.0)[0] in (FORWARD, NOT_SERVICE)
    s.handle_timer(100.0)
    s.take_signals()
    assert s.status()["backends"][0]["ready"] is False
    return s


def test_after_idle_a_probed_backend_is_trusted_again_only_after_a_new_probe() -> None:
    """Idle means the controller scales the backend down: no probing while parked, and
    the next request is held (and activates) until a fresh probe succeeds."""
    s = _gone_idle()
    assert s.probes_due(101.0) == []  # parked: nothing to probe without demand
    assert out(s, syn(), 102.0)[0] == HELD
    assert any(sig.kind == "activate" for sig in s.take_signals())
    assert s.probes_due(102.0) == [("web-1", "10.0.0.11", 8080)]
    s.probe_result("web-1", True, 102.2)
    assert s.releasable


def test_a_demand_during_the_idle_hook_probes_only_once_the_hook_ended() -> None:
    """on_idle stops the backend (a stop takes a while, and a server shutting down still
    accepts): a client arriving meanwhile is held, and the backend is probed only after
    the hook ended, so the client is not released into the dying server."""
    s = _gone_idle()
    s.idle_hook(True, 100.01)  # the stop runs
    assert out(s, syn(), 100.5)[0] == HELD
    assert any(sig.kind == "activate" for sig in s.take_signals())
    assert s.probes_due(100.5) == [] and s.probes_due(101.0) == []
    assert s.counters["waits_for_idle_hook"] == 1
    s.idle_hook(False, 101.2)  # stopped: now the wake's probes
    assert s.probes_due(101.2) == [("web-1", "10.0.0.11", 8080)]
    s.probe_result("web-1", True, 101.3)
    assert s.releasable


def test_an_idle_hook_that_overruns_holds_the_probes_back_for_ten_seconds_at_most() -> None:
    s = _gone_idle()
    s.idle_hook(True, 100.0)
    assert out(s, syn(), 101.0)[0] == HELD
    assert s.next_probe() == 110.0
    assert s.probes_due(109.9) == []
    assert s.probes_due(110.0) == [("web-1", "10.0.0.11", 8080)]
    s.idle_hook(False, 130.0)  # its late end changes nothing
    s.probe_result("web-1", True, 110.1)
    assert s.releasable


def test_probes_back_off_as_a_wake_drags_on() -> None:
    """While clients wait, a backend is probed every millisecond for the first 2 s of the
    wake, then every 5 ms, and every 20 ms past 10 s: a backend that does not come (a
    crashed one, or dormant services woken together by a scan of their VIPs) costs the
    data plane a bounded rate of connects, and a normal start still wakes in ~1 ms."""
    s = Service("web", ip_s(VIP), PORTS, probe_interval=0.5)
    s.set_backend("web-1", ip_s(B1), True, 0.0)
    s.probe_result("web-1", False, 0.0)
    assert out(s, syn(), 10.0)[0] == HELD

    def probes(t0: float, t1: float, step: float = 0.0005) -> int:
        n, t = 0, t0
        while t < t1:
            for _ in s.probes_due(t):
                n += 1
                s.probe_result("web-1", False, t)
            t += step
        return n

    assert 900 <= probes(10.0, 11.0) <= 1100  # the first second: every 1 ms
    assert 180 <= probes(12.5, 13.5) <= 220  # past 2 s: every 5 ms
    assert 45 <= probes(21.0, 22.0, 0.002) <= 55  # past 10 s: every 20 ms
    s.probe_result("web-1", True, 22.0)
    assert s.releasable


# --- wake latency -------------------------------------------------------------------------


def _observed(s: Service) -> dict[str, list[int]]:
    return {"wake": s.wake_seconds.counts,
            **{p: h.counts for p, h in s.wake_phase_seconds.items()}}


def test_wake_phases_hook_ready_release() -> None:
    """A wake from the held SYN: the hook starts 0.02 s later, the port accepts the probe
    1.5 s after that, the release follows 0.003 s later; each phase lands in its bucket
    and the whole wake in its own."""
    s = Service("web", ip_s(VIP), PORTS, probe_interval=0.5)
    s.set_backend("web-1", ip_s(B1), True, 0.0)
    s.probe_result("web-1", False, 0.0)  # the backend is down: nothing ready
    assert out(s, syn(), 10.0)[0] == HELD
    s.hook_started(10.02)
    s.hook_started(10.5)  # a second report of the same wake changes nothing
    assert s.probes_due(11.52)
    s.probe_result("web-1", True, 11.52)
    assert s.wake_seconds.count == 0  # not woken until the held packets are out
    assert len(s.release(11.523)) == 1
    b = s.wake_seconds.bounds
    for name, h, want in (("hook", s.wake_phase_seconds["hook"], 0.02),
                          ("ready", s.wake_phase_seconds["ready"], 1.5),
                          ("release", s.wake_phase_seconds["release"], 0.003),
                          ("wake", s.wake_seconds, 1.523)):
        assert h.count == 1, name
        assert h.sum == pytest.approx(want), name
        assert b[h.counts.index(1)] >= want > ([0.0, *b])[h.counts.index(1)], name
    # A packet to the ready service is no wake.
    before = _observed(s)
    assert out(s, syn(sport=41000), 12.0)[0] == FORWARD
    assert _observed(s) == before


def test_wake_without_hook_or_hold_and_abandoned_wakes() -> None:
    # Without a hook the ready phase runs from the start; external readiness, no hold.
    s = service(hold=HoldSpec(packets=0))
    s.set_backend("web-1", ip_s(B1), False, 0.0)
    assert out(s, syn(), 5.0)[0] == NO_BACKEND
    s.set_backend("web-1", ip_s(B1), True, 5.25)
    assert s.wake_phase_seconds["hook"].count == 0
    assert s.wake_phase_seconds["ready"].sum == pytest.approx(0.25)
    assert s.wake_seconds.sum == pytest.approx(0.25)  # nothing held: woken when ready
    assert s.wake_phase_seconds["release"].count == 0
    # A wake that never finds a backend ends with the demand: never observed.
    s2 = service(idle_timeout=5.0)
    assert out(s2, syn(), 0.0)[0] == HELD
    s2.handle_timer(100.0)  # the hold timed out, then the service went idle
    s2.set_backend("web-1", ip_s(B1), True, 101.0)
    assert s2.wake_seconds.count == 0 and s2.wake_phase_seconds["ready"].count == 0
