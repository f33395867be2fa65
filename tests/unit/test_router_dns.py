"""The data plane answers DNS for local names itself; other queries go to the local stack."""

from __future__ import annotations

from ipaddress import IPv4Address

import dnslib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from fabric.net import packets
from fabric.net.vnet import ZERO_HDR
from fabric.router.model import L3_OFF, Port
from fabric.router.router import Router
from gateway.dns import DnsCore
from gateway.records import Records

POD_MAC = "02:00:0a:00:00:02"


def setup() -> tuple[Router, Port, Port, DnsCore]:
    r = Router("shop", "10.0.0.0/24")
    r.add_pod("a", "10.0.0.2", POD_MAC)
    pa = Port(vnet=False, mtu=1500)
    r.attach("a", pa, 0.0)
    local = Port(vnet=False, mtu=1500, l3=True)
    r.attach_local(local)
    records = Records("shop", "fabric.internal", "10.0.0.0/24")
    records.set("a", IPv4Address("10.0.0.2"))
    core = DnsCore(records, [])
    r.attach_dns(core.answer_local)
    r.outputs.clear()
    return r, pa, local, core


def query(name: str, qtype: str = "A", sport: int = 40000) -> bytearray:
    q = dnslib.DNSRecord.question(name, qtype).pack()
    pkt = packets.udp_packet(packets.ip_bytes("10.0.0.2"), packets.ip_bytes("10.0.0.1"),
                             sport, 53, q)
    return bytearray(packets.eth_header(packets.mac_bytes("02:fb:00:00:00:01"),
                                        packets.mac_bytes(POD_MAC), packets.ETH_P_IP) + pkt)


def test_local_name_answered_in_the_data_plane() -> None:
    r, pa, local, core = setup()
    f = query("a.shop.fabric.internal", sport=40001)
    assert r.receive(pa, f, len(f), 1.0) is None
    assert len(r.outputs) == 1
    out, frame = r.outputs[0]
    assert out is pa
    e = Ether(frame)
    assert e.dst == POD_MAC and e[IP].src == "10.0.0.1" and e[IP].dst == "10.0.0.2"
    assert e[UDP].sport == 53 and e[UDP].dport == 40001
    chk = e[UDP].chksum
    del e[UDP].chksum
    assert Ether(bytes(e))[UDP].chksum == chk  # valid checksum
    reply = dnslib.DNSRecord.parse(bytes(e[UDP].payload))
    assert str(reply.rr[0].rdata) == "10.0.0.2" and reply.rr[0].ttl == 5
    assert core.counters["local_answers"] == 1 and local.tx_packets == 0


def test_other_names_go_to_the_local_stack_unchanged() -> None:
    r, pa, local, core = setup()
    f = query("www.example.test")
    ip_packet = bytes(f[14:])
    out = r.receive(pa, f, len(f), 1.0)
    assert out is local and not r.outputs
    assert bytes(f[L3_OFF:len(f)]) == ip_packet
    assert core.counters["queries"] == 0


def test_bad_udp_checksum_is_dropped() -> None:
    r, pa, local, core = setup()
    f = query("a.shop.fabric.internal")
    f[14 + 20 + 6] ^= 0xFF
    assert r.receive(pa, f, len(f), 1.0) is None
    assert not r.outputs and pa.drops == {"bad_checksum": 1}


def test_truncated_udp_to_the_gateway_in_an_exact_size_buffer() -> None:
    """A frame cut inside its UDP header, in a buffer that ends with it (as the replay
    harness and embedders pass them): dropped or passed on, never an IndexError."""
    r, pa, local, core = setup()
    for size in range(0, 8):  # an IP length that says the UDP header is cut short
        ip = IP(src="10.0.0.2", dst="10.0.0.1", proto=17, len=20 + size) / (b"\x9c\x40" * 4)
        pkt = bytes(ip)[:20 + size]
        f = bytearray(packets.eth_header(packets.mac_bytes("02:fb:00:00:00:01"),
                                         packets.mac_bytes(POD_MAC), packets.ETH_P_IP) + pkt)
        r.receive(pa, f, len(f), 1.0)
    assert core.counters["queries"] == 0


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(min_size=12, max_size=600), st.integers(1, 0xFFFF), st.integers(2, 254),
       st.booleans())
def test_reply_frames_are_what_udp_packet_builds(reply, sport, host, vnet):
    """The data plane's DNS reply, packed in one go, is byte for byte the frame
    send_ip(udp_packet(...)) queues: both checksums, odd and even lengths, either framing."""
    r = Router("shop", "10.0.0.0/24")
    ip = f"10.0.0.{host}" if host != 1 else "10.0.0.2"
    r.add_pod("a", ip, POD_MAC)
    pa = Port(vnet=vnet, mtu=1500)
    r.attach("a", pa, 0.0)
    r.attach_dns(lambda query, now: reply)
    r.outputs.clear()
    q = dnslib.DNSRecord.question("a.shop.fabric.internal").pack()
    pkt = packets.udp_packet(packets.ip_bytes(ip), packets.ip_bytes("10.0.0.1"), sport, 53, q)
    f = bytearray((ZERO_HDR if vnet else b"") + packets.eth_header(
        packets.mac_bytes("02:fb:00:00:00:01"), packets.mac_bytes(POD_MAC),
        packets.ETH_P_IP) + pkt)
    assert r.receive(pa, f, len(f), 1.0) is None
    expect = packets.eth_header(packets.mac_bytes(POD_MAC), r.gw_mac, packets.ETH_P_IP) + \
        packets.udp_packet(r.gw_ip, packets.ip_bytes(ip), 53, sport, reply, flags_frag=0)
    assert r.outputs == [(pa, (ZERO_HDR if vnet else b"") + expect)]
    assert pa.tx_packets == 1 and not pa.drops


