"""mac1/mac2 and cookie replies: cheap DoS defence in front of the expensive handshake.

mac1 proves the sender knows our static public key (it stops blind scanning for free).
mac2 proves the sender can receive at its source address: under load we answer
initiations without it with a cookie reply instead of doing the Diffie-Hellmans, so a
spoofed flood costs us one BLAKE2s and one small AEAD per packet.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable

from cryptography.exceptions import InvalidTag

from tunnels import xchacha20poly1305
from tunnels.messages import (
    COOKIE_NONCE_LEN,
    COOKIE_REPLY_LEN,
    INDEX_HEADER,
    LABEL_COOKIE,
    LABEL_MAC1,
    MAC_LEN,
    TYPE_COOKIE_REPLY,
)

COOKIE_SECRET_MAX_AGE = 120.0
# A sender stops using a cookie a little before the responder's secret can rotate under it.
COOKIE_USE_MAX_AGE = COOKIE_SECRET_MAX_AGE - 5.0
_ZERO_MAC = bytes(MAC_LEN)


def hash32(data: bytes) -> bytes:
    """HASH() of the protocol: unkeyed BLAKE2s-256."""
    return hashlib.blake2s(data).digest()


def mac16(key: bytes, data: bytes) -> bytes:
    """MAC() of the protocol: keyed BLAKE2s-128."""
    return hashlib.blake2s(data, digest_size=MAC_LEN, key=key).digest()


def address_bytes(addr: tuple) -> bytes:
    """The bytes a cookie binds to: packed IP then big-endian port (never raises)."""
    try:
        host, port = addr[0], int(addr[1])
        try:
            packed = ipaddress.ip_address(host).packed
        except ValueError:
            packed = str(host).encode("utf-8", "replace")
        return packed + (port & 0xFFFF).to_bytes(2, "big")
    except (TypeError, ValueError, IndexError):
        return repr(addr).encode("utf-8", "replace")


class CookieChecker:
    """The receiving side for messages sent to us: verify mac1/mac2, mint cookie replies."""

    def __init__(self, local_public: bytes, rng: Callable[[int], bytes]) -> None:
        self.mac1_key = hash32(LABEL_MAC1 + local_public)
        self.cookie_key = hash32(LABEL_COOKIE + local_public)
        self._rng = rng
        self._secret = b""
        self._secret_at = float("-inf")

    def check_mac1(self, msg: bytes, mac1_at: int) -> bool:
        """mac1 over everything before it, keyed with our public key."""
        want = mac16(self.mac1_key, msg[:mac1_at])
        return hmac.compare_digest(want, msg[mac1_at : mac1_at + MAC_LEN])

    def _cookie(self, src: tuple, now: float) -> bytes:
        # Lazy rotation: the secret is replaced at first use after it is 120 s old (or if
        # the clock went backwards), which is all a periodic timer would achieve.
        if not self._secret_at <= now < self._secret_at + COOKIE_SECRET_MAX_AGE:
            self._secret = bytes(self._rng(32))
            self._secret_at = now
        return mac16(self._secret, address_bytes(src))

    def check_mac2(self, msg: bytes, mac2_at: int, src: tuple, now: float) -> bool:
        """mac2 over everything before it, keyed with the cookie of ``src``."""
        want = mac16(self._cookie(src, now), msg[:mac2_at])
        return hmac.compare_digest(want, msg[mac2_at : mac2_at + MAC_LEN])

    def create_reply(
        self, msg: bytes, mac1_at: int, receiver_index: int, src: tuple, now: float
    ) -> bytes:
        """A type-3 message carrying the cookie of ``src``, bound to the message's mac1."""
        nonce = bytes(self._rng(COOKIE_NONCE_LEN))
        mac1 = msg[mac1_at : mac1_at + MAC_LEN]
        sealed = xchacha20poly1305.encrypt(self.cookie_key, nonce, self._cookie(src, now), mac1)
        return INDEX_HEADER.pack(TYPE_COOKIE_REPLY, receiver_index) + nonce + sealed


class CookieGenerator:
    """The sending side towards one peer: add mac1/mac2, and take the cookies it sends us."""

    def __init__(self, remote_public: bytes) -> None:
        self.mac1_key = hash32(LABEL_MAC1 + remote_public)
        self.cookie_key = hash32(LABEL_COOKIE + remote_public)
        self.cookie: bytes | None = None
        self.cookie_at = 0.0
        self.last_mac1: bytes | None = None

    def add_macs(self, body: bytes, now: float) -> bytes:
        """``body`` + mac1 + mac2 (zeros when we hold no fresh cookie)."""
        mac1 = mac16(self.mac1_key, body)
        self.last_mac1 = mac1
        body += mac1
        cookie = self.cookie
        if cookie is not None and self.cookie_at <= now < self.cookie_at + COOKIE_USE_MAX_AGE:
            return body + mac16(cookie, body)
        return body + _ZERO_MAC

    def consume_reply(self, reply: bytes, now: float) -> bool:
        """Store the cookie of a type-3 message; False if it does not answer our last mac1."""
        if self.last_mac1 is None or len(reply) != COOKIE_REPLY_LEN:
            return False
        nonce = reply[8 : 8 + COOKIE_NONCE_LEN]
        try:
            cookie = xchacha20poly1305.decrypt(
                self.cookie_key, nonce, reply[8 + COOKIE_NONCE_LEN :], self.last_mac1
            )
        except InvalidTag:
            return False
        self.cookie = cookie
        self.cookie_at = now
        return True
