#!/usr/bin/env python3
"""Write the replay cases under pcaps/: case.json, what each pod sends (<pod>.in.pcap) and
what the router must send it (<pod>.out.pcap).

Inputs are built with scapy the way a Linux pod sends them; expected outputs are built with
scapy too, from the rules (TTL - 1 with a freshly computed header checksum, gateway MAC as
source, the pod's MAC as destination, ICMP errors quoting header + 8 bytes), never with the
router's code, so a replay compares the router with an independent expectation.

    .venv/bin/python pcaps/make_pcaps.py            # every case
    .venv/bin/python pcaps/make_pcaps.py ttl_expiry # some

The files are committed test data: rerun this only when changing a case on purpose.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet, Raw
from scapy.utils import wrpcap

HERE = Path(__file__).resolve().parent
CIDR = "10.0.0.0/24"
GW_IP = "10.0.0.1"
GW_MAC = "02:fb:00:00:00:01"
BCAST = "ff:ff:ff:ff:ff:ff"
IPS = {"a": "10.0.0.2", "b": "10.0.0.3", "web": "10.0.0.20"}
MACS = {"a": "02:00:00:00:00:0a", "b": "02:00:00:00:00:0b", "web": "02:00:00:00:00:20"}
CLIENTS = [f"c{i}" for i in range(1, 6)]  # service clients c1..c5: 10.0.0.11-15
for _i, _c in enumerate(CLIENTS, 1):
    IPS[_c] = f"10.0.0.{10 + _i}"
    MACS[_c] = f"02:00:00:00:00:c{_i}"
VIP = "10.0.0.100"  # the service "web" in the svc_* cases
LINUX_SYN_OPTS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (100, 0)), ("NOP", None),
                  ("WScale", 7)]
PING_DATA = bytes.fromhex("3ee8d76500000000") + bytes(range(0x10, 0x40))  # 8 + 48 bytes


class Case:
    def __init__(self, name: str, description: str, pods: list[dict], until: float | None = None,
                 services: list[dict] | None = None, events: list[dict] | None = None
                 ) -> None:
        self.name = name
        self.description = description
        self.pods = pods
        self.until = until
        self.services = services or []
        self.events = events or []
        self.inputs: dict[str, list[tuple[float, bytes]]] = {p["name"]: [] for p in pods}
        self.outputs: dict[str, list[tuple[float, bytes]]] = {p["name"]: [] for p in pods}

    def send(self, pod: str, t: float, pkt: Packet | bytes) -> Ether:
        raw = bytes(pkt)
        self.inputs[pod].append((t, raw))
        return Ether(raw)

    def expect(self, pod: str, t: float, pkt: Packet | bytes) -> None:
        self.outputs[pod].append((t, bytes(pkt)))

    def write(self) -> None:
        d = HERE / self.name
        d.mkdir(exist_ok=True)
        spec = {"description": self.description, "cidr": CIDR, "pods": self.pods}
        if self.until is not None:
            spec["until"] = self.until
        if self.services:
            spec["services"] = self.services
        if self.events:
            spec["events"] = self.events
        (d / "case.json").write_text(json.dumps(spec, indent=2) + "\n")
        for pod in self.inputs:
            _write(d / f"{pod}.in.pcap", self.inputs[pod])
            _write(d / f"{pod}.out.pcap", sorted(self.outputs[pod], key=lambda x: x[0]))


def _write(path: Path, frames: list[tuple[float, bytes]]) -> None:
    pkts = []
    for t, raw in frames:
        p = Ether(raw)
        p.time = t
        pkts.append(p)
    wrpcap(str(path), pkts, linktype=1)


def pod(name: str, attach: float | None = 0.0, mac: bool = True, mtu: int | None = None
        ) -> dict:
    d: dict = {"name": name, "ip": IPS[name], "mac": MACS[name] if mac else None,
               "attach": attach}
    if mtu is not None:
        d["mtu"] = mtu
    return d


# --- what pods send -----------------------------------------------------------------------


def eth(src: str) -> Ether:
    return Ether(src=MACS[src], dst=GW_MAC)


def arp_request(src: str, target: str, psrc: str | None = None) -> Packet:
    return Ether(src=MACS[src], dst=BCAST) / ARP(
        op=1, hwsrc=MACS[src], psrc=IPS[src] if psrc is None else psrc,
        hwdst="00:00:00:00:00:00", pdst=target)


def ping(src: str, dst: str, seq: int, ident: int, *, ttl: int = 64, reply: bool = False,
         ip_id: int = 0x4D2) -> Packet:
    return eth(src) / IP(src=IPS[src], dst=dst, ttl=ttl, id=ip_id, flags="DF") / ICMP(
        type=0 if reply else 8, id=ident, seq=seq) / Raw(PING_DATA)


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes, *, ttl: int = 64,
        ip_id: int = 0x1111, df: bool = True, ip_src: str | None = None) -> Packet:
    return eth(src) / IP(src=ip_src or IPS[src], dst=dst, ttl=ttl, id=ip_id,
                         flags="DF" if df else 0) / UDP(sport=sport, dport=dport) / Raw(payload)


# --- what the router must send --------------------------------------------------------------


def forwarded(frame: Ether, to: str) -> bytes:
    """The frame as the router forwards it to pod `to`: MACs rewritten, TTL - 1, the IP
    header checksum recomputed by scapy (the L4 checksum stays as it was)."""
    ip = IP(bytes(frame[IP]))
    ip.ttl -= 1
    del ip.chksum
    return bytes(Ether(src=GW_MAC, dst=MACS[to], type=0x0800) / ip)


def arp_reply(to: str, target: str, requester_ip: str | None = None) -> bytes:
    return bytes(Ether(src=GW_MAC, dst=MACS[to]) / ARP(
        op=2, hwsrc=GW_MAC, psrc=target, hwdst=MACS[to],
        pdst=IPS[to] if requester_ip is None else requester_ip))


def gw_arp_request(to: str) -> bytes:
    return bytes(Ether(src=GW_MAC, dst=BCAST) / ARP(
        op=1, hwsrc=GW_MAC, psrc=GW_IP, hwdst="00:00:00:00:00:00", pdst=IPS[to]))


def icmp_error(to: str, offending: bytes, icmp_type: int, code: int, mtu: int = 0,
               src: str = GW_IP) -> bytes:
    """ICMP error from the gateway (or `src`) quoting the offending IP header and 8 bytes."""
    ihl = (offending[0] & 15) * 4
    icmp = ICMP(type=icmp_type, code=code)
    if mtu:
        icmp.nexthopmtu = mtu
    return bytes(Ether(src=GW_MAC, dst=MACS[to]) / IP(
        src=src, dst=IPS[to], ttl=64, id=0, flags=0) / icmp / Raw(offending[:ihl + 8]))


def as_held(frame: Ether) -> bytes:
    """The IP packet as the router holds it (TTL already decremented)."""
    return forwarded(frame, "a")[14:]


def dnat(frame: Ether, to: str, target_port: int) -> bytes:
    """A client's packet to the VIP as backend pod `to` must receive it: destination
    address and port rewritten to the backend's, source kept, TTL - 1, the IP and L4
    checksums computed afresh by scapy, gateway MAC to the backend's MAC."""
    ip = IP(bytes(frame[IP]))
    ip.ttl -= 1
    ip.dst = IPS[to]
    del ip.chksum
    l4 = ip.payload
    l4.dport = target_port
    del l4.chksum
    return bytes(Ether(src=GW_MAC, dst=MACS[to], type=0x0800) / ip)


