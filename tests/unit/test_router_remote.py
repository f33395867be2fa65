"""Pods on other workers: packets go to the tunnel as plain, clamped, fitting packets,
and packets from the tunnel reach local pods only from pods that live on that worker."""

from __future__ import annotations

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from fabric.net import packets
from fabric.router.model import KIND_TUNNEL, Port
from fabric.router.router import Router
from tests.support.packets import tcp_super_frame

GW = packets.mac_bytes("02:fb:00:00:00:01")
A_MAC = "02:00:0a:00:00:02"


def setup() -> tuple[Router, Port]:
    r = Router("shop", "10.0.0.0/24")
    r.add_pod("a", "10.0.0.2", A_MAC)
    r.add_pod("db", "10.0.0.9", remote="w2")
    pa = Port(vnet=False, mtu=1500)
    r.attach("a", pa, 0.0)
    r.attach_tunnel(7, 1420)
    r.outputs.clear()
    return r, pa


def tunnelled(r: Router) -> list[tuple[str, bytes]]:
    """What the router queued for the tunnel, as the data plane takes it from its outputs:
    (worker, bare IPv4 packet) for each entry of a tunnel attachment, in order."""
    out = []
    for port, data in r.outputs:
        if port.kind == KIND_TUNNEL:
            assert port.l3 and port.ns_id == 7 and port.peer is not None
            out.append((port.peer, data))
    return out


def frame(ip_packet: bytes) -> bytearray:
    return bytearray(packets.eth_header(GW, packets.mac_bytes(A_MAC), packets.ETH_P_IP)
                     + ip_packet)


def test_udp_to_remote_pod_goes_to_the_tunnel() -> None:
    r, pa = setup()
    f = frame(packets.udp_packet(packets.ip_bytes("10.0.0.2"), packets.ip_bytes("10.0.0.9"),
                                 1000, 2000, b"hello", ttl=64))
    assert r.receive(pa, f, len(f), 1.0) is None
    sent = tunnelled(r)
    assert len(sent) == 1 and sent[0][0] == "w2"
    p = IP(sent[0][1])
    assert p.ttl == 63 and p[UDP].load == b"hello"


def test_syn_mss_is_clamped_with_a_valid_checksum() -> None:
    r, pa = setup()
    syn = packets.tcp_packet(packets.ip_bytes("10.0.0.2"), packets.ip_bytes("10.0.0.9"),
                             40000, 80, 1, 0, packets.TCP_SYN,
                             options=b"\x02\x04\x05\xb4\x01\x03\x03\x07")
    f = frame(syn)
    r.receive(pa, f, len(f), 1.0)
    p = IP(tunnelled(r)[0][1])
    assert dict(p[TCP].options)["MSS"] == 1380
    chk = p[TCP].chksum
    del p[TCP].chksum
    assert IP(bytes(p))[TCP].chksum == chk


def test_super_frame_is_segmented_for_the_tunnel() -> None:
    r, pa = setup()
    payload = bytes(range(256)) * 20
    hdr, eth = tcp_super_frame(payload, 1368, src=packets.ip_bytes("10.0.0.2"),
                               dst=packets.ip_bytes("10.0.0.9"), mac_dst=GW,
                               mac_src=packets.mac_bytes(A_MAC))
    f = bytearray(hdr.pack() + eth)
    pv = Port(vnet=True, mtu=1500)
    r.detach("a")
    r.attach("a", pv, 1.0)
    r.outputs.clear()
    r.receive(pv, f, len(f), 1.0)
    sent = tunnelled(r)
    assert len(sent) == 4
    assert all(len(pkt) <= 1420 for _, pkt in sent)
    assert b"".join(bytes(IP(pkt)[TCP].payload) for _, pkt in sent) == payload
    for _, pkt in sent:
        p = IP(pkt)
        chk = p[TCP].chksum
        del p[TCP].chksum
        assert IP(bytes(p))[TCP].chksum == chk


def test_from_remote_to_local_pod() -> None:
    r, pa = setup()
    pkt = packets.udp_packet(packets.ip_bytes("10.0.0.9"), packets.ip_bytes("10.0.0.2"),
                             2000, 1000, b"back", ttl=64)
    r.receive_remote("w2", pkt, 1.0)
    (out, f), = r.outputs
    assert out is pa
    e = Ether(f)
    assert e.dst == A_MAC and e[IP].ttl == 63 and e[UDP].load == b"back"


def test_from_remote_spoofed_source_dropped() -> None:
    r, pa = setup()
    pkt = packets.udp_packet(packets.ip_bytes("10.0.0.7"), packets.ip_bytes("10.0.0.2"),
                             2000, 1000, b"x")
    r.receive_remote("w2", pkt, 1.0)
    pkt = packets.udp_packet(packets.ip_bytes("10.0.0.9"), packets.ip_bytes("10.0.0.2"),
                             2000, 1000, b"x")
    r.receive_remote("w3", pkt, 1.0)  # db lives on w2, not w3
    assert not r.outputs and r.drops == {"spoofed_source": 2}
