"""Peers recover at once: a worker contacts its peers as soon as it starts, and data for
a session it lost (it restarted) from a peer's endpoint starts a bounded handshake, so
traffic both ways resumes within a second of simulated time instead of WireGuard's 15 s.
Also the handshake work budget: what a flood of handshake messages may cost."""

from __future__ import annotations

import os
import random

from tests.support.tunnel_net import Net, Node, ipv4_packet, packet_tag
from tunnels import messages
from tunnels.cookie import hash32, mac16
from tunnels.core import (
    DEFAULT_HANDSHAKE_BUDGET,
    UNKNOWN_SESSION_INTERVAL,
    UNKNOWN_SESSION_RATE,
    TunnelCore,
)
from tunnels.timers import REKEY_TIMEOUT

A_ADDR = ("192.0.2.1", 51820)
B_ADDR = ("192.0.2.2", 51820)
STEP = 0.1  # a ping every 100 ms


def established() -> Net:
    net = Net()
    net.add("a", A_ADDR, seed=1)
    net.add("b", B_ADDR, seed=2)
    net.link("a", "b")
    net.advance(net.now)  # the start-up handshake
    for x, y in (("a", "b"), ("b", "a")):
        net.send(x, y, 1, ipv4_packet(60, 1))
        net.flush()
        assert [packet_tag(p) for _, _, p in net.nodes[y].delivered] == [1]
        net.nodes[y].delivered.clear()
    return net


def restart(net: Net, name: str, peer: str, seed: int, knows_peer: bool = True) -> Node:
    """`name` comes back as a fresh core with the same keys and configuration (what a
    kill -9 and a start do): every session it had is gone, its peer still holds one."""
    node = net.nodes[name]
    node.core = TunnelCore(node.private_key, rng=random.Random(seed).randbytes)
    other = net.nodes[peer]
    node.core.add_peer(peer, other.public_key, other.addr if knows_peer else None, None)
    node.delivered.clear()
    return node


def until_delivered(net: Net, src: str, dst: str, limit: float = 30.0) -> float:
    """`src` sends a packet every STEP (timers run, everything delivered); seconds until
    the first one reaches `dst`."""
    start = net.now
    receiver = net.nodes[dst]
    tag = 100
    while net.now - start < limit:
        tag += 1
        net.send(src, dst, 1, ipv4_packet(60, tag))
        net.flush()
        if any(packet_tag(p) == tag for _, _, p in receiver.delivered):
            return net.now - start
        net.advance(net.now + STEP)
    return float("inf")


def test_a_peer_is_contacted_as_soon_as_it_is_added():
    net = Net()
    a = net.add("a", A_ADDR, seed=1)
    b = net.add("b", B_ADDR, seed=2)
    net.link("a", "b")
    assert a.core.next_timer() is not None and a.core.next_timer() <= net.now
    net.advance(net.now)  # no packet was sent: the peers handshake anyway
    assert a.core.counters["handshake_complete"] + b.core.counters["handshake_complete"] >= 2
    assert a.core.peers()[0]["session_age"] == 0.0
    # Nothing waits: the first packet either way goes out as data on that session.
    assert [d.kind for d in net.send("a", "b", 1, ipv4_packet(60, 1))] == [messages.TYPE_DATA]
    assert [d.kind for d in net.send("b", "a", 1, ipv4_packet(60, 2))] == [messages.TYPE_DATA]


def test_a_peer_without_an_address_waits_and_one_given_an_address_is_contacted():
    net = Net()
    a = net.add("a", A_ADDR, seed=1)
    b = net.add("b", B_ADDR, seed=2)
    net.link("a", "b", a_knows_b=False, b_knows_a=False)
    assert a.core.next_timer() is None and b.core.next_timer() is None
    a.core.add_peer("b", b.public_key, B_ADDR)  # e.g. its host name resolved later
    net.advance(net.now)
    assert a.core.counters["handshake_complete"] == 1
    assert b.core.peers()[0]["endpoint"] == A_ADDR


