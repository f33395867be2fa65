"""Independent reference implementation of ``Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s``.

Written from the Noise Protocol Framework specification (revision 34), sections 4 (crypto
functions), 5 (CipherState / SymmetricState / HandshakeState), 7 (IK pattern) and 9 (the
``psk`` modifier). It exists only to cross-check the tunnel code and the ``noiseprotocol``
package in tests, so it favours readability over speed and shares no code with either.

    IKpsk2:
      <- s
      ...
      -> e, es, s, ss
      <- e, ee, se, psk

Because this is a psk handshake, every ``e`` token also calls ``MixKey(e.public_key)``
after ``MixHash(e.public_key)`` (spec section 9.2).
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

PROTOCOL_NAME = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
PROLOGUE = b"fabricd tunnel v1"
ZERO_PSK = bytes(32)

HASHLEN = 32
BLOCKLEN = 64
DHLEN = 32
KEYLEN = 32
TAGLEN = 16
MAX_NONCE = 2**64 - 1  # reserved by the spec; never used for encryption


class HandshakeError(Exception):
    """A handshake message failed to authenticate, was malformed or came out of order."""


# --- crypto functions (spec section 4) ----------------------------------------------------


def hash_(data: bytes) -> bytes:
    """HASH(): BLAKE2s with a 32-byte digest."""
    return hashlib.blake2s(data, digest_size=HASHLEN).digest()


def hmac_hash(key: bytes, data: bytes) -> bytes:
    """HMAC-HASH() per RFC 2104 with BLAKE2s and a 64-byte block (not BLAKE2s keyed mode)."""
    if len(key) > BLOCKLEN:
        key = hash_(key)
    key = key.ljust(BLOCKLEN, b"\x00")
    ipad = bytes(b ^ 0x36 for b in key)
    opad = bytes(b ^ 0x5C for b in key)
    return hash_(opad + hash_(ipad + data))


def hkdf(chaining_key: bytes, input_key_material: bytes, num_outputs: int) -> tuple[bytes, ...]:
    """HKDF() as defined by the spec: 2 or 3 outputs of HASHLEN bytes each."""
    if num_outputs not in (2, 3):
        raise ValueError("num_outputs must be 2 or 3")
    temp_key = hmac_hash(chaining_key, input_key_material)
    output1 = hmac_hash(temp_key, b"\x01")
    output2 = hmac_hash(temp_key, output1 + b"\x02")
    if num_outputs == 2:
        return output1, output2
    output3 = hmac_hash(temp_key, output2 + b"\x03")
    return output1, output2, output3


def public_key(private: bytes) -> bytes:
    """The raw 32-byte X25519 public key for a raw 32-byte private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def generate_private() -> bytes:
    """GENERATE_KEYPAIR(), returning only the raw private key."""
    return X25519PrivateKey.generate().private_bytes_raw()


def dh(private: bytes, public: bytes) -> bytes:
    """DH(): X25519 of a raw private key and a raw public key."""
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(public)
        )
    except ValueError as exc:  # e.g. a low-order point giving an all-zero shared secret
        raise HandshakeError(f"DH failed: {exc}") from exc


def nonce_bytes(n: int) -> bytes:
    """ChaChaPoly nonce: 32 bits of zeros followed by the little-endian 64-bit counter."""
    return b"\x00" * 4 + n.to_bytes(8, "little")


def encrypt(k: bytes, n: int, ad: bytes, plaintext: bytes) -> bytes:
    """ENCRYPT(k, n, ad, plaintext) with ChaCha20-Poly1305."""
    if not 0 <= n < MAX_NONCE:
        raise ValueError("nonce out of range")
    return ChaCha20Poly1305(k).encrypt(nonce_bytes(n), plaintext, ad)


def decrypt(k: bytes, n: int, ad: bytes, ciphertext: bytes) -> bytes:
    """DECRYPT(k, n, ad, ciphertext); raises HandshakeError on authentication failure."""
    if not 0 <= n < MAX_NONCE:
        raise ValueError("nonce out of range")
    try:
        return ChaCha20Poly1305(k).decrypt(nonce_bytes(n), ciphertext, ad)
    except InvalidTag as exc:
        raise HandshakeError("authentication failed") from exc


# --- state objects (spec section 5) -------------------------------------------------------


