"""Fuzz ``TunnelCore.receive``: 100k random and mutated datagrams are never accepted as a
packet, never raise (not even into the core's own safety net), and leave the core working.

Hypothesis draws the seed and the palette of mutations of each batch of 1,000 datagrams;
the batch itself comes from a seeded PRNG so 100 examples stay fast. Some inputs carry a
*valid* mac1 or a *live* index so they get past the cheap checks into Noise and the AEAD.
"""

from __future__ import annotations

import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.tunnel_net import Net, ipv4_packet, packet_tag
from tunnels import messages
from tunnels.cookie import hash32, mac16

A_ADDR = ("192.0.2.1", 51820)
B_ADDR = ("192.0.2.2", 51820)
C_ADDR = ("192.0.2.3", 51820)
BATCH = 1000
EXAMPLES = 100  # x BATCH = 100k datagrams


class World:
    """b is the target: an established session with a, a pending handshake towards c
    (so responses have a live index), and a corpus of genuine messages b already took."""

    def __init__(self) -> None:
        net = Net()
        self.net = net
        self.a = net.add("a", A_ADDR, seed=11)
        self.b = net.add("b", B_ADDR, seed=12)
        self.c = net.add("c", C_ADDR, seed=13)
        net.link("a", "b")
        net.link("b", "c")
        self.corpus: list[bytes] = []
        net.send("a", "b", 5, ipv4_packet(80, 1))
        self._flush_recording()
        for i in range(5):
            net.send("a", "b", 5, ipv4_packet(80 + i, 2 + i))
            net.send("b", "a", 5, ipv4_packet(80 + i, 2 + i))
            self._flush_recording()
        # c does not answer: b keeps a pending initiation with a live index.
        net.send("b", "c", 5, ipv4_packet(60, 1))
        self.pending_init = net.take()[0].data
        self.live_indices = list(self.b.core._index.entries)
        self.mac1_key = hash32(messages.LABEL_MAC1 + self.b.public_key)
        self.delivered_before = len(self.b.delivered)
        self.tag = 100

    def _flush_recording(self) -> None:
        for _ in range(20):
            wire = self.net.take()
            if not wire:
                return
            for d in wire:
                if d.dst == B_ADDR:
                    self.corpus.append(d.data)
                self.net.deliver(d)

    def still_works(self) -> None:
        """New traffic both ways goes through."""
        self.tag += 1
        net = self.net
        net.send("a", "b", 9, ipv4_packet(70, self.tag))
        net.send("b", "a", 9, ipv4_packet(70, self.tag))
        net.flush()
        assert packet_tag(self.b.delivered[-1][2]) == self.tag
        assert packet_tag(self.a.delivered[-1][2]) == self.tag
        self.delivered_before = len(self.b.delivered)


_WORLD: World | None = None


def world() -> World:
    global _WORLD
    if _WORLD is None:
        _WORLD = World()
    return _WORLD


# -- mutations: each takes (rng, datagram, world) and returns a new datagram --------------


def flip_bits(r: random.Random, d: bytes, w: World) -> bytes:
    if not d:
        return d
    b = bytearray(d)
    for _ in range(r.randint(1, 4)):
        b[r.randrange(len(b))] ^= 1 << r.randrange(8)
    return bytes(b)


def truncate(r: random.Random, d: bytes, w: World) -> bytes:
    return d[: r.randrange(len(d) + 1)]


def extend(r: random.Random, d: bytes, w: World) -> bytes:
    return d + r.randbytes(r.randint(1, 64))


def set_type(r: random.Random, d: bytes, w: World) -> bytes:
    return bytes([r.randint(0, 6)]) + d[1:] if d else d


def live_index(r: random.Random, d: bytes, w: World) -> bytes:
    """Point the receiver field (where the type says it is) at an index b really uses."""
    if len(d) < 12 or not w.live_indices:
        return d
    at = 8 if d[0] == messages.TYPE_RESPONSE else 4
    return d[:at] + struct.pack("<I", r.choice(w.live_indices)) + d[at + 4 :]


