"""Per-peer state: sessions, the pending handshake, the packet queue, timers, stats."""

from __future__ import annotations

from collections import deque

from noise.backends.default.keypairs import KeyPair25519
from noise.connection import NoiseConnection

from tunnels.cookie import CookieGenerator
from tunnels.ratelimiter import TokenBucket
from tunnels.timers import PeerTimers
from tunnels.transport import Session

QUEUE_LIMIT = 128

# Drops we can pin on a peer. Some drops (unknown index, bad mac1, rate limit, malformed
# outer header) happen before we know who sent the datagram: those are only global.
PEER_DROPS = (
    "replay",
    "decrypt_failure",
    "expired",
    "malformed",
    "queue_overflow",
    "handshake_timeout",
    "handshake_replay",
    "handshake_failed",
    "cookie_invalid",
    "no_endpoint",
)


class PendingHandshake:
    """Our initiation to a peer, waiting for its response."""

    __slots__ = ("peer", "local_index", "noise", "created")

    def __init__(self, peer: Peer, local_index: int, noise: NoiseConnection, created: float):
        self.peer = peer
        self.local_index = local_index
        self.noise = noise
        self.created = created


class Peer:
    """Another worker: its key and endpoint, and everything we know about talking to it."""

    __slots__ = (
        "id",
        "public_key",
        "remote",
        "endpoint",
        "configured",
        "keepalive",
        "cookies",
        "current",
        "previous",
        "next",
        "handshake",
        "queue",
        "timers",
        "scheduled",
        "last_timestamp",
        "last_initiation_sent",
        "last_handshake",
        "last_authentic",
        "budget",
        "rx_bytes",
        "tx_bytes",
        "rx_packets",
        "tx_packets",
        "drops",
    )

    def __init__(
        self,
        peer_id: str,
        public_key: bytes,
        endpoint: tuple[str, int] | None,
        keepalive: float | None,
        peer_budget: float = 10.0,
    ) -> None:
        self.id = peer_id
        self.public_key = public_key
        self.remote = KeyPair25519.from_public_bytes(public_key)
        self.endpoint = endpoint
        # The address the configuration gave (roaming moves `endpoint`, not this one).
        self.configured = endpoint
        self.keepalive = keepalive if keepalive and keepalive > 0 else None
        self.cookies = CookieGenerator(public_key)
        self.current: Session | None = None
        self.previous: Session | None = None
        self.next: Session | None = None
        self.handshake: PendingHandshake | None = None
        self.queue: deque[tuple[int, bytes]] = deque()
        self.timers = PeerTimers()
        # Earliest deadline we have pushed on the core's timer heap (None: nothing pushed).
        self.scheduled: float | None = None
        # Greatest TAI64N timestamp of an initiation we accepted from this peer.
        self.last_timestamp = b""
        self.last_initiation_sent = float("-inf")
        self.last_handshake: float | None = None
        # When anything authentic last came from the peer (data, initiation, response).
        self.last_authentic = float("-inf")
        # Handshake messages from the peer's endpoints that may get crypto (core.py).
        self.budget = TokenBucket(peer_budget, peer_budget)
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.rx_packets = 0
        self.tx_packets = 0
        self.drops = dict.fromkeys(PEER_DROPS, 0)

    def enqueue(self, namespace_id: int, packet: bytes) -> bool:
        """Hold a packet until a session exists; True if the oldest had to be dropped."""
        overflow = len(self.queue) >= QUEUE_LIMIT
        if overflow:
            self.queue.popleft()
        self.queue.append((namespace_id, packet))
        return overflow

    def sessions(self) -> list[Session]:
        return [s for s in (self.current, self.previous, self.next) if s is not None]