def tcp_reset_for_syn(to: str, syn: Ether) -> bytes:
    """RFC 793's answer to a SYN nobody takes, from the address it was sent to: RST|ACK,
    seq 0, ack = its seq + 1, window 0 (IP: TTL 64, id 0, DF, as Linux sends RSTs)."""
    ip, tcp = syn[IP], syn[TCP]
    return bytes(Ether(src=GW_MAC, dst=MACS[to]) / IP(src=ip.dst, dst=ip.src, ttl=64, id=0,
                                                       flags="DF")
                 / TCP(sport=tcp.dport, dport=tcp.sport, seq=0, ack=(tcp.seq + 1) & 0xFFFFFFFF,
                       flags="RA", window=0))


def echo_reply(to: str, request: Ether) -> bytes:
    icmp = request[ICMP]
    return bytes(Ether(src=GW_MAC, dst=MACS[to]) / IP(src=GW_IP, dst=IPS[to], ttl=64, id=0,
                                                       flags=0)
                 / ICMP(type=0, id=icmp.id, seq=icmp.seq) / Raw(bytes(icmp.payload)))


# --- the cases ----------------------------------------------------------------------------


def arp_ping() -> Case:
    c = Case("arp_ping", "MACs learned: the gateway ARPs for each pod at attach, the pods "
             "answer, ARP for each other (proxy ARP) and ping each other and the gateway.",
             [pod("a", mac=False), pod("b", mac=False)])
    c.expect("a", 0.0, gw_arp_request("a"))
    c.expect("b", 0.0, gw_arp_request("b"))
    for name, t in (("a", 0.0001), ("b", 0.0002)):
        c.send(name, t, Ether(src=MACS[name], dst=GW_MAC) / ARP(
            op=2, hwsrc=MACS[name], psrc=IPS[name], hwdst=GW_MAC, pdst=GW_IP))
    c.send("a", 1.0, arp_request("a", IPS["b"]))
    c.expect("a", 1.0, arp_reply("a", IPS["b"]))
    for seq, t in ((1, 1.0005), (2, 2.0)):
        req = c.send("a", t, ping("a", IPS["b"], seq, 0x2A, ip_id=0x100 + seq))
        c.expect("b", t, forwarded(req, "b"))
        if seq == 1:
            c.send("b", 1.001, arp_request("b", IPS["a"]))
            c.expect("b", 1.001, arp_reply("b", IPS["a"]))
        rep = c.send("b", t + 0.001, ping("b", IPS["a"], seq, 0x2A, reply=True,
                                          ip_id=0x900 + seq))
        c.expect("a", t + 0.001, forwarded(rep, "a"))
    req = c.send("a", 3.0, ping("a", GW_IP, 1, 0x2B))
    c.expect("a", 3.0, echo_reply("a", req))
    return c