def test_start_up_handshakes_retry_on_the_normal_timers():
    net = Net()
    a = net.add("a", A_ADDR, seed=1)
    net.add("b", B_ADDR, seed=2)
    net.link("a", "b", b_knows_a=False)
    net.nodes["b"].addr = ("198.51.100.9", 1)  # b is not there
    net.advance(net.now + 2 * (REKEY_TIMEOUT + 0.34))
    assert a.core.counters["initiation_sent"] == 3  # at once, then every 5 s + jitter


def test_restarted_worker_is_reached_at_once_both_ways():
    """b is killed and comes back: the traffic a (the survivor, holding the session b
    lost) sends toward b resumes at once, and so does b's toward a."""
    net = established()
    net.advance(net.now + 30)  # b is down for a while; a does not notice
    restart(net, "b", "a", seed=77)
    a_to_b = until_delivered(net, "a", "b")
    assert a_to_b < 1.0, a_to_b
    assert until_delivered(net, "b", "a") < 1.0
    pa = net.nodes["a"].core._peers["b"]
    pb = net.nodes["b"].core._peers["a"]
    # The survivor switched to the new session: it sends on it, the lost one is gone.
    assert pa.current.remote_index == pb.current.local_index
    assert pa.next is None


def test_restarted_worker_whose_first_handshake_was_lost_answers_stale_data_with_one():
    """b's start-up initiation is lost; a keeps sending on the session b lost. Data for
    an unknown session from a's endpoint makes b initiate (once a second at most)."""
    net = established()
    net.advance(net.now + 30)
    b = restart(net, "b", "a", seed=77)
    net.advance(net.now, deliver=False)
    lost = net.take()
    assert [d.kind for d in lost] == [messages.TYPE_INITIATION]
    took = until_delivered(net, "a", "b")
    c = b.core.counters
    # The first stale packet after the interval starts it, the next one goes through.
    assert took <= UNKNOWN_SESSION_INTERVAL + 2 * STEP + 1e-6, took  # not 15 s
    assert c["unknown_session"] >= 1 and c["handshake_on_unknown_session"] == 1
    assert c["unknown_index"] == 0
    assert until_delivered(net, "b", "a") < 1.0


def test_restart_left_to_the_survivors_timers_takes_15s():
    """A restarted side that can neither contact its peer nor tell stale data is the
    peer's (it has no address for it) leaves it to the survivor's timers: the 15 s
    the issue measured, so the bound above is the fix, not the scenario."""
    net = established()
    net.advance(net.now + 30)
    restart(net, "b", "a", seed=77, knows_peer=False)
    took = until_delivered(net, "a", "b")
    assert 10 < took < 20, took


def _data(index: int) -> bytes:
    return messages.DATA_HEADER.pack(messages.TYPE_DATA, index, 0) + os.urandom(40)


def test_handshakes_on_unknown_sessions_are_bounded_per_peer_and_in_all():
    """A spoofer sending data with made-up indices from peers' endpoints makes us send at
    most one initiation per peer per second and UNKNOWN_SESSION_RATE/s in all."""
    core = TunnelCore(random.Random(5).randbytes(32), rng=random.Random(6).randbytes)
    peers = []
    for i in range(100):
        pub = TunnelCore(random.Random(100 + i).randbytes(32)).public_key
        addr = (f"192.0.2.{10 + i}", 51820)
        core.add_peer(f"p{i}", pub, addr)
        peers.append(addr)
    now = 1000.0
    core.handle_timer(now)  # the start-up initiations
    sent = core.counters["initiation_sent"]
    assert sent == 100
    now += UNKNOWN_SESSION_INTERVAL
    initiations = 0
    for step in range(200):  # 2 s: 100 datagrams from each of the 100 endpoints
        t = now + step * 0.01
        for addr in peers[step % 2 :: 2]:
            out, packets = core.receive(_data(step * 1000 + 1), addr, t)
            assert packets == []
            assert all(dst == addr and m[0] == messages.TYPE_INITIATION for dst, m in out)
            initiations += len(out)
        out, _ = core.receive(_data(7), ("203.0.113.1", 9), t)  # not a peer's
        assert out == []
    c = core.counters
    assert initiations == c["handshake_on_unknown_session"]
    assert initiations <= UNKNOWN_SESSION_RATE * (1 + 2.0) + 1  # burst + 2 s at the rate
    assert c["unknown_session_limited"] > 0
    assert c["unknown_session"] == 100 * 100
    assert c["unknown_index"] == 200


