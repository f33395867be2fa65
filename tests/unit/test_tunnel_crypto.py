"""The small crypto pieces: XChaCha20-Poly1305, TAI64N, keys, mac1/mac2 and cookies,
the load meter and rate limiter, and the Noise wrapper."""

from __future__ import annotations

import random

import pytest
from cryptography.exceptions import InvalidTag

from tunnels import messages, tai64n, xchacha20poly1305
from tunnels.cookie import CookieChecker, CookieGenerator, address_bytes, hash32, mac16
from tunnels.handshake import NoiseContext
from tunnels.keys import generate_keypair, public_key
from tunnels.peer import Peer
from tunnels.ratelimiter import LoadMeter, RateLimiter

# draft-irtf-cfrg-xchacha-03, sections 2.2.1 and A.3.1.
H_KEY = bytes(range(32))
H_NONCE = bytes.fromhex("000000090000004a0000000031415927")
H_OUT = "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
X_KEY = bytes(range(0x80, 0xA0))
X_NONCE = bytes(range(0x40, 0x58))
X_AD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
X_PLAIN = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
    b"the future, sunscreen would be it."
)
X_CIPHER = (
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
    "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
    "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
    "21f9664c97637da9768812f615c68b13b52e"
)
X_TAG = "c0875924c1c7987947deafd8780acf49"


def test_hchacha20_vector():
    assert xchacha20poly1305.hchacha20(H_KEY, H_NONCE).hex() == H_OUT


def test_xchacha20poly1305_vector_and_tamper():
    sealed = xchacha20poly1305.encrypt(X_KEY, X_NONCE, X_PLAIN, X_AD)
    assert sealed.hex() == X_CIPHER + X_TAG
    assert xchacha20poly1305.decrypt(X_KEY, X_NONCE, sealed, X_AD) == X_PLAIN
    with pytest.raises(InvalidTag):
        xchacha20poly1305.decrypt(X_KEY, X_NONCE, sealed, X_AD + b"x")
    with pytest.raises(ValueError):
        xchacha20poly1305.encrypt(X_KEY, X_NONCE[:12], X_PLAIN, X_AD)


def test_tai64n_orders_like_time():
    a, b = tai64n.encode(1_700_000_000.25), tai64n.encode(1_700_000_000.5)
    assert len(a) == tai64n.TAI64N_LEN and a < b
    assert tai64n.decode(a) == pytest.approx(1_700_000_000.25)
    assert tai64n.after(a) > a and tai64n.after(tai64n.encode(5.999999999)) > tai64n.encode(5.9)
    assert tai64n.encode(-3) == tai64n.encode(0)


def test_keys():
    priv, pub = generate_keypair(random.Random(1).randbytes)
    assert len(priv) == len(pub) == 32 and public_key(priv) == pub
    with pytest.raises(ValueError):
        public_key(b"x")


def test_mac1_mac2_and_cookie_round_trip():
    rng = random.Random(3).randbytes
    responder_pub = generate_keypair(rng)[1]
    checker = CookieChecker(responder_pub, rng)
    gen = CookieGenerator(responder_pub)
    src = ("192.0.2.1", 4000)
    body = bytes(messages.INITIATION_MAC1_AT)
    msg = gen.add_macs(body, 0.0)
    assert len(msg) == messages.INITIATION_LEN
    assert checker.check_mac1(msg, messages.INITIATION_MAC1_AT)
    assert msg[messages.INITIATION_MAC2_AT :] == bytes(16)
    assert not checker.check_mac2(msg, messages.INITIATION_MAC2_AT, src, 0.0)
    reply = checker.create_reply(msg, messages.INITIATION_MAC1_AT, 77, src, 0.0)
    assert len(reply) == messages.COOKIE_REPLY_LEN and reply[0] == messages.TYPE_COOKIE_REPLY
    assert int.from_bytes(reply[4:8], "little") == 77
    assert gen.consume_reply(reply, 0.0)
    msg2 = gen.add_macs(body, 1.0)
    assert checker.check_mac2(msg2, messages.INITIATION_MAC2_AT, src, 1.0)
    # The cookie is bound to the source address...
    assert not checker.check_mac2(msg2, messages.INITIATION_MAC2_AT, ("192.0.2.1", 4001), 1.0)
    # ...and to the secret, which rotates after 120 s.
    assert not checker.check_mac2(msg2, messages.INITIATION_MAC2_AT, src, 121.0)
    # A sender stops using a cookie before that.
    assert gen.add_macs(body, 116.0)[messages.INITIATION_MAC2_AT :] == bytes(16)


