"""Cross-checks of the tunnel's Noise handshake (Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s).

Two independent implementations are compared: ``tests/unit/noise_ref.py`` (written from the
Noise spec) and the ``noiseprotocol`` package the tunnel uses. They must interoperate in both
directions, agree byte for byte given the same keys, and match the vectors pinned below, so a
change to either side (or to the protocol parameters) fails here.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import warnings
from types import ModuleType

import pytest
from cryptography.exceptions import InvalidTag
from noise.backends.default.keypairs import KeyPair25519
from noise.connection import Keypair, NoiseConnection

from tests.unit import noise_ref as ref


def _key(label: str) -> bytes:
    """A fixed 32-byte key derived from a readable label."""
    return hashlib.blake2s(f"fabricd test: {label}".encode()).digest()


I_S = _key("initiator static")
R_S = _key("responder static")
I_E = _key("initiator ephemeral")
R_E = _key("responder ephemeral")
PSK = _key("psk")
OTHER_PSK = _key("other psk")
# 12-byte TAI64N-style timestamp, the payload the tunnel puts in message 1.
TIMESTAMP = struct.pack(">QI", 0x4000000065A0BC00, 123456789)

I_S_PUB = bytes.fromhex("50e8753d476e3bca7e1b73843f4068833f3ffcf5711e75c189d94b9a4bf2624e")
R_S_PUB = bytes.fromhex("218e2ff50c0c8aa652ae0cfb4e2e4653ad3a5c3e77b3e06fc716ae34731b681f")

# Pinned outputs for the fixed keys above, message 1 payload TIMESTAMP, message 2 empty.
# Message 1 = e (32) | enc(s) (48) | enc(payload) (28); message 2 = e (32) | enc(empty) (16).
VECTORS = {
    "zero-psk": {
        "psk": ref.ZERO_PSK,
        "msg1": "1a85f773076ca03c70dbe85e82b664dbd69a6a9ff09851c421cd1d7f8a951158"
        "e291773cfdbbf0bdad65c92888e312e062361a576ff60679ab890887fe9776c4"
        "3be0840ff59cce462828ba9c9234392f18ae5b7c2830d984467c77c508dd1e1d"
        "81e5bda5f52d03af4d2430d2",
        "msg2": "b784a67d953a4cacb5f96b84b598dbdb653a1b1fff7f75001ee8ae5fa553a721"
        "3377d3d8856bb752635ec76488019774",
        "h": "5a8ccfa06a06df7c70a7464004c164997efcf6ba0061c99479dd58d23a2f8d07",
        "k_i2r": "e803c03b621ecd34de764c427c1898d898ce0aed7b7ce0c7d07d431aa13b228b",
        "k_r2i": "a8ccca6055b9846b26c5c45b44e65331e12d659826a2df48cc63e938ba0cbb4e",
        "ping0": "cc0789f5192a2068b2c71d76dd6d3ddbae254e7c",
    },
    "psk": {
        "psk": PSK,
        # Message 1 does not depend on a psk2 psk, so it equals the zero-psk one.
        "msg1": "1a85f773076ca03c70dbe85e82b664dbd69a6a9ff09851c421cd1d7f8a951158"
        "e291773cfdbbf0bdad65c92888e312e062361a576ff60679ab890887fe9776c4"
        "3be0840ff59cce462828ba9c9234392f18ae5b7c2830d984467c77c508dd1e1d"
        "81e5bda5f52d03af4d2430d2",
        "msg2": "b784a67d953a4cacb5f96b84b598dbdb653a1b1fff7f75001ee8ae5fa553a721"
        "1a0d23416a31b1bc18d2f534ae8dbf33",
        "h": "d9dcd1991dd90d236da95f0b49170f0df1cbc440e1519b28f858d2c86571f379",
        "k_i2r": "33e4d9b2a6fec555c3b22024143a5208d888c36febda2441cdae75e3afe91ac8",
        "k_r2i": "487374c393ca7cc26d4c83c9e80ebad3f17c5d11e811f2d252ae8bac3e2a4194",
        "ping0": "55e5155ab19f64bf5b9e92226d0d841b4333d034",
    },
}
PSK_CASES = [pytest.param(ref.ZERO_PSK, id="zero-psk"), pytest.param(PSK, id="psk")]


# --- helpers ------------------------------------------------------------------------------


def np_conn(
    initiator: bool,
    s_priv: bytes,
    rs_pub: bytes | None = None,
    psk: bytes = ref.ZERO_PSK,
    e_priv: bytes | None = None,
    prologue: bytes = ref.PROLOGUE,
) -> NoiseConnection:
    """A started noiseprotocol connection with the tunnel's parameters."""
    conn = NoiseConnection.from_name(ref.PROTOCOL_NAME)
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.set_prologue(prologue)
    conn.set_psks(psk)
    conn.set_keypair_from_private_bytes(Keypair.STATIC, s_priv)
    if rs_pub is not None:
        conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, rs_pub)
    if e_priv is not None:
        # Injected ephemerals are test-only; noiseprotocol warns about them.
        conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, e_priv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        conn.start_handshake()
    return conn


