"""TunnelCore end to end: two (or three) cores, a fake clock, an explicit wire."""

from __future__ import annotations

import pytest

from tests.support.tunnel_net import Datagram, Net, ipv4_packet, packet_tag
from tunnels import messages
from tunnels.cookie import hash32, mac16
from tunnels.core import TunnelCore
from tunnels.keys import generate_keypair
from tunnels.peer import QUEUE_LIMIT
from tunnels.replay import WINDOW
from tunnels.timers import (
    KEEPALIVE_TIMEOUT,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    ZERO_KEYS_AFTER,
)

A_ADDR = ("192.0.2.1", 51820)
B_ADDR = ("192.0.2.2", 51820)
C_ADDR = ("192.0.2.3", 51820)
NOWHERE = ("198.51.100.99", 9)


def two(psk_a=None, psk_b=None, **kw) -> Net:
    net = Net()
    net.add("a", A_ADDR, seed=1, psk=psk_a, **kw)
    net.add("b", B_ADDR, seed=2, psk=psk_b, **kw)
    net.link("a", "b")
    return net


def established(**kw) -> Net:
    net = two(**kw)
    net.handshake("a", "b")
    assert len(net.nodes["b"].delivered) == 1
    net.nodes["b"].delivered.clear()
    return net


def tags(node) -> list[int]:
    return [packet_tag(p) for _, _, p in node.delivered]


def session_pair(net: Net, x: str = "a", y: str = "b") -> None:
    """x and y hold exactly one session, the same one, and nothing else."""
    px = net.nodes[x].core._peers[y]
    py = net.nodes[y].core._peers[x]
    assert px.current is not None and py.current is not None
    assert px.current.local_index == py.current.remote_index
    assert px.current.remote_index == py.current.local_index
    assert px.next is None and py.next is None
    assert px.handshake is None and py.handshake is None


# -- handshake and data -------------------------------------------------------------------


def test_handshake_then_data_both_ways_with_namespace():
    net = two()
    a, b = net.nodes["a"], net.nodes["b"]
    pkt = ipv4_packet(100, 7)
    out = net.send("a", "b", 0xDEADBEEF, pkt)
    assert [d.kind for d in out] == [messages.TYPE_INITIATION]
    assert len(out[0].data) == messages.INITIATION_LEN
    net.flush()
    assert b.delivered == [("a", 0xDEADBEEF, pkt)]

    back = ipv4_packet(1400, 8)
    out = net.send("b", "a", 0, back)
    assert [d.kind for d in out] == [messages.TYPE_DATA]
    assert len(out[0].data) == 16 + 4 + 1400 + 16
    net.flush()
    assert a.delivered == [("b", 0, back)]

    ca, cb = a.core.counters, b.core.counters
    assert ca["handshake_complete"] == cb["handshake_complete"] == 1
    assert ca["rx_packets"] == cb["tx_packets"] == 1
    assert cb["rx_packets"] == ca["tx_packets"] == 1
    row = a.core.peers(net.now)[0]
    assert row["id"] == "b" and row["endpoint"] == B_ADDR
    assert row["last_handshake"] == net.now and row["session_age"] == 0.0
    assert row["rx_packets"] == 1 and row["tx_packets"] == 1
    assert row["rx_bytes"] > 0 and row["tx_bytes"] > 0
    assert set(row["drops"]) >= {"replay", "decrypt_failure", "queue_overflow"}
    assert not any(row["drops"].values())
    session_pair(net)


def test_responder_waits_for_confirmation_instead_of_initiating():
    net = two()
    net.send("a", "b", 1, ipv4_packet(60, 1))
    init = net.take()
    net.deliver(init[0])  # b answers; a has not seen the response yet
    response = net.take()
    out = net.send("b", "a", 1, ipv4_packet(60, 2))
    assert out == []  # queued until a's first data message confirms the session
    for d in response:
        net.deliver(d)
    net.flush()
    assert tags(net.nodes["a"]) == [2] and tags(net.nodes["b"]) == [1]
    assert net.nodes["b"].core.counters["initiation_sent"] == 0
    session_pair(net)