class CipherState:
    """Key ``k`` (or None when empty) and nonce counter ``n``."""

    def __init__(self, k: bytes | None = None) -> None:
        self.k = k
        self.n = 0

    def has_key(self) -> bool:
        """True once a key has been installed."""
        return self.k is not None

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        """Encrypt with the next nonce, or pass through when there is no key yet."""
        if self.k is None:
            return plaintext
        ciphertext = encrypt(self.k, self.n, ad, plaintext)
        self.n += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """Decrypt with the next nonce (not advanced on failure), or pass through."""
        if self.k is None:
            return ciphertext
        plaintext = decrypt(self.k, self.n, ad, ciphertext)
        self.n += 1
        return plaintext


class SymmetricState:
    """Chaining key ``ck``, handshake hash ``h`` and the handshake CipherState."""

    def __init__(self, protocol_name: bytes) -> None:
        if len(protocol_name) <= HASHLEN:
            self.h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            self.h = hash_(protocol_name)
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, input_key_material: bytes) -> None:
        """MixKey(): new ck and a fresh cipher key (HASHLEN == KEYLEN, so no truncation)."""
        self.ck, temp_k = hkdf(self.ck, input_key_material, 2)
        self.cipher = CipherState(temp_k)

    def mix_hash(self, data: bytes) -> None:
        """MixHash(): h = HASH(h || data)."""
        self.h = hash_(self.h + data)

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        """MixKeyAndHash(): used for the psk token."""
        self.ck, temp_h, temp_k = hkdf(self.ck, input_key_material, 3)
        self.mix_hash(temp_h)
        self.cipher = CipherState(temp_k)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        """EncryptAndHash(): encrypt with h as associated data, then mix the ciphertext."""
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """DecryptAndHash(): decrypt with h as associated data, then mix the ciphertext."""
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        """Split(): (initiator->responder key, responder->initiator key)."""
        temp_k1, temp_k2 = hkdf(self.ck, b"", 2)
        return temp_k1, temp_k2


class _HandshakeState:
    """HandshakeState for IKpsk2; the public classes below drive it message by message."""

    def __init__(
        self,
        initiator: bool,
        s_priv: bytes,
        rs_pub: bytes | None,
        psk: bytes,
        prologue: bytes,
        e_priv: bytes | None,
    ) -> None:
        if len(s_priv) != DHLEN or len(psk) != 32:
            raise ValueError("static private key and psk must be 32 bytes")
        self.initiator = initiator
        self.ss = SymmetricState(PROTOCOL_NAME)
        self.ss.mix_hash(prologue)
        self.s_priv = s_priv
        self.s_pub = public_key(s_priv)
        self.e_priv = e_priv
        self.e_pub: bytes | None = None
        self.rs: bytes | None = rs_pub
        self.re: bytes | None = None
        self.psk = psk
        # Pre-message "<- s": both sides hash the responder's static public key.
        self.ss.mix_hash(rs_pub if initiator else self.s_pub)
        self.done = False

    # token helpers ------------------------------------------------------------------------

    def _write_e(self) -> bytes:
        if self.e_priv is None:
            self.e_priv = generate_private()
        self.e_pub = public_key(self.e_priv)
        self.ss.mix_hash(self.e_pub)
        self.ss.mix_key(self.e_pub)  # psk modifier rule for "e"
        return self.e_pub

    def _read_e(self, message: bytes) -> bytes:
        if len(message) < DHLEN:
            raise HandshakeError("message too short for e")
        self.re, rest = message[:DHLEN], message[DHLEN:]
        self.ss.mix_hash(self.re)
        self.ss.mix_key(self.re)  # psk modifier rule for "e"
        return rest

    def _dh(self, local: str, remote: str) -> bytes:
        priv = self.e_priv if local == "e" else self.s_priv
        pub = self.re if remote == "e" else self.rs
        assert priv is not None and pub is not None
        return dh(priv, pub)

    def mix_es(self) -> None:
        """es: DH(e, rs) for the initiator, DH(s, re) for the responder."""
        self.ss.mix_key(self._dh("e", "s") if self.initiator else self._dh("s", "e"))

    def mix_se(self) -> None:
        """se: DH(s, re) for the initiator, DH(e, rs) for the responder."""
        self.ss.mix_key(self._dh("s", "e") if self.initiator else self._dh("e", "s"))

    def mix_ss(self) -> None:
        """ss: DH(s, rs)."""
        self.ss.mix_key(self._dh("s", "s"))

    def mix_ee(self) -> None:
        """ee: DH(e, re)."""
        self.ss.mix_key(self._dh("e", "e"))

    def split(self) -> tuple[bytes, bytes]:
        """Transport keys as (k_send, k_recv) for this side."""
        if not self.done:
            raise HandshakeError("handshake not finished")
        k1, k2 = self.ss.split()
        return (k1, k2) if self.initiator else (k2, k1)


