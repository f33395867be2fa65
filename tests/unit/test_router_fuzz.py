"""Property tests: whatever bytes arrive on a pod port, `Router.receive` and the timers never
raise, and every frame the router emits is well-formed and goes to an attached port.

Inputs are random bytes and mutations of valid frames (ARP, IPv4 with options, ICMP, TCP,
UDP, fragments, GSO super-frames behind virtio-net headers with random fields), sent from
plain and vnet ports, to destinations that exercise every path (pods, gateway, unknown,
outside, held, remote, small MTUs). Mutated frames are often "repaired" (own source
address, valid IP header checksum) so that they get past the first checks.
"""

from __future__ import annotations

import random
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.net import checksum, packets
from fabric.net.packets import ARP_REPLY, ARP_REQUEST, BROADCAST_MAC, ETH_P_ARP, ETH_P_IP
from fabric.net.vnet import F_NEEDS_CSUM, GSO_NONE, GSO_UDP, VnetHdr
from fabric.router.model import Port
from fabric.router.router import Router
from tests.support.packets import tcp_super_frame, udp_super_frame

GW_MAC = packets.mac_bytes("02:fb:00:00:00:01")
GW = bytes([10, 0, 0, 1])


def ip(last: int) -> bytes:
    return bytes([10, 0, 0, last])


# name, address, MAC (None: learned), port kind ("plain", "vnet", None: not attached), MTU
PODS = [
    ("p", ip(2), "02:00:00:00:00:02", "plain", 1500),
    ("v", ip(3), "02:00:00:00:00:03", "vnet", 1500),
    ("ps", ip(4), None, "plain", 576),      # small MTU, MAC learned
    ("vs", ip(5), None, "vnet", 1280),      # small MTU, MAC learned
    ("off", ip(6), "02:00:00:00:00:06", None, 1500),  # never attached: frames are held
]
SENDERS = ["p", "v", "ps", "vs"]
TARGETS = [ip(2), ip(3), ip(4), ip(5), ip(6), ip(7), GW, ip(77), ip(0), ip(255),
           bytes([10, 0, 1, 9]), bytes([192, 168, 1, 1]), bytes([224, 0, 0, 251]),
           b"\xff\xff\xff\xff", bytes(4)]


class Env:
    def __init__(self) -> None:
        self.r = Router("fuzz", "10.0.0.0/24")
        self.captured: list[tuple[int, bytes, bool]] = []
        self.ports: dict[str, Port] = {}
        self.macs: dict[str, bytes] = {}
        for name, addr, mac, kind, mtu in PODS:
            self.r.add_pod(name, packets.ip_str(addr), mac)
            self.macs[name] = packets.mac_bytes(mac) if mac else bytes([2, 0, 0, 0, 0, addr[3]])
            if kind is not None:
                self.ports[name] = self.port(kind == "vnet", mtu)
                self.r.attach(name, self.ports[name], 0.0)
        self.r.add_pod("far", "10.0.0.7", remote="node-2")
        self.now = 0.0
        self.frames = 0
        self.outputs = 0
        check_outputs(self, self.take_all(), {})
        self.captured.clear()

    def port(self, vnet: bool, mtu: int) -> Port:
        """A port with a capture hook, as `fabricd capture` would set."""
        p = Port(vnet=vnet, mtu=mtu)
        p.capture = lambda now, frame, outgoing: self.captured.append((id(p), frame, outgoing))
        return p

    def take_all(self) -> list[tuple[Port, bytes]]:
        out = list(self.r.outputs)
        self.r.outputs.clear()
        return out

    def feed(self, sender: str, data: bytes) -> None:
        port = self.ports[sender]
        tx_before = {id(p): p.tx_packets for p in self.ports.values()}
        rx_before = port.rx_packets
        buf = bytearray(data) + bytearray(64)
        n = len(data)
        deadline = self.r.next_timer()
        self.r.touched = False
        out = self.r.receive(port, buf, n, self.now)
        # The shell re-reads the deadline only after a frame that left the fast path.
        if not self.r.touched:
            assert self.r.next_timer() == deadline, "the fast path moved a deadline"
        assert buf[n:] == bytearray(64)
        assert port.rx_packets == rx_before + 1
        outs = [(out, bytes(buf[:n]))] if out is not None else []
        outs += self.take_all()
        check_outputs(self, outs, tx_before)
        # Captures see the frame that came in and exactly the frames that go out.
        assert self.captured[0] == (id(port), data[port.hlen:], False)
        assert sorted(self.captured[1:]) == sorted((id(p), f[p.hlen:], True) for p, f in outs)
        self.captured.clear()
        self.frames += 1
        self.outputs += len(outs)

    def tick(self, dt: float) -> None:
        self.now += dt
        t = self.r.next_timer()
        if t is not None and t <= self.now:
            tx_before = {id(p): p.tx_packets for p in self.ports.values()}
            self.r.handle_timer(self.now)
            outs = self.take_all()
            check_outputs(self, outs, tx_before)
            assert self.captured == [(id(p), f[p.hlen:], True) for p, f in outs]
            self.captured.clear()
        for pod in self.r.pods.values():
            assert len(pod.pending) <= self.r.hold.limit