def test_send_validation_and_unknown_peer_are_counted():
    net = established()
    core = net.nodes["a"].core
    assert core.send("zz", 1, ipv4_packet(), net.now) == []
    assert core.send("b", -1, ipv4_packet(), net.now) == []
    assert core.send("b", 1 << 32, ipv4_packet(), net.now) == []
    assert core.send("b", 1, b"short", net.now) == []
    assert core.send("b", 1, b"\x60" + bytes(39), net.now) == []  # IPv6
    assert core.send("b", "x", ipv4_packet(), net.now) == []  # type: ignore[arg-type]
    assert core.counters["send_unknown_peer"] == 1
    assert core.counters["send_invalid"] == 5


# -- hostile and damaged datagrams ----------------------------------------------------------


def test_forged_truncated_and_unknown_index_are_dropped_and_counted():
    net = established()
    b = net.nodes["b"]
    data = net.send("a", "b", 1, ipv4_packet(200, 1))[0]
    net.take()
    flipped = bytearray(data.data)
    flipped[40] ^= 1
    bad_index = bytearray(data.data)
    bad_index[4] ^= 0xFF
    reserved = bytearray(data.data)
    reserved[2] = 1
    for raw in (bytes(flipped), data.data[:31], bytes(bad_index), bytes(reserved), b"", b"\x04"):
        out, packets = b.core.receive(raw, A_ADDR, net.now)
        assert out == [] and packets == []
    b.core.receive(bytes(bad_index), NOWHERE, net.now)
    c = b.core.counters
    assert c["decrypt_failure"] == 1
    # From the peer's endpoint an unknown index is an unknown session; a peer that just
    # spoke on a session we hold gets no new handshake for it.
    assert c["unknown_session"] == 1 and c["handshake_on_unknown_session"] == 0
    assert c["unknown_index"] == 1  # from elsewhere
    assert c["malformed"] == 4
    assert b.core.peers()[0]["drops"]["decrypt_failure"] == 1
    # The genuine one still goes through afterwards: a forgery never moves the window.
    net.deliver(data)
    assert tags(b) == [1]


def test_forged_packet_from_elsewhere_does_not_move_the_endpoint():
    net = established()
    b = net.nodes["b"]
    data = net.send("a", "b", 1, ipv4_packet(60, 1))[0]
    net.take()
    forged = data.data[:-1] + bytes([data.data[-1] ^ 1])
    b.core.receive(forged, NOWHERE, net.now)
    assert b.core.peers()[0]["endpoint"] == A_ADDR


def test_replayed_data_is_dropped():
    net = established()
    b = net.nodes["b"]
    data = net.send("a", "b", 1, ipv4_packet(60, 1))[0]
    net.take()
    net.deliver(data)
    net.deliver(data)
    assert tags(b) == [1]
    assert b.core.counters["replay"] == 1
    assert b.core.peers()[0]["drops"]["replay"] == 1


def test_reordered_within_window_accepted():
    net = established()
    b = net.nodes["b"]
    sent = [net.send("a", "b", 1, ipv4_packet(60, i))[0] for i in range(100)]
    net.take()
    for d in reversed(sent):
        net.deliver(d)
    assert sorted(tags(b)) == list(range(100))
    assert tags(b) == list(reversed(range(100)))
    assert b.core.counters["replay"] == 0


def test_reordered_outside_window_rejected_edge_exact():
    net = established()
    b = net.nodes["b"]
    # a's session counter starts at 1 here (counter 0 carried the handshake's packet).
    sent = [net.send("a", "b", 1, ipv4_packet(60, i))[0] for i in range(WINDOW + 2)]
    net.take()
    net.deliver(sent[-1])  # counter WINDOW + 2
    net.deliver(sent[0])  # counter 1: WINDOW + 1 behind -> outside
    net.deliver(sent[1])  # counter 2: WINDOW behind -> outside
    net.deliver(sent[2])  # counter 3: WINDOW - 1 behind -> the oldest still inside
    assert tags(b) == [WINDOW + 1, 2]
    assert b.core.counters["replay"] == 2


