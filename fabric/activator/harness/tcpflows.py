"""TCP conversations of a capture, reassembled into the byte streams each side sent.

What a stream activator sees is the kernel's view of a connection: the client's bytes in
order, once, and its end. This rebuilds that from captured segments, per direction:
retransmissions and overlaps are trimmed to the bytes not yet delivered, segments that
arrive early wait until the gap before them is filled (the bytes are delivered at the time
of the segment that fills it, as the kernel would), a FIN ends the direction once every
byte before it is in, an RST ends both at once. A SYN starts a conversation (its sender is
the client); a connection already open when the capture started begins at its first
segment, with the client being the side that sends to the service port.

Server bytes are kept with how many client bytes had been delivered when they were sent
(``client_before``): the simulated backend (backend.py) replays them by that measure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fabric.activator.harness.capture import ACK, FIN, PROTO_TCP, RST, SYN, IPPacket

MASK = 0xFFFFFFFF
HALF = 1 << 31


@dataclass(slots=True)
class ClientEvent:
    ts: float
    kind: str  # "data", "close" (FIN), "reset"
    data: bytes = b""
    server_before: int = 0  # server bytes the client had received when it sent this


@dataclass(slots=True)
class ServerChunk:
    ts: float
    client_before: int  # client bytes delivered before the server sent this
    data: bytes = b""  # empty with end set: the server's FIN or RST
    end: str = ""  # "", "close", "reset"


@dataclass
class Conversation:
    """One TCP connection to the service port."""

    index: int  # order of the connection in the capture (its SYN, or first segment)
    client: tuple[str, int]
    server: tuple[str, int]
    opened: float
    syn_seen: bool
    client_events: list[ClientEvent] = field(default_factory=list)
    server_chunks: list[ServerChunk] = field(default_factory=list)
    refused: bool = False  # the server answered the SYN with an RST
    accepted: bool = False  # the server sent a SYN-ACK (or any data)
    retransmitted: int = 0  # segments (or parts) already delivered, trimmed
    out_of_order: int = 0  # segments that waited for a gap to be filled

    def server_reached(self, count: int) -> float:
        """When (capture time) the client had received `count` server bytes."""
        n = 0
        for ch in self.server_chunks:
            n += len(ch.data)
            if n >= count:
                return ch.ts
        return self.opened

    @property
    def client_bytes(self) -> int:
        return sum(len(e.data) for e in self.client_events)

    @property
    def server_bytes(self) -> int:
        return sum(len(c.data) for c in self.server_chunks)


class _Half:
    """One direction's reassembly (sequence numbers relative to its first byte)."""

    __slots__ = ("base", "nxt", "pending", "fin_at", "ended")

    def __init__(self) -> None:
        self.base: int | None = None
        self.nxt = 0
        self.pending: dict[int, bytes] = {}
        self.fin_at: int | None = None
        self.ended = False

    def rel(self, seq: int) -> int:
        assert self.base is not None
        o = (seq - self.base) & MASK
        return o - (1 << 32) if o >= HALF else o

    def segment(self, conv: Conversation, p: IPPacket) -> tuple[bytes, bool]:
        """The new in-order bytes this segment makes available, and whether the
        direction has now ended with a FIN."""
        if self.base is None:
            self.base = (p.seq + 1) & MASK if p.flags & SYN else p.seq
        if self.ended:
            if p.payload:
                conv.retransmitted += 1
            return b"", False
        o = self.rel((p.seq + 1) & MASK if p.flags & SYN else p.seq)
        data = p.payload
        out = b""
        if data:
            end = o + len(data)
            if end <= self.nxt:
                conv.retransmitted += 1
            elif o <= self.nxt:
                if o < self.nxt:
                    conv.retransmitted += 1
                out = data[self.nxt - o:]
                self.nxt = end
                out += self._drain(conv)
            else:
                conv.out_of_order += 1
                old = self.pending.get(o)
                if old is None or len(old) < len(data):
                    self.pending[o] = data
        if p.flags & FIN:
            self.fin_at = o + len(data)
        if self.fin_at is not None and self.nxt >= self.fin_at:
            self.ended = True
            return out, True
        return out, False

    def _drain(self, conv: Conversation) -> bytes:
        out = b""
        while self.pending:
            ready = [k for k in self.pending if k <= self.nxt]
            if not ready:
                break
            for k in sorted(ready):
                data = self.pending.pop(k)
                end = k + len(data)
                if end > self.nxt:
                    out += data[self.nxt - k:]
                    self.nxt = end
                else:
                    conv.retransmitted += 1
        return out


def syn_ports(packets: list[IPPacket]) -> dict[int, int]:
    """Destination ports of connection attempts (SYN without ACK), with their count."""
    ports: dict[int, int] = {}
    for p in packets:
        if p.proto == PROTO_TCP and p.flags & (SYN | ACK) == SYN:
            ports[p.dport] = ports.get(p.dport, 0) + 1
    return ports


def conversations(packets: list[IPPacket], port: int) -> list[Conversation]:
    """The capture's TCP connections to `port`, in the order they began."""
    convs: list[Conversation] = []
    live: dict[tuple[str, int, str, int], tuple[Conversation, _Half, _Half]] = {}
    for p in packets:
        if p.proto != PROTO_TCP or (p.dport != port and p.sport != port):
            continue
        to_server = p.dport == port
        if p.sport == port and p.dport == port:
            to_server = bool(p.flags & SYN and not p.flags & ACK)  # a port to itself
        key = (p.src, p.sport, p.dst, p.dport) if to_server else (p.dst, p.dport, p.src,
                                                                  p.sport)
        entry = live.get(key)
        fresh_syn = to_server and p.flags & (SYN | ACK) == SYN
        if entry is not None and fresh_syn:
            conv0, c0, s0 = entry
            # a SYN after the end (port reuse) starts a new connection; one repeating
            # the first SYN's sequence number is a retransmission
            if (c0.ended or s0.ended or conv0.refused) and c0.base != (p.seq + 1) & MASK:
                entry = None
        if entry is None:
            if not to_server and not p.payload and not p.flags & SYN:
                continue  # a stray server segment of a connection we never saw begin
            conv = Conversation(len(convs), (key[0], key[1]), (key[2], key[3]), p.ts,
                                bool(fresh_syn))
            convs.append(conv)
            entry = live[key] = (conv, _Half(), _Half())
        conv, chalf, shalf = entry
        if to_server:
            if p.flags & RST:
                if not chalf.ended:
                    chalf.ended = True
                    conv.client_events.append(ClientEvent(p.ts, "reset", b"", shalf.nxt))
                continue
            data, fin = chalf.segment(conv, p)
            if data:
                conv.client_events.append(ClientEvent(p.ts, "data", data, shalf.nxt))
            if fin:
                conv.client_events.append(ClientEvent(p.ts, "close", b"", shalf.nxt))
        else:
            if p.flags & RST:
                if not conv.accepted and not shalf.ended:
                    conv.refused = True
                if not shalf.ended:
                    shalf.ended = True
                    conv.server_chunks.append(ServerChunk(p.ts, chalf.nxt, end="reset"))
                continue
            if p.flags & SYN or p.payload:
                conv.accepted = True
            data, fin = shalf.segment(conv, p)
            if data:
                conv.server_chunks.append(ServerChunk(p.ts, chalf.nxt, data))
            if fin:
                conv.server_chunks.append(ServerChunk(p.ts, chalf.nxt, end="close"))
    return convs