def check_outputs(env: Env, outs: list[tuple[Port, bytes]], tx_before: dict[int, int]) -> None:
    attached = {id(p): name for name, p in env.ports.items() if p.pod is not None}
    counts: dict[int, int] = {}
    for port, frame in outs:
        assert id(port) in attached, "frame for a port that is not attached"
        pod = port.pod
        assert pod is not None and pod.port is port
        counts[id(port)] = counts.get(id(port), 0) + 1
        h = port.hlen
        assert len(frame) >= h + 14
        hdr = VnetHdr.parse(frame) if h else None
        eth = packets.Ethernet.parse(frame[h:])
        assert eth.src == GW_MAC
        if eth.ethertype == ETH_P_ARP:
            arp = packets.Arp.parse(frame[h + 14:])
            assert arp.sha == GW_MAC
            assert len(frame) == h + 42
            if arp.op == ARP_REQUEST:
                # The gateway asking for a pod whose MAC it does not know.
                assert eth.dst == BROADCAST_MAC and arp.spa == GW and arp.tpa == pod.ip
                assert arp.tha == bytes(6)
            else:
                assert arp.op == ARP_REPLY
                assert eth.dst == arp.tha
                assert arp.spa != arp.tpa and arp.spa[:3] == bytes([10, 0, 0])
                assert arp.spa[3] not in (0, 255)
            continue
        assert eth.ethertype == ETH_P_IP, "only ARP and IPv4 leave the router"
        assert eth.dst == pod.mac and eth.dst[0] & 1 == 0, "IP frames go to the pod's MAC"
        ipv4 = packets.IPv4.parse(frame[h + 14:])
        assert checksum.verify(frame[h + 14:h + 14 + ipv4.ihl]), "bad IP header checksum"
        assert ipv4.dst == pod.ip or ipv4.src == GW
        if ipv4.src == GW:
            assert ipv4.dst == pod.ip and ipv4.proto == packets.PROTO_ICMP
            icmp = frame[h + 14 + ipv4.ihl:h + 14 + ipv4.total_length]
            assert checksum.verify(icmp), "bad ICMP checksum from the gateway"
            if icmp[0] != packets.ICMP_ECHO_REPLY:
                assert icmp[0] in (packets.ICMP_UNREACH, packets.ICMP_TIME_EXCEEDED)
                assert ipv4.total_length <= 20 + 8 + 60 + 8
                assert len(icmp) >= 28 and icmp[8] >> 4 == 4
                assert icmp[8 + 12:8 + 16] == pod.ip, "ICMP error about someone else's packet"
        if hdr is None or hdr.gso_type == GSO_NONE:
            # Anything but a super-frame for a vnet port respects the egress MTU (echo
            # replies mirror a request that came in on the same port).
            is_echo = ipv4.src == GW and frame[h + 14 + ipv4.ihl] == packets.ICMP_ECHO_REPLY
            assert is_echo or ipv4.total_length <= port.mtu, (ipv4.total_length, port.mtu)
    for p in env.ports.values():
        if tx_before:
            assert p.tx_packets - tx_before[id(p)] == counts.get(id(p), 0), "tx counter"


# --- the corpus -------------------------------------------------------------------------