def np_keys(conn: NoiseConnection) -> tuple[bytes, bytes]:
    """(k_send, k_recv) of a finished noiseprotocol connection."""
    proto = conn.noise_protocol
    return proto.cipher_state_encrypt.k, proto.cipher_state_decrypt.k


def check_transport(conn: NoiseConnection, k_send: bytes, k_recv: bytes) -> None:
    """noiseprotocol transport (implicit counters from 0) <-> explicit-counter reference."""
    ours = ref.Transport(k_send, k_recv)
    for i in range(3):
        msg = f"from noiseprotocol #{i}".encode() + os.urandom(i * 7)
        assert ours.open(i, conn.encrypt(msg)) == msg
    for i in range(3):
        msg = f"from reference #{i}".encode() + os.urandom(i * 5)
        counter, ct = ours.seal(msg)
        assert counter == i
        assert conn.decrypt(ct) == msg
    # Counters really are part of the nonce: a message opened under the wrong one fails.
    ct = conn.encrypt(b"counter 3")
    with pytest.raises(ref.HandshakeError):
        ours.open(4, ct)
    assert ours.open(3, ct) == b"counter 3"


def ref_pair(psk: bytes) -> tuple[ref.Initiator, ref.Responder]:
    """A fixed-key reference initiator/responder pair."""
    return ref.Initiator(I_S, R_S_PUB, psk, e_priv=I_E), ref.Responder(R_S, psk, e_priv=R_E)


def flip(data: bytes, bit: int) -> bytes:
    """data with one bit inverted."""
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# --- primitives ---------------------------------------------------------------------------


def test_fixed_public_keys() -> None:
    assert ref.public_key(I_S) == I_S_PUB
    assert ref.public_key(R_S) == R_S_PUB


@pytest.mark.parametrize("key_len", [0, 16, 32, 64, 65, 200])
def test_hmac_blake2s_matches_stdlib(key_len: int) -> None:
    key = bytes(range(256))[:key_len]
    for data in (b"", b"\x01", os.urandom(100)):
        assert ref.hmac_hash(key, data) == hmac.new(key, data, hashlib.blake2s).digest()


def test_hkdf_structure() -> None:
    ck, ikm = _key("ck"), _key("ikm")
    o1, o2, o3 = ref.hkdf(ck, ikm, 3)
    assert ref.hkdf(ck, ikm, 2) == (o1, o2)
    t = hmac.new(ck, ikm, hashlib.blake2s).digest()
    assert o1 == hmac.new(t, b"\x01", hashlib.blake2s).digest()
    assert o2 == hmac.new(t, o1 + b"\x02", hashlib.blake2s).digest()
    assert o3 == hmac.new(t, o2 + b"\x03", hashlib.blake2s).digest()