# -- keys, psk ---------------------------------------------------------------------------


def test_wrong_peer_key_on_responder_gets_nothing_through():
    net = Net()
    net.add("a", A_ADDR, seed=1)
    b = net.add("b", B_ADDR, seed=2)
    a = net.nodes["a"]
    a.core.add_peer("b", b.public_key, B_ADDR, None)
    b.core.add_peer("a", generate_keypair()[1], A_ADDR, None)  # not a's key
    net.send("a", "b", 1, ipv4_packet())
    net.flush()
    assert b.delivered == [] and a.delivered == []
    assert b.core.counters["unknown_peer"] == 1
    assert b.core.counters["response_sent"] == 0


def test_wrong_responder_key_on_initiator_fails_mac1():
    net = Net()
    a = net.add("a", A_ADDR, seed=1)
    b = net.add("b", B_ADDR, seed=2)
    a.core.add_peer("b", generate_keypair()[1], B_ADDR, None)  # not b's key
    b.core.add_peer("a", a.public_key, A_ADDR, None)
    net.send("a", "b", 1, ipv4_packet())
    net.flush()
    assert b.delivered == []
    assert b.core.counters["mac1_invalid"] == 1


def test_psk_mismatch_fails():
    net = two(psk_a=b"\x01" * 32, psk_b=b"\x02" * 32)
    net.send("a", "b", 1, ipv4_packet())
    net.flush()
    a, b = net.nodes["a"], net.nodes["b"]
    assert a.delivered == [] and b.delivered == []
    assert a.core.counters["handshake_failed"] == 1
    assert a.core.counters["handshake_complete"] == 0


def test_same_psk_works():
    net = two(psk_a=b"\x07" * 32, psk_b=b"\x07" * 32)
    net.handshake("a", "b")
    assert len(net.nodes["b"].delivered) == 1


def test_psk_unset_on_one_side_fails():
    net = two(psk_a=None, psk_b=b"\x07" * 32)
    net.handshake("a", "b")
    assert net.nodes["b"].delivered == []


def test_forged_response_does_not_kill_the_pending_handshake():
    net = two()
    a = net.nodes["a"]
    net.send("a", "b", 1, ipv4_packet(60, 5))
    init = net.take()[0]
    net.deliver(init)
    response = net.take()[0]
    # Same indices and a valid mac1 (anyone knows a's public key), garbage Noise body.
    body = response.data[: messages.RESPONSE_NOISE.start] + bytes(48)
    body += mac16(hash32(messages.LABEL_MAC1 + a.public_key), body) + bytes(16)
    a.core.receive(body, B_ADDR, net.now)
    assert a.core.counters["handshake_failed"] == 1
    net.deliver(response)
    net.flush()
    assert tags(net.nodes["b"]) == [5]


# -- timers: rekey, reject, retry, keepalive, zeroing ------------------------------------


def test_rekey_after_120s_and_old_session_still_decrypts_in_flight():
    net = established()
    a, b = net.nodes["a"], net.nodes["b"]
    t0 = net.now
    net.now = t0 + REKEY_AFTER_TIME + 1
    in_flight = net.send("b", "a", 1, ipv4_packet(60, 100))  # on the old session
    net.take()
    out = net.send("a", "b", 1, ipv4_packet(60, 1))
    assert [d.kind for d in out] == [messages.TYPE_DATA, messages.TYPE_INITIATION]
    assert a.core.counters["rekey"] == 1
    net.take()
    data_old, init = out
    net.deliver(init)
    net.flush()  # response -> a; a's keepalive on the new session -> b confirms it
    new_a = a.core._peers["b"].current
    assert new_a.created == net.now and a.core._peers["b"].previous is not None
    net.deliver(in_flight[0])  # b's old-session packet, late
    net.deliver(data_old)  # a's old-session packet, late
    assert tags(a) == [100] and tags(b) == [1]
    # The new session works both ways and is the one in use.
    net.send("a", "b", 1, ipv4_packet(60, 2))
    net.send("b", "a", 1, ipv4_packet(60, 101))
    net.flush()
    assert tags(a) == [100, 101] and tags(b) == [1, 2]
    session_pair(net)