def corpus(sender: str) -> list[tuple[bytes | None, bytes]]:
    """Valid frames from `sender`: (virtio-net header or None for the default, frame)."""
    me = dict((n, a) for n, a, *_ in PODS)[sender]
    mac = bytes([2, 0, 0, 0, 0, me[3]])
    eth = packets.eth_header(GW_MAC, mac, ETH_P_IP)
    out: list[tuple[bytes | None, bytes]] = []
    for t in TARGETS:
        out.append((None, packets.arp_frame(ARP_REQUEST, mac, me, bytes(6), t, BROADCAST_MAC)))
        out.append((None, eth + packets.icmp_echo(me, t, 7, 1, b"ping" * 5)))
        out.append((None, eth + packets.udp_packet(me, t, 5000, 53, b"udp payload")))
        out.append((None, eth + packets.tcp_packet(me, t, 40000, 80, 1, 0, packets.TCP_SYN,
                                                   options=b"\x02\x04\x05\xb4")))
    out += [
        (None, packets.arp_frame(ARP_REQUEST, mac, me, bytes(6), me, BROADCAST_MAC)),
        (None, packets.arp_frame(ARP_REQUEST, mac, bytes(4), bytes(6), me, BROADCAST_MAC)),
        (None, packets.arp_frame(ARP_REPLY, mac, me, GW_MAC, GW, GW_MAC)),
        (None, eth + packets.udp_packet(me, ip(3), 1, 2, bytes(1400), flags_frag=0)),
        (None, eth + packets.udp_packet(me, ip(4), 1, 2, bytes(1400), flags_frag=0)),
        (None, eth + packets.tcp_packet(me, ip(5), 1, 2, 0, 0, packets.TCP_ACK, bytes(1400))),
        (None, eth + packets.udp_packet(me, ip(3), 1, 2, b"ttl", ttl=1)),
        (None, eth + packets.ipv4_header(me, ip(3), 17, 16, flags_frag=packets.IP_MF | 3,
                                         ttl=1) + bytes(16)),
        (None, eth + packets.ipv4_header(me, ip(4), 17, 800, flags_frag=packets.IP_MF,
                                         options=bytes([0x94, 4, 0, 0, 7, 7, 4]) + bytes(5))
         + bytes(800)),
        (None, eth + packets.ipv4_header(me, GW, 47, 4) + bytes(4)),
        (None, eth + packets.icmp_error(me, packets.udp_packet(ip(3), me, 1, 2, b""), 3, 3)),
        (None, eth + packets.udp_packet(ip(77), ip(3), 1, 2, b"spoofed")),
        (None, packets.eth_header(GW_MAC, mac, 0x86DD) + bytes(60)),
        (None, packets.eth_header(GW_MAC, mac, 0x8100) + b"\0\1\x08\0" + bytes(40)),
    ]
    # Offloaded frames (their virtio-net header; on plain ports the frame alone).
    for dst in (ip(2), ip(3), ip(4), ip(5), ip(6), ip(77)):
        for length, mss in ((3000, 1448), (500, 1448), (6000, 536), (1, 1)):
            hdr, frame = tcp_super_frame(bytes(length), mss, src=me, dst=dst, mac_dst=GW_MAC,
                                         mac_src=mac, options=b"")
            out.append((hdr.pack(), frame))
        hdr, frame = udp_super_frame(bytes(3000), 1000, src=me, dst=dst)
        out.append((hdr.pack(), eth + frame[14:]))
        hdr, frame = udp_super_frame(bytes(3000), 1000, src=me, dst=dst, gso_type=GSO_UDP,
                                     df=False)
        out.append((hdr.pack(), eth + frame[14:]))
        hdr, frame = udp_super_frame(bytes(100), 0, src=me, dst=dst, gso_type=GSO_NONE)
        out.append((hdr.pack(), eth + frame[14:]))
    return out


CORPUS = {s: corpus(s) for s in SENDERS}


def mutate(rng: random.Random, sender: str, vnet: bool) -> bytes:
    me = dict((n, a) for n, a, *_ in PODS)[sender]
    hdr, frame = rng.choice(CORPUS[sender])
    f = bytearray(frame)
    for _ in range(rng.choice((0, 1, 1, 2, 3, 8))):
        kind = rng.random()
        if kind < 0.4 and f:
            f[rng.randrange(min(len(f), 64))] = rng.randrange(256)
        elif kind < 0.6 and f:
            i = rng.randrange(len(f))
            f[i] ^= 1 << rng.randrange(8)
        elif kind < 0.75:
            del f[rng.randrange(len(f) + 1):]
        elif kind < 0.85:
            f += rng.randbytes(rng.randrange(1, 40))
        elif kind < 0.95 and len(f) >= 34:
            # A field the router reads: version/ihl, total length, flags/offset, TTL, proto.
            field = rng.choice((14, 16, 20, 22, 23))
            if field == 16 or field == 20:
                f[field:field + 2] = rng.randrange(0x10000).to_bytes(2, "big")
            else:
                f[field] = rng.randrange(256)
    if len(f) >= 34 and f[12:14] == b"\x08\x00" and rng.random() < 0.7:
        # Repair: our own source address and a valid header checksum when possible.
        f[26:30] = me
        ihl = (f[14] & 15) * 4
        if ihl >= 20 and len(f) >= 14 + ihl:
            f[24:26] = b"\0\0"
            f[24:26] = checksum.checksum(f[14:14 + ihl]).to_bytes(2, "big")
    if not vnet:
        return bytes(f)
    h = bytearray(hdr if hdr is not None else bytes(10))
    if rng.random() < 0.3:
        vh = VnetHdr.parse(h)
        vh = vh._replace(
            flags=rng.choice((0, F_NEEDS_CSUM, 2, 3, rng.randrange(256))),
            gso_type=rng.choice((0, 1, 3, 4, 5, 0x81, 0x85, rng.randrange(256))),
            hdr_len=rng.randrange(0x10000),
            gso_size=rng.choice((0, 1, 7, 536, 1448, 65535, rng.randrange(0x10000))),
            csum_start=rng.choice((0, 14, 34, 54, len(f), len(f) + 5, rng.randrange(0x10000))),
            csum_offset=rng.choice((0, 2, 6, 10, 16, 0xFFFF, rng.randrange(0x10000))),
        )
        h = bytearray(vh.pack())
    elif rng.random() < 0.2:
        h[rng.randrange(10)] = rng.randrange(256)
    return bytes(h) + bytes(f)


