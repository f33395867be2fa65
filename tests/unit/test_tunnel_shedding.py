"""When the tunnel link sheds handshake floods in the kernel: counts and explicit time in,
decisions out (tunnels.prefilter.Shedding)."""

from __future__ import annotations

from tunnels.prefilter import Shedding


def test_a_flood_within_a_second_starts_shedding_and_a_trickle_does_not() -> None:
    s = Shedding(trigger=100, base=1.0, longest=8.0)
    assert not s.observe(0, 0.0)
    assert not s.observe(99, 0.5)
    assert s.until is None
    assert not s.observe(150, 1.2)  # a new second: counted from 150
    assert not s.observe(200, 1.5)
    assert s.observe(250, 1.9)
    assert s.until == 2.9 and s.episodes == 1
    assert not s.observe(10_000, 2.0)  # already shedding


def test_a_lasting_flood_doubles_the_window_up_to_the_longest() -> None:
    s = Shedding(trigger=10, base=1.0, longest=4.0)
    s.observe(0, 0.0)
    assert s.observe(20, 0.1)
    windows = []
    now, count = 0.1, 20
    for _ in range(5):
        now = s.until  # type: ignore[assignment]
        assert s.expired(now)
        assert s.next_timer() == now + s.window
        assert not s.observe(count, now)  # a fresh count after the lift
        count += 50
        now += 0.01
        assert s.observe(count, now)
        windows.append(s.window)
    assert windows == [2.0, 4.0, 4.0, 4.0, 4.0]
    assert s.episodes == 1


def test_a_flood_that_stopped_is_over_after_one_quiet_window() -> None:
    s = Shedding(trigger=10, base=1.0, longest=8.0)
    s.observe(0, 0.0)
    assert s.observe(20, 0.5)
    assert not s.expired(1.4)
    assert s.expired(1.5)
    assert not s.expired(1.6)  # once
    assert not s.over(2.4)
    assert s.next_timer() == 2.5
    assert not s.observe(20, 2.0)
    assert s.over(2.6)
    assert not s.over(2.7)
    assert s.next_timer() is None
    # the next flood is a new episode at the base window
    s.observe(20, 10.0)
    assert s.observe(40, 10.1)
    assert s.episodes == 2 and s.window == 1.0


def test_counters_going_back_reset_the_count() -> None:
    s = Shedding(trigger=10)
    s.observe(100, 0.0)
    assert not s.observe(5, 0.1)  # a new core: counted afresh
    assert s.observe(20, 0.2)
