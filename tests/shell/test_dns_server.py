"""The DNS server's asyncio shell on 127.0.0.1 (no local stack, no root): local names
over UDP and TCP, forwarding to an upstream resolver played by the test, and the
retry/SERVFAIL timer armed exactly."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from ipaddress import IPv4Address
from typing import cast

import dnslib

from gateway.dns import DnsCore
from gateway.dns_server import DnsServer
from gateway.records import Records


def sockets() -> tuple[socket.socket, socket.socket]:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    tcp.setblocking(False)
    return udp, tcp


async def ask_udp(addr: tuple[str, int], q: dnslib.DNSRecord,
                  timeout: float = 3.0) -> dnslib.DNSRecord:
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    try:
        await loop.sock_sendto(s, q.pack(), addr)
        data = await asyncio.wait_for(loop.sock_recv(s, 65535), timeout)
        return dnslib.DNSRecord.parse(data)
    finally:
        s.close()


async def ask_tcp(addr: tuple[str, int], q: dnslib.DNSRecord) -> dnslib.DNSRecord:
    reader, writer = await asyncio.open_connection(*addr)
    try:
        data = q.pack()
        writer.write(struct.pack("!H", len(data)) + data)
        (size,) = struct.unpack("!H", await reader.readexactly(2))
        return dnslib.DNSRecord.parse(await reader.readexactly(size))
    finally:
        writer.close()


class Upstream(asyncio.DatagramProtocol):
    """A resolver on 127.0.0.1 that answers every A question with 192.0.2.7, or stays
    silent when `mute`."""

    def __init__(self) -> None:
        self.mute = False
        self.seen = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.seen += 1
        if self.mute:
            return
        q = dnslib.DNSRecord.parse(data)
        a = q.reply()
        a.add_answer(dnslib.RR(q.q.qname, rdata=dnslib.A("192.0.2.7"), ttl=300))
        self.transport.sendto(a.pack(), addr)


def test_local_names_forwarding_and_servfail_on_loopback() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, upstream = await loop.create_datagram_endpoint(
            Upstream, local_addr=("127.0.0.1", 0))
        up_addr = transport.get_extra_info("sockname")
        records = Records("shop", "fabric.internal", "10.10.0.0/24")
        records.set("web", IPv4Address("10.10.0.5"))
        udp, tcp = sockets()
        server = DnsServer(DnsCore(records, [(up_addr[0], up_addr[1])]), udp, tcp, "shop")
        await server.start()
        addr = udp.getsockname()
        taddr = tcp.getsockname()
        try:
            r = await ask_udp(addr, dnslib.DNSRecord.question("web.shop.fabric.internal"))
            assert str(r.a.rdata) == "10.10.0.5" and r.header.rcode == 0
            r = await ask_tcp(taddr, dnslib.DNSRecord.question("web.shop.fabric.internal"))
            assert str(r.a.rdata) == "10.10.0.5"
            r = await ask_udp(addr, dnslib.DNSRecord.question("nope.shop.fabric.internal"))
            assert r.header.rcode == dnslib.RCODE.NXDOMAIN
            r = await ask_udp(addr, dnslib.DNSRecord.question("example.org"))
            assert str(r.a.rdata) == "192.0.2.7" and upstream.seen == 1
            # A silent upstream: retried, then SERVFAIL, from the server's own timer.
            upstream.mute = True
            t0 = time.monotonic()
            r = await ask_udp(addr, dnslib.DNSRecord.question("slow.example.org"), 15.0)
            took = time.monotonic() - t0
            assert r.header.rcode == dnslib.RCODE.SERVFAIL and upstream.seen >= 2, took
        finally:
            server.close()
            transport.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_client_that_does_not_read_its_answers_is_held_then_dropped() -> None:
    """Pipelined queries from a client that never reads: the server stops reading it
    once its replies pile up, its buffer stays bounded, and it is dropped; another
    client is still answered at once meanwhile."""
    from gateway.dns_server import TCP_WRITE_MAX, _TcpClient

    async def main() -> None:
        records = Records("shop", "fabric.internal", "10.10.0.0/24")
        records.set("web", IPv4Address("10.10.0.5"))
        udp, tcp = sockets()
        server = DnsServer(DnsCore(records, []), udp, tcp, "shop")
        await server.start()
        taddr = tcp.getsockname()
        q = dnslib.DNSRecord.question("web.shop.fabric.internal", "ANY").pack()
        burst = (struct.pack("!H", len(q)) + q) * 2000
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.connect(taddr)
        c.setblocking(False)
        try:
            biggest = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < 4:
                try:
                    c.send(burst)
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    pass
                import gc

                for o in gc.get_objects():
                    if isinstance(o, _TcpClient) and not o.writer.is_closing():
                        biggest = max(biggest, o.writer.transport.get_write_buffer_size())
                r = await ask_udp(udp.getsockname(),
                                  dnslib.DNSRecord.question("web.shop.fabric.internal"), 1.0)
                assert str(r.a.rdata) == "10.10.0.5"
                await asyncio.sleep(0.05)
            assert biggest <= TCP_WRITE_MAX
            r = await ask_tcp(taddr, dnslib.DNSRecord.question("web.shop.fabric.internal"))
            assert str(r.a.rdata) == "10.10.0.5"
        finally:
            c.close()
            server.close()

    asyncio.run(asyncio.wait_for(main(), 60))


class Recording(Upstream):
    """An upstream that notes the source port of every query."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[int] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.ports.append(addr[1])
        super().datagram_received(data, addr)