def test_reject_after_180s():
    net = established()
    b = net.nodes["b"]
    t0 = net.now
    net.now = t0 + 100
    late = net.send("a", "b", 1, ipv4_packet(60, 1))[0]
    net.take()
    net.now = t0 + REJECT_AFTER_TIME + 1
    net.deliver(late)
    assert b.delivered == []
    assert b.core.counters["expired"] == 1
    # Nothing is sent on the dead session: the packet waits for a new handshake.
    out = net.send("a", "b", 1, ipv4_packet(60, 2))
    assert [d.kind for d in out] == [messages.TYPE_INITIATION]
    net.flush()
    assert tags(b) == [2]


def test_handshake_retries_every_5s_then_gives_up_at_90s_dropping_queue():
    net = Net()
    a = net.add("a", A_ADDR, seed=1)
    b = net.add("b", B_ADDR, seed=2)
    a.core.add_peer("b", b.public_key, NOWHERE, None)
    t0 = net.now
    for i in range(3):
        net.send("a", "b", 1, ipv4_packet(60, i))
    sent_at = [t0]
    assert len(net.take()) == 1  # one initiation for three packets
    while (t := a.core.next_timer()) is not None and t < t0 + 200:
        net.now = t
        out = a.core.handle_timer(t)
        if out:
            assert [d[1][0] for d in out] == [messages.TYPE_INITIATION]
            assert out[0][0] == NOWHERE
            sent_at.append(t)
        if a.core.counters["handshake_giveup"]:
            break
    gaps = [y - x for x, y in zip(sent_at, sent_at[1:], strict=False)]
    assert all(REKEY_TIMEOUT <= g <= REKEY_TIMEOUT + 0.334 for g in gaps), gaps
    assert sent_at[-1] < t0 + REKEY_ATTEMPT_TIME
    assert t0 + REKEY_ATTEMPT_TIME <= net.now <= t0 + REKEY_ATTEMPT_TIME + REKEY_TIMEOUT + 0.334
    assert len(sent_at) >= 17
    row = a.core.peers()[0]
    assert row["queued"] == 0 and row["handshake_pending"] is False
    assert row["drops"]["handshake_timeout"] == 3
    assert a.core.counters["handshake_timeout"] == 3
    # Only the key-zeroing timer is left; no more initiations.
    nxt = a.core.next_timer()
    assert nxt is None or nxt >= net.now + ZERO_KEYS_AFTER - 1
    assert a.core._index.entries == {}


def test_queue_holds_128_and_drops_oldest():
    net = two()
    a, b = net.nodes["a"], net.nodes["b"]
    n = QUEUE_LIMIT + 2
    for i in range(n):
        net.send("a", "b", 1, ipv4_packet(60, i))
    assert a.core.counters["queue_overflow"] == 2
    assert a.core.peers()[0]["queued"] == QUEUE_LIMIT
    assert a.core.peers()[0]["drops"]["queue_overflow"] == 2
    net.flush()
    assert tags(b) == list(range(2, n))  # in order, the two oldest gone
    assert a.core.peers()[0]["queued"] == 0