def garp_probe() -> Case:
    c = Case("garp_probe", "RFC 5227 probes and announcements and gratuitous ARP get no "
             "answer; neither do the network, broadcast and outside addresses; a probe for "
             "another pod's address and a normal request do.", [pod("a")])
    t = 0.1
    for _ in range(3):
        c.send("a", t, arp_request("a", IPS["a"], psrc="0.0.0.0"))
        t += 0.2
    for _ in range(2):
        c.send("a", t, arp_request("a", IPS["a"]))  # announcement
        t += 0.2
    c.send("a", t, Ether(src=MACS["a"], dst=BCAST) / ARP(
        op=2, hwsrc=MACS["a"], psrc=IPS["a"], hwdst=BCAST, pdst=IPS["a"]))
    for target in ("10.0.0.0", "10.0.0.255", "192.168.0.1"):
        c.send("a", 1.5, arp_request("a", target))
    c.send("a", 2.0, arp_request("a", IPS["b"], psrc="0.0.0.0"))
    c.expect("a", 2.0, arp_reply("a", IPS["b"], requester_ip="0.0.0.0"))
    c.send("a", 2.1, arp_request("a", GW_IP))
    c.expect("a", 2.1, arp_reply("a", GW_IP))
    return c


def spoofed_source() -> Case:
    c = Case("spoofed_source", "Packets and ARP from a with someone else's source address are "
             "dropped silently; its own packet then goes through.", [pod("a"), pod("b")])
    c.send("a", 1.0, udp("a", IPS["b"], 4000, 5000, b"not from a", ip_src=IPS["b"]))
    c.send("a", 1.1, udp("a", IPS["b"], 4000, 5000, b"made up", ip_src="10.0.0.99"))
    c.send("a", 1.2, eth("a") / IP(src="10.0.0.99", dst=GW_IP, id=5, flags="DF")
           / ICMP(id=7, seq=1) / Raw(PING_DATA))
    c.send("a", 1.3, arp_request("a", GW_IP, psrc=IPS["b"]))
    c.send("a", 1.4, Ether(src=MACS["a"], dst=BCAST) / IP(src="0.0.0.0", dst="255.255.255.255",
                                                          ttl=64, id=0) /
           UDP(sport=68, dport=67) / Raw(b"\x01\x01\x06\x00" + bytes(236)))
    ok = c.send("a", 2.0, udp("a", IPS["b"], 4000, 5000, b"really from a"))
    c.expect("b", 2.0, forwarded(ok, "b"))
    return c