def fix_mac1(r: random.Random, d: bytes, w: World) -> bytes:
    """Recompute mac1 so the message reaches the expensive checks."""
    if len(d) == messages.INITIATION_LEN:
        at = messages.INITIATION_MAC1_AT
    elif len(d) == messages.RESPONSE_LEN:
        at = messages.RESPONSE_MAC1_AT
    else:
        return d
    return d[:at] + mac16(w.mac1_key, d[:at]) + d[at + 16 :]


def shaped(r: random.Random, d: bytes, w: World) -> bytes:
    """Random bytes with a valid-looking header and an exact message length."""
    kind, size = r.choice(
        [
            (messages.TYPE_INITIATION, messages.INITIATION_LEN),
            (messages.TYPE_RESPONSE, messages.RESPONSE_LEN),
            (messages.TYPE_COOKIE_REPLY, messages.COOKIE_REPLY_LEN),
            (messages.TYPE_DATA, messages.DATA_MIN_LEN + r.randint(0, 100)),
        ]
    )
    return struct.pack("<I", kind) + r.randbytes(size - 4)


def splice(r: random.Random, d: bytes, w: World) -> bytes:
    other = r.choice(w.corpus)
    cut = r.randrange(min(len(d), len(other)) + 1)
    return d[:cut] + other[cut:]


def counter_change(r: random.Random, d: bytes, w: World) -> bytes:
    if len(d) < 16 or d[0] != messages.TYPE_DATA:
        return d
    return (
        d[:8]
        + struct.pack("<Q", r.choice([0, 1, 2**64 - 1, 2**64 - 2**13, r.getrandbits(64)]))
        + d[16:]
    )


MUTATIONS = [
    flip_bits,
    truncate,
    extend,
    set_type,
    live_index,
    fix_mac1,
    shaped,
    splice,
    counter_change,
]


def make(r: random.Random, ops: list, w: World) -> bytes:
    roll = r.random()
    if roll < 0.15:
        d = r.randbytes(r.choice([0, 1, 3, 4, 31, 32, 64, 92, 148, r.randint(0, 2000)]))
    elif roll < 0.25:
        d = r.choice(w.corpus)  # a pure replay of something b already accepted
    else:
        d = r.choice(w.corpus)
        for _ in range(r.randint(1, 3)):
            d = r.choice(ops)(r, d, w)
    # Keep the expensive path (valid mac1 -> Noise, ~1 ms) to a few percent of inputs.
    if r.random() < 0.03:
        d = fix_mac1(r, d, w)
    return d


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(
    seed=st.integers(0, 2**32 - 1),
    ops=st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=len(MUTATIONS), unique=True),
)
def test_fuzz_receive(seed, ops):
    w = world()
    core = w.b.core
    r = random.Random(seed)
    initiations = 0
    for i in range(BATCH):
        d = make(r, ops, w)
        src = r.choice([A_ADDR, C_ADDR, ("203.0.113.7", r.randint(1, 65535))])
        out, packets = core.receive(d, src, w.net.now + i * 0.01)
        assert packets == [], (d.hex(), src)
        for dst, msg in out:
            # Handshake replies, or (data for a session b does not hold, from a peer's
            # endpoint) an initiation to that peer; never data, never to anyone else.
            if msg[0] == messages.TYPE_INITIATION:
                assert dst in (A_ADDR, C_ADDR)
                initiations += 1
            else:
                assert msg[0] in (messages.TYPE_RESPONSE, messages.TYPE_COOKIE_REPLY)
    # At most one per peer per second of the batch's (simulated) 10 s.
    assert initiations <= 2 * (BATCH * 0.01 + 1)
    w.net.now += BATCH * 0.01
    c = core.counters
    assert c["internal_error"] == 0
    assert c["rx_packets"] == w.delivered_before
    assert core.peers()[0]["endpoint"] == A_ADDR  # never moved by anything unauthenticated
    w.still_works()


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300), st.tuples(st.text(max_size=20), st.integers(-5, 70000)))
def test_fuzz_arbitrary_bytes_and_addresses(data, src):
    w = world()
    out, packets = w.b.core.receive(data, src, w.net.now)
    assert packets == []
    assert w.b.core.counters["internal_error"] == 0


def test_fuzz_world_still_handshakes_afterwards():
    w = world()
    w.net.now += 1.0
    w.net.nodes["a"].core.rekey("b", w.net.now)
    w.net.flush()
    w.still_works()
    assert w.b.core.counters["internal_error"] == 0