def test_passive_keepalive_after_10s_of_receiving_without_sending():
    net = established()
    a, b = net.nodes["a"], net.nodes["b"]
    net.advance(net.now + 20)  # settle timers from the handshake (b answered it already)
    assert a.core.counters["keepalive_received"] == 1
    t = net.now
    net.send("a", "b", 1, ipv4_packet(60, 1))
    net.flush()
    assert b.core.next_timer() == pytest.approx(t + KEEPALIVE_TIMEOUT)
    net.now = t + KEEPALIVE_TIMEOUT
    out = b.core.handle_timer(net.now)
    assert len(out) == 1 and out[0][0] == A_ADDR
    assert out[0][1][0] == messages.TYPE_DATA and len(out[0][1]) == messages.DATA_MIN_LEN
    a.core.receive(out[0][1], B_ADDR, net.now)
    assert a.core.counters["keepalive_received"] == 2
    assert a.delivered == []
    # Sending data ourselves instead cancels the keepalive.
    net.send("a", "b", 1, ipv4_packet(60, 2))
    net.flush()
    net.send("b", "a", 1, ipv4_packet(60, 3))
    net.flush()
    sent = b.core.counters["keepalive_sent"]
    net.advance(net.now + KEEPALIVE_TIMEOUT + 1)
    assert b.core.counters["keepalive_sent"] == sent


def test_persistent_keepalive():
    net = Net()
    a = net.add("a", A_ADDR, seed=1)
    b = net.add("b", B_ADDR, seed=2)
    net.link("a", "b", b_knows_a=False, keepalive=None)
    a.core.add_peer("b", b.public_key, B_ADDR, keepalive=25)  # update in place
    assert a.core.next_timer() is not None and a.core.next_timer() <= net.now
    net.advance(net.now)  # the first keepalive starts a handshake right away
    assert a.core.counters["handshake_complete"] == 1
    assert b.core.peers()[0]["endpoint"] == A_ADDR  # learned from the handshake
    t = net.now
    net.advance(t + 100)
    ka = a.core.counters["keepalive_sent"]
    assert 4 <= ka <= 5  # about every 25 s of silence
    assert b.core.counters["keepalive_received"] >= ka - 1


def test_new_handshake_when_data_sent_gets_no_answer():
    net = established()
    a = net.nodes["a"]
    net.advance(net.now + 20)
    before = a.core.counters["initiation_sent"]
    net.send("a", "b", 1, ipv4_packet(60, 1))
    net.take()  # lost
    net.advance(net.now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + 0.4, deliver=False)
    assert a.core.counters["initiation_sent"] == before + 1


def test_keys_zeroed_after_3x_reject_after_time():
    net = established()
    a, b = net.nodes["a"], net.nodes["b"]
    net.advance(net.now + ZERO_KEYS_AFTER + 1)
    assert a.core.counters["keys_zeroed"] >= 1 and b.core.counters["keys_zeroed"] >= 1
    assert a.core._index.entries == {} and b.core._index.entries == {}
    assert a.core.peers()[0]["session_age"] is None
    net.handshake("a", "b")  # and it recovers
    assert len(b.delivered) == 1


# -- roaming -----------------------------------------------------------------------------


def test_roaming_endpoint_follows_authenticated_source():
    net = established()
    a, b = net.nodes["a"], net.nodes["b"]
    new_addr = ("203.0.113.5", 40000)
    a.addr = new_addr
    net.send("a", "b", 1, ipv4_packet(60, 1))
    net.flush()
    assert tags(b) == [1]
    assert b.core.peers()[0]["endpoint"] == new_addr
    assert b.core.counters["roamed"] == 1
    out = net.send("b", "a", 1, ipv4_packet(60, 2))
    assert out[0].dst == new_addr
    net.flush()
    assert tags(a) == [2]


def test_roaming_on_handshake():
    net = established()
    a, b = net.nodes["a"], net.nodes["b"]
    a.addr = ("203.0.113.9", 1234)
    init = a.core.rekey("b", net.now)
    net.deliver(Datagram(a.addr, B_ADDR, init[0][1]))
    assert b.core.peers()[0]["endpoint"] == a.addr
    net.flush()
    assert a.core.counters["handshake_complete"] == 2
    assert b.core.counters["roamed"] == 1


# -- simultaneous initiation -------------------------------------------------------------


