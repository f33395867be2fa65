"""TunnelCore: the sans-IO tunnel device (wireguard-go's ``device``), no sockets or clocks.

Everything comes in as bytes plus the caller's ``now`` (seconds, any monotonic clock) and
goes out as datagrams to send, packets to deliver, and the time of the next timer:

    out = core.send(peer_id, namespace_id, ip_packet, now)      # -> [(addr, datagram)]
    out, packets = core.receive(datagram, src_addr, now)        # packets: [(peer, ns, ip)]
    when = core.next_timer()                                    # call handle_timer(now) then
    out = core.handle_timer(now)

Hostile input never raises: every datagram that is not accepted is dropped and counted
(``counters`` globally, ``peers()[i]["drops"]`` when the sender is known). The data path
(type 4 both ways) is one struct call, two dict lookups and one AEAD call.
"""

from __future__ import annotations

import base64
import heapq
import ipaddress
import itertools
import os
import random
import struct
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag

from fabric.histogram import HANDSHAKE_BUCKETS, Histogram
from tunnels import tai64n
from tunnels.cookie import CookieChecker
from tunnels.handshake import NoiseContext
from tunnels.indextable import IndexTable
from tunnels.messages import (
    COOKIE_REPLY_LEN,
    DATA_HEADER,
    DATA_MIN_LEN,
    INDEX_HEADER,
    INITIATION_LEN,
    INITIATION_MAC1_AT,
    INITIATION_MAC2_AT,
    INITIATION_NOISE,
    IPV4_MIN_LEN,
    MAX_PACKET,
    NAMESPACE,
    RESPONSE_HEADER,
    RESPONSE_LEN,
    RESPONSE_MAC1_AT,
    RESPONSE_MAC2_AT,
    RESPONSE_NOISE,
    TYPE_COOKIE_REPLY,
    TYPE_DATA,
    TYPE_INITIATION,
    TYPE_RESPONSE,
)
from tunnels.peer import PEER_DROPS, Peer, PendingHandshake
from tunnels.ratelimiter import LoadMeter, RateLimiter, TokenBucket
from tunnels.replay import COUNTER_LIMIT, WINDOW, WINDOW_MASK
from tunnels.timers import (
    KEEPALIVE_TIMEOUT,
    NEW_HANDSHAKE,
    PERSISTENT_KEEPALIVE,
    REJECT_AFTER_MESSAGES,
    REKEY_AFTER_MESSAGES,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX_MS,
    RETRANSMIT,
    SEND_KEEPALIVE,
    ZERO_KEYS,
)
from tunnels.transport import Session
from tunnels.transport import pack_nonce as _pack_nonce

Addr = tuple[str, int]
Datagram = tuple[Addr, bytes]
Delivered = tuple[str, int, bytes]

DEFAULT_LOAD_THRESHOLD = 100.0
DEFAULT_MAX_PEERS = 4096
# Handshake messages (types 1-3) per second we spend any crypto on, checked before mac1:
# one bucket for datagrams from a peer's endpoint, one for every other source, so a flood
# from elsewhere cannot crowd out the peers. Each holds a quarter second's worth.
DEFAULT_HANDSHAKE_BUDGET = 1000.0
DEFAULT_HANDSHAKE_BUDGET_PEERS = 1000.0
BUDGET_BURST_SECONDS = 0.25
# Within the peers' budget, each peer's endpoints get at most this many a second (as many
# at once), so a flood spoofing one peer's address leaves the others their share. A
# peer's real handshakes need a few per REKEY_TIMEOUT.
PEER_BUDGET = 10.0
# Data for a session we do not know (we restarted), from a peer's endpoint, starts a
# handshake toward that peer: at most once per peer per this interval, and at most
# UNKNOWN_SESSION_RATE per second (burst as many) over all peers.
UNKNOWN_SESSION_INTERVAL = 1.0
UNKNOWN_SESSION_RATE = 20.0

# Global counters: every drop reason, then events. All exist from the start (at zero) so a
# metrics scrape or `fabricd get` table always has the same columns.
DROPS = (
    "malformed",
    "unknown_index",
    "unknown_session",
    "replay",
    "decrypt_failure",
    "expired",
    "mac1_invalid",
    "rate_limited",
    "handshake_over_budget",
    "handshake_over_budget_peer",
    "handshake_failed",
    "handshake_replay",
    "unknown_peer",
    "cookie_invalid",
    "queue_overflow",
    "handshake_timeout",
    "no_endpoint",
    "send_unknown_peer",
    "send_invalid",
    "index_table_full",
    "internal_error",
)
EVENTS = (
    "initiation_sent",
    "initiation_received",
    "response_sent",
    "response_received",
    "cookie_sent",
    "cookie_received",
    "handshake_complete",
    "handshake_giveup",
    "rekey",
    "keepalive_sent",
    "keepalive_received",
    "roamed",
    "simultaneous_ignored",
    "simultaneous_yielded",
    "under_load",
    "keys_zeroed",
    "handshake_on_unknown_session",
    "unknown_session_limited",
)

