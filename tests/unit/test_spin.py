"""The busy-poll window (fabric.runtime.spin), with explicit times: what the data-plane
thread would do after each turn."""

from __future__ import annotations

import pytest

from fabric.runtime.spin import FLOOR, SpinWindow

US = 1e-6
MS = 1e-3


def turn(w: SpinWindow, start: float, took: float = 5 * US) -> float:
    """A turn that read frames at `start`; the spin's end it leaves (0: sleep)."""
    w.frames(start, start + took)
    return w.until()


def test_off_never_spins() -> None:
    w = SpinWindow()
    assert not w.on
    assert turn(w, 1.0) == 0.0 and w.window == 0.0


def test_fixed_spins_its_window_after_every_frame_turn_whatever_comes() -> None:
    w = SpinWindow(3 * MS)
    assert w.on and not w.adaptive
    assert turn(w, 1.0) == pytest.approx(1.0 + 5 * US + 3 * MS)
    assert w.ended_empty()
    assert w.window == 3 * MS
    assert not w.frames(5.0, 5.0 + 5 * US)  # long after (the thread slept): same window
    w.until()
    assert w.window == 3 * MS
    assert w.frames(5.001, 5.001 + 5 * US)  # found within it
    assert w.window == 3 * MS


def test_adaptive_starts_at_nothing_so_a_lone_frame_costs_no_spin() -> None:
    w = SpinWindow(3 * MS, adaptive=True)
    assert w.window == 0.0
    assert turn(w, 1.0) == 0.0  # no gap seen yet: sleep at once
    assert not w.ended_empty()  # so no spin to end


def test_adaptive_grows_to_twice_a_gap_a_spin_could_cover_up_to_its_max() -> None:
    w = SpinWindow(3 * MS, adaptive=True)
    turn(w, 1.0)
    until = turn(w, 1.0 + 40 * US)  # woke after ~35 µs: a 70 µs spin would have found it
    assert w.window == pytest.approx(70 * US)
    assert until == pytest.approx(1.0 + 45 * US + 70 * US)
    assert w.frames(1.0 + 100 * US, 1.0 + 105 * US)  # found within the spin: grows
    assert w.window == pytest.approx(110 * US)
    w.until()
    w.frames(1.0 + 2.105 * MS, 1.0 + 2.11 * MS)  # 2 ms later: twice that is over the max
    assert w.window == 3 * MS


def test_adaptive_a_short_gap_found_keeps_a_longer_window() -> None:
    w = SpinWindow(3 * MS, adaptive=True)
    turn(w, 1.0)
    turn(w, 1.0 + 1.005 * MS)
    assert w.window == pytest.approx(2 * MS)
    turn(w, 1.0 + 1.02 * MS)  # bulk: frames waiting right away
    assert w.window == pytest.approx(2 * MS)


def test_adaptive_halves_on_every_empty_spin_then_sleeps_at_once() -> None:
    w = SpinWindow(3 * MS, adaptive=True)
    t = 1.0
    turn(w, t)
    turn(w, t + 2 * MS)
    assert w.window == 3 * MS
    windows = []
    for _ in range(12):  # sparse traffic: every gap is 200 ms, longer than the max
        w.ended_empty()
        windows.append(w.window)
        t += 0.2
        turn(w, t)
    assert windows[:3] == pytest.approx([1.5 * MS, 0.75 * MS, 0.375 * MS])
    assert all(x == 0.0 or x >= FLOOR for x in windows)
    assert windows[-1] == 0.0  # below FLOOR: no spin at all
    assert w.until() == 0.0
    spun = 3 * MS + sum(windows)  # what all those spins cost together
    assert spun < 6.1 * MS
    assert not w.ended_empty()  # the shell's report of a spin it never made is ignored
    assert w.window == 0.0


def test_adaptive_comes_back_when_gaps_shorten_again() -> None:
    w = SpinWindow(1 * MS, adaptive=True)
    turn(w, 1.0)
    turn(w, 1.3)  # 300 ms: more than the max, stays at 0
    assert w.window == 0.0
    turn(w, 1.3 + 200 * US)
    assert w.window == pytest.approx(2 * 195 * US)


def test_request_response_past_the_max_spins_about_the_reply_time() -> None:
    # A client asks every 5 ms, the server answers 30 µs later, max 1 ms: the window
    # settles near twice the reply's gap, not the client's interval.
    w = SpinWindow(1 * MS, adaptive=True)
    t = 1.0
    cost = 0.0
    found = 0
    for i in range(40):
        until = turn(w, t)  # the request
        reply = t + 30 * US
        if until and until >= reply:
            cost += reply - (t + 5 * US)
            found += 1
        elif until:
            cost += until - (t + 5 * US)
            w.ended_empty()
        until = turn(w, reply)  # the reply
        nxt = t + 5 * MS
        if until and until < nxt:
            cost += until - (reply + 5 * US)
            w.ended_empty()
        elif until:
            cost += nxt - (reply + 5 * US)
        t = nxt
        if i == 39:
            assert 20 * US <= w.window <= 100 * US
    assert cost / 40 < 120 * US  # per exchange, against 5 ms between them
    assert found > 30


def test_adaptive_with_a_zero_max_is_off() -> None:
    w = SpinWindow(0.0, adaptive=True)
    assert not w.on and not w.adaptive
    assert turn(w, 1.0) == 0.0 and turn(w, 1.0001) == 0.0