class _Role:
    """Shared accessors for Initiator and Responder."""

    _hs: _HandshakeState

    @property
    def h(self) -> bytes:
        """The current handshake hash (the final one once the handshake is done)."""
        return self._hs.ss.h

    @property
    def ck(self) -> bytes:
        """The current chaining key."""
        return self._hs.ss.ck

    @property
    def rs(self) -> bytes | None:
        """The remote static public key (learned from message 1 on the responder)."""
        return self._hs.rs

    @property
    def e_pub(self) -> bytes | None:
        """Our ephemeral public key, once written."""
        return self._hs.e_pub

    def split(self) -> tuple[bytes, bytes]:
        """Split() after the handshake: (k_send, k_recv) for this side."""
        return self._hs.split()


class Initiator(_Role):
    """The IK initiator: knows the responder's static key in advance."""

    def __init__(
        self,
        s_priv: bytes,
        rs_pub: bytes,
        psk: bytes = ZERO_PSK,
        prologue: bytes = PROLOGUE,
        e_priv: bytes | None = None,
    ) -> None:
        self._hs = _HandshakeState(True, s_priv, rs_pub, psk, prologue, e_priv)
        self._step = 0

    def write_message_1(self, payload: bytes = b"") -> bytes:
        """-> e, es, s, ss  (then the encrypted payload)."""
        if self._step != 0:
            raise HandshakeError("message 1 already written")
        self._step = 1
        hs = self._hs
        out = hs._write_e()
        hs.mix_es()
        out += hs.ss.encrypt_and_hash(hs.s_pub)
        hs.mix_ss()
        return out + hs.ss.encrypt_and_hash(payload)

    def read_message_2(self, message: bytes) -> bytes:
        """<- e, ee, se, psk  (then the encrypted payload); returns the payload."""
        if self._step != 1:
            raise HandshakeError("message 2 not expected now")
        self._step = 2
        hs = self._hs
        if len(message) < DHLEN + TAGLEN:
            raise HandshakeError("message 2 too short")
        rest = hs._read_e(message)
        hs.mix_ee()
        hs.mix_se()
        hs.ss.mix_key_and_hash(hs.psk)
        payload = hs.ss.decrypt_and_hash(rest)
        hs.done = True
        return payload


class Responder(_Role):
    """The IK responder: learns the initiator's static key from message 1."""

    def __init__(
        self,
        s_priv: bytes,
        psk: bytes = ZERO_PSK,
        prologue: bytes = PROLOGUE,
        e_priv: bytes | None = None,
    ) -> None:
        self._hs = _HandshakeState(False, s_priv, None, psk, prologue, e_priv)
        self._step = 0

    def read_message_1(self, message: bytes) -> bytes:
        """-> e, es, s, ss  (then the encrypted payload); returns the payload."""
        if self._step != 0:
            raise HandshakeError("message 1 already read")
        self._step = 1
        hs = self._hs
        if len(message) < DHLEN + DHLEN + TAGLEN + TAGLEN:
            raise HandshakeError("message 1 too short")
        rest = hs._read_e(message)
        hs.mix_es()
        enc_s, rest = rest[: DHLEN + TAGLEN], rest[DHLEN + TAGLEN :]
        hs.rs = hs.ss.decrypt_and_hash(enc_s)
        hs.mix_ss()
        return hs.ss.decrypt_and_hash(rest)

    def write_message_2(self, payload: bytes = b"") -> bytes:
        """<- e, ee, se, psk  (then the encrypted payload)."""
        if self._step != 1:
            raise HandshakeError("message 2 not expected now")
        self._step = 2
        hs = self._hs
        out = hs._write_e()
        hs.mix_ee()
        hs.mix_se()
        hs.ss.mix_key_and_hash(hs.psk)
        out += hs.ss.encrypt_and_hash(payload)
        hs.done = True
        return out


class Transport:
    """Transport-phase cipher with an explicit counter, as the tunnel data path uses."""

    def __init__(self, k_send: bytes, k_recv: bytes) -> None:
        self.k_send = k_send
        self.k_recv = k_recv
        self.send_counter = 0

    def seal(self, plaintext: bytes, ad: bytes = b"") -> tuple[int, bytes]:
        """Encrypt with the next send counter; returns (counter, ciphertext)."""
        counter = self.send_counter
        self.send_counter += 1
        return counter, encrypt(self.k_send, counter, ad, plaintext)

    def open(self, counter: int, ciphertext: bytes, ad: bytes = b"") -> bytes:
        """Decrypt a message received with an explicit counter."""
        return decrypt(self.k_recv, counter, ad, ciphertext)
