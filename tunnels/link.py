"""The tunnel's UDP link: the I/O shell around the sans-IO `TunnelCore`.

It runs on the data-plane thread (its socket is one more fd in the data plane's epoll;
the data plane calls ``readable()`` when it has datagrams and hands the decrypted
packets to the routers of their namespaces, and sends routers' tunnel outputs with
``send_many()``), so there is no thread hop on the packet path. Its timers are the
core's (handshake retries, keepalives, rekeying): ``next_timer()``/``handle_timer()``.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Iterator

from fabric.net.coalesce import coalesce
from tunnels import prefilter
from tunnels.core import TunnelCore

log = logging.getLogger("fabricd.tunnel")

BATCH = 256
SOCK_BUF = 8 * 1024 * 1024
MAX_DATAGRAM = 65535
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
# A plain int: `flags & socket.MSG_TRUNC` goes through enum.Flag.__and__ (~1.7 us, more
# than the core's whole drop of a datagram), on every datagram read.
MSG_TRUNC = int(socket.MSG_TRUNC)

# (peer id, namespace id, IPv4 packet, virtio-net header of a coalesced super-frame)
Delivered = tuple[str, int, bytes, bytes | None]


class TunnelLink:
    name = "tunnel"

    def __init__(self, core: TunnelCore, listen: tuple[str, int], *,
                 kernel_filter: bool = True) -> None:
        """``kernel_filter``: attach the kernel pre-filter (tunnels.prefilter); off only to
        test what the daemon itself does with what the filter would drop."""
        self.core = core
        self.use_prefilter = kernel_filter
        self.listen = listen
        self.sock: socket.socket | None = None
        self.buf = bytearray(MAX_DATAGRAM)
        self.counters: dict[str, int] = {
            "send_errors": 0,
            "recv_errors": 0,
            "datagrams_in": 0,
            "datagrams_out": 0,
            "gso_sends": 0,
            "gro_batches": 0,
            "coalesced": 0,
            "empty": 0,
            "truncated": 0,
            "send_too_big": 0,
            "kernel_drops": 0,
            "shed_episodes": 0,
            "shed_windows": 0,
            "shed_filter_errors": 0,
        }
        self.gso = True
        self.gro = False
        self.shedding = prefilter.Shedding()
        self.filtered = False  # the shape filter is attached
        self._drops0 = 0  # the socket's drop count when it was opened

    def open(self) -> int:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):
                try:
                    s.setsockopt(socket.SOL_SOCKET, force, SOCK_BUF)  # *BUFFORCE as root
                except OSError:
                    s.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
            s.bind(self.listen)
            s.setblocking(False)
        except OSError as e:
            s.close()
            from fabric.errors import PortError

            raise PortError(
                f"tunnel listen {self.listen[0]}:{self.listen[1]}: {e.strerror}"
            ) from None
        try:
            s.setsockopt(SOL_UDP, UDP_GRO, 1)
            self.gro = True
        except OSError:
            self.gro = False  # an older kernel: one datagram per read
        self.sock = s
        self.filtered = self.use_prefilter and self._filter(prefilter.program())
        self._drops0 = prefilter.kernel_drops(s) or 0
        return s.fileno()

    def _filter(self, insns: list[prefilter.Insn]) -> bool:
        """Attach a pre-filter program; False (counted, logged once) if the kernel
        refuses it: the core still drops everything a filter would, only dearer."""
        try:
            prefilter.attach(self.sock, insns)  # type: ignore[arg-type]
        except (OSError, ValueError) as e:
            self.counters["shed_filter_errors"] += 1
            if self.counters["shed_filter_errors"] == 1:
                log.warning("tunnel: kernel pre-filter not attached (%s): malformed and "
                            "flooding datagrams reach the daemon and cost it CPU", e)
            return False
        return True

    def snapshot(self) -> dict[str, int]:
        """The counters, with what the kernel dropped for the socket brought up to date."""
        sock = self.sock
        if sock is not None:
            drops = prefilter.kernel_drops(sock)
            if drops is not None:
                self.counters["kernel_drops"] = drops - self._drops0
        return dict(self.counters)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    # --- on the data-plane thread --------------------------------------------------------

    def readable(self, now: float) -> Iterator[list[Delivered]]:
        """Read what the socket has (up to BATCH reads), answer handshakes, and yield the
        decrypted packets of each read in order (an empty list for a read that had none),
        runs of one flow's TCP segments merged into super-frames (one TAP write each). One
        read at a time, so what waits in memory is one GRO batch at most."""
        sock = self.sock
        if sock is None:
            return
        if self.filtered and self.shedding.observe(self.core.over_budget(), now):
            self._shed(now)
        buf = self.buf
        mv = memoryview(buf)
        receive = self.core.receive
        c = self.counters
        gro = self.gro
        recvmsg = sock.recvmsg_into
        bufs = [buf]
        for _ in range(BATCH):
            try:
                if gro:
                    # With UDP GRO the kernel hands over several datagrams of one sender
                    # at once, cut at gso_size (told in a control message).
                    n, anc, flags, addr = recvmsg(bufs, GRO_CMSG_SPACE)
                else:
                    n, addr = sock.recvfrom_into(buf)
                    anc, flags = (), 0
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                c["recv_errors"] += 1
                break
            src = (addr[0], addr[1])
            if n == 0 or flags & MSG_TRUNC:
                # Nothing to cut GRO batches at, or more than the buffer: malformed for
                # the core to count (never an exception out of the loop).
                c["datagrams_in"] += 1
                c["truncated" if n else "empty"] += 1
                receive(b"", src, now)
                yield []  # every read ends in a yield: the caller's time budget applies
                continue
            size = n
            for level, kind, data in anc:
                if level == SOL_UDP and kind == UDP_GRO and len(data) >= 2:
                    size = int.from_bytes(data[:2], "little") or n
                    if size < n:
                        c["gro_batches"] += 1
            got: list[tuple[str, int, bytes]] = []
            delivered: list[Delivered] = []
            for off in range(0, n, size):
                c["datagrams_in"] += 1
                out, packets = receive(bytes(mv[off:min(off + size, n)]), src, now)
                if out:
                    self._sendall(out)
                got += packets
            self._merge(got, delivered)
            # Yielded even when empty (a handshake, a drop), so a flood that delivers
            # nothing still gives the data plane its say after every read.
            yield delivered

    def _merge(self, got: list[tuple[str, int, bytes]], delivered: list[Delivered]) -> None:
        """Append decrypted packets to `delivered`, runs of one peer and namespace
        through fabric.net.coalesce."""
        if len(got) < 2:
            for peer, ns_id, pkt in got:
                delivered.append((peer, ns_id, pkt, None))
            return
        i = 0
        while i < len(got):
            peer, ns_id, _ = got[i]
            j = i + 1
            while j < len(got) and got[j][0] == peer and got[j][1] == ns_id:
                j += 1
            merged = coalesce([p for _, _, p in got[i:j]])
            self.counters["coalesced"] += (j - i) - len(merged)
            for pkt, hdr in merged:
                delivered.append((peer, ns_id, pkt, hdr))
            i = j

    def send(self, peer_id: str, ns_id: int, packet: bytes, now: float) -> None:
        out = self.core.send(peer_id, ns_id, packet, now)
        if out:
            self._sendall(out)

    def send_many(self, peer_id: str, ns_id: int, packets: list[bytes], now: float) -> None:
        """The segments of one super-frame: encrypted one by one, sent as one batch."""
        send = self.core.send
        out: list[tuple[tuple[str, int], bytes]] = []
        for p in packets:
            out += send(peer_id, ns_id, p, now)
        if out:
            self._sendall(out)

    def _sendall(self, datagrams: list[tuple[tuple[str, int], bytes]]) -> None:
        """Send datagrams; runs of equal-size datagrams to one address go out as one
        UDP GSO send (one system call, the kernel cuts them), where the kernel can."""
        sock = self.sock
        if sock is None:
            return
        i = 0
        n = len(datagrams)
        while i < n:
            addr, data = datagrams[i]
            size = len(data)
            j = i + 1
            if self.gso:
                limit = min(n, i + min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size))
                while (j < limit and datagrams[j][0] == addr
                       and len(datagrams[j][1]) == size):
                    j += 1
                # A shorter last datagram may end a GSO batch.
                if j < limit and datagrams[j][0] == addr and len(datagrams[j][1]) < size:
                    j += 1
            if j - i > 1:
                payload = b"".join(d for _, d in datagrams[i:j])
                try:
                    sock.sendmsg([payload], [(SOL_UDP, UDP_SEGMENT, struct.pack("H", size))],
                                 0, addr)
                    self.counters["datagrams_out"] += j - i
                    self.counters["gso_sends"] += 1
                except OSError as e:
                    # EINVAL is also what an oversized datagram gets: GSO is only blamed
                    # (and given up for good) when the same datagram goes out without it.
                    if e.errno in (errno.EINVAL, errno.EIO, errno.ENOPROTOOPT,
                                   errno.EOPNOTSUPP) and self._plain(addr, data):
                        self.gso = False  # no UDP GSO here: plain sends from now on
                        log.info("tunnel: UDP GSO not available (%s); sending one by one", e)
                        i += 1
                        continue
                    self._send_error(addr, e, j - i)
            else:
                try:
                    sock.sendto(data, addr)
                    self.counters["datagrams_out"] += 1
                except OSError as e:
                    self._send_error(addr, e, 1)
            i = j

    def _plain(self, addr: tuple[str, int], data: bytes) -> bool:
        """Send one datagram without GSO; whether it went."""
        try:
            self.sock.sendto(data, addr)  # type: ignore[union-attr]
        except OSError:
            return False
        self.counters["datagrams_out"] += 1
        return True

    def _send_error(self, addr: tuple[str, int], e: OSError, count: int) -> None:
        # A full socket buffer or an unreachable endpoint costs these datagrams; the
        # protocol's own retries and keepalives recover.
        self.counters["send_errors"] += count
        if e.errno in (errno.EMSGSIZE, errno.EINVAL):
            self.counters["send_too_big"] += count
            if self.counters["send_too_big"] == count:  # the first time: say what to fix
                log.warning("tunnel send to %s: %s: datagrams too big for the underlay's "
                            "path; lower the namespace mtu (1420 leaves room for the "
                            "tunnel's 60 bytes on a 1500 underlay)", addr, e)
        elif e.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.EHOSTUNREACH,
                             errno.ENETUNREACH, errno.ECONNREFUSED, errno.EPERM):
            log.warning("tunnel send to %s: %s", addr, e)

    def rekey(self, peer_id: str, now: float) -> None:
        out = self.core.rekey(peer_id, now)
        if out:
            self._sendall(out)

    # --- timers (the data plane calls these like a router's) ----------------------------

    def next_timer(self) -> float | None:
        t = self.core.next_timer()
        s = self.shedding.next_timer()
        if s is None:
            return t
        return s if t is None or s < t else t

    def handle_timer(self, now: float) -> None:
        out = self.core.handle_timer(now)
        if out:
            self._sendall(out)
        shedding = self.shedding
        if shedding.expired(now):
            # Lift the shed filter to look again: the next flood batch re-sheds.
            if self.sock is not None:
                self.filtered = self._filter(prefilter.program())
        elif shedding.over(now):
            log.warning("tunnel: the handshake flood is over; %d datagrams dropped by the "
                        "kernel so far (kernel_drops)", self.snapshot()["kernel_drops"])

    def _shed(self, now: float) -> None:
        """A handshake flood: drop handshake messages from non-peer addresses in the
        kernel for the shedding window."""
        sh = self.shedding
        self.counters["shed_windows"] += 1
        first = sh.episodes != self.counters["shed_episodes"]
        self.counters["shed_episodes"] = sh.episodes
        peers = self.core.peer_addresses()
        try:
            insns = prefilter.program(peers)
        except ValueError as e:  # too many peers for one program: keep reading them all
            sh.until = None
            if first:
                log.warning("tunnel: handshake flood, not shed in the kernel: %s", e)
            return
        if self._filter(insns) and first:
            log.warning("tunnel: handshake flood (over %d messages/s beyond the budget from "
                        "non-peer addresses): handshake messages from anyone but the %d peer "
                        "addresses are dropped in the kernel, %.0f s at a time, until it "
                        "stops; forwarding is unaffected", sh.trigger, len(peers), sh.window)