def _gathering(reply_for) -> tuple[Router, Port]:
    """A router whose pod's port gathers DNS replies (a TAP, as the data plane marks it)."""
    r = Router("shop", "10.0.0.0/24")
    r.add_pod("a", "10.0.0.2", POD_MAC)
    pa = Port(vnet=True, mtu=1500, kind="netns")
    r.attach("a", pa, 0.0)
    r.attach_dns(lambda query, now: reply_for(query))
    r.gso_ports.add(pa)
    r.outputs.clear()
    return r, pa


def _vnet_query(sport: int, qid: int) -> bytearray:
    q = dnslib.DNSRecord.question("a.shop.fabric.internal")
    q.header.id = qid
    f = bytearray(ZERO_HDR) + query("a.shop.fabric.internal", sport=sport)[:42] + q.pack()
    f[50:52] = b"\0\0"  # no UDP checksum (the id changed)
    return f


def test_gathered_replies_wait_for_the_end_of_the_batch_one_frame_per_size() -> None:
    """On a gathering port a reply waits for end_batch(); replies of one size to one
    client socket share a frame (GSO_UDP_L4 when more than one) in query order; another
    size or another socket is another frame."""
    from fabric.net import gso
    from fabric.net.vnet import GSO_UDP_L4, VnetHdr

    sizes = {1: 40, 2: 40, 3: 41, 4: 40, 5: 40}
    r, pa = _gathering(lambda q: bytes([q[1]]) * sizes[q[1]])
    for qid, sport in ((1, 40000), (2, 40000), (3, 40000), (4, 40000), (5, 40001)):
        f = _vnet_query(sport, qid)
        assert r.receive(pa, f, len(f), 1.0) is None
    assert not r.outputs
    r.end_batch()
    assert not r.replies and pa.tx_packets == 5
    frames = []
    for _, frame in r.outputs:
        segs = gso.segment(memoryview(frame)[10:], VnetHdr.parse(frame))
        assert frame[1] == (GSO_UDP_L4 if len(segs) > 1 else 0)
        for seg in segs:
            assert seg[:12] == packets.mac_bytes(POD_MAC) + r.gw_mac
            assert seg[34:36] == (53).to_bytes(2, "big")
        frames.append([(seg[36] << 8 | seg[37], bytes(seg[42:])) for seg in segs])
    assert sorted(frames) == sorted([
        [(40000, bytes([i]) * 40) for i in (1, 2, 4)], [(40000, bytes([3]) * 41)],
        [(40001, bytes([5]) * 40)]])


def test_a_full_run_leaves_at_once_and_a_captured_port_is_not_gathered() -> None:
    from fabric.router.router import DNS_RUN_MAX

    r, pa = _gathering(lambda q: b"x" * 30)
    for qid in range(DNS_RUN_MAX + 1):
        f = _vnet_query(40000, qid)
        r.receive(pa, f, len(f), 1.0)
    assert len(r.outputs) == 1 and len(r.replies[(pa, 40000, 30)]) == 1
    r.end_batch()
    r.outputs.clear()
    seen: list[bool] = []
    pa.capture = lambda now, frame, out: seen.append(out)
    f = _vnet_query(40000, 99)
    r.receive(pa, f, len(f), 1.0)
    assert len(r.outputs) == 1 and not r.replies and seen == [False, True]


def test_answer_times_are_observed_for_answers_only() -> None:
    from fabric.histogram import DNS_BUCKETS, Histogram

    answers = iter([b"\0" * 20, b"", None])
    r = Router("shop", "10.0.0.0/24")
    r.add_pod("a", "10.0.0.2", POD_MAC)
    pa = Port(vnet=False, mtu=1500)
    r.attach("a", pa, 0.0)
    local = Port(vnet=False, mtu=1500, l3=True)
    r.attach_local(local)
    hist = Histogram(DNS_BUCKETS)
    r.attach_dns(lambda query, now: next(answers), hist)
    for _ in range(3):
        f = query("a.shop.fabric.internal")
        r.receive(pa, f, len(f), 1.0)
    assert hist.count == 1 and local.tx_packets == 1


def test_the_inline_observation_is_histogram_observe(monkeypatch) -> None:
    """Router._dns updates the histogram itself (no method call per answer): every value,
    on a bound (`le` is inclusive), between bounds or past the last, lands where
    Histogram.observe puts it, and the sum is the same."""
    from fabric.histogram import DNS_BUCKETS, Histogram
    from fabric.router import router as router_mod

    durations = [0.0, 1e-6, DNS_BUCKETS[0], DNS_BUCKETS[0] * 1.0001, 0.0003, DNS_BUCKETS[-1],
                 DNS_BUCKETS[-1] + 1, 1e9]
    clock = iter(t for d in durations for t in (1000.0, 1000.0 + d))
    monkeypatch.setattr(router_mod, "_clock", lambda: next(clock))
    r, pa, _, _ = setup()
    hist, ref = Histogram(DNS_BUCKETS), Histogram(DNS_BUCKETS)
    r.attach_dns(lambda query, now: b"\0" * 20, hist)
    for _ in durations:
        f = query("a.shop.fabric.internal")
        r.receive(pa, f, len(f), 1.0)
    for d in durations:
        ref.observe((1000.0 + d) - 1000.0)
    assert hist.counts == ref.counts and hist.sum == ref.sum and hist.count == len(durations)