def ttl_expiry() -> Case:
    c = Case("ttl_expiry", "TTL 1 gets ICMP time exceeded (UDP and echo), TTL 2 is forwarded "
             "with TTL 1, an echo with TTL 1 to the gateway itself is answered.",
             [pod("a"), pod("b")])
    p1 = c.send("a", 1.0, udp("a", IPS["b"], 40001, 33434, b"@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_",
                              ttl=1, ip_id=0xA001, df=False))
    c.expect("a", 1.0, icmp_error("a", bytes(p1[IP]), 11, 0))
    p2 = c.send("a", 1.1, udp("a", IPS["b"], 40001, 33435, b"@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_",
                              ttl=2, ip_id=0xA002, df=False))
    c.expect("b", 1.1, forwarded(p2, "b"))
    p3 = c.send("a", 1.2, ping("a", IPS["b"], 1, 0x77, ttl=1))
    c.expect("a", 1.2, icmp_error("a", bytes(p3[IP]), 11, 0))
    p4 = c.send("a", 1.3, ping("a", GW_IP, 2, 0x77, ttl=1))
    c.expect("a", 1.3, echo_reply("a", p4))
    return c


def hold_release() -> Case:
    c = Case("hold_release", "b attaches at t=5: a's three earlier packets are held and "
             "released in order at attach, before a's later packet; b then answers.",
             [pod("a"), pod("b", attach=5.0)])
    c.send("a", 0.5, arp_request("a", IPS["b"]))
    c.expect("a", 0.5, arp_reply("a", IPS["b"]))
    for i, t in enumerate((1.0, 2.0, 3.0), 1):
        p = c.send("a", t, udp("a", IPS["b"], 7000, 7001, b"held %d" % i, ip_id=0x200 + i))
        c.expect("b", 5.0, forwarded(p, "b"))
    p = c.send("a", 6.0, udp("a", IPS["b"], 7000, 7001, b"after attach", ip_id=0x204))
    c.expect("b", 6.0, forwarded(p, "b"))
    c.send("b", 6.4, arp_request("b", IPS["a"]))
    c.expect("b", 6.4, arp_reply("b", IPS["a"]))
    p = c.send("b", 6.5, udp("b", IPS["a"], 7001, 7000, b"got 4", ip_id=0x300))
    c.expect("a", 6.5, forwarded(p, "a"))
    return c


def hold_timeout() -> Case:
    c = Case("hold_timeout", "b never attaches: a's packets are held 30 s, then a gets ICMP "
             "host unreachable for each (quoting the packet as held, TTL 63).",
             [pod("a"), pod("b", attach=None)], until=40.0)
    p1 = c.send("a", 1.0, udp("a", IPS["b"], 9000, 9001, b"anyone there?", ip_id=0x501))
    p2 = c.send("a", 2.5, ping("a", IPS["b"], 1, 0x99, ip_id=0x502))
    c.expect("a", 31.0, icmp_error("a", as_held(p1), 3, 1))
    c.expect("a", 32.5, icmp_error("a", as_held(p2), 3, 1))
    return c


def frag_needed() -> Case:
    c = Case("frag_needed", "b's port has MTU 1400: a 1500-byte DF packet gets ICMP "
             "fragmentation needed (MTU 1400), a 1400-byte one passes, a 1500-byte packet "
             "without DF is fragmented.", [pod("a"), pod("b", mtu=1400)])
    big = c.send("a", 1.0, eth("a") / IP(src=IPS["a"], dst=IPS["b"], id=0x601, flags="DF")
                  / TCP(sport=45000, dport=80, seq=1000, ack=2000, flags="A", window=502)
                  / Raw(bytes(range(256)) * 5 + bytes(180)))
    assert len(big[IP]) == 1500
    c.expect("a", 1.0, icmp_error("a", as_held(big), 3, 4, mtu=1400))
    fits = c.send("a", 1.1, eth("a") / IP(src=IPS["a"], dst=IPS["b"], id=0x602, flags="DF")
                   / TCP(sport=45000, dport=80, seq=1000, ack=2000, flags="A", window=502)
                   / Raw(bytes(range(256)) * 5 + bytes(80)))
    assert len(fits[IP]) == 1400
    c.expect("b", 1.1, forwarded(fits, "b"))
    nodf = c.send("a", 2.0, udp("a", IPS["b"], 5004, 5005, bytes(i & 0xFF for i in range(1472)),
                                ip_id=0x603, df=False))
    assert len(nodf[IP]) == 1500
    ip = IP(as_held(nodf))
    for frag in fragment(ip, fragsize=1376):
        c.expect("b", 2.0, Ether(src=GW_MAC, dst=MACS["b"]) / frag)
    return c