@pytest.mark.parametrize("seeds", [(1, 2), (2, 1), (5, 9), (9, 5)])
def test_simultaneous_initiation_ends_with_one_session_pair(seeds):
    net = Net()
    net.add("a", A_ADDR, seed=seeds[0])
    net.add("b", B_ADDR, seed=seeds[1])
    net.link("a", "b")
    a, b = net.nodes["a"], net.nodes["b"]
    ia = net.send("a", "b", 1, ipv4_packet(60, 1))
    ib = net.send("b", "a", 1, ipv4_packet(60, 2))
    assert ia[0].kind == ib[0].kind == messages.TYPE_INITIATION
    net.flush()  # both initiations cross, then whatever follows
    assert tags(a) == [2] and tags(b) == [1]
    session_pair(net)
    winner, loser = (a, b) if a.public_key > b.public_key else (b, a)
    assert winner.core.counters["simultaneous_ignored"] == 1
    assert loser.core.counters["simultaneous_yielded"] == 1
    assert winner.core.counters["response_sent"] == 0
    assert a.core.counters["handshake_complete"] == b.core.counters["handshake_complete"] == 1
    # And it stays that way: more traffic, timers running, no extra handshakes.
    for i in range(3):
        net.send("a", "b", 1, ipv4_packet(60, 10 + i))
        net.send("b", "a", 1, ipv4_packet(60, 20 + i))
        net.flush()
    net.advance(net.now + 60)
    # Two crossing initiations, plus the winner's once more when the loser's arrived
    # (the winner cannot tell a crossing from its own having been lost).
    assert a.core.counters["initiation_sent"] + b.core.counters["initiation_sent"] == 3
    session_pair(net)


def test_simultaneous_initiation_with_one_initiation_lost():
    net = Net()
    net.add("a", A_ADDR, seed=1)
    net.add("b", B_ADDR, seed=2)
    net.link("a", "b")
    a, b = net.nodes["a"], net.nodes["b"]
    winner, loser = ("a", "b") if a.public_key > b.public_key else ("b", "a")
    net.send(winner, loser, 1, ipv4_packet(60, 1))
    net.send(loser, winner, 1, ipv4_packet(60, 2))
    # The winner's initiation is lost; the loser's is ignored by the winner.
    for d in net.take():
        if d.src == net.nodes[loser].addr:
            net.deliver(d)
    net.flush()
    # The loser's initiation makes the winner send its own again at once: no waiting
    # for the retry timer (as when a worker starts after its peer first tried).
    assert tags(net.nodes[loser]) == [1] and tags(net.nodes[winner]) == [2]
    session_pair(net)
    assert REKEY_TIMEOUT > 1


# -- cookies, load, rate limit, initiation replay -----------------------------------------


def test_cookie_reply_under_load_then_retry_with_mac2_succeeds():
    net = Net()
    a = net.add("a", A_ADDR, seed=1)
    b = net.add("b", B_ADDR, seed=2, handshake_load_threshold=0)  # always under load
    net.link("a", "b", b_knows_a=False)  # only a initiates
    net.send("a", "b", 1, ipv4_packet(60, 1))
    init = net.take()[0]
    assert init.data[messages.INITIATION_MAC2_AT :] == bytes(16)
    out = net.deliver(init)
    assert [d.kind for d in out] == [messages.TYPE_COOKIE_REPLY]
    assert len(out[0].data) == messages.COOKIE_REPLY_LEN
    assert b.core.counters["cookie_sent"] == 1 and b.core.counters["response_sent"] == 0
    net.flush()
    assert a.core.counters["cookie_received"] == 1
    assert b.delivered == []
    net.advance(net.now + REKEY_TIMEOUT + 0.4)  # retransmit, now with mac2
    assert b.core.counters["response_sent"] == 1
    assert tags(b) == [1]
    assert b.core.counters["cookie_sent"] == 1


def test_tampered_or_stale_cookie_reply_is_ignored():
    net = Net()
    a = net.add("a", A_ADDR, seed=1)
    net.add("b", B_ADDR, seed=2, handshake_load_threshold=0)
    net.link("a", "b")
    net.send("a", "b", 1, ipv4_packet(60, 1))
    init = net.take()[0]
    reply = net.deliver(init)[0]
    net.take()
    tampered = reply.data[:-1] + bytes([reply.data[-1] ^ 1])
    a.core.receive(tampered, B_ADDR, net.now)
    assert a.core.counters["cookie_invalid"] == 1
    assert a.core.peers()[0]["drops"]["cookie_invalid"] == 1
    a.core.rekey("b", net.now)  # a new initiation under a new index: the reply is stale
    net.take()
    net.deliver(reply)
    assert a.core.counters["unknown_index"] == 1
    assert a.core.counters["cookie_received"] == 0


