"""The data-plane thread driven without root: routers with socketpair ports, the deadline
heap on its timerfd, control-side calls, the tunnel link between two data planes on
127.0.0.1, and the egress uplink demultiplexer."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections.abc import Iterator

import pytest
from scapy.layers.inet import ICMP, IP, UDP

from fabric.net import checksum, packets
from fabric.router.model import Port
from fabric.router.router import Router
from fabric.runtime import dataplane
from fabric.runtime.dataplane import DataPlane, DataPlaneBusy
from gateway.egress import EgressNat
from gateway.uplink import Uplink
from tests.support.pods import GW_MAC, SocketPod
from tunnels.core import TunnelCore
from tunnels.keys import generate_keypair
from tunnels.link import TunnelLink

CIDR = "10.10.0.0/24"


@pytest.fixture
def dp() -> Iterator[DataPlane]:
    d = DataPlane()
    d.start()
    yield d
    d.close()


def attach(dp: DataPlane, router: Router, pod: SocketPod) -> Port:
    port = Port(vnet=pod.vnet, mtu=1500, fd=pod.take_fd(), kind="fd")

    def here() -> None:
        router.attach(pod.name, port, time.monotonic(), pod.mac)
        dp.add_port(router, port)

    dp.call(here)
    return port


@contextlib.contextmanager
def _shop(dp: DataPlane) -> Iterator[tuple[Router, SocketPod, SocketPod]]:
    """A router on `dp` with pods a and b, both attached; the pods closed after."""
    r = Router("shop", CIDR)
    a = SocketPod("a", "10.10.0.2", "02:00:0a:0a:00:02")
    b = SocketPod("b", "10.10.0.3", "02:00:0a:0a:00:03")
    try:
        dp.add_owner(r)
        dp.call(r.add_pod, "a", a.ip, a.mac)
        dp.call(r.add_pod, "b", b.ip, b.mac)
        attach(dp, r, a)
        attach(dp, r, b)
        yield r, a, b
    finally:
        a.close()
        b.close()


@pytest.fixture
def shop(dp: DataPlane) -> Iterator[tuple[Router, SocketPod, SocketPod]]:
    """A router with pods a and b, both attached."""
    with _shop(dp) as pods:
        yield pods


def test_held_frames_leave_right_after_the_call_that_attaches(dp: DataPlane) -> None:
    r = Router("shop", CIDR)
    a = SocketPod("a", "10.10.0.2", "02:00:0a:0a:00:02")
    b = SocketPod("b", "10.10.0.3", "02:00:0a:0a:00:03")
    try:
        dp.add_owner(r)
        dp.call(r.add_pod, "a", a.ip, a.mac)
        dp.call(r.add_pod, "b", b.ip, b.mac)
        attach(dp, r, a)
        for i in range(5):
            a.udp(b.ip, 5000, 6000, b"held%d" % i)
        deadline = time.monotonic() + 2
        while dp.call(r.held) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dp.call(r.held) == 5
        t0 = time.monotonic()
        attach(dp, r, b)  # nothing else happens: no frame, no timer
        got = [b.recv_ip(0.5) for _ in range(5)]
        assert time.monotonic() - t0 < 0.5
        assert [bytes(IP(p)[UDP].payload) for p in got if p] == [b"held%d" % i
                                                               for i in range(5)]
        a.udp(b.ip, 5000, 6000, b"later")
        assert bytes(IP(b.recv_ip()).payload[UDP].payload) == b"later"
    finally:
        a.close()
        b.close()


def test_timer_deadlines_are_met_exactly(dp: DataPlane) -> None:
    """A pod's hold times out at its deadline: its sender gets host unreachable then."""
    r = Router("shop", CIDR, hold_timeout=0.1)
    a = SocketPod("a", "10.10.0.2", "02:00:0a:0a:00:02")
    try:
        dp.add_owner(r)
        dp.call(r.add_pod, "a", a.ip, a.mac)
        dp.call(r.add_pod, "gone", "10.10.0.9")
        attach(dp, r, a)
        late = []
        for i in range(7):
            t0 = time.monotonic()
            a.udp("10.10.0.9", 5000 + i, 6000, b"x")
            err = a.recv_ip(2.0)
            took = time.monotonic() - t0
            assert err is not None and IP(err)[ICMP].type == 3 and IP(err)[ICMP].code == 1
            assert took >= 0.1
            late.append(took - 0.1)
        median = sorted(late)[3]
        print(f"\nhold timeout to ICMP at the sender: median {median * 1e3:.2f} ms late")
        assert median < 0.02, late  # milliseconds at most, not a polling tick
        assert dp.timer_fires >= 7
    finally:
        a.close()