def tcp_handshake() -> Case:
    c = Case("tcp_handshake", "A TCP connection a -> b:80: ARP, 3-way handshake with Linux "
             "SYN options, a request, a response, FIN/ACK teardown.", [pod("a"), pod("b")])
    t = [1.0]
    ids = {"a": 0x7000, "b": 0x8000}

    def step(sender: str, flags: str, seq: int, ack: int, payload: bytes = b"",
             options: list | None = None) -> None:
        other = "b" if sender == "a" else "a"
        sport, dport = (51000, 80) if sender == "a" else (80, 51000)
        ids[sender] += 1
        pkt = c.send(sender, t[0], eth(sender) / IP(src=IPS[sender], dst=IPS[other],
                                                    id=ids[sender], flags="DF")
                     / TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags,
                           window=64240 if flags == "S" else 502, options=options or [])
                     / Raw(payload))
        c.expect(other, t[0], forwarded(pkt, other))
        t[0] = round(t[0] + 0.0003, 6)

    c.send("a", 0.9, arp_request("a", IPS["b"]))
    c.expect("a", 0.9, arp_reply("a", IPS["b"]))
    isn_a, isn_b = 0x11223344, 0xAABBCCDD
    syn_opts = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (100, 0)), ("NOP", None),
                ("WScale", 7)]
    step("a", "S", isn_a, 0, options=syn_opts)
    c.send("b", 0.95, arp_request("b", IPS["a"]))  # b's neighbour entry, before it answers
    c.expect("b", 0.95, arp_reply("b", IPS["a"]))
    step("b", "SA", isn_b, isn_a + 1, options=syn_opts[:3] + [("NOP", None), ("WScale", 7)])
    request = b"GET / HTTP/1.1\r\nHost: 10.0.0.3\r\nUser-Agent: curl/8.5.0\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello fabric"
    step("a", "A", isn_a + 1, isn_b + 1)
    step("a", "PA", isn_a + 1, isn_b + 1, request)
    step("b", "A", isn_b + 1, isn_a + 1 + len(request))
    step("b", "PA", isn_b + 1, isn_a + 1 + len(request), response)
    step("a", "A", isn_a + 1 + len(request), isn_b + 1 + len(response))
    step("a", "FA", isn_a + 1 + len(request), isn_b + 1 + len(response))
    step("b", "FA", isn_b + 1 + len(response), isn_a + 2 + len(request))
    step("a", "A", isn_a + 2 + len(request), isn_b + 2 + len(response))
    return c


# --- services: the router's service core with the shipped TCP activator ------------------


def client(name: str) -> dict:
    return {"name": name, "ip": IPS[name], "mac": MACS[name], "attach": 0.0}


def web_service(hold: dict | None = None, backends: tuple[str, ...] = ("web",),
                udp: bool = False) -> dict:
    """The service "web": VIP:80/tcp -> 8080 with the TCP activator (and, with `udp`,
    VIP:53/udp -> 5353 without activator), readiness from the controller (the events)."""
    ports: list[dict] = [{"port": 80, "target_port": 8080, "protocol": "tcp",
                          "activator": "tcp"}]
    if udp:
        ports.append({"port": 53, "target_port": 5353, "protocol": "udp", "activator": "none"})
    svc: dict = {"name": "web", "ip": VIP, "ports": ports, "backends": list(backends),
                 "readiness": "external"}
    if hold:
        svc["hold"] = hold
    return svc


def syn(src: str, sport: int, isn: int, ip_id: int, tsval: int = 100) -> Packet:
    """A Linux client's SYN to VIP:80."""
    opts = [o if o[0] != "Timestamp" else ("Timestamp", (tsval, 0)) for o in LINUX_SYN_OPTS]
    return eth(src) / IP(src=IPS[src], dst=VIP, id=ip_id, flags="DF") / TCP(
        sport=sport, dport=80, seq=isn, flags="S", window=64240, options=opts)


def svc_syn_storm() -> Case:
    c = Case("svc_syn_storm", "50 SYNs from five clients to a dormant VIP within 100 ms are "
             "held (one wake) and reach the backend DNATed to 8080, in arrival order, only "
             "when it is ready at t=1.0.",
             [client(n) for n in CLIENTS] + [{**client("web"), "attach": 0.5}],
             services=[web_service()],
             events=[{"t": 1.0, "backend": "web", "ready": True}])
    for i in range(50):
        src = CLIENTS[i % len(CLIENTS)]
        sport = 32768 + (i * 7919) % 28000  # Linux's ephemeral range
        isn = (0x1000193 * (i + 1) * 2654435761) & 0xFFFFFFFF
        p = c.send(src, round(0.1 + i * 0.002, 6), syn(src, sport, isn, 0x4000 + i, 1000 + i))
        c.expect("web", 1.0, dnat(p, "web", 8080))
    return c


