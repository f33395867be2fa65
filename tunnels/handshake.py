"""Noise_IKpsk2 handshake messages, through the ``noiseprotocol`` package.

The package is used for the handshake only, and with care:

* it deletes its handshake state (and the remote static key it learned) once the last
  message is processed, so the responder reads the initiator's static key right after
  message 1, before writing message 2;
* its transport uses implicit nonces, useless over UDP, so we keep only the two split
  keys and do transport ourselves (``transport.py``);
* it raises assorted exceptions on hostile input (bad tags, low-order points), so every
  call is wrapped and a failure is a ``None`` the core counts.
"""

from __future__ import annotations

from noise.backends.default.keypairs import KeyPair25519
from noise.connection import NoiseConnection

from tunnels.messages import NOISE_MSG1_LEN, NOISE_MSG2_LEN, PROLOGUE, PROTOCOL_NAME
from tunnels.tai64n import TAI64N_LEN

ZERO_PSK = bytes(32)


class NoiseContext:
    """Our static key and the cluster psk, shared by every handshake of a core."""

    def __init__(self, private_key: bytes, psk: bytes | None) -> None:
        if psk is not None and len(psk) != 32:
            raise ValueError("the psk is 32 bytes")
        self.static = KeyPair25519.from_private_bytes(private_key)
        self.public = self.static.public_bytes
        self.psk = psk if psk is not None else ZERO_PSK

    def _connection(self, initiator: bool) -> NoiseConnection:
        conn = NoiseConnection.from_name(PROTOCOL_NAME)
        conn.set_psks(self.psk)
        conn.set_prologue(PROLOGUE)
        if initiator:
            conn.set_as_initiator()
        else:
            conn.set_as_responder()
        conn.noise_protocol.keypairs["s"] = self.static
        return conn

    @staticmethod
    def _set_ephemeral(conn: NoiseConnection, ephemeral: bytes) -> None:
        # Set on the live handshake state, after validate(), so the library does not warn
        # about a preset ephemeral; the bytes come from the core's rng.
        conn.noise_protocol.handshake_state.e = KeyPair25519.from_private_bytes(ephemeral)

    def create_initiation(
        self, remote: KeyPair25519, ephemeral: bytes, timestamp: bytes
    ) -> tuple[NoiseConnection, bytes] | None:
        """Noise message 1 (108 bytes) towards ``remote``, carrying ``timestamp``."""
        try:
            conn = self._connection(initiator=True)
            conn.noise_protocol.keypairs["rs"] = remote
            conn.start_handshake()
            self._set_ephemeral(conn, ephemeral)
            msg = bytes(conn.write_message(timestamp))
        except Exception:  # the library's errors are not a stable API
            return None
        if len(msg) != NOISE_MSG1_LEN:
            return None
        return conn, msg

    def consume_initiation(self, msg1: bytes) -> tuple[NoiseConnection, bytes, bytes] | None:
        """Read message 1: (state, initiator's static public key, timestamp) or None."""
        try:
            conn = self._connection(initiator=False)
            conn.start_handshake()
            payload = bytes(conn.read_message(msg1))
            # Must be read now: the library deletes it when the handshake completes.
            remote_static = conn.noise_protocol.handshake_state.rs.public_bytes
        except Exception:
            return None
        if len(payload) != TAI64N_LEN:
            return None
        return conn, remote_static, payload

    def create_response(
        self, conn: NoiseConnection, ephemeral: bytes
    ) -> tuple[bytes, bytes, bytes] | None:
        """Noise message 2 (48 bytes) and our (send_key, receive_key)."""
        try:
            self._set_ephemeral(conn, ephemeral)
            msg = bytes(conn.write_message(b""))
            keys = _split_keys(conn)
        except Exception:
            return None
        if len(msg) != NOISE_MSG2_LEN:
            return None
        return msg, keys[0], keys[1]

    @staticmethod
    def consume_response(conn: NoiseConnection, msg2: bytes) -> tuple[bytes, bytes] | None:
        """Read message 2 on our pending initiation: (send_key, receive_key) or None.

        Anyone who saw our initiation can answer it with garbage; the library mutates its
        state before the tag check fails, so we snapshot and restore around the read and a
        forged response cannot kill the genuine one that follows.
        """
        snap = _snapshot(conn)
        try:
            payload = conn.read_message(msg2)
            if len(payload) != 0:
                return None
            return _split_keys(conn)
        except Exception:
            if snap is not None:
                _restore(conn, snap)
            return None


def _snapshot(conn: NoiseConnection) -> tuple | None:
    """What ``read_message`` changes before it can fail (noiseprotocol 0.3.1 internals)."""
    try:
        proto = conn.noise_protocol
        hs = proto.handshake_state
        sym = hs.symmetric_state
        cs = sym.cipher_state
        return (
            list(hs.message_patterns),
            hs.re,
            sym.h,
            sym.ck,
            cs.k,
            cs.n,
            list(proto.psks),
            conn._next_fn,
        )
    except Exception:
        return None


def _restore(conn: NoiseConnection, snap: tuple) -> None:
    proto = conn.noise_protocol
    hs = proto.handshake_state
    sym = hs.symmetric_state
    cs = sym.cipher_state
    patterns, re_, h, ck, k, n, psks, next_fn = snap
    hs.message_patterns = patterns
    hs.re = re_
    sym.h = h
    sym.ck = ck
    cs.initialize_key(k)
    cs.n = n
    proto.psks = psks
    conn._next_fn = next_fn


def _split_keys(conn: NoiseConnection) -> tuple[bytes, bytes]:
    """The transport keys Noise split into, as (ours to send, ours to receive)."""
    proto = conn.noise_protocol
    send_key = proto.cipher_state_encrypt.k
    recv_key = proto.cipher_state_decrypt.k
    if len(send_key) != 32 or len(recv_key) != 32:
        raise ValueError("split produced no keys")
    return bytes(send_key), bytes(recv_key)