def test_initial_hash_is_hash_of_long_protocol_name() -> None:
    assert len(ref.PROTOCOL_NAME) > ref.HASHLEN  # so h = HASH(name), not the padded name
    ss = ref.SymmetricState(ref.PROTOCOL_NAME)
    assert ss.h == ss.ck == hashlib.blake2s(ref.PROTOCOL_NAME).digest()
    assert ss.h.hex() == "60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36"


def test_chachapoly_nonce_layout() -> None:
    assert ref.nonce_bytes(0) == bytes(12)
    assert ref.nonce_bytes(0x0102030405060708) == bytes(4) + bytes.fromhex("0807060504030201")


# --- interop with noiseprotocol -----------------------------------------------------------


@pytest.mark.parametrize("psk", PSK_CASES)
def test_reference_initiator_to_noiseprotocol_responder(psk: bytes) -> None:
    s_i, s_r = ref.generate_private(), ref.generate_private()
    ours = ref.Initiator(s_i, ref.public_key(s_r), psk)
    theirs = np_conn(False, s_r, psk=psk)

    msg1 = ours.write_message_1(TIMESTAMP)
    assert len(msg1) == 108
    assert theirs.read_message(msg1) == TIMESTAMP
    assert theirs.noise_protocol.handshake_state.rs.public_bytes == ref.public_key(s_i)
    msg2 = bytes(theirs.write_message(b""))
    assert len(msg2) == 48
    assert ours.read_message_2(msg2) == b""

    assert theirs.handshake_finished
    assert ours.h == theirs.get_handshake_hash()
    k_send, k_recv = ours.split()
    assert np_keys(theirs) == (k_recv, k_send)
    check_transport(theirs, k_send, k_recv)


@pytest.mark.parametrize("psk", PSK_CASES)
def test_noiseprotocol_initiator_to_reference_responder(psk: bytes) -> None:
    s_i, s_r = ref.generate_private(), ref.generate_private()
    theirs = np_conn(True, s_i, ref.public_key(s_r), psk=psk)
    ours = ref.Responder(s_r, psk)

    msg1 = bytes(theirs.write_message(TIMESTAMP))
    assert len(msg1) == 108
    assert ours.read_message_1(msg1) == TIMESTAMP
    assert ours.rs == ref.public_key(s_i)
    msg2 = ours.write_message_2(b"")
    assert len(msg2) == 48
    assert theirs.read_message(msg2) == b""

    assert theirs.handshake_finished
    assert ours.h == theirs.get_handshake_hash()
    k_send, k_recv = ours.split()
    assert np_keys(theirs) == (k_recv, k_send)
    check_transport(theirs, k_send, k_recv)


def test_payloads_of_other_sizes_interoperate() -> None:
    ours = ref.Initiator(I_S, R_S_PUB, PSK)
    theirs = np_conn(False, R_S, psk=PSK)
    payload1, payload2 = os.urandom(1000), b"response payload"
    assert theirs.read_message(ours.write_message_1(payload1)) == payload1
    assert ours.read_message_2(bytes(theirs.write_message(payload2))) == payload2
    assert ours.h == theirs.get_handshake_hash()


# --- fixed vectors ------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(VECTORS))
def test_pinned_vectors_reference(case: str) -> None:
    v = VECTORS[case]
    ini, resp = ref_pair(v["psk"])
    msg1 = ini.write_message_1(TIMESTAMP)
    assert msg1.hex() == v["msg1"]
    assert resp.read_message_1(msg1) == TIMESTAMP
    msg2 = resp.write_message_2(b"")
    assert msg2.hex() == v["msg2"]
    assert ini.read_message_2(msg2) == b""
    assert ini.h.hex() == resp.h.hex() == v["h"]
    k_i2r, k_r2i = bytes.fromhex(v["k_i2r"]), bytes.fromhex(v["k_r2i"])
    assert ini.split() == (k_i2r, k_r2i)
    assert resp.split() == (k_r2i, k_i2r)
    counter, ping = ref.Transport(*ini.split()).seal(b"ping")
    assert (counter, ping.hex()) == (0, v["ping0"])