def test_call_returns_raises_and_runs_between_frames(dp: DataPlane) -> None:
    assert dp.call(lambda x: x * 2, 21) == 42
    with pytest.raises(ZeroDivisionError):
        dp.call(lambda: 1 // 0)
    assert dp.call(lambda: dp.on_thread)


def test_a_call_not_taken_in_time_never_runs_and_the_loop_never_waits(dp: DataPlane) -> None:
    """A stalled data plane costs a caller a clear error, not a frozen event loop, and a
    call given up on (timeout, cancellation) is skipped, never run late."""
    ran: list[str] = []

    async def main() -> None:
        dp.post(time.sleep, 0.6)  # the data plane is busy for 0.6 s
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        with pytest.raises(DataPlaneBusy, match="did not take a call within 0.2 s"):
            await dp.acall(ran.append, "timed out", timeout=0.2)
        cancelled = asyncio.create_task(dp.acall(ran.append, "cancelled"))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert await dp.acall(lambda: ran.append("waited") or 7) == 7
        tick.cancel()
        assert max(gaps) < 0.1, f"the event loop stalled for {max(gaps):.3f} s"

    asyncio.run(main())
    with pytest.raises(DataPlaneBusy):  # the blocking form, for other threads, alike
        dp.post(time.sleep, 0.4)
        dp.call(ran.append, "blocking", timeout=0.1)
    dp.call(lambda: None)
    assert ran == ["waited"]
    assert dp.calls_abandoned == 3


def test_a_posted_call_that_raises_is_logged_and_counted(
        dp: DataPlane, caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> None:
        raise ValueError("bad")

    with caplog.at_level("ERROR", logger="fabricd.dataplane"):
        for _ in range(3):
            dp.post(boom)
        dp.call(lambda: None)
    assert dp.errors.counts["call"] == 3
    assert sum("posted call" in r.getMessage() for r in caplog.records) == 1


def test_a_router_that_raises_costs_one_frame(dp: DataPlane) -> None:
    r = Router("shop", CIDR)
    a = SocketPod("a", "10.10.0.2", "02:00:0a:0a:00:02")
    b = SocketPod("b", "10.10.0.3", "02:00:0a:0a:00:03")
    try:
        dp.add_owner(r)
        dp.call(r.add_pod, "a", a.ip, a.mac)
        dp.call(r.add_pod, "b", b.ip, b.mac)
        pa = attach(dp, r, a)
        attach(dp, r, b)
        real = r.receive
        calls = {"n": 0}

        def flaky(port: Port, buf: bytearray, n: int, now: float) -> Port | None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("a router bug")
            return real(port, buf, n, now)

        dp.call(dp.remove_port, pa)
        dp.call(dp.add_port, r, pa, flaky)
        a.udp(b.ip, 1, 2, b"lost")
        time.sleep(0.1)
        a.udp(b.ip, 1, 2, b"kept")
        got = b.recv_ip(2.0)
        assert got is not None and bytes(IP(got)[UDP].payload) == b"kept"
    finally:
        a.close()
        b.close()


def _link(port_peer: int | None, key: bytes, peer_pub: bytes, peer: str) -> TunnelLink:
    core = TunnelCore(key, None)
    link = TunnelLink(core, ("127.0.0.1", 0))
    link.open()
    return link


def test_two_data_planes_joined_by_the_tunnel_link() -> None:
    k1, p1 = generate_keypair()
    k2, p2 = generate_keypair()
    dp1, dp2 = DataPlane(), DataPlane()
    l1 = TunnelLink(TunnelCore(k1, None), ("127.0.0.1", 0))
    l2 = TunnelLink(TunnelCore(k2, None), ("127.0.0.1", 0))
    l1.open()
    l2.open()
    assert l1.sock is not None and l2.sock is not None
    ep1 = l1.sock.getsockname()
    ep2 = l2.sock.getsockname()
    l1.core.add_peer("w2", p2, (ep2[0], ep2[1]), None)
    l2.core.add_peer("w1", p1, (ep1[0], ep1[1]), None)
    a = SocketPod("a", "10.10.0.2", "02:00:0a:0a:00:02")
    b = SocketPod("b", "10.10.0.3", "02:00:0a:0a:00:03", vnet=True)
    r1, r2 = Router("shop", CIDR), Router("shop", CIDR)
    try:
        for dp, r, link, local, other, worker in ((dp1, r1, l1, a, b, "w2"),
                                                  (dp2, r2, l2, b, a, "w1")):
            dp.start()
            dp.add_owner(r)
            dp.attach_tunnel(link)
            dp.call(r.attach_tunnel, 7, 1420)
            dp.route_tunnel(7, r)
            dp.call(r.add_pod, local.name, local.ip, local.mac)
            dp.call(r.add_pod, other.name, other.ip, None, worker)
            attach(dp, r, local)
        # A burst: queued while the handshake runs, then sent in order.
        for i in range(30):
            a.udp(b.ip, 5000, 6000, b"t%02d" % i)
        got = [b.recv_ip(5.0) for _ in range(30)]
        assert [bytes(IP(p)[UDP].payload) for p in got if p] == [b"t%02d" % i
                                                               for i in range(30)]
        b.udp(a.ip, 6000, 5000, b"back")
        back = a.recv_ip(5.0)
        assert back is not None and bytes(IP(back)[UDP].payload) == b"back"
        tp = dp1.call(r1.tunnel_ports)
        assert [p.peer for p in tp] == ["w2"] and tp[0].tx_packets == 30
        assert l1.counters["datagrams_out"] >= 31  # the handshake, then the data
        # The tunnel core's timers are the data plane's too (a rekey is armed).
        assert dp1.call(lambda: dp1._armed.get(l1)) is not None
    finally:
        for dp in (dp1, dp2):
            dp.close()
        l1.close()
        l2.close()
        a.close()
        b.close()


def test_egress_uplink_demultiplexes_to_the_namespace(dp: DataPlane) -> None:
    """The uplink's packets go to the router whose egress address they are for; a pod's
    packets to the outside leave SNATed on the uplink (a socketpair plays the TUN)."""
    import ipaddress

    r = Router("shop", CIDR)
    a = SocketPod("a", "10.10.0.2", "02:00:0a:0a:00:02")
    tun_test, tun_fabric = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun_test.settimeout(2.0)
    uplink = Uplink("fabtest0", ipaddress.IPv4Network("100.64.0.0/16"))
    port = Port(vnet=False, mtu=1500, fd=tun_fabric.detach(), kind="uplink", l3=True)
    uplink.port = port
    eip = uplink.allocate("shop", 7)
    nat = EgressNat(eip, ["0.0.0.0/0"])
    try:
        dp.add_owner(r)
        dp.attach_uplink(uplink, port)
        dp.call(r.attach_egress, nat, port)
        dp.call(uplink.add, "shop", eip, r)
        dp.call(r.add_pod, "a", a.ip, a.mac)
        attach(dp, r, a)
        a.udp("198.51.100.7", 5353, 53, b"query")
        out = IP(tun_test.recv(65536))
        assert out.src == str(eip) and out.dst == "198.51.100.7" and out.ttl == 63
        reply = packets.udp_packet(packets.ip_bytes("198.51.100.7"), eip.packed, 53,
                                   out[UDP].sport, b"answer")
        tun_test.send(reply)
        got = a.recv_ip(2.0)
        assert got is not None and IP(got).dst == a.ip and bytes(IP(got)[UDP].payload) == \
            b"answer"
        tun_test.send(packets.udp_packet(packets.ip_bytes("198.51.100.7"),
                                         packets.ip_bytes("100.64.9.9"), 53, 1, b"nobody"))
        time.sleep(0.1)
        assert dp.call(lambda: dict(port.drops)) == {"no_namespace": 1}
    finally:
        a.close()
        tun_test.close()


def test_health_says_when_the_data_plane_is_stuck_or_dead() -> None:
    """/v1/health is what a supervisor polls: ok only while the data plane takes calls."""
    from fabric.runtime import worker
    from fabric.runtime.worker import Fabric

    async def main() -> None:
        async with Fabric(worker_id="w1", local_stack=False) as fab:
            assert (await fab.health())["ok"] is True
            fab.starting = True  # a daemon still applying its file
            assert "starting" in (await fab.health())["error"]
            fab.starting = False
            old = worker.HEALTH_TIMEOUT
            worker.HEALTH_TIMEOUT = 0.2
            try:
                fab.dataplane.post(time.sleep, 0.6)  # a stuck data plane
                state = await fab.health()
                assert state["ok"] is False and "did not answer" in state["error"]
                await asyncio.sleep(0.6)
                assert (await fab.health())["ok"] is True
            finally:
                worker.HEALTH_TIMEOUT = old

            fab.dataplane._stop = True  # the thread ends, as it would on an escaped bug
            fab.dataplane.post(int)
            fab.dataplane._thread.join(5)  # type: ignore[union-attr]
            state = await fab.health()
            assert state["ok"] is False and "died" in state["error"]
            fab.dataplane._stop = False

    asyncio.run(asyncio.wait_for(main(), 30))


class EndlessLink:
    """A tunnel link whose socket never runs dry (a flood): every read costs 0.2 ms of
    work and delivers nothing, like a read of handshake messages."""

    name = "tunnel"

    def __init__(self) -> None:
        self.r, self.w = socket.socketpair()
        self.w.send(b"x")  # readable for ever: nothing reads it
        self.reads = 0

    def fileno(self) -> int:
        return self.r.fileno()

    def readable(self, now: float) -> Iterator[list[tuple[str, int, bytes, bytes | None]]]:
        while True:
            t = time.perf_counter()
            while time.perf_counter() - t < 0.0002:
                pass
            self.reads += 1
            yield []

    def send_many(self, peer: str, ns_id: int, packets: list[bytes], now: float) -> None:
        pass

    def next_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass

    def close(self) -> None:
        self.r.close()
        self.w.close()


def test_a_tunnel_socket_that_never_runs_dry_leaves_the_pods_their_turn(
        dp: DataPlane, shop: tuple[Router, SocketPod, SocketPod]) -> None:
    link = EndlessLink()
    r, a, b = shop
    try:
        dp.attach_tunnel(link)  # type: ignore[arg-type]
        for i in range(20):
            a.udp(b.ip, 5000, 6000, b"p%d" % i)
            got = b.recv_ip(10.0)
            assert got is not None and bytes(IP(got)[UDP].payload) == b"p%d" % i
        # Without a budget the loop never comes back to the pods and nothing arrives.
        # How soon a frame gets through depends on the machine's load (the test's own
        # thread waits for the GIL behind the busy data plane), so no time is asserted:
        # every frame is delivered while the link is still being read, and the budget
        # is what let the loop go.
        assert dp.call(lambda: dp.tunnel_yields) > 0 and link.reads > 10
    finally:
        dp.attach_tunnel(None)
        link.close()


def test_a_dropped_frame_reaches_the_drop_log_with_its_headers(
        dp: DataPlane, shop: tuple[Router, SocketPod, SocketPod]) -> None:
    """The shell hands the drop log the frame it just dropped (not the next or a stale
    one), with the pod it came from; frames forwarded around it are not logged."""
    r, a, b = shop
    a.udp(b.ip, 5000, 6000, b"before")
    assert b.recv_ip() is not None
    a.send_ip(bytes(IP(src="10.10.0.99", dst=b.ip) / UDP(sport=4444, dport=53)))
    a.udp(b.ip, 5000, 6000, b"after")
    assert b.recv_ip() is not None
    entries = dp.call(r.droplog.entries)
    assert len(entries) == 1, entries
    e = entries[0]
    assert (e["pod"], e["reason"], e["src"], e["dst"], e["proto"], e["sport"],
            e["dport"]) == ("a", "spoofed_source", "10.10.0.99", b.ip, "udp", 4444, 53)


@pytest.mark.parametrize("between", ["icmp", "tcp"])
def test_one_flows_small_datagrams_to_a_tap_leave_as_one_udp_gso_frame_in_order(
        between: str) -> None:
    """A wakeup's run of one flow's datagrams to a TAP leaves as one super-frame that
    segments back into them; a frame of another kind in between (an ICMP echo, a TCP
    segment, which the loop does not even offer to the run) ends the run first, so the
    pod sees everything in the order it was sent."""
    from fabric.net import gso
    from fabric.net.vnet import GSO_UDP_L4, VnetHdr
    from tests.unit.test_udp_run import pod_frame

    dp = DataPlane()  # not started: calls run inline and the test drives the reads
    r = Router("shop", CIDR)
    a = SocketPod("a", "10.10.0.2", "02:00:0a:0a:00:02", vnet=True)
    b = SocketPod("b", "10.10.0.3", "02:00:0a:0a:00:03", vnet=True)
    try:
        dp.add_owner(r)
        ports = {}
        for pod in (a, b):
            dp.call(r.add_pod, pod.name, pod.ip, pod.mac)
            ports[pod.name] = port = Port(vnet=True, mtu=1500, fd=pod.take_fd(), kind="netns")
            r.attach(pod.name, port, time.monotonic(), pod.mac)
            dp.add_port(r, port)

        def datagram(i: int) -> bytes:
            f = pod_frame(bytes([i]) * 64, 1000 + i)
            f[16:22] = a.macb  # pod_frame's addresses are another pod's: make them a's
            f[36:40] = a.ipb
            f[40:44] = b.ipb
            f[34:36] = b"\0\0"
            f[34:36] = checksum.checksum(f[24:44]).to_bytes(2, "big")
            f[50:52] = checksum.pseudo_header_sum(a.ipb, b.ipb, 17, 72).to_bytes(2, "big")
            return bytes(f)

        sent = [datagram(i) for i in range(5)]
        if between == "icmp":
            other = packets.icmp_echo(a.ipb, b.ipb, 1, 1, b"between")
        else:
            other = packets.tcp_packet(a.ipb, b.ipb, 40000, 5201, 1, 1, packets.TCP_ACK,
                                       b"between")
        ping = bytes(10) + packets.eth_header(GW_MAC, a.macb, packets.ETH_P_IP) + other
        sent += [ping] + [datagram(i) for i in range(5, 8)]
        for f in sent:
            a.sock.send(f)
        dp._readable(*dp.ports[ports["a"].fd])
        got = []
        while select.select([b.sock], [], [], 0.5)[0]:
            got.append(b.sock.recv(65536))  # with the virtio-net header
        assert [f[1] for f in got] == [GSO_UDP_L4, 0, GSO_UDP_L4]
        segs = []
        for f in got:
            if f[1] == GSO_UDP_L4:
                segs += [bytes(10) + s for s in gso.segment(memoryview(f)[10:], VnetHdr.parse(f))]
            else:
                segs.append(f)
        want = []
        for f in sent:
            fwd = bytearray(f)
            fwd[10:22] = b.macb + GW_MAC
            fwd[32] -= 1  # TTL
            fwd[34:36] = b"\0\0"
            fwd[34:36] = checksum.checksum(fwd[24:44]).to_bytes(2, "big")
            if fwd[0]:  # NEEDS_CSUM: the segment carries the finished checksum
                eth = bytearray(fwd[10:])
                gso.complete_checksum(eth, 34, 6)
                fwd = bytearray(10) + eth
            want.append(bytes(fwd))
        assert segs == want
        assert dp.udp_runs == 2 and dp.udp_run_datagrams == 8
    finally:
        a.close()
        b.close()
        dp.close()


def _dns_router(dp: DataPlane, pod: SocketPod, kind: str = "netns") -> tuple[Router, Port]:
    """A router answering its zone in the data plane, pod attached on a vnet port."""
    from ipaddress import IPv4Address

    from gateway.dns import DnsCore
    from gateway.records import Records

    r = Router("shop", CIDR)
    records = Records("shop", "fabric.internal", CIDR)
    records.set("a", IPv4Address("10.10.0.2"))
    records.set("b", IPv4Address("10.10.0.30"))
    r.attach_dns(DnsCore(records, []).answer_local)
    dp.add_owner(r)
    dp.call(r.add_pod, pod.name, pod.ip, pod.mac)
    port = Port(vnet=True, mtu=1500, fd=pod.take_fd(), kind=kind)
    r.attach(pod.name, port, time.monotonic(), pod.mac)
    dp.add_port(r, port)
    return r, port


def _dns_query(pod: SocketPod, name: str, qtype: str, qid: int, sport: int) -> bytes:
    """A query as the pod's stack sends it over a TAP with checksum offload."""
    import dnslib

    from fabric.net.vnet import F_NEEDS_CSUM
    from fabric.net.vnet import pack as vnet_pack

    q = dnslib.DNSRecord.question(name, qtype)
    q.header.id = qid
    pkt = bytearray(packets.udp_packet(pod.ipb, packets.ip_bytes("10.10.0.1"), sport, 53,
                                       q.pack()))
    pkt[26:28] = checksum.pseudo_header_sum(pod.ipb, packets.ip_bytes("10.10.0.1"), 17,
                                            len(pkt) - 20).to_bytes(2, "big")
    return (vnet_pack(F_NEEDS_CSUM, 0, 0, 0, 34, 6)
            + packets.eth_header(GW_MAC, pod.macb, packets.ETH_P_IP) + bytes(pkt))


def _datagrams(frames: list[bytes]) -> list[bytes]:
    """The IPv4 packets a pod's kernel delivers: super-frames cut, checksums finished."""
    from fabric.net import gso
    from fabric.net.vnet import VnetHdr

    out = []
    for f in frames:
        for seg in gso.segment(memoryview(f)[10:], VnetHdr.parse(f)):
            out.append(bytes(seg[14:]))
    return out


# (name, type, client socket): on socket 1 three A replies of one size, a NODATA (another
# size), an A; on socket 2 an A, an NXDOMAIN, two As.
QUERIES = [("a", "A", 1), ("b", "A", 2), ("b", "A", 1), ("c", "A", 2), ("a", "A", 1),
           ("b", "AAAA", 1), ("a", "A", 2), ("a", "A", 1), ("b", "A", 2)]


def test_dns_replies_of_one_read_batch_leave_as_one_gso_frame_per_socket_and_size() -> None:
    """Equal-sized replies to one client socket become one UDP GSO frame (one write, one
    wake-up of the client); another size or another socket is another frame; replies of
    one size keep their order, and every datagram is byte for byte the reply the
    ungathered path sends (a plain port), checksums included."""
    from fabric.net.vnet import GSO_UDP_L4

    replies: dict[str, list[bytes]] = {}
    for kind in ("netns", "fd"):  # gathered, and the reference
        dp = DataPlane()  # not started: calls run inline and the test drives the reads
        a = SocketPod("a", "10.10.0.2", "02:00:0a:0a:00:02", vnet=True)
        try:
            r, port = _dns_router(dp, a, kind)
            assert (port in r.gso_ports) == (kind == "netns")
            for i, (name, qtype, sock) in enumerate(QUERIES):
                a.sock.send(_dns_query(a, f"{name}.shop.fabric.internal", qtype, 100 + i,
                                       40000 + sock))
            dp._readable(*dp.ports[port.fd])
            got = []
            while select.select([a.sock], [], [], 0.5)[0]:
                got.append(a.sock.recv(65536))
            if kind == "netns":
                # socket 1: four As and a NODATA; socket 2: three As and an NXDOMAIN
                sizes = sorted(len(_datagrams([f])) for f in got)
                assert sizes == [1, 1, 3, 4]
                assert all(f[1] == (GSO_UDP_L4 if len(_datagrams([f])) > 1 else 0)
                           for f in got)
            else:
                assert len(got) == len(QUERIES) and not any(f[1] for f in got)
            replies[kind] = _datagrams(got)
            assert port.tx_packets == len(QUERIES)
        finally:
            a.close()
            dp.close()

    def by_socket(packets_: list[bytes]) -> dict[int, list[bytes]]:
        out: dict[int, list[bytes]] = {}
        for p in packets_:
            out.setdefault(p[22] << 8 | p[23], []).append(p)
        return out

    def by_size(packets_: list[bytes]) -> dict[int, list[bytes]]:
        # the IP ids the kernel gives segments after the first, and so the IPv4
        # checksum, may differ: compared without them
        out: dict[int, list[bytes]] = {}
        for p in packets_:
            out.setdefault(len(p), []).append(p[:4] + p[6:10] + p[12:])
        return out

    gathered, reference = by_socket(replies["netns"]), by_socket(replies["fd"])
    assert gathered.keys() == {40001, 40002}
    for sport, ref in reference.items():
        # per socket, the same datagrams, in query order among those of one size
        assert by_size(gathered[sport]) == by_size(ref)
        for p in gathered[sport]:
            assert checksum.checksum(p[:20]) == 0
            assert checksum.add(checksum.ones_sum(p[20:]), checksum.pseudo_header_sum(
                p[12:16], p[16:20], 17, len(p) - 20)) == 0xFFFF


def test_a_kernel_that_refuses_gso_gets_the_dns_replies_one_by_one(monkeypatch) -> None:
    """EINVAL on a UDP GSO write (a kernel without UDP segmentation on TAP writes): the
    replies of that frame go one by one, and the port's replies are no longer gathered."""
    import errno
    import os

    from fabric.net.vnet import GSO_UDP_L4
    from fabric.runtime import dataplane as dpmod

    real = os.write
    refused = []

    def write(fd: int, data) -> int:
        if len(data) > 10 and data[1] == GSO_UDP_L4:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "no USO")
        return real(fd, data)

    monkeypatch.setattr(dpmod.os, "write", write)
    dp = DataPlane()
    a = SocketPod("a", "10.10.0.2", "02:00:0a:0a:00:02", vnet=True)
    try:
        r, port = _dns_router(dp, a)
        for i in range(4):
            a.sock.send(_dns_query(a, "a.shop.fabric.internal", "A", 7 + i, 40001))
        dp._readable(*dp.ports[port.fd])
        got = []
        while select.select([a.sock], [], [], 0.5)[0]:
            got.append(a.sock.recv(65536))
        assert len(refused) == 1 and len(got) == 4 and not any(f[1] for f in got)
        assert [f[52] << 8 | f[53] for f in got] == [7, 8, 9, 10]  # DNS ids, in order
        assert port not in r.gso_ports and not port.drops
    finally:
        a.close()


def _settled(dp: DataPlane, timeout: float = 5.0) -> int:
    """dp.busy_polls once it stops moving (the thread went back to sleeping)."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        now = dp.busy_polls
        if now == last:
            return now
        last = now
        time.sleep(0.1)
    raise AssertionError(f"the data plane kept polling: {dp.busy_polls} polls")


@pytest.mark.parametrize(("busy_poll", "adaptive"), [(0.0, False), (0.02, False), (0.02, True)])
def test_busy_poll_polls_only_after_frames_and_then_sleeps(
        busy_poll: float, adaptive: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if adaptive:  # one frame a turn, so frames waiting make turns back to back (below)
        monkeypatch.setattr(dataplane, "BATCH", 1)
    dp = DataPlane(busy_poll=busy_poll, adaptive=adaptive)
    dp.start()
    try:
        with _shop(dp) as (_, a, b):
            _check_busy_poll(dp, a, b, busy_poll, adaptive)
    finally:
        dp.close()


def test_a_read_that_fills_its_batch_counts_every_frame(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A port read that stops because the batch is full, not the port, counts all its
    frames: it counted one less (the loop index), so a batch of one counted none and
    the busy-poll spin never heard of the frame."""
    monkeypatch.setattr(dataplane, "BATCH", 2)
    dp = DataPlane()  # not started: calls run inline and the test drives the reads
    r = Router("shop", CIDR)
    a = SocketPod("a", "10.10.0.2", "02:00:0a:0a:00:02")
    b = SocketPod("b", "10.10.0.3", "02:00:0a:0a:00:03")
    try:
        dp.add_owner(r)
        dp.call(r.add_pod, "a", a.ip, a.mac)
        dp.call(r.add_pod, "b", b.ip, b.mac)
        port = attach(dp, r, a)
        attach(dp, r, b)
        for _ in range(3):
            a.udp(b.ip, 1, 2, b"x")
        dp._readable(*dp.ports[port.fd])
        assert dp.frames == 2  # a full batch
        dp._readable(*dp.ports[port.fd])
        assert dp.frames == 3  # the rest, then the port was empty
        assert [b.recv_ip(2.0) is not None for _ in range(3)] == [True] * 3
    finally:
        a.close()
        b.close()
        dp.close()


def _forward(a: SocketPod, b: SocketPod, payload: bytes) -> None:
    a.udp(b.ip, 1, 2, payload)
    got = b.recv_ip(2.0)
    assert got is not None and bytes(IP(got)[UDP].payload) == payload


def _check_busy_poll(dp: DataPlane, a: SocketPod, b: SocketPod, busy_poll: float,
                     adaptive: bool) -> None:
    idle = _settled(dp)  # nothing was forwarded yet: no polling at all
    assert idle == 0
    _forward(a, b, b"one")
    after = _settled(dp)
    if busy_poll and not adaptive:
        assert after > 0  # it polled after the frame, then slept again
        assert dp.spins_empty >= 1 and dp.spin.window == busy_poll
    else:
        assert after == 0  # adaptive: one frame is no gap, nothing to cover yet
    if adaptive:
        # A short gap makes the thread spin after a frame, and once frames stop the spins
        # end empty and it sleeps. The gap must not be this thread's: paced from here
        # (each frame sent once the one before arrived) it is only short while the
        # machine is idle, and under load no gap came within the max in twenty tries.
        # So the frames are queued on the data-plane thread itself, which reads none of
        # them meanwhile: read one a turn (BATCH 1), each turn ends with the next one
        # waiting, and the gap is the thread's own few µs between two polls. (Tries:
        # the thread can still be preempted inside that gap.)
        def queue() -> None:
            for _ in range(3):
                a.udp(b.ip, 1, 2, b"next")

        for _ in range(20):
            dp.call(queue)
            for _ in range(3):
                got = b.recv_ip(2.0)
                assert got is not None and bytes(IP(got)[UDP].payload) == b"next"
            if dp.busy_polls:
                break
        after = _settled(dp)
        assert after > 0 and dp.spins_empty >= 1
        assert dp.spin.window < busy_poll
    dp.set_busy_poll(0.0)  # a reload may turn it off: the thread picks it up next turn
    _forward(a, b, b"two")
    assert _settled(dp) == after
    assert dp.spin.window == 0.0 and not dp.spin.on


def test_a_port_is_read_through_its_own_reader_until_its_fd_goes_away() -> None:
    """Each port is read with a FileIO.readinto of its fd, made when the port is added
    and dropped with it; an empty port ends the read batch (None, not an exception), and
    a port whose fd vanished under the data plane is counted, no longer read, and
    reported to the control side, as before."""
    import errno
    import os

    dp = DataPlane()  # not started: calls run inline and the test drives the reads
    r = Router("shop", CIDR)
    a = SocketPod("a", "10.10.0.2", "02:00:0a:0a:00:02")
    b = SocketPod("b", "10.10.0.3", "02:00:0a:0a:00:03")
    try:
        dp.add_owner(r)
        ports = {}
        for pod in (a, b):
            dp.call(r.add_pod, pod.name, pod.ip, pod.mac)
            ports[pod.name] = attach(dp, r, pod)
        pa = ports["a"]
        assert set(dp._readers) == {pa.fd, ports["b"].fd}
        dp._readable(*dp.ports[pa.fd])  # nothing to read: no frame, no error
        assert dp.frames == 0 and dp.rx_errors == 0
        for i in range(3):
            a.udp(b.ip, 1000 + i, 2000, b"x" * (10 + i))
        dp._readable(*dp.ports[pa.fd])
        assert dp.frames == 3 and pa.rx_packets == 3 and dp.rx_errors == 0
        got = [b.recv_ip(0.5) for _ in range(3)]
        assert [len(p) for p in got if p is not None] == [38, 39, 40]
        entry = dp.ports[pa.fd]
        os.close(pa.fd)  # the device vanished under the data plane
        dp._readable(*entry)
        assert dp.rx_errors == 1 and pa.fd not in dp.ports and pa.fd not in dp._readers
        assert dp.trouble.take() == [(pa, errno.EBADF)]
        dp.remove_port(ports["b"])
        assert not dp._readers
    finally:
        a.close()
        b.close()
        dp.close()
