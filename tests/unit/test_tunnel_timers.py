"""PeerTimers: the deadline bookkeeping the core schedules."""

from __future__ import annotations

from tunnels import timers as T
from tunnels.timers import PeerTimers


def test_constants_match_wireguard():
    assert T.REKEY_AFTER_TIME == 120 and T.REJECT_AFTER_TIME == 180
    assert T.REKEY_TIMEOUT == 5 and T.REKEY_ATTEMPT_TIME == 90 and T.KEEPALIVE_TIMEOUT == 10
    assert T.REKEY_AFTER_MESSAGES == 2**60
    assert T.REJECT_AFTER_MESSAGES == 2**64 - 2**13 - 1
    assert T.ZERO_KEYS_AFTER == 540


def test_data_sent_arms_new_handshake_once():
    t = PeerTimers()
    assert t.data_sent(0.0, 0.1) == T.NEW_HANDSHAKE_AFTER + 0.1
    assert t.data_sent(1.0, 0.1) is None  # already armed: not pushed later
    t.authenticated_received()
    assert t.new_handshake is None


def test_keepalive_and_need_another():
    t = PeerTimers()
    assert t.data_received(0.0) == T.KEEPALIVE_TIMEOUT
    assert t.data_received(1.0) is None and t.need_another_keepalive
    t.authenticated_sent()
    assert t.send_keepalive is None


def test_handshake_attempts_and_completion():
    t = PeerTimers()
    assert t.handshake_initiated(0.0, 0.2) == 5.2 and t.attempt_start == 0.0
    t.handshake_initiated(5.2, 0.0)
    assert t.attempt_start == 0.0  # a retry continues the same series
    t.handshake_complete()
    assert t.retransmit is None and t.attempt_start is None


def test_expired_disarms_and_earliest():
    t = PeerTimers()
    t.handshake_initiated(0.0, 0.0)
    t.data_received(0.0)
    t.session_derived(0.0)
    assert t.traversal(0.0, 25) == 25
    assert t.traversal(1.0, 25) is None  # moved later: the old heap entry is early enough
    assert t.earliest() == 5.0
    assert t.expired(10.0) == [T.RETRANSMIT, T.SEND_KEEPALIVE]
    assert t.expired(10.0) == []
    assert t.earliest() == 26.0
    t.clear()
    assert t.earliest() is None
    assert t.traversal(0.0, None) is None