@pytest.mark.parametrize("case", list(VECTORS))
def test_pinned_vectors_noiseprotocol(case: str) -> None:
    v = VECTORS[case]
    ini = np_conn(True, I_S, R_S_PUB, psk=v["psk"], e_priv=I_E)
    resp = np_conn(False, R_S, psk=v["psk"], e_priv=R_E)
    msg1 = bytes(ini.write_message(TIMESTAMP))
    assert msg1.hex() == v["msg1"]
    assert resp.read_message(msg1) == TIMESTAMP
    msg2 = bytes(resp.write_message(b""))
    assert msg2.hex() == v["msg2"]
    assert ini.read_message(msg2) == b""
    assert ini.get_handshake_hash().hex() == resp.get_handshake_hash().hex() == v["h"]
    k_i2r, k_r2i = bytes.fromhex(v["k_i2r"]), bytes.fromhex(v["k_r2i"])
    assert np_keys(ini) == (k_i2r, k_r2i)
    assert np_keys(resp) == (k_r2i, k_i2r)
    assert ini.encrypt(b"ping").hex() == v["ping0"]


@pytest.mark.parametrize("case", list(VECTORS))
def test_pinned_vectors_mixed_roles(case: str) -> None:
    """Each implementation's message, read by the other, then answered with fixed keys."""
    v = VECTORS[case]
    ours_i, ours_r = ref_pair(v["psk"])
    np_i = np_conn(True, I_S, R_S_PUB, psk=v["psk"], e_priv=I_E)
    np_r = np_conn(False, R_S, psk=v["psk"], e_priv=R_E)

    assert np_r.read_message(ours_i.write_message_1(TIMESTAMP)) == TIMESTAMP
    assert ours_r.read_message_1(bytes(np_i.write_message(TIMESTAMP))) == TIMESTAMP
    msg2_np = bytes(np_r.write_message(b""))
    msg2_ours = ours_r.write_message_2(b"")
    assert msg2_np == msg2_ours == bytes.fromhex(v["msg2"])
    assert ours_i.read_message_2(msg2_np) == b""
    assert np_i.read_message(msg2_ours) == b""
    assert ours_i.h == np_r.get_handshake_hash() == bytes.fromhex(v["h"])
    assert ours_r.h == np_i.get_handshake_hash() == bytes.fromhex(v["h"])


def test_vectors_depend_on_every_input() -> None:
    """Changing any key, the psk or the prologue changes the transcript (no ignored input)."""
    base = VECTORS["psk"]

    def run(**kw: bytes) -> tuple[str, str]:
        ini = ref.Initiator(
            kw.get("i_s", I_S),
            ref.public_key(kw.get("r_s", R_S)),
            kw.get("psk", PSK),
            kw.get("prologue", ref.PROLOGUE),
            e_priv=kw.get("i_e", I_E),
        )
        resp = ref.Responder(
            kw.get("r_s", R_S),
            kw.get("psk", PSK),
            kw.get("prologue", ref.PROLOGUE),
            e_priv=kw.get("r_e", R_E),
        )
        msg1 = ini.write_message_1(TIMESTAMP)
        resp.read_message_1(msg1)
        return msg1.hex(), resp.write_message_2(b"").hex()

    assert run() == (base["msg1"], base["msg2"])
    for kw in ({"i_s": R_E}, {"r_s": I_E}, {"i_e": R_S}, {"prologue": b"fabricd tunnel v2"}):
        msg1, msg2 = run(**kw)
        assert msg1 != base["msg1"] and msg2 != base["msg2"], kw
    msg1, msg2 = run(r_e=I_S)
    assert msg1 == base["msg1"] and msg2 != base["msg2"]
    msg1, msg2 = run(psk=OTHER_PSK)
    assert msg1 == base["msg1"] and msg2 != base["msg2"]


# --- negative cases -----------------------------------------------------------------------