_unpack_data = DATA_HEADER.unpack_from
_pack_data = DATA_HEADER.pack
_unpack_index = INDEX_HEADER.unpack_from
_unpack_response = RESPONSE_HEADER.unpack_from
_pack_ns = NAMESPACE.pack
_unpack_ns = NAMESPACE.unpack_from


class TunnelCore:
    """All peers of one worker: handshakes, sessions, cookies, timers (see module doc)."""

    def __init__(
        self,
        private_key: bytes,
        psk: bytes | None = None,
        *,
        rng: Callable[[int], bytes] = os.urandom,
        handshake_load_threshold: float = DEFAULT_LOAD_THRESHOLD,
        wall_offset: float = 0.0,
        max_peers: int = DEFAULT_MAX_PEERS,
        rate_limit: float = 20.0,
        rate_burst: float = 5.0,
        handshake_budget: float | None = DEFAULT_HANDSHAKE_BUDGET,
        handshake_budget_peers: float | None = DEFAULT_HANDSHAKE_BUDGET_PEERS,
    ) -> None:
        """``handshake_load_threshold``: handshake messages per second above which we are
        "under load" (cookies required, per-source rate limit applied); 0 means always.
        ``wall_offset``: added to ``now`` to get Unix time for initiation timestamps, e.g.
        ``time.time() - time.monotonic()`` when ``now`` is ``time.monotonic()``.
        ``handshake_budget`` / ``handshake_budget_peers``: handshake messages per second
        from other sources / from peers' endpoints that get any crypto at all (the rest
        are dropped first); None means no bound."""
        self._noise = NoiseContext(private_key, psk)
        self.public_key: bytes = self._noise.public
        self._rng = rng
        # Jitter is not secret and is drawn per data packet: a cheap PRNG seeded from rng.
        self._jitter_rng = random.Random(int.from_bytes(rng(8), "little"))
        self._wall_offset = wall_offset
        self.max_peers = max_peers
        self._checker = CookieChecker(self.public_key, rng)
        self._load = LoadMeter(handshake_load_threshold)
        self._limiter = RateLimiter(rate_limit, rate_burst)
        self._budget_other = _bucket(handshake_budget)
        self._budget_peers = _bucket(handshake_budget_peers)
        self._unknown_session = TokenBucket(UNKNOWN_SESSION_RATE, UNKNOWN_SESSION_RATE)
        self._peers: dict[str, Peer] = {}
        self._by_key: dict[bytes, Peer] = {}
        # Every peer's configured and current endpoint: which sources are a peer's.
        self._by_endpoint: dict[Addr, Peer] = {}
        # At most 4 indices per peer (pending handshake, current, previous, next).
        self._index = IndexTable(rng, 4 * max_peers + 16)
        self._entries = self._index.entries
        self._heap: list[tuple[float, int, Peer]] = []
        self._seq = itertools.count()
        self._c = dict.fromkeys(DROPS + EVENTS, 0)
        # Handshakes we initiated: from the initiation sent to the response consumed.
        self.handshake_seconds = Histogram(HANDSHAKE_BUCKETS)
        self._last_timestamp = b""
        self._now = 0.0
        self._rx_bytes = 0
        self._tx_bytes = 0
        self._rx_packets = 0
        self._tx_packets = 0

    # -- configuration -------------------------------------------------------------------

    def add_peer(
        self,
        peer_id: str,
        public_key: bytes,
        endpoint: Addr | None = None,
        keepalive: float | None = None,
    ) -> None:
        """Add a peer, or update endpoint/keepalive of an existing one with the same key
        (a config reload keeps its sessions); a new key for an existing id replaces it."""
        public_key = bytes(public_key)
        if len(public_key) != 32:
            raise ValueError("a peer public key is 32 bytes")
        if endpoint is not None:
            _check_numeric(endpoint)
        if public_key == self.public_key:
            raise ValueError("a peer cannot have this worker's own public key")
        existing = self._peers.get(peer_id)
        if existing is not None and existing.public_key == public_key:
            if endpoint is not None:
                if endpoint != existing.configured:
                    old, existing.configured = existing.configured, endpoint
                    if old != existing.endpoint:
                        self._unmap(existing, old)
                if endpoint != existing.endpoint:
                    self._set_endpoint(existing, endpoint)
                    if existing.current is None:
                        # No session to keep: reach the peer at its new address at once.
                        self._arm(existing, existing.timers.initiate_now())
            existing.keepalive = keepalive if keepalive and keepalive > 0 else None
            if existing.keepalive and existing.timers.persistent is None:
                existing.timers.persistent = 0.0
                self._arm(existing, 0.0)
            return
        other = self._by_key.get(public_key)
        if other is not None and other.id != peer_id:
            raise ValueError(f"public key already used by peer {other.id}")
        if existing is not None:
            self.remove_peer(peer_id)
        if len(self._peers) >= self.max_peers:
            raise ValueError(f"too many peers (max {self.max_peers})")
        peer = Peer(peer_id, public_key, endpoint, keepalive, PEER_BUDGET)
        self._peers[peer_id] = peer
        self._by_key[public_key] = peer
        if endpoint is not None:
            self._by_endpoint[endpoint] = peer
            # Every peer with an address is contacted right away (a worker starting, a
            # peer added or given a new key), not at the first packet: a peer that
            # still holds a session from before we (re)started switches to the new one
            # at once. The next handle_timer() sends it; retries as usual.
            self._arm(peer, peer.timers.initiate_now())
            if peer.keepalive:
                peer.timers.persistent = 0.0

    def remove_peer(self, peer_id: str) -> bool:
        """Forget a peer and every key and queued packet it had; False if unknown."""
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return False
        del self._by_key[peer.public_key]
        self._unmap(peer, peer.endpoint)
        self._unmap(peer, peer.configured)
        self._forget_keys(peer)
        peer.queue.clear()
        peer.timers.clear()
        return True

    def rekey(self, peer_id: str, now: float) -> list[Datagram]:
        """Start a new handshake with the peer now, whatever the timers say."""
        self._now = now
        peer = self._peers.get(peer_id)
        if peer is None:
            self._c["send_unknown_peer"] += 1
            return []
        try:
            return self._initiate(peer, now, force=True)
        except Exception:  # the core never raises into the event loop
            self._c["internal_error"] += 1
            return []

    # -- data path -----------------------------------------------------------------------

    def send(self, peer_id: str, namespace_id: int, packet: bytes, now: float) -> list[Datagram]:
        """Encrypt one IPv4 packet for a peer. Returns the datagrams to send: the data
        message, or (no usable session yet) a handshake initiation while the packet waits
        in the peer's queue; possibly nothing (the handshake is already under way)."""
        self._now = now
        peer = self._peers.get(peer_id)
        if peer is None:
            self._c["send_unknown_peer"] += 1
            return []
        try:
            plaintext = _pack_ns(namespace_id) + packet
            if not IPV4_MIN_LEN + 4 <= len(plaintext) <= MAX_PACKET + 4 or packet[0] >> 4 != 4:
                raise TypeError  # not an IPv4 packet: the peer would drop it anyway
        except (struct.error, TypeError):
            self._c["send_invalid"] += 1
            return []
        session = peer.current
        endpoint = peer.endpoint
        try:
            if session is not None and now < session.rekey_at and endpoint is not None:
                counter = session.send_counter
                if counter < REKEY_AFTER_MESSAGES:
                    # Fast path: Session.seal() inlined.
                    session.send_counter = counter + 1
                    msg = _pack_data(
                        TYPE_DATA, session.remote_index, counter
                    ) + session.send_aead.encrypt(_pack_nonce(counter), plaintext, None)
                    self._sent_data(peer, len(msg), now)
                    return [(endpoint, msg)]
            return self._send_slow(peer, namespace_id, packet, now)
        except Exception:  # the core never raises into the event loop
            self._c["internal_error"] += 1
            return []

    def _sent_data(self, peer: Peer, size: int, now: float) -> None:
        """Stats and timers after a data message went out."""
        peer.tx_bytes += size
        peer.tx_packets += 1
        self._tx_bytes += size
        self._tx_packets += 1
        timers = peer.timers
        timers.send_keepalive = None  # authenticated_sent(): data is as good as a keepalive
        if timers.new_handshake is None:
            self._arm(peer, timers.data_sent(now, self._jitter()))
        if peer.keepalive:
            when = timers.traversal(now, peer.keepalive)
            if when is not None:
                self._arm(peer, when)

    def _send_slow(
        self, peer: Peer, namespace_id: int, packet: bytes, now: float
    ) -> list[Datagram]:
        """No fresh session: send on a still-usable one and rekey, or queue and handshake."""
        session = peer.current
        out: list[Datagram] = []
        if self._usable(session, now) and peer.endpoint is not None:
            msg = session.seal(_pack_ns(namespace_id) + packet)
            out.append((peer.endpoint, msg))
            self._sent_data(peer, len(msg), now)
            if peer.handshake is None:
                self._c["rekey"] += 1
                out.extend(self._initiate(peer, now))
            return out
        if peer.enqueue(namespace_id, packet):
            peer.drops["queue_overflow"] += 1
            self._c["queue_overflow"] += 1
        pending = peer.next
        if peer.handshake is None and pending is not None and now - pending.created < REKEY_TIMEOUT:
            # We just answered the peer's initiation: its first data packet will confirm
            # that session and release the queue. Only if it does not come, initiate.
            timers = peer.timers
            if timers.retransmit is None:
                if timers.attempt_start is None:
                    timers.attempt_start = now
                timers.retransmit = pending.created + REKEY_TIMEOUT + self._jitter()
                self._arm(peer, timers.retransmit)
            return out
        out.extend(self._initiate(peer, now))
        return out

    @staticmethod
    def _usable(session: Session | None, now: float) -> bool:
        return (
            session is not None
            and now < session.reject_at
            and session.send_counter < REJECT_AFTER_MESSAGES
        )

    def receive(
        self, datagram: bytes, src: Addr, now: float
    ) -> tuple[list[Datagram], list[Delivered]]:
        """Process one UDP payload from ``src``. Returns (datagrams to send, packets to
        deliver as (peer_id, namespace_id, ipv4_packet))."""
        self._now = now
        c = self._c
        try:
            if type(datagram) is not bytes:
                if not isinstance(datagram, (bytearray, memoryview)):
                    c["malformed"] += 1
                    return [], []
                datagram = bytes(datagram)
            if len(datagram) < DATA_MIN_LEN or datagram[0] != TYPE_DATA:
                return self._receive_handshake(datagram, src, now)
            # Data fast path: header, index lookup, replay pre-check, one AEAD call.
            kind, index, counter = _unpack_data(datagram)
            if kind != TYPE_DATA:
                c["malformed"] += 1
                return [], []
            session = self._entries.get(index)
            if type(session) is not Session:
                return self._unknown_session_data(src, now), []
            peer = session.peer
            if now >= session.reject_at:
                peer.drops["expired"] += 1
                c["expired"] += 1
                return [], []
            replay = session.replay
            top = replay.top
            if (counter <= top or counter >= COUNTER_LIMIT) and not replay.check(counter):
                peer.drops["replay"] += 1
                c["replay"] += 1
                return [], []
            try:
                plain = session.recv_aead.decrypt(_pack_nonce(counter), datagram[16:], None)
            except InvalidTag:
                peer.drops["decrypt_failure"] += 1
                c["decrypt_failure"] += 1
                return [], []
            # Authentic: only now may the replay window move (ReplayFilter.update inlined).
            shift = counter - top
            if shift > 0:
                replay.bits = ((replay.bits << shift) | 1) & WINDOW_MASK if shift < WINDOW else 1
                replay.top = counter
            else:
                replay.update(counter)
            return self._authentic_data(peer, session, plain, len(datagram), src, now)
        except Exception:
            c["internal_error"] += 1
            return [], []

    def _authentic_data(
        self, peer: Peer, session: Session, plain: bytes, size: int, src: Addr, now: float
    ) -> tuple[list[Datagram], list[Delivered]]:
        """Bookkeeping for an authenticated data message, then unwrap its packet."""
        out: list[Datagram] = []
        peer.last_authentic = now
        if session is not peer.current and session is peer.next:
            self._confirm_next(peer, now, out)
        if src != peer.endpoint:
            self._roam(peer, src)
        peer.rx_bytes += size
        self._rx_bytes += size
        timers = peer.timers
        timers.new_handshake = None  # authenticated_received()
        if peer.keepalive:
            when = timers.traversal(now, peer.keepalive)
            if when is not None:
                self._arm(peer, when)
        if now >= session.rekey_on_receive_at and peer.handshake is None:
            if session is peer.current:
                self._c["rekey"] += 1
                out.extend(self._initiate(peer, now))
        n = len(plain)
        if n == 0:
            self._c["keepalive_received"] += 1
            return out, []
        if timers.send_keepalive is None:  # data_received()
            timers.send_keepalive = now + KEEPALIVE_TIMEOUT
            self._arm(peer, timers.send_keepalive)
        else:
            timers.need_another_keepalive = True
        # namespace(4) + IPv4: version 4, total length within what we got (extra = padding).
        if n >= 4 + IPV4_MIN_LEN and plain[4] >> 4 == 4:
            total = (plain[6] << 8) | plain[7]
            if IPV4_MIN_LEN <= total <= n - 4:
                peer.rx_packets += 1
                self._rx_packets += 1
                return out, [(peer.id, _unpack_ns(plain)[0], plain[4 : 4 + total])]
        peer.drops["malformed"] += 1
        self._c["malformed"] += 1
        return out, []

    # -- handshake path ------------------------------------------------------------------

    def _receive_handshake(
        self, datagram: bytes, src: Addr, now: float
    ) -> tuple[list[Datagram], list[Delivered]]:
        n = len(datagram)
        out: list[Datagram] = []
        kind = datagram[0] if n >= 4 and not datagram[1] | datagram[2] | datagram[3] else -1
        if not (
            (kind == TYPE_INITIATION and n == INITIATION_LEN)
            or (kind == TYPE_RESPONSE and n == RESPONSE_LEN)
            or (kind == TYPE_COOKIE_REPLY and n == COOKIE_REPLY_LEN)
        ):
            self._c["malformed"] += 1
            return out, []
        # The work budget, before any crypto (mac1 included): what a flood of handshake
        # messages can take from forwarding is bounded by the budget, not by its rate.
        # A peer's endpoint draws on its own share, then on the peers' budget.
        peer = self._by_endpoint.get(src)
        if peer is None:
            other = self._budget_other
            if other is not None and not other.take(now):
                self._c["handshake_over_budget"] += 1
                return out, []
        else:
            peers = self._budget_peers
            if peers is not None and not (peer.budget.take(now) and peers.take(now)):
                self._c["handshake_over_budget_peer"] += 1
                return out, []
        if kind == TYPE_INITIATION:
            self._receive_initiation(datagram, src, now, out)
        elif kind == TYPE_RESPONSE:
            self._receive_response(datagram, src, now, out)
        else:
            self._receive_cookie(datagram, now)
        return out, []

    def _admit(
        self,
        msg: bytes,
        mac1_at: int,
        mac2_at: int,
        sender: int,
        src: Addr,
        now: float,
        out: list[Datagram],
    ) -> bool:
        """mac1 already checked. Under load: require mac2 (else send a cookie) and apply
        the per-source token bucket. Returns whether to process the message."""
        if not self._load.record(now):
            return True
        self._c["under_load"] += 1
        if not self._checker.check_mac2(msg, mac2_at, src, now):
            out.append((src, self._checker.create_reply(msg, mac1_at, sender, src, now)))
            self._c["cookie_sent"] += 1
            return False
        if not self._limiter.allow(str(src[0]), now):
            self._c["rate_limited"] += 1
            return False
        return True

    def _receive_initiation(self, msg: bytes, src: Addr, now: float, out: list[Datagram]) -> None:
        c = self._c
        if not self._checker.check_mac1(msg, INITIATION_MAC1_AT):
            c["mac1_invalid"] += 1
            return
        _, sender = _unpack_index(msg)
        if not self._admit(msg, INITIATION_MAC1_AT, INITIATION_MAC2_AT, sender, src, now, out):
            return
        result = self._noise.consume_initiation(msg[INITIATION_NOISE])
        if result is None:
            c["handshake_failed"] += 1
            return
        conn, remote_static, timestamp = result
        peer = self._by_key.get(remote_static)
        if peer is None:
            c["unknown_peer"] += 1
            return
        if timestamp <= peer.last_timestamp:
            peer.drops["handshake_replay"] += 1
            c["handshake_replay"] += 1
            return
        peer.last_timestamp = timestamp
        peer.last_authentic = now
        c["initiation_received"] += 1
        peer.rx_bytes += len(msg)
        self._rx_bytes += len(msg)
        self._roam(peer, src)
        peer.timers.authenticated_received()
        if peer.handshake is not None:
            started = peer.timers.attempt_start
            if (
                self.public_key > peer.public_key
                and started is not None
                and now - started < REKEY_TIMEOUT
            ):
                # Both sides initiated at once: the greater public key wins and its own
                # initiation goes on; the peer yields and answers ours. The peer's
                # initiation also proves it is up now, while ours may have been sent
                # before it was (a worker starting) or to an old address: send ours
                # again at once instead of waiting for the retry timer.
                c["simultaneous_ignored"] += 1
                out.extend(self._initiate(peer, now, force=True))
                return
            c["simultaneous_yielded"] += 1
            self._drop_handshake(peer)
        response = self._noise.create_response(conn, bytes(self._rng(32)))
        if response is None:
            peer.drops["handshake_failed"] += 1
            c["handshake_failed"] += 1
            return
        msg2, send_key, recv_key = response
        session = Session(peer, 0, sender, send_key, recv_key, now, initiator=False)
        index = self._index.allocate(session)
        if index is None:
            c["index_table_full"] += 1
            return
        session.local_index = index
        if peer.next is not None:
            self._free_session(peer.next)
        if peer.previous is not None:
            self._free_session(peer.previous)
            peer.previous = None
        peer.next = session
        reply = peer.cookies.add_macs(
            RESPONSE_HEADER.pack(TYPE_RESPONSE, index, sender) + msg2, now
        )
        out.append((src, reply))
        peer.tx_bytes += len(reply)
        self._tx_bytes += len(reply)
        c["response_sent"] += 1
        timers = peer.timers
        timers.authenticated_sent()
        self._arm(peer, timers.session_derived(now))
        when = timers.traversal(now, peer.keepalive)
        if when is not None:
            self._arm(peer, when)

    def _receive_response(self, msg: bytes, src: Addr, now: float, out: list[Datagram]) -> None:
        c = self._c
        if not self._checker.check_mac1(msg, RESPONSE_MAC1_AT):
            c["mac1_invalid"] += 1
            return
        _, sender, receiver = _unpack_response(msg)
        if not self._admit(msg, RESPONSE_MAC1_AT, RESPONSE_MAC2_AT, sender, src, now, out):
            return
        pending = self._index.entries.get(receiver)
        if type(pending) is not PendingHandshake:
            c["unknown_index"] += 1
            return
        peer = pending.peer
        keys = self._noise.consume_response(pending.noise, msg[RESPONSE_NOISE])
        if keys is None:
            peer.drops["handshake_failed"] += 1
            c["handshake_failed"] += 1
            return
        c["response_received"] += 1
        self.handshake_seconds.observe(now - pending.created)
        peer.last_authentic = now
        peer.rx_bytes += len(msg)
        self._rx_bytes += len(msg)
        session = Session(peer, pending.local_index, sender, keys[0], keys[1], now, initiator=True)
        self._index.replace(pending.local_index, session)
        peer.handshake = None
        # Rotation as WireGuard's initiator: an unconfirmed "next" (we also answered the
        # peer's initiation) becomes "previous" so its packets still decrypt.
        old_previous = peer.previous
        if peer.next is not None:
            peer.previous = peer.next
            peer.next = None
            if peer.current is not None:
                self._free_session(peer.current)
        else:
            peer.previous = peer.current
        if old_previous is not None:
            self._free_session(old_previous)
        peer.current = session
        peer.last_handshake = now
        c["handshake_complete"] += 1
        self._roam(peer, src)
        timers = peer.timers
        timers.handshake_complete()
        timers.authenticated_received()
        self._arm(peer, timers.session_derived(now))
        when = timers.traversal(now, peer.keepalive)
        if when is not None:
            self._arm(peer, when)
        # Send what waited, or a keepalive: either confirms the session to the responder.
        if not self._release(peer, now, out):
            out.extend(self._keepalive(peer, now))

    def _receive_cookie(self, msg: bytes, now: float) -> None:
        _, receiver = _unpack_index(msg)
        entry = self._index.entries.get(receiver)
        if entry is None:
            self._c["unknown_index"] += 1
            return
        peer = entry.peer
        if not peer.cookies.consume_reply(msg, now):
            peer.drops["cookie_invalid"] += 1
            self._c["cookie_invalid"] += 1
            return
        self._c["cookie_received"] += 1

    def _confirm_next(self, peer: Peer, now: float, out: list[Datagram]) -> None:
        """The initiator used the session we answered with: it becomes current."""
        if peer.previous is not None:
            self._free_session(peer.previous)
        peer.previous = peer.current
        peer.current = peer.next
        peer.next = None
        peer.last_handshake = now
        self._c["handshake_complete"] += 1
        peer.timers.handshake_complete()
        self._release(peer, now, out)

    def _release(self, peer: Peer, now: float, out: list[Datagram]) -> bool:
        """Send the queued packets in order on the current session; True if any went."""
        session = peer.current
        queue = peer.queue
        if not queue or not self._usable(session, now) or peer.endpoint is None:
            return False
        endpoint = peer.endpoint
        while queue and session.send_counter < REJECT_AFTER_MESSAGES:
            namespace_id, packet = queue.popleft()
            msg = session.seal(_pack_ns(namespace_id) + packet)
            out.append((endpoint, msg))
            self._sent_data(peer, len(msg), now)
        return True

    def _roam(self, peer: Peer, src: Addr) -> bool:
        """The endpoint follows the source of anything authentic from the peer."""
        if src != peer.endpoint:
            if peer.endpoint is not None:
                self._c["roamed"] += 1
            self._set_endpoint(peer, src)
            return True
        return False

    def _set_endpoint(self, peer: Peer, addr: Addr) -> None:
        """Move the peer's endpoint; the configured one stays known as the peer's."""
        old = peer.endpoint
        peer.endpoint = addr
        if old is not None and old != peer.configured:
            self._unmap(peer, old)
        self._by_endpoint[addr] = peer

    def _unmap(self, peer: Peer, addr: Addr | None) -> None:
        if addr is not None and self._by_endpoint.get(addr) is peer:
            del self._by_endpoint[addr]

    def _unknown_session_data(self, src: Addr, now: float) -> list[Datagram]:
        """A data message for a session we do not hold. From a peer's endpoint it most
        likely means we restarted and the peer still sends on the session we lost:
        start a handshake toward it now instead of waiting for the peer's timers
        (15 s). Unauthenticated, so bounded: not while the peer is talking to us on a
        session we do hold, once per peer per UNKNOWN_SESSION_INTERVAL, and
        UNKNOWN_SESSION_RATE per second in all."""
        c = self._c
        peer = self._by_endpoint.get(src)
        if peer is None:
            c["unknown_index"] += 1
            return []
        c["unknown_session"] += 1
        if (
            now - peer.last_authentic < UNKNOWN_SESSION_INTERVAL
            or now - peer.last_initiation_sent < UNKNOWN_SESSION_INTERVAL
        ):
            return []
        if not self._unknown_session.take(now):
            c["unknown_session_limited"] += 1
            return []
        c["handshake_on_unknown_session"] += 1
        return self._initiate(peer, now, force=True)

    def _initiate(self, peer: Peer, now: float, force: bool = False) -> list[Datagram]:
        """Send a handshake initiation, at most one per REKEY_TIMEOUT unless forced."""
        if not force and now - peer.last_initiation_sent < REKEY_TIMEOUT:
            return []
        peer.last_initiation_sent = now
        self._arm(peer, peer.timers.handshake_initiated(now, self._jitter()))
        self._drop_handshake(peer)
        if peer.endpoint is None:
            # Nowhere to send it (counted as a dropped initiation); the retransmit timer
            # keeps trying (the peer may contact us meanwhile) and gives up, dropping the
            # queue, after REKEY_ATTEMPT_TIME.
            peer.drops["no_endpoint"] += 1
            self._c["no_endpoint"] += 1
            return []
        timestamp = tai64n.encode(now + self._wall_offset)
        if timestamp <= self._last_timestamp:
            timestamp = tai64n.after(self._last_timestamp)
        self._last_timestamp = timestamp
        created = self._noise.create_initiation(peer.remote, bytes(self._rng(32)), timestamp)
        if created is None:
            self._c["handshake_failed"] += 1
            return []
        conn, msg1 = created
        pending = PendingHandshake(peer, 0, conn, now)
        index = self._index.allocate(pending)
        if index is None:
            self._c["index_table_full"] += 1
            return []
        pending.local_index = index
        peer.handshake = pending
        msg = peer.cookies.add_macs(INDEX_HEADER.pack(TYPE_INITIATION, index) + msg1, now)
        peer.tx_bytes += len(msg)
        self._tx_bytes += len(msg)
        self._c["initiation_sent"] += 1
        return [(peer.endpoint, msg)]

    def _keepalive(self, peer: Peer, now: float) -> list[Datagram]:
        """An empty data message on the current session, or a handshake if there is none."""
        session = peer.current
        if not self._usable(session, now) or peer.endpoint is None:
            return self._initiate(peer, now)
        msg = session.seal(b"")
        peer.tx_bytes += len(msg)
        self._tx_bytes += len(msg)
        self._c["keepalive_sent"] += 1
        peer.timers.authenticated_sent()
        when = peer.timers.traversal(now, peer.keepalive)
        if when is not None:
            self._arm(peer, when)
        return [(peer.endpoint, msg)]

    def _drop_handshake(self, peer: Peer) -> None:
        pending = peer.handshake
        if pending is not None:
            self._index.free(pending.local_index, pending)
            peer.handshake = None

    def _free_session(self, session: Session) -> None:
        self._index.free(session.local_index, session)
        session.zero()

    def _jitter(self) -> float:
        """0-333 ms, so peers that lost packets together do not retry in lockstep."""
        return self._jitter_rng.randint(0, REKEY_TIMEOUT_JITTER_MAX_MS) / 1000

    # -- timers --------------------------------------------------------------------------

    def _arm(self, peer: Peer, when: float) -> None:
        """Make sure the heap holds an entry for ``peer`` no later than ``when``."""
        scheduled = peer.scheduled
        if scheduled is None or when < scheduled:
            peer.scheduled = when
            heapq.heappush(self._heap, (when, next(self._seq), peer))
            if len(self._heap) > 4 * len(self._peers) + 64:
                self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        """Drop stale heap entries: one entry per peer with a deadline."""
        heap = []
        for peer in self._peers.values():
            when = peer.timers.earliest()
            peer.scheduled = when
            if when is not None:
                heap.append((when, next(self._seq), peer))
        heapq.heapify(heap)
        self._heap = heap

    def next_timer(self) -> float | None:
        """When ``handle_timer`` wants to run next (may be in the past: run it now)."""
        heap = self._heap
        peers = self._peers
        while heap and peers.get(heap[0][2].id) is not heap[0][2]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def handle_timer(self, now: float) -> list[Datagram]:
        """Run every timer due at ``now``; returns the datagrams they produced."""
        self._now = now
        out: list[Datagram] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, peer = heapq.heappop(heap)
            if self._peers.get(peer.id) is not peer:
                continue
            if peer.scheduled == when:
                peer.scheduled = None
            try:
                self._fire(peer, now, out)
            except Exception:
                self._c["internal_error"] += 1
            when = peer.timers.earliest()
            if when is not None:
                self._arm(peer, when)
            heap = self._heap  # _arm may have rebuilt it
        return out

    def _fire(self, peer: Peer, now: float, out: list[Datagram]) -> None:
        timers = peer.timers
        for name in timers.expired(now):
            if name == RETRANSMIT:
                started = timers.attempt_start
                if started is not None and now - started >= REKEY_ATTEMPT_TIME:
                    self._give_up(peer, now)
                else:
                    out.extend(self._initiate(peer, now, force=True))
            elif name == SEND_KEEPALIVE:
                out.extend(self._keepalive(peer, now))
                if timers.need_another_keepalive:
                    # More data arrived since the timer was armed: keep answering it.
                    timers.need_another_keepalive = False
                    timers.send_keepalive = now + KEEPALIVE_TIMEOUT
                    self._arm(peer, timers.send_keepalive)
            elif name == NEW_HANDSHAKE:
                # We sent data and heard nothing back for 15 s.
                out.extend(self._initiate(peer, now))
            elif name == ZERO_KEYS:
                self._zero_keys(peer)
            elif name == PERSISTENT_KEEPALIVE:
                if peer.keepalive:
                    out.extend(self._keepalive(peer, now))

    def _give_up(self, peer: Peer, now: float) -> None:
        """REKEY_ATTEMPT_TIME without a session: stop, and drop what was waiting."""
        dropped = len(peer.queue)
        peer.queue.clear()
        peer.drops["handshake_timeout"] += dropped
        self._c["handshake_timeout"] += dropped
        self._c["handshake_giveup"] += 1
        self._drop_handshake(peer)
        peer.timers.handshake_abandoned()
        when = peer.timers.arm_zero_keys_if_idle(now)
        if when is not None:
            self._arm(peer, when)

    def _zero_keys(self, peer: Peer) -> None:
        """3 x REJECT_AFTER_TIME without a new handshake: forget every key of the peer."""
        self._forget_keys(peer)
        self._c["keys_zeroed"] += 1

    def _forget_keys(self, peer: Peer) -> None:
        """The pending handshake and all three sessions of the peer, freed."""
        self._drop_handshake(peer)
        for attr in ("current", "previous", "next"):
            session = getattr(peer, attr)
            if session is not None:
                self._free_session(session)
                setattr(peer, attr, None)

    # -- introspection -------------------------------------------------------------------

    def over_budget(self) -> int:
        """Handshake messages from unknown sources dropped over the budget so far (cheap:
        the link asks before every read batch, to tell a flood)."""
        return self._c["handshake_over_budget"]

    def peer_addresses(self) -> set[str]:
        """The IPv4 addresses of every peer's configured and current endpoint."""
        return {addr[0] for addr in self._by_endpoint}

    @property
    def counters(self) -> dict[str, int]:
        """Global drop and event counters plus data totals (a fresh dict each call)."""
        out = dict(self._c)
        out["rx_bytes"] = self._rx_bytes
        out["tx_bytes"] = self._tx_bytes
        out["rx_packets"] = self._rx_packets
        out["tx_packets"] = self._tx_packets
        out["peers"] = len(self._peers)
        out["indices"] = len(self._index)
        out["rate_limiter_entries"] = len(self._limiter)
        out["rate_limiter_table_full"] = self._limiter.table_full
        return out

    def peers(self, now: float | None = None) -> list[dict[str, Any]]:
        """One dict per peer for ``fabricd get peers`` (ages relative to ``now``, or to
        the last time the core was called)."""
        if now is None:
            now = self._now
        rows = []
        for peer in self._peers.values():
            current = peer.current
            rows.append(
                {
                    "id": peer.id,
                    "public_key": base64.b64encode(peer.public_key).decode(),
                    "endpoint": peer.endpoint,
                    "keepalive": peer.keepalive,
                    "last_handshake": peer.last_handshake,
                    "session_age": None if current is None else now - current.created,
                    "handshake_pending": peer.handshake is not None,
                    "queued": len(peer.queue),
                    "rx_bytes": peer.rx_bytes,
                    "tx_bytes": peer.tx_bytes,
                    "rx_packets": peer.rx_packets,
                    "tx_packets": peer.tx_packets,
                    "drops": dict(peer.drops),
                }
            )
        return rows

    def peer_drop_names(self) -> tuple[str, ...]:
        """The keys of every peer's ``drops`` dict."""
        return PEER_DROPS


def _bucket(rate: float | None) -> TokenBucket | None:
    if rate is None:
        return None
    if not rate > 0:
        raise ValueError("a handshake budget is a positive rate (or None: unbounded)")
    return TokenBucket(rate, max(1.0, rate * BUDGET_BURST_SECONDS))


def _check_numeric(endpoint: Addr) -> None:
    """Sends go to the endpoint as is: a host name would be looked up (blocking) at
    every send on the packet thread. Names are resolved by the caller."""
    try:
        ipaddress.ip_address(endpoint[0])
    except ValueError:
        raise ValueError(f"peer endpoint {endpoint[0]!r} is not a numeric address "
                         "(resolve names before adding the peer)") from None