def test_cookie_reply_is_bound_to_the_last_mac1():
    rng = random.Random(4).randbytes
    pub = generate_keypair(rng)[1]
    checker = CookieChecker(pub, rng)
    gen = CookieGenerator(pub)
    first = gen.add_macs(bytes(messages.INITIATION_MAC1_AT), 0.0)
    reply = checker.create_reply(first, messages.INITIATION_MAC1_AT, 1, ("192.0.2.1", 1), 0.0)
    gen.add_macs(b"\x01" * messages.INITIATION_MAC1_AT, 0.0)  # a newer message went out
    assert not gen.consume_reply(reply, 0.0)
    assert not CookieGenerator(pub).consume_reply(reply, 0.0)  # never sent anything


def test_mac1_uses_the_receivers_key():
    a_pub, b_pub = generate_keypair()[1], generate_keypair()[1]
    msg = CookieGenerator(a_pub).add_macs(bytes(116), 0.0)
    assert CookieChecker(a_pub, random.Random(0).randbytes).check_mac1(msg, 116)
    assert not CookieChecker(b_pub, random.Random(0).randbytes).check_mac1(msg, 116)
    assert mac16(hash32(messages.LABEL_MAC1 + a_pub), bytes(116)) == msg[116:132]


def test_address_bytes_never_raises():
    assert address_bytes(("10.0.0.1", 258)) == bytes([10, 0, 0, 1, 1, 2])
    assert len(address_bytes(("::1", 1))) == 18
    assert address_bytes(("host.example", 1)).startswith(b"host.example")
    for odd in ((), ("x",), (None, "y"), object()):
        assert isinstance(address_bytes(odd), bytes)  # type: ignore[arg-type]


def test_load_meter():
    meter = LoadMeter(threshold=3)
    assert [meter.record(10.0 + i * 0.01) for i in range(5)] == [False] * 3 + [True] * 2
    assert meter.record(10.9)  # sticky for a second after the last overload
    assert not meter.record(13.0)
    assert LoadMeter(threshold=0).record(0.5)
    assert meter.rate(100.0) == 0.0


def test_rate_limiter_bucket_and_table_bound():
    rl = RateLimiter(rate=20, burst=5, max_entries=3)
    assert [rl.allow("a", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert not rl.allow("a", 0.04) and rl.allow("a", 0.1)  # 20/s: one token per 50 ms
    assert rl.allow("b", 0.1) and rl.allow("c", 0.1)
    assert not rl.allow("d", 0.1) and rl.table_full == 1  # full of recent sources
    assert rl.allow("d", 10.0)  # idle (refilled) buckets are collected
    assert len(rl) <= 3


def test_noise_round_trip_and_remote_static():
    a_priv, a_pub = generate_keypair()
    b_priv, b_pub = generate_keypair()
    ia, rb = NoiseContext(a_priv, None), NoiseContext(b_priv, None)
    peer_b = Peer("b", b_pub, None, None)
    stamp = tai64n.encode(1.0)
    conn, msg1 = ia.create_initiation(peer_b.remote, bytes(range(32)), stamp)
    assert len(msg1) == messages.NOISE_MSG1_LEN
    rconn, remote, got_stamp = rb.consume_initiation(msg1)
    assert remote == a_pub and got_stamp == stamp
    msg2, r_send, r_recv = rb.create_response(rconn, bytes(range(1, 33)))
    assert len(msg2) == messages.NOISE_MSG2_LEN
    i_send, i_recv = NoiseContext.consume_response(conn, msg2)
    assert i_send == r_recv and i_recv == r_send and i_send != i_recv


def test_noise_garbage_returns_none():
    ctx = NoiseContext(generate_keypair()[0], None)
    assert ctx.consume_initiation(bytes(messages.NOISE_MSG1_LEN)) is None
    assert ctx.consume_initiation(b"") is None
    with pytest.raises(ValueError):
        NoiseContext(bytes(32), b"short")