def test_wrong_responder_static_key_fails_message_1() -> None:
    wrong = ref.public_key(_key("somebody else"))
    with pytest.raises(ref.HandshakeError):
        ref.Responder(R_S).read_message_1(ref.Initiator(I_S, wrong).write_message_1(TIMESTAMP))
    msg1 = bytes(np_conn(True, I_S, wrong).write_message(TIMESTAMP))
    with pytest.raises(ref.HandshakeError):
        ref.Responder(R_S).read_message_1(msg1)
    with pytest.raises(InvalidTag):
        np_conn(False, R_S).read_message(ref.Initiator(I_S, wrong).write_message_1(TIMESTAMP))


def test_psk_mismatch_fails_message_2() -> None:
    # Reference on both sides: message 1 still reads (psk2 is mixed at the end of message 2).
    ini, resp = ref.Initiator(I_S, R_S_PUB, PSK), ref.Responder(R_S, OTHER_PSK)
    assert resp.read_message_1(ini.write_message_1(TIMESTAMP)) == TIMESTAMP
    with pytest.raises(ref.HandshakeError):
        ini.read_message_2(resp.write_message_2(b""))
    # Unset psk (zeros) on one side only.
    ini, resp = ref.Initiator(I_S, R_S_PUB), ref.Responder(R_S, PSK)
    resp.read_message_1(ini.write_message_1(TIMESTAMP))
    with pytest.raises(ref.HandshakeError):
        ini.read_message_2(resp.write_message_2(b""))
    # Reference initiator against a noiseprotocol responder with another psk.
    ini, np_r = ref.Initiator(I_S, R_S_PUB, PSK), np_conn(False, R_S, psk=OTHER_PSK)
    np_r.read_message(ini.write_message_1(TIMESTAMP))
    with pytest.raises(ref.HandshakeError):
        ini.read_message_2(bytes(np_r.write_message(b"")))
    # noiseprotocol initiator against a reference responder with another psk.
    np_i, resp = np_conn(True, I_S, R_S_PUB, psk=PSK), ref.Responder(R_S, OTHER_PSK)
    resp.read_message_1(bytes(np_i.write_message(TIMESTAMP)))
    with pytest.raises(InvalidTag):
        np_i.read_message(resp.write_message_2(b""))


def test_prologue_mismatch_fails_message_1() -> None:
    ini = ref.Initiator(I_S, R_S_PUB, prologue=b"fabricd tunnel v0")
    with pytest.raises(ref.HandshakeError):
        ref.Responder(R_S).read_message_1(ini.write_message_1(TIMESTAMP))


@pytest.mark.parametrize("case", list(VECTORS))
def test_every_bit_flip_in_message_1_fails(case: str) -> None:
    v = VECTORS[case]
    msg1 = bytes.fromhex(v["msg1"])
    for bit in range(len(msg1) * 8):
        with pytest.raises(ref.HandshakeError):
            ref.Responder(R_S, v["psk"], e_priv=R_E).read_message_1(flip(msg1, bit))
    # The untouched message still reads, so the failures above are due to the flips.
    assert ref.Responder(R_S, v["psk"]).read_message_1(msg1) == TIMESTAMP


@pytest.mark.parametrize("case", list(VECTORS))
def test_every_bit_flip_in_message_2_fails(case: str) -> None:
    v = VECTORS[case]
    msg2 = bytes.fromhex(v["msg2"])
    for bit in range(len(msg2) * 8):
        ini = ref.Initiator(I_S, R_S_PUB, v["psk"], e_priv=I_E)
        ini.write_message_1(TIMESTAMP)
        with pytest.raises(ref.HandshakeError):
            ini.read_message_2(flip(msg2, bit))
    ini = ref.Initiator(I_S, R_S_PUB, v["psk"], e_priv=I_E)
    ini.write_message_1(TIMESTAMP)
    assert ini.read_message_2(msg2) == b""