def run(rng: random.Random, frames: int) -> Env:
    env = Env()
    kinds = {name: (kind, mtu) for name, _, _, kind, mtu in PODS}
    for _ in range(frames):
        sender = rng.choice([s for s in SENDERS if s in env.ports])
        vnet = env.ports[sender].vnet
        if rng.random() < 0.1:
            data = rng.randbytes(rng.randrange(0, 120))
        else:
            data = mutate(rng, sender, vnet)
        # Now and then a burst of the same frame: hold overflow, ICMP rate limiting.
        for _ in range(150 if rng.random() < 0.002 else 1):
            env.feed(sender, data)
        env.tick(rng.choice((0.0, 0.0, 0.0001, 0.001, 0.01, 0.1, 2.0)))
        if rng.random() < 0.003:
            # Detach or attach a pod: frames for it are held, released or expire, and
            # learned MACs are forgotten so the gateway ARPs again.
            name = rng.choice(("off", "ps", "vs"))
            if name in env.ports:
                if sum(1 for s in SENDERS if s in env.ports) > 1 or name == "off":
                    env.r.detach(name)
                    del env.ports[name]
            else:
                kind, mtu = kinds[name]
                if kind is None:
                    kind, mtu = rng.choice(("plain", "vnet")), rng.choice((576, 1500))
                env.ports[name] = env.port(kind == "vnet", mtu)
                env.r.attach(name, env.ports[name], env.now)
                check_outputs(env, env.take_all(), {})
                env.captured.clear()
    return env


# --- hypothesis -------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.sampled_from(SENDERS), st.binary(max_size=200))
def test_random_bytes_never_raise(sender: str, data: bytes) -> None:
    env = Env()
    env.feed(sender, data)
    env.tick(100.0)


@FUZZ
@given(st.sampled_from(SENDERS), st.randoms(use_true_random=False))
def test_mutated_frames_never_raise(sender: str, rng: random.Random) -> None:
    env = Env()
    for _ in range(5):
        env.feed(sender, mutate(rng, sender, env.ports[sender].vnet))
        env.tick(rng.choice((0.0, 1.0, 31.0)))


@FUZZ
@given(st.sampled_from(["v", "vs"]), st.sampled_from(range(len(CORPUS["v"]))),
       st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFF),
       st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_random_vnet_headers_never_raise(sender: str, i: int, flags: int, gso_type: int,
                                         hdr_len: int, gso_size: int, csum_start: int,
                                         csum_offset: int) -> None:
    env = Env()
    _, frame = CORPUS[sender][i % len(CORPUS[sender])]
    vh = VnetHdr(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)
    env.feed(sender, vh.pack() + frame)
    env.tick(100.0)


def test_corpus_frames_are_valid_and_mostly_produce_output() -> None:
    # The unmutated corpus must exercise the router, not just its drop paths.
    env = Env()
    for sender in SENDERS:
        for hdr, frame in CORPUS[sender]:
            data = (hdr or bytes(10)) + frame if env.ports[sender].vnet else frame
            env.feed(sender, data)
            env.tick(0.001)
    assert env.outputs > env.frames * 0.5
    drops: dict[str, int] = {}
    for p in env.ports.values():
        for k, v in p.drops.items():
            drops[k] = drops.get(k, 0) + v
    for reason in ("spoofed_source", "ttl_expired", "no_route", "too_big", "ipv6", "ethertype",
                   "broadcast", "multicast", "gateway_port_closed", "no_tunnel"):
        assert reason in drops, reason
    assert "malformed" not in drops and "bad_checksum" not in drops


def test_seeded_mutation_loop() -> None:
    start = time.monotonic()
    rng = random.Random(20261122)
    env = run(rng, 50_000)
    assert env.frames >= 50_000
    assert env.outputs > 10_000
    assert time.monotonic() - start < 60