def _initiation(core: TunnelCore, good_mac1: bool = True) -> bytes:
    body = messages.INDEX_HEADER.pack(messages.TYPE_INITIATION, 1) + os.urandom(
        messages.NOISE_MSG1_LEN)
    key = hash32(messages.LABEL_MAC1 + core.public_key)
    body += mac16(key, body) if good_mac1 else os.urandom(16)
    return body + bytes(16)


def test_handshake_budget_drops_a_flood_before_any_crypto():
    core = TunnelCore(random.Random(5).randbytes(32), handshake_budget=100.0)
    now = 1000.0
    junk = [_initiation(core, good_mac1=False) for _ in range(1000)]
    for i, d in enumerate(junk):  # 1,000 in one second
        core.receive(d, (f"198.51.100.{i % 250}", 1000 + i), now + i / 1000)
    c = core.counters
    # Only what the budget admitted got as far as mac1 (a quarter second's burst plus
    # the rate): the rest was dropped before any BLAKE2s.
    assert c["mac1_invalid"] + c["handshake_over_budget"] == 1000
    assert 100 <= c["mac1_invalid"] <= 25 + 100 + 1
    assert c["handshake_over_budget_peer"] == 0


def test_a_peer_handshakes_through_a_flood_from_elsewhere():
    """10,000 spoofed mac1-valid initiations a second from random sources: a (a peer, at
    its endpoint) still gets its cookie and then its session; the flood gets at most the
    budget's worth of cookie replies."""
    net = Net()
    a = net.add("a", A_ADDR, seed=1)
    b = net.add("b", B_ADDR, seed=2)
    net.link("a", "b", b_knows_a=False)  # only a initiates, into the flood
    flood = [_initiation(b.core) for _ in range(500)]
    rng = random.Random(3)
    rate = 10_000
    start = net.now
    net.send("a", "b", 1, ipv4_packet(60, 1))
    done_at = None
    sent = 0
    while net.now - start < 8.0:
        for _ in range(rate // 100):  # 10 ms of flood
            src = (f"203.0.{rng.randrange(256)}.{rng.randrange(256)}", rng.randrange(65536))
            b.core.receive(flood[sent % len(flood)], src, net.now)
            sent += 1
        net.advance(net.now + 0.01)
        net.flush()
        if done_at is None and b.delivered:
            done_at = net.now - start
    c = b.core.counters
    assert done_at is not None and done_at < REKEY_TIMEOUT + 1.0, done_at
    assert c["handshake_over_budget"] > 0.8 * sent
    assert c["handshake_over_budget_peer"] == 0
    assert c["cookie_sent"] <= DEFAULT_HANDSHAKE_BUDGET * (8.0 + 0.25) + 10
    assert a.core.counters["cookie_received"] >= 1


def test_a_flood_spoofing_one_peer_leaves_the_other_peers_their_share():
    """The flood comes from a's endpoint (the attacker knows it): it gets a's share of
    the peers' budget, and c still handshakes with b."""
    net = Net()
    net.add("a", A_ADDR, seed=1)
    b = net.add("b", B_ADDR, seed=2)
    c = net.add("c", ("192.0.2.3", 51820), seed=3)
    net.link("a", "b")
    net.link("c", "b", b_knows_a=False)  # only c initiates
    flood = [_initiation(b.core) for _ in range(200)]
    start = net.now
    net.send("c", "b", 1, ipv4_packet(60, 1))
    sent = 0
    while net.now - start < 7.0:
        for _ in range(100):  # 10,000 a second
            b.core.receive(flood[sent % len(flood)], A_ADDR, net.now)
            sent += 1
        net.advance(net.now + 0.01)
        net.flush()
    counters = b.core.counters
    assert ("c", 1, ipv4_packet(60, 1)) in b.delivered
    assert counters["handshake_over_budget_peer"] >= sent - (10 + 10 * 7.0) - 1
    assert counters["cookie_sent"] <= 10 + 10 * 7.0 + 5
    assert c.core.counters["handshake_complete"] == 1