def svc_retransmits() -> Case:
    c = Case("svc_retransmits", "One client's SYN at t=0 and its retransmits at 1 s and 3 s "
             "(Linux RTO) are held with one wake; the backend, ready at 3.5, gets all three "
             "DNATed in order (the core does not dedupe).",
             [client("c1"), client("web")], services=[web_service()],
             events=[{"t": 3.5, "backend": "web", "ready": True}])
    for k, t in enumerate((0.0, 1.0, 3.0)):
        p = c.send("c1", t, syn("c1", 45678, 0x5EED1234, 0x6000 + k, 5000 + int(t * 1000)))
        c.expect("web", 3.5, dnat(p, "web", 8080))
    return c


def svc_rst_and_strays() -> Case:
    c = Case("svc_rst_and_strays", "While dormant, a stray ACK with data, a keepalive and an "
             "RST to the VIP are dropped by the TCP activator without a wake; a SYN is held "
             "and wakes; at ready (t=2.5) only the SYN reaches the backend.",
             [client("c1"), client("web")], services=[web_service()],
             events=[{"t": 2.5, "backend": "web", "ready": True}])

    def seg(t: float, sport: int, flags: str, seq: int, ack: int, data: bytes = b"",
            ip_id: int = 0) -> None:
        c.send("c1", t, eth("c1") / IP(src=IPS["c1"], dst=VIP, id=ip_id, flags="DF") / TCP(
            sport=sport, dport=80, seq=seq, ack=ack, flags=flags, window=502,
            options=[("NOP", None), ("NOP", None), ("Timestamp", (9000, 7000))]) / Raw(data))

    # A connection that died with the last backend: more data, then a keepalive
    # (seq = snd.nxt - 1, no data), then a reset from another one.
    seg(0.5, 41000, "PA", 0x100000, 0x200000, b"GET /again HTTP/1.1\r\n\r\n", 0x7001)
    seg(0.7, 41000, "A", 0x100000 + 23, 0x200000, ip_id=0x7002)
    seg(0.9, 41002, "R", 0x300000, 0, ip_id=0)
    p = c.send("c1", 1.5, syn("c1", 41004, 0x400000, 0x7003))
    c.expect("web", 2.5, dnat(p, "web", 8080))
    return c


def svc_hold_timeout() -> Case:
    c = Case("svc_hold_timeout", "No backend, hold timeout 2 s: a held SYN is answered with "
             "RST|ACK from the VIP and a held UDP datagram with ICMP port unreachable from the "
             "VIP (quoting it as held, TTL 63), each 2 s after it arrived.",
             [client("c1")], until=6.0,
             services=[web_service(hold={"timeout": 2.0}, backends=(), udp=True)])
    s1 = c.send("c1", 1.0, syn("c1", 50000, 0xC0FFEE00, 0x7100))
    c.expect("c1", 3.0, tcp_reset_for_syn("c1", s1))
    query = bytes.fromhex("1234010000010000000000000377656206666162726963000001" "0001")
    u1 = c.send("c1", 1.2, eth("c1") / IP(src=IPS["c1"], dst=VIP, id=0x7101, flags=0)
                / UDP(sport=51000, dport=53) / Raw(query))
    held = IP(bytes(u1[IP]))
    held.ttl -= 1
    del held.chksum
    c.expect("c1", 3.2, icmp_error("c1", bytes(held), 3, 3, src=VIP))
    return c


CASES: dict[str, Callable[[], Case]] = {f.__name__: f for f in (
    arp_ping, garp_probe, spoofed_source, ttl_expiry, hold_release, hold_timeout, frag_needed,
    tcp_handshake, svc_syn_storm, svc_retransmits, svc_rst_and_strays, svc_hold_timeout)}


def main(argv: list[str]) -> None:
    names = argv or list(CASES)
    for name in names:
        case = CASES[name]()
        case.write()
        n_in = sum(len(v) for v in case.inputs.values())
        n_out = sum(len(v) for v in case.outputs.values())
        print(f"{name}: {n_in} frames in, {n_out} expected out")


if __name__ == "__main__":
    main(sys.argv[1:])
