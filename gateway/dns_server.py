"""The I/O shell of a namespace's DNS server.

Queries arrive on UDP and TCP port 53 of the gateway address, on sockets opened in the
namespace's local stack; forwarded queries leave from sockets in the daemon's own
network namespace (where the upstream resolvers are reachable). All protocol decisions
are the sans-IO `DnsCore`'s; this module moves bytes and keeps the limits.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from typing import Any

from fabric.histogram import DNS_BUCKETS, Histogram
from gateway.dns import DnsCore, Forward, Reply

log = logging.getLogger("fabricd.dns")

MAX_TCP_CLIENTS = 256
# One pod (one source address) may hold this many of them: a slowloris in a namespace
# must not take TCP DNS away from its neighbours.
MAX_TCP_PER_CLIENT = 32
TCP_IDLE = 10.0
# A client's replies waiting to be sent: above TCP_WRITE_HIGH its next queries are not
# read until it reads (back-pressure); one that lets TCP_WRITE_MAX pile up, or stays above
# the mark for TCP_IDLE, is dropped. Memory per connection stays bounded either way.
TCP_WRITE_HIGH = 64 * 1024
TCP_WRITE_MAX = 512 * 1024
UDP_BATCH = 256
MAX_MESSAGE = 65535
# Forwarded queries leave from a socket of their own, connected to the upstream, on a port
# the kernel picks at random: an off-path forger must guess the port as well as the id,
# and the kernel drops datagrams from anyone but the upstream. A socket lives until its
# answer arrives or the core would have given up on it.
UPSTREAM_LIFETIME = 8.0
MAX_UPSTREAM_SOCKETS = 256


class _TcpClient:
    """A client connection; the core sees it as an opaque address."""

    __slots__ = ("writer",)

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer


class DnsServer:
    def __init__(self, core: DnsCore, udp: socket.socket, tcp: socket.socket,
                 name: str) -> None:
        self.core = core
        self.name = name
        self.udp = udp
        self.tcp = tcp
        # forwarded UDP queries in flight: fd -> (socket, upstream, deadline), oldest first
        self._upstream: dict[int, tuple[socket.socket, tuple[str, int], float]] = {}
        self._loop = asyncio.get_running_loop()
        self._server: asyncio.base_events.Server | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tcp_clients = 0
        self._per_client: dict[str, int] = {}
        self._clients: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.counters: dict[str, int] = {"tcp_rejected": 0, "tcp_client_limit": 0,
                                         "send_errors": 0,
                                         "upstream_tcp_errors": 0, "tcp_slow_closed": 0,
                                         "upstream_sockets_full": 0}
        # Answers from the zone: the time the core took to build them (a forwarded
        # query's time is the core's upstream_seconds).
        self.local_seconds = Histogram(DNS_BUCKETS)

    async def start(self) -> None:
        self._loop.add_reader(self.udp.fileno(), self._on_udp)
        self._server = await asyncio.start_server(self._on_tcp, sock=self.tcp,
                                                  limit=MAX_MESSAGE + 2)

    def close(self) -> None:
        try:
            self._loop.remove_reader(self.udp.fileno())
        except (ValueError, OSError):
            pass
        for fd in list(self._upstream):
            self._drop_upstream(fd)
        if self._timer is not None:
            self._timer.cancel()
        if self._server is not None:
            self._server.close()
        for w in list(self._clients):
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        self.udp.close()
        self.tcp.close()

    # --- queries -------------------------------------------------------------------------

    def _handle(self, data: bytes, client: Any, now: float, tcp: bool) -> list[Any]:
        """The core's actions for a query; a local answer's time is observed."""
        t = time.perf_counter()
        actions = self.core.handle_query(data, client, now, tcp)
        if actions and type(actions[0]) is Reply:
            self.local_seconds.observe(time.perf_counter() - t)
        return actions

    def _on_udp(self) -> None:
        recv = self.udp.recvfrom
        handle = self._handle
        now = time.monotonic()
        for _ in range(UDP_BATCH):
            try:
                data, addr = recv(MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            self._do(handle(data, addr, now, False))
        self._arm()

    async def _on_tcp(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        if self._tcp_clients >= MAX_TCP_CLIENTS:
            self.counters["tcp_rejected"] += 1
            writer.close()
            return
        peer = writer.get_extra_info("peername")
        who = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if self._per_client.get(who, 0) >= MAX_TCP_PER_CLIENT:
            self.counters["tcp_client_limit"] += 1
            writer.close()
            return
        self._per_client[who] = self._per_client.get(who, 0) + 1
        self._tcp_clients += 1
        self._clients.add(writer)
        client = _TcpClient(writer)
        writer.transport.set_write_buffer_limits(high=TCP_WRITE_HIGH)
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE)
                (size,) = struct.unpack("!H", head)
                data = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE)
                self._do(self._handle(data, client, time.monotonic(), True))
                self._arm()
                if writer.is_closing() or size < 12:
                    break  # less than a header (counted malformed): not a DNS client
                try:  # returns at once unless the client's replies pile up
                    await asyncio.wait_for(writer.drain(), TCP_IDLE)
                except TimeoutError:
                    self.counters["tcp_slow_closed"] += 1
                    writer.transport.abort()
                    break
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        except asyncio.CancelledError:  # the server is closing: end the connection quietly
            pass
        finally:
            self._tcp_clients -= 1
            left = self._per_client.pop(who) - 1
            if left:
                self._per_client[who] = left
            self._clients.discard(writer)
            writer.close()

    # --- upstream ------------------------------------------------------------------------

    def _send_upstream(self, data: bytes, upstream: tuple[str, int]) -> None:
        now = time.monotonic()
        self._expire(now)
        if len(self._upstream) >= MAX_UPSTREAM_SOCKETS:
            self._drop_upstream(next(iter(self._upstream)))  # the oldest: long given up
            self.counters["upstream_sockets_full"] += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(upstream)  # binds a random ephemeral port; only upstream may answer
            sock.send(data)
        except OSError:
            sock.close()
            self.counters["send_errors"] += 1
            return
        fd = sock.fileno()
        self._upstream[fd] = (sock, upstream, now + UPSTREAM_LIFETIME)
        self._loop.add_reader(fd, self._on_upstream, fd)

    def _drop_upstream(self, fd: int) -> None:
        entry = self._upstream.pop(fd, None)
        if entry is not None:
            self._loop.remove_reader(fd)
            entry[0].close()

    def _expire(self, now: float) -> None:
        for fd, (_, _, deadline) in list(self._upstream.items()):
            if deadline > now:
                break
            self._drop_upstream(fd)

    def _on_upstream(self, fd: int) -> None:
        entry = self._upstream.get(fd)
        if entry is None:
            return
        sock, upstream, _ = entry
        try:
            data = sock.recv(MAX_MESSAGE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # ICMP unreachable from the upstream: the core's timer retries
            self._drop_upstream(fd)
            return
        self._drop_upstream(fd)  # one answer per query: a second one is not read
        self._do(self.core.handle_upstream(data, upstream, time.monotonic(), False))
        self._arm()

    async def _forward_tcp(self, fwd: Forward) -> None:
        host, port = fwd.upstream
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 3.0)
            try:
                writer.write(struct.pack("!H", len(fwd.data)) + fwd.data)
                await writer.drain()
                head = await asyncio.wait_for(reader.readexactly(2), 5.0)
                (size,) = struct.unpack("!H", head)
                data = await asyncio.wait_for(reader.readexactly(size), 5.0)
            finally:
                writer.close()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            # The core's own timer retries or answers SERVFAIL.
            self.counters["upstream_tcp_errors"] += 1
            return
        self._do(self.core.handle_upstream(data, fwd.upstream, time.monotonic(), True))
        self._arm()

    # --- actions and timers --------------------------------------------------------------

    def _do(self, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, Reply):
                c = a.client
                try:
                    if isinstance(c, _TcpClient):
                        w = c.writer
                        if w.is_closing():
                            continue
                        if w.transport.get_write_buffer_size() + len(a.data) > TCP_WRITE_MAX:
                            self.counters["tcp_slow_closed"] += 1  # it does not read
                            w.transport.abort()
                            continue
                        w.write(struct.pack("!H", len(a.data)) + a.data)
                    else:
                        self.udp.sendto(a.data, c)
                except OSError:
                    self.counters["send_errors"] += 1
            elif isinstance(a, Forward):
                if a.tcp:
                    t = asyncio.ensure_future(self._forward_tcp(a))
                    self._tasks.add(t)
                    t.add_done_callback(self._tasks.discard)
                else:
                    self._send_upstream(a.data, a.upstream)

    def _arm(self) -> None:
        """One timer for the core's next deadline and the oldest forwarding socket's end
        of life (so an unanswered query's socket closes even if nothing else comes)."""
        t = self.core.next_timer()
        if self._upstream:
            oldest = next(iter(self._upstream.values()))[2]
            t = oldest if t is None else min(t, oldest)
        if t is None or t == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = t
        delay = max(0.0, t - time.monotonic())
        self._timer = self._loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = None
        self._expire(time.monotonic())
        self._do(self.core.handle_timer(time.monotonic()))
        self._arm()