def test_load_threshold_switches_cookies_on():
    net = Net()
    b = net.add("b", B_ADDR, seed=2, handshake_load_threshold=3)
    nodes = []
    for i in range(6):
        n = net.add(f"c{i}", (f"192.0.2.{10 + i}", 51820), seed=10 + i)
        net.link(n.name, "b")
        nodes.append(n)
    for n in nodes:
        net.send(n.name, "b", 1, ipv4_packet(60, 1))
    for d in net.take():
        net.deliver(d)
    c = b.core.counters
    assert c["response_sent"] == 3  # the first three are under the threshold
    assert c["cookie_sent"] == 3
    net.take()
    # A second later, with no more load, handshakes go straight through again.
    net.now += 2.5
    net.add("late", ("192.0.2.99", 1), seed=99)
    net.link("late", "b")
    net.send("late", "b", 1, ipv4_packet(60, 1))
    net.flush()
    assert b.core.counters["response_sent"] == 4


def test_per_source_rate_limit_under_load():
    net = Net()
    a = net.add("a", A_ADDR, seed=1)
    b = net.add("b", B_ADDR, seed=2, handshake_load_threshold=0)
    net.link("a", "b", b_knows_a=False)  # only a initiates
    # First get a cookie so the initiations carry a valid mac2.
    net.send("a", "b", 1, ipv4_packet(60, 1))
    net.flush()
    assert a.core.counters["cookie_received"] == 1
    inits = [a.core.rekey("b", net.now)[0][1] for _ in range(10)]
    responses = 0
    for raw in inits:
        out, _ = b.core.receive(raw, A_ADDR, net.now)
        responses += sum(1 for _, m in out if m[0] == messages.TYPE_RESPONSE)
    assert responses == 5  # burst 5
    assert b.core.counters["rate_limited"] == 5
    # Another source is not affected; and a's bucket refills at 20/s.
    net.add("c", C_ADDR, seed=3)
    net.link("c", "b")
    net.send("c", "b", 1, ipv4_packet(60, 1))
    net.flush()  # cookie
    net.advance(net.now + REKEY_TIMEOUT + 0.4)
    assert [peer for peer, _, _ in b.delivered].count("c") == 1
    assert b.core.counters["rate_limited"] == 5
    net.now += 1.0
    out, _ = b.core.receive(a.core.rekey("b", net.now)[0][1], A_ADDR, net.now)
    assert [m[0] for _, m in out] == [messages.TYPE_RESPONSE]


def test_replayed_initiation_is_rejected():
    net = two()
    b = net.nodes["b"]
    net.send("a", "b", 1, ipv4_packet(60, 1))
    init = net.take()[0]
    out1 = net.deliver(init)
    assert [d.kind for d in out1] == [messages.TYPE_RESPONSE]
    net.take()
    out2 = net.deliver(init)
    assert out2 == []
    assert b.core.counters["handshake_replay"] == 1
    assert b.core.peers()[0]["drops"]["handshake_replay"] == 1
    # Even much later (same timestamp inside).
    net.now += 1000
    assert net.deliver(init) == []
    assert b.core.counters["handshake_replay"] == 2


def test_initiator_timestamps_increase_even_with_a_stuck_clock():
    net = established()
    a, b = net.nodes["a"], net.nodes["b"]
    for _ in range(3):
        out = a.core.rekey("b", net.now)  # same `now` each time
        out2, _ = b.core.receive(out[0][1], A_ADDR, net.now)
        assert [m[0] for _, m in out2] == [messages.TYPE_RESPONSE]
    assert b.core.counters["handshake_replay"] == 0


