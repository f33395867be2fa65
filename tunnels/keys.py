"""Curve25519 key helpers: a worker's identity is one static X25519 key pair."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_LEN = 32


def public_key(private: bytes) -> bytes:
    """The 32-byte public key of a 32-byte private key (any 32 bytes are a valid scalar)."""
    if len(private) != KEY_LEN:
        raise ValueError("an X25519 private key is 32 bytes")
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )


def generate_keypair(rng=os.urandom) -> tuple[bytes, bytes]:
    """A fresh (private, public) pair; the private key comes straight from ``rng``."""
    private = bytes(rng(KEY_LEN))
    return private, public_key(private)