def test_forwarded_queries_leave_from_random_ports_and_only_the_upstream_may_answer() -> None:
    """Each forwarded query has a socket of its own, connected to the upstream: its
    port changes per query, and a forged answer from elsewhere to that port is not even
    delivered; no socket outlives its answer."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, upstream = await loop.create_datagram_endpoint(
            Recording, local_addr=("127.0.0.1", 0))
        up_addr = transport.get_extra_info("sockname")
        records = Records("shop", "fabric.internal", "10.10.0.0/24")
        udp, tcp = sockets()
        core = DnsCore(records, [(up_addr[0], up_addr[1])])
        server = DnsServer(core, udp, tcp, "shop")
        await server.start()
        addr = udp.getsockname()
        try:
            for i in range(20):
                r = await ask_udp(addr, dnslib.DNSRecord.question(f"n{i}.example.org"))
                assert str(r.a.rdata) == "192.0.2.7"
            assert len(set(upstream.ports)) >= 15, upstream.ports  # random, not one port
            assert not server._upstream  # answered: closed
            # A forger who knows the port of the query in flight still cannot answer it.
            upstream.mute = True
            forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            forger.bind(("127.0.0.1", 0))
            ask = asyncio.ensure_future(
                ask_udp(addr, dnslib.DNSRecord.question("victim.example.org"), 15.0))
            while len(upstream.ports) < 21:
                await asyncio.sleep(0.01)
            port = upstream.ports[-1]
            q = dnslib.DNSRecord.question("victim.example.org")
            for wid in range(0, 65536, 7):  # a spray of ids: none may be accepted
                q.header.id = wid
                fake = q.reply()
                fake.add_answer(dnslib.RR("victim.example.org", rdata=dnslib.A("6.6.6.6")))
                forger.sendto(fake.pack(), ("127.0.0.1", port))
            r = await ask
            assert r.header.rcode == dnslib.RCODE.SERVFAIL and not r.rr
            assert core.counters["unmatched_answers"] == 0  # not even delivered
            forger.close()
        finally:
            server.close()
            transport.close()
        assert not server._upstream

    asyncio.run(asyncio.wait_for(main(), 40))


def test_sockets_of_unanswered_queries_close_without_further_traffic(monkeypatch) -> None:  # noqa: ANN001
    """A silent upstream: the sockets of the attempts go at their lifetime by the
    server's own timer, not at the next forwarded query (which may never come)."""
    import gateway.dns_server as dns_server

    monkeypatch.setattr(dns_server, "UPSTREAM_LIFETIME", 1.0)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, upstream = await loop.create_datagram_endpoint(
            Upstream, local_addr=("127.0.0.1", 0))
        upstream.mute = True
        up_addr = transport.get_extra_info("sockname")
        records = Records("shop", "fabric.internal", "10.10.0.0/24")
        udp, tcp = sockets()
        core = DnsCore(records, [(up_addr[0], up_addr[1])], timeout=0.3, attempts=2)
        server = DnsServer(core, udp, tcp, "shop")
        await server.start()
        try:
            r = await ask_udp(udp.getsockname(), dnslib.DNSRecord.question("x.example.org"))
            assert r.header.rcode == dnslib.RCODE.SERVFAIL and upstream.seen == 2
            assert server._upstream  # the attempts' sockets, until their lifetime
            t0 = time.monotonic()
            while server._upstream and time.monotonic() - t0 < 3:
                await asyncio.sleep(0.05)
            assert not server._upstream, "sockets of unanswered queries stay open"
            assert time.monotonic() - t0 < 1.5
        finally:
            server.close()
            transport.close()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_one_client_holds_at_most_32_tcp_connections_and_a_short_message_ends_one() -> None:
    """A slowloris from one address takes 32 of the namespace's 256 TCP slots, not all of
    them; a message shorter than a DNS header closes its connection."""
    from gateway.dns_server import MAX_TCP_PER_CLIENT

    async def main() -> None:
        records = Records("shop", "fabric.internal", "10.10.0.0/24")
        records.set("web", IPv4Address("10.10.0.5"))
        udp, tcp = sockets()
        server = DnsServer(DnsCore(records, []), udp, tcp, "shop")
        await server.start()
        taddr = tcp.getsockname()
        held = []
        try:
            for _ in range(MAX_TCP_PER_CLIENT + 8):
                held.append(await asyncio.open_connection(*taddr))
            closed = 0
            for reader, _ in held:
                try:
                    if await asyncio.wait_for(reader.read(1), 0.2) == b"":
                        closed += 1
                except TimeoutError:
                    pass
            assert closed == 8 and server.counters["tcp_client_limit"] == 8, closed
            for _, writer in held:
                writer.close()
            await asyncio.sleep(0.1)
            # The slots are free again; an empty message ends its connection.
            reader, writer = await asyncio.open_connection(*taddr)
            writer.write(b"\x00\x00")
            assert await asyncio.wait_for(reader.read(1), 2) == b""
            writer.close()
            r = await ask_tcp(taddr, dnslib.DNSRecord.question("web.shop.fabric.internal"))
            assert str(r.a.rdata) == "10.10.0.5"
        finally:
            server.close()

    asyncio.run(asyncio.wait_for(main(), 20))