def test_bit_flips_rejected_by_noiseprotocol_too() -> None:
    v = VECTORS["psk"]
    msg1, msg2 = bytes.fromhex(v["msg1"]), bytes.fromhex(v["msg2"])
    for bit in range(len(msg1) * 8):
        with pytest.raises(InvalidTag):
            np_conn(False, R_S, psk=PSK, e_priv=R_E).read_message(flip(msg1, bit))
    for bit in range(len(msg2) * 8):
        ini = np_conn(True, I_S, R_S_PUB, psk=PSK, e_priv=I_E)
        ini.write_message(TIMESTAMP)
        with pytest.raises(InvalidTag):
            ini.read_message(flip(msg2, bit))


@pytest.mark.parametrize("which", ["truncated", "extended"])
def test_length_changes_fail(which: str) -> None:
    v = VECTORS["psk"]
    msg1, msg2 = bytes.fromhex(v["msg1"]), bytes.fromhex(v["msg2"])
    change = (lambda m: m[:-1]) if which == "truncated" else (lambda m: m + b"\x00")
    with pytest.raises(ref.HandshakeError):
        ref.Responder(R_S, PSK).read_message_1(change(msg1))
    ini = ref.Initiator(I_S, R_S_PUB, PSK, e_priv=I_E)
    ini.write_message_1(TIMESTAMP)
    with pytest.raises(ref.HandshakeError):
        ini.read_message_2(change(msg2))


def test_split_before_handshake_done_is_refused() -> None:
    ini = ref.Initiator(I_S, R_S_PUB)
    ini.write_message_1(b"")
    with pytest.raises(ref.HandshakeError):
        ini.split()


# --- the tunnel's own handshake code (tunnels/handshake.py) -------------------------------


@pytest.fixture
def tunnel_hs() -> ModuleType:
    """tunnels.handshake, imported per test so a broken module fails only these tests."""
    from tunnels import handshake

    return handshake


def _remote(public: bytes) -> KeyPair25519:
    """A remote static key in the form tunnels.handshake takes it."""
    return KeyPair25519.from_public_bytes(public)


def test_tunnel_wire_layout() -> None:
    from tunnels import messages

    assert messages.PROTOCOL_NAME == ref.PROTOCOL_NAME
    assert messages.PROLOGUE == ref.PROLOGUE
    assert (messages.NOISE_MSG1_LEN, messages.NOISE_MSG2_LEN) == (108, 48)
    assert (messages.INITIATION_LEN, messages.RESPONSE_LEN) == (148, 92)
    assert messages.INITIATION_NOISE == slice(8, 116)
    assert messages.RESPONSE_NOISE == slice(12, 60)


@pytest.mark.parametrize("case", list(VECTORS))
def test_tunnel_initiation_read_by_reference(tunnel_hs: ModuleType, case: str) -> None:
    v = VECTORS[case]
    psk = None if v["psk"] == ref.ZERO_PSK else v["psk"]  # None means "unset" to the tunnel
    ctx = tunnel_hs.NoiseContext(I_S, psk)
    created = ctx.create_initiation(_remote(R_S_PUB), I_E, TIMESTAMP)
    assert created is not None
    conn, msg1 = created
    assert msg1.hex() == v["msg1"]

    ours = ref.Responder(R_S, v["psk"], e_priv=R_E)
    assert ours.read_message_1(msg1) == TIMESTAMP
    assert ours.rs == I_S_PUB == ctx.public
    msg2 = ours.write_message_2(b"")
    assert msg2.hex() == v["msg2"]

    keys = tunnel_hs.NoiseContext.consume_response(conn, msg2)
    assert keys == (bytes.fromhex(v["k_i2r"]), bytes.fromhex(v["k_r2i"]))
    assert keys == ours.split()[::-1]


