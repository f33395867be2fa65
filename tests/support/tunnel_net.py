"""An in-memory network of TunnelCores with a fake clock, for tests and benchmarks.

Datagrams sit on ``Net.wire`` until the test delivers, drops, reorders or holds them, so
every scenario (loss, reordering, replay, roaming, crossing handshakes) is explicit and
deterministic: each node's keys and rng come from a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tunnels.core import Addr, TunnelCore
from tunnels.keys import public_key


def ipv4_packet(size: int = 60, tag: int = 0) -> bytes:
    """A minimal valid IPv4 header (total length = ``size``) with ``tag`` in its id field."""
    if not 20 <= size <= 0xFFFF:
        raise ValueError("IPv4 packet size out of range")
    header = bytes([0x45, 0, size >> 8, size & 0xFF, (tag >> 8) & 0xFF, tag & 0xFF, 0, 0])
    header += bytes([64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
    return header + bytes(size - 20)


def packet_tag(packet: bytes) -> int:
    """The ``tag`` that ``ipv4_packet`` put in the IPv4 identification field."""
    return (packet[4] << 8) | packet[5]


@dataclass
class Datagram:
    """One UDP payload in flight."""

    src: Addr
    dst: Addr
    data: bytes

    @property
    def kind(self) -> int:
        return self.data[0] if self.data else -1


@dataclass
class Node:
    """A core plus its address and what it delivered."""

    name: str
    addr: Addr
    core: TunnelCore
    private_key: bytes
    delivered: list[tuple[str, int, bytes]] = field(default_factory=list)

    @property
    def public_key(self) -> bytes:
        return public_key(self.private_key)


class Net:
    """Nodes, a wire, and a clock that only moves when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.nodes: dict[str, Node] = {}
        self.wire: list[Datagram] = []

    def add(self, name: str, addr: Addr, seed: int, psk: bytes | None = None, **kw) -> Node:
        private = random.Random(seed).randbytes(32)
        core = TunnelCore(private, psk, rng=random.Random(seed + 1_000_003).randbytes, **kw)
        node = Node(name, addr, core, private)
        self.nodes[name] = node
        return node

    def link(
        self,
        a: str,
        b: str,
        a_knows_b: bool = True,
        b_knows_a: bool = True,
        keepalive: float | None = None,
    ) -> None:
        """Make ``a`` and ``b`` peers (peer ids are node names)."""
        na, nb = self.nodes[a], self.nodes[b]
        na.core.add_peer(b, nb.public_key, nb.addr if a_knows_b else None, keepalive)
        nb.core.add_peer(a, na.public_key, na.addr if b_knows_a else None, keepalive)

    def node_at(self, addr: Addr) -> Node | None:
        for node in self.nodes.values():
            if node.addr == addr:
                return node
        return None

    def _put(self, src: Node, out: list[tuple[Addr, bytes]]) -> list[Datagram]:
        sent = [Datagram(src.addr, dst, data) for dst, data in out]
        self.wire.extend(sent)
        return sent

    def send(self, a: str, peer: str, namespace_id: int, packet: bytes) -> list[Datagram]:
        """``a`` sends a packet to ``peer``; what it emits goes on the wire."""
        node = self.nodes[a]
        return self._put(node, node.core.send(peer, namespace_id, packet, self.now))

    def take(self) -> list[Datagram]:
        """Remove and return everything in flight."""
        wire, self.wire = self.wire, []
        return wire

    def deliver(self, dgram: Datagram, src: Addr | None = None) -> list[Datagram]:
        """Hand one datagram to whoever is at its destination (``src`` overrides the
        source address, e.g. for a peer behind a NAT that changed)."""
        node = self.node_at(dgram.dst)
        if node is None:
            return []
        out, packets = node.core.receive(dgram.data, src or dgram.src, self.now)
        node.delivered.extend(packets)
        return self._put(node, out)

    def flush(self, rounds: int = 50) -> None:
        """Deliver everything in flight, and what that produces, until the wire is quiet."""
        for _ in range(rounds):
            wire = self.take()
            if not wire:
                return
            for dgram in wire:
                self.deliver(dgram)
        raise AssertionError("the wire never went quiet")

    def advance(self, until: float, deliver: bool = True) -> None:
        """Run every node's timers in time order up to ``until`` (delivering what they
        send unless ``deliver`` is False, in which case it stays on the wire)."""
        while True:
            due = [
                (t, name)
                for name, node in self.nodes.items()
                if (t := node.core.next_timer()) is not None and t <= until
            ]
            if not due:
                break
            t, name = min(due)
            self.now = max(self.now, t)
            node = self.nodes[name]
            self._put(node, node.core.handle_timer(self.now))
            if deliver:
                self.flush()
        self.now = max(self.now, until)

    def handshake(self, a: str, b: str, namespace_id: int = 1) -> None:
        """``a`` initiates by sending one packet; everything is delivered."""
        self.send(a, b, namespace_id, ipv4_packet(60, 0xFFFF))
        self.flush()
