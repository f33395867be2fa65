"""Transport sessions: the two keys a handshake produced, with explicit counters.

noiseprotocol's transport uses an implicit nonce, so one lost UDP datagram would break
every later decrypt. We carry the counter in the message (as WireGuard does) and build
the nonce from it: 4 zero bytes then the counter, 8 bytes little-endian, i.e. exactly
bytes 8..16 of the data message header. One ChaCha20Poly1305 object per direction is
created once per session so the per-packet cost is one AEAD call.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tunnels.messages import DATA_HEADER, TYPE_DATA
from tunnels.replay import ReplayFilter
from tunnels.timers import REJECT_AFTER_TIME, REKEY_AFTER_TIME, REKEY_ON_RECEIVE_AGE

if TYPE_CHECKING:
    from tunnels.peer import Peer

NONCE_PREFIX = b"\x00\x00\x00\x00"
_pack_header = DATA_HEADER.pack
pack_nonce = struct.Struct("<4xQ").pack  # counter -> 12-byte nonce


class Session:
    """One session (WireGuard's "keypair"): send/receive AEADs, counter, replay window."""

    __slots__ = (
        "peer",
        "local_index",
        "remote_index",
        "initiator",
        "created",
        "rekey_at",
        "reject_at",
        "rekey_on_receive_at",
        "send_counter",
        "replay",
        "send_aead",
        "recv_aead",
    )

    def __init__(
        self,
        peer: Peer,
        local_index: int,
        remote_index: int,
        send_key: bytes,
        recv_key: bytes,
        created: float,
        initiator: bool,
    ) -> None:
        self.peer = peer
        self.local_index = local_index
        self.remote_index = remote_index
        self.initiator = initiator
        self.created = created
        # Only the initiator rekeys on age when sending (avoids both sides racing to).
        self.rekey_at = created + (REKEY_AFTER_TIME if initiator else REJECT_AFTER_TIME)
        self.reject_at = created + REJECT_AFTER_TIME
        # ...and, so that a peer that only receives still rekeys in time, on receiving too.
        self.rekey_on_receive_at = created + REKEY_ON_RECEIVE_AGE if initiator else float("inf")
        self.send_counter = 0
        self.replay = ReplayFilter()
        self.send_aead: ChaCha20Poly1305 | None = ChaCha20Poly1305(send_key)
        self.recv_aead: ChaCha20Poly1305 | None = ChaCha20Poly1305(recv_key)

    def seal(self, plaintext: bytes) -> bytes:
        """A complete type-4 message; the caller has checked the counter limits."""
        counter = self.send_counter
        self.send_counter = counter + 1
        return _pack_header(TYPE_DATA, self.remote_index, counter) + self.send_aead.encrypt(
            pack_nonce(counter), plaintext, None
        )

    def open(self, message: bytes) -> bytes:
        """The plaintext of a type-4 message; raises InvalidTag when not authentic.
        (The core inlines this on its hot path.)"""
        return self.recv_aead.decrypt(NONCE_PREFIX + message[8:16], message[16:], None)

    def zero(self) -> None:
        """Drop the key material (Python cannot scrub memory; we drop every reference)."""
        self.send_aead = None
        self.recv_aead = None
        self.reject_at = float("-inf")
        self.rekey_at = float("-inf")
        self.rekey_on_receive_at = float("inf")

    @property
    def alive(self) -> bool:
        return self.send_aead is not None