@pytest.mark.parametrize("case", list(VECTORS))
def test_reference_initiation_read_by_tunnel(tunnel_hs: ModuleType, case: str) -> None:
    v = VECTORS[case]
    psk = None if v["psk"] == ref.ZERO_PSK else v["psk"]
    ctx = tunnel_hs.NoiseContext(R_S, psk)
    ours = ref.Initiator(I_S, R_S_PUB, v["psk"], e_priv=I_E)

    consumed = ctx.consume_initiation(ours.write_message_1(TIMESTAMP))
    assert consumed is not None
    conn, remote_static, timestamp = consumed
    assert (remote_static, timestamp) == (I_S_PUB, TIMESTAMP)

    response = ctx.create_response(conn, R_E)
    assert response is not None
    msg2, k_send, k_recv = response
    assert msg2.hex() == v["msg2"]
    assert ours.read_message_2(msg2) == b""
    assert (k_send, k_recv) == (bytes.fromhex(v["k_r2i"]), bytes.fromhex(v["k_i2r"]))
    assert ours.split() == (k_recv, k_send)
    assert ours.h.hex() == v["h"]


def test_tunnel_rejects_bad_initiations(tunnel_hs: ModuleType) -> None:
    ctx = tunnel_hs.NoiseContext(R_S, PSK)
    msg1 = ref.Initiator(I_S, R_S_PUB, PSK, e_priv=I_E).write_message_1(TIMESTAMP)
    for bit in range(len(msg1) * 8):
        assert ctx.consume_initiation(flip(msg1, bit)) is None, bit
    wrong = ref.public_key(_key("somebody else"))
    assert ctx.consume_initiation(ref.Initiator(I_S, wrong, PSK).write_message_1(TIMESTAMP)) is None
    # The payload must be a 12-byte timestamp.
    other = ref.Initiator(I_S, R_S_PUB, PSK).write_message_1(TIMESTAMP + b"\x00")
    assert ctx.consume_initiation(other) is None
    assert ctx.consume_initiation(msg1) is not None


def test_tunnel_initiation_to_wrong_key_is_rejected_by_reference(tunnel_hs: ModuleType) -> None:
    ctx = tunnel_hs.NoiseContext(I_S, PSK)
    _, msg1 = ctx.create_initiation(_remote(ref.public_key(_key("somebody else"))), I_E, TIMESTAMP)
    with pytest.raises(ref.HandshakeError):
        ref.Responder(R_S, PSK).read_message_1(msg1)


def test_tunnel_rejects_psk_mismatch_in_response(tunnel_hs: ModuleType) -> None:
    ctx = tunnel_hs.NoiseContext(I_S, PSK)
    conn, msg1 = ctx.create_initiation(_remote(R_S_PUB), I_E, TIMESTAMP)
    ours = ref.Responder(R_S, OTHER_PSK, e_priv=R_E)
    ours.read_message_1(msg1)
    assert tunnel_hs.NoiseContext.consume_response(conn, ours.write_message_2(b"")) is None


def test_tunnel_survives_forged_responses(tunnel_hs: ModuleType) -> None:
    """Every single-bit forgery of message 2 is refused and the genuine one still works."""
    v = VECTORS["psk"]
    ctx = tunnel_hs.NoiseContext(I_S, PSK)
    conn, msg1 = ctx.create_initiation(_remote(R_S_PUB), I_E, TIMESTAMP)
    ours = ref.Responder(R_S, PSK, e_priv=R_E)
    ours.read_message_1(msg1)
    msg2 = ours.write_message_2(b"")
    consume = tunnel_hs.NoiseContext.consume_response
    for bit in range(len(msg2) * 8):
        assert consume(conn, flip(msg2, bit)) is None, bit
    # A genuine response to another initiation (a replayed or crossed one) is refused too.
    _, other_msg1 = ctx.create_initiation(_remote(R_S_PUB), _key("another ephemeral"), TIMESTAMP)
    other = ref.Responder(R_S, PSK)
    other.read_message_1(other_msg1)
    assert consume(conn, other.write_message_2(b"")) is None
    assert consume(conn, msg2) == (bytes.fromhex(v["k_i2r"]), bytes.fromhex(v["k_r2i"]))
