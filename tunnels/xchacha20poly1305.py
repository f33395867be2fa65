"""XChaCha20-Poly1305 built from ``cryptography``'s ChaCha20 and ChaCha20Poly1305.

``cryptography`` has no XChaCha, and cookie replies carry a random 24-byte nonce, so we
derive the subkey with HChaCha20 ourselves. HChaCha20 is the ChaCha20 block function
without its final feed-forward addition; one raw ChaCha20 keystream block *is* that
output plus the input state, so subtracting the known input words gives HChaCha20 with
no pure-Python rounds (draft-irtf-cfrg-xchacha-03, sections 2.2 and 2.3).
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

NONCE_LEN = 24
_SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)
_W16 = struct.Struct("<16I")
_W4 = struct.Struct("<4I")
_W8 = struct.Struct("<8I")
_ZERO_BLOCK = bytes(64)
_MASK = 0xFFFFFFFF


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """The 32-byte HChaCha20 subkey of ``key`` and a 16-byte nonce."""
    # cryptography's 16-byte ChaCha20 "nonce" is state words 12..15 (counter then nonce),
    # exactly where HChaCha20 puts its 16-byte input.
    block = Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor().update(_ZERO_BLOCK)
    out = _W16.unpack(block)
    n = _W4.unpack(nonce16)
    words = [(out[i] - _SIGMA[i]) & _MASK for i in range(4)]
    words += [(out[12 + i] - n[i]) & _MASK for i in range(4)]
    return _W8.pack(*words)


def _split(key: bytes, nonce: bytes) -> tuple[ChaCha20Poly1305, bytes]:
    if len(nonce) != NONCE_LEN:
        raise ValueError("XChaCha20-Poly1305 takes a 24-byte nonce")
    return ChaCha20Poly1305(hchacha20(key, nonce[:16])), b"\x00\x00\x00\x00" + nonce[16:]


def encrypt(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """Ciphertext followed by the 16-byte tag."""
    aead, n12 = _split(key, nonce)
    return aead.encrypt(n12, plaintext, ad)


def decrypt(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    """The plaintext; raises ``cryptography.exceptions.InvalidTag`` when not authentic."""
    aead, n12 = _split(key, nonce)
    return aead.decrypt(n12, ciphertext, ad)