# -- peers, tables, timers bookkeeping ----------------------------------------------------


def test_remove_peer_frees_indices_and_drops_traffic():
    net = established()
    a, b = net.nodes["a"], net.nodes["b"]
    data = net.send("a", "b", 1, ipv4_packet(60, 1))[0]
    net.take()
    assert b.core.remove_peer("a") is True
    assert b.core.remove_peer("a") is False
    assert b.core._index.entries == {}
    net.deliver(data)
    assert b.delivered == [] and b.core.counters["unknown_index"] == 1
    assert b.core.next_timer() is None
    assert a.core.peers()[0]["id"] == "b"


def test_add_peer_validation():
    core = TunnelCore(generate_keypair()[0])
    other = generate_keypair()[1]
    core.add_peer("x", other, None, None)
    with pytest.raises(ValueError):
        core.add_peer("y", other, None, None)  # key already used
    with pytest.raises(ValueError):
        core.add_peer("z", b"short", None, None)
    with pytest.raises(ValueError):
        core.add_peer("me", core.public_key, None, None)
    core.add_peer("x", other, ("192.0.2.7", 1), None)  # same key: update in place
    assert core.peers()[0]["endpoint"] == ("192.0.2.7", 1)
    small = TunnelCore(generate_keypair()[0], max_peers=1)
    small.add_peer("p", other, None, None)
    with pytest.raises(ValueError):
        small.add_peer("q", generate_keypair()[1], None, None)


def test_timer_heap_stays_bounded_under_traffic():
    net = established()
    a, b = net.nodes["a"], net.nodes["b"]
    for i in range(3000):
        net.now += 0.05
        net.send("a", "b", 1, ipv4_packet(60, i % 60000))
        if i % 3 == 0:
            net.send("b", "a", 1, ipv4_packet(60, i % 60000))
        net.flush()
        if i % 50 == 0:
            net.advance(net.now)
    assert len(a.core._heap) <= 4 * 1 + 64 + 1
    assert len(b.core._heap) <= 4 * 1 + 64 + 1
    assert a.core.counters["internal_error"] == b.core.counters["internal_error"] == 0


def test_counters_have_stable_keys():
    core = TunnelCore(generate_keypair()[0])
    keys = set(core.counters)
    for name in (
        "replay",
        "decrypt_failure",
        "unknown_index",
        "rate_limited",
        "malformed",
        "queue_overflow",
        "handshake_timeout",
        "rx_bytes",
        "tx_packets",
    ):
        assert name in keys
    assert all(v == 0 for k, v in core.counters.items() if k != "indices")


def test_peer_without_endpoint_queues_until_it_calls_us():
    net = two()
    a, b = net.nodes["a"], net.nodes["b"]
    b.core.remove_peer("a")
    b.core.add_peer("a", a.public_key, None, None)  # b does not know a's address
    assert net.send("b", "a", 1, ipv4_packet(60, 1)) == []
    assert b.core.peers()[0]["drops"]["no_endpoint"] == 1
    assert b.core.peers()[0]["queued"] == 1
    net.send("a", "b", 1, ipv4_packet(60, 2))
    net.flush()
    assert tags(b) == [2] and tags(a) == [1]
    assert b.core.peers()[0]["endpoint"] == A_ADDR


def test_handshake_time_is_observed_by_the_initiator():
    """Initiation sent at t, response consumed 0.04 s later: one observation of 0.04 s
    on the initiator's side, none on the responder's (it did not wait for anything)."""
    net = two()
    a, b = net.nodes["a"], net.nodes["b"]
    net.send("a", "b", 1, ipv4_packet(60, 1))
    [init] = net.take()
    net.now += 0.01
    net.deliver(init)
    response = net.take()
    net.now += 0.03
    for d in response:
        net.deliver(d)
    h = a.core.handshake_seconds
    assert h.count == 1 and h.sum == pytest.approx(0.04)
    assert h.bounds[h.counts.index(1)] == 0.05
    assert b.core.handshake_seconds.count == 0
