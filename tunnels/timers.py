"""WireGuard's protocol timers as plain deadlines: no clock, no threads.

``PeerTimers`` only records *when* each per-peer timer is due; the core decides what to
do when one fires. Each event method returns a deadline it armed (or moved earlier) so
the core can schedule it, and None when the core's schedule is already early enough.
"""

from __future__ import annotations

REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
REKEY_TIMEOUT_JITTER_MAX_MS = 333
KEEPALIVE_TIMEOUT = 10.0
ZERO_KEYS_AFTER = 3 * REJECT_AFTER_TIME
# The initiator of a session rekeys on *receiving* once the session is this old, so a peer
# that only receives still gets fresh keys before REJECT_AFTER_TIME.
REKEY_ON_RECEIVE_AGE = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
# We sent data and heard nothing back for this long: the session is probably dead.
NEW_HANDSHAKE_AFTER = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT

RETRANSMIT = "retransmit"
SEND_KEEPALIVE = "send_keepalive"
NEW_HANDSHAKE = "new_handshake"
ZERO_KEYS = "zero_keys"
PERSISTENT_KEEPALIVE = "persistent_keepalive"


class PeerTimers:
    """The five per-peer deadlines (None = not armed) and the state they depend on."""

    __slots__ = (
        "retransmit",
        "send_keepalive",
        "new_handshake",
        "zero_keys",
        "persistent",
        "need_another_keepalive",
        "attempt_start",
    )

    def __init__(self) -> None:
        self.retransmit: float | None = None
        self.send_keepalive: float | None = None
        self.new_handshake: float | None = None
        self.zero_keys: float | None = None
        self.persistent: float | None = None
        self.need_another_keepalive = False
        # When the current series of handshake attempts began (for REKEY_ATTEMPT_TIME).
        self.attempt_start: float | None = None

    def earliest(self) -> float | None:
        """The next deadline of any kind."""
        best = None
        for when in (
            self.retransmit,
            self.send_keepalive,
            self.new_handshake,
            self.zero_keys,
            self.persistent,
        ):
            if when is not None and (best is None or when < best):
                best = when
        return best

    # -- events (names follow wireguard-go's timers.go) --------------------------------

    def data_sent(self, now: float, jitter: float) -> float | None:
        """We sent data: expect to hear back within KEEPALIVE_TIMEOUT + REKEY_TIMEOUT."""
        if self.new_handshake is None:
            self.new_handshake = now + NEW_HANDSHAKE_AFTER + jitter
            return self.new_handshake
        return None

    def data_received(self, now: float) -> float | None:
        """We received data: answer within KEEPALIVE_TIMEOUT, with a keepalive if need be."""
        if self.send_keepalive is None:
            self.send_keepalive = now + KEEPALIVE_TIMEOUT
            return self.send_keepalive
        self.need_another_keepalive = True
        return None

    def authenticated_sent(self) -> None:
        """Anything we send is as good as a keepalive."""
        self.send_keepalive = None

    def authenticated_received(self) -> None:
        """Anything authentic from the peer shows the session is alive."""
        self.new_handshake = None

    def traversal(self, now: float, interval: float | None) -> float | None:
        """Any authenticated packet either way postpones the persistent keepalive."""
        if not interval:
            return None
        was = self.persistent
        self.persistent = now + interval
        return self.persistent if was is None or self.persistent < was else None

    def handshake_initiated(self, now: float, jitter: float) -> float:
        """We sent an initiation: retry after REKEY_TIMEOUT + jitter unless answered."""
        if self.attempt_start is None:
            self.attempt_start = now
        self.retransmit = now + REKEY_TIMEOUT + jitter
        return self.retransmit

    def initiate_now(self) -> float:
        """Start a handshake at the next timer run (a peer just added or given an
        address), then retry on the normal schedule; 0.0 is "already due"."""
        if self.retransmit is None or self.retransmit > 0.0:
            self.retransmit = 0.0
        return 0.0

    def handshake_complete(self) -> None:
        """A session is confirmed: stop retrying."""
        self.retransmit = None
        self.attempt_start = None
        self.need_another_keepalive = False

    def handshake_abandoned(self) -> None:
        """We gave up (REKEY_ATTEMPT_TIME) or were told to: no retries, no keepalive."""
        self.retransmit = None
        self.attempt_start = None
        self.send_keepalive = None

    def session_derived(self, now: float) -> float:
        """New keys: forget every key if no handshake happens for 3 x REJECT_AFTER_TIME."""
        self.zero_keys = now + ZERO_KEYS_AFTER
        return self.zero_keys

    def arm_zero_keys_if_idle(self, now: float) -> float | None:
        """After giving up, still wipe whatever keys remain in time."""
        if self.zero_keys is None:
            self.zero_keys = now + ZERO_KEYS_AFTER
            return self.zero_keys
        return None

    def expired(self, now: float) -> list[str]:
        """Which timers are due at ``now``; each one returned is disarmed."""
        fired = []
        if self.retransmit is not None and self.retransmit <= now:
            self.retransmit = None
            fired.append(RETRANSMIT)
        if self.send_keepalive is not None and self.send_keepalive <= now:
            self.send_keepalive = None
            fired.append(SEND_KEEPALIVE)
        if self.new_handshake is not None and self.new_handshake <= now:
            self.new_handshake = None
            fired.append(NEW_HANDSHAKE)
        if self.zero_keys is not None and self.zero_keys <= now:
            self.zero_keys = None
            fired.append(ZERO_KEYS)
        if self.persistent is not None and self.persistent <= now:
            self.persistent = None
            fired.append(PERSISTENT_KEEPALIVE)
        return fired

    def clear(self) -> None:
        """Disarm everything (peer removed, keys wiped)."""
        self.retransmit = self.send_keepalive = self.new_handshake = None
        self.zero_keys = self.persistent = None
        self.need_another_keepalive = False
        self.attempt_start = None
