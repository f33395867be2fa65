"""The busy-poll windows (fabric.runtime.spin), with explicit times: what the data-plane
thread would do between frames, played by `Thread` the way DataPlane._run drives it."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from fabric.runtime.spin import (
    EARLY,
    FLOOR,
    FOUND,
    HISTORY,
    MARGIN,
    NONE,
    OVER,
    SHARP,
    SHORT,
    SpinWindow,
)

US = 1e-6
MS = 1e-3


def turn(w: SpinWindow, start: float, took: float = 5 * US) -> float:
    """A turn that read frames at `start`; the spin's end it leaves (0: none)."""
    w.frames(start, start + took)
    return w.until()


@dataclass
class Thread:
    """The shell's part: spins, sleeps, wakes by its timer (`timer_late` after the time
    asked) or by a frame (`wake_cost` after it came, the cross-vCPU wakeup)."""

    w: SpinWindow
    took: float = 5 * US
    timer_late: float = 0.0
    wake_cost: float = 40 * US
    spun: float = 0.0  # seconds spent polling
    caught: int = 0  # frames a spin found
    woken: int = 0  # frames that had to wake the thread
    early: int = 0
    aheads: int = 0  # wakes by its own timer for a spin ahead

    def run(self, arrivals: list[float]) -> Thread:
        end: float | None = None
        spin_until = wake_at = 0.0
        for a in arrivals:
            t = end if end is not None else a
            start = None
            if end is not None and a <= end:  # it came during the turn: no wait at all
                start = end
                spin_until = wake_at = 0.0
            while end is not None and start is None:
                if spin_until:
                    if a <= spin_until:
                        self.spun += max(0.0, a - t)
                        start = max(a, t)
                        self.caught += 1
                        break
                    self.spun += spin_until - t
                    t = spin_until
                    self.w.ended_empty()
                    spin_until = 0.0
                    wake_at = self.w.wake_at()
                elif wake_at and a >= wake_at + self.timer_late:
                    t = wake_at + self.timer_late
                    spin_until = self.w.woke(t)
                    wake_at = 0.0
                    self.aheads += 1
                else:
                    start = a + self.wake_cost
                    self.woken += 1
            if start is None:
                start = a + self.wake_cost
                self.woken += 1
            said = self.w.frames(start, start + self.took)
            self.early += said == EARLY
            end = start + self.took
            spin_until = self.w.until()
            wake_at = 0.0 if spin_until else self.w.wake_at()
        return self


def pings(n: int, every: float, reply: float = 3 * US, t0: float = 1.0) -> list[float]:
    """Each echo: the request, and the reply `reply` later (both cross the fabric)."""
    out = []
    for i in range(n):
        out += [t0 + i * every, t0 + i * every + reply]
    return out


def test_off_never_spins() -> None:
    w = SpinWindow()
    assert not w.on
    assert turn(w, 1.0) == 0.0 and w.window == 0.0 and w.wake_at() == 0.0


def test_fixed_spins_its_window_after_every_frame_turn_whatever_comes() -> None:
    w = SpinWindow(3 * MS)
    assert w.on and not w.adaptive
    assert turn(w, 1.0) == pytest.approx(1.0 + 5 * US + 3 * MS)
    assert w.ended_empty()
    assert w.window == 3 * MS and w.wake_at() == 0.0
    assert w.frames(5.0, 5.0 + 5 * US) == NONE  # long after (the thread slept)
    w.until()
    assert w.frames(5.001, 5.001 + 5 * US) == FOUND  # within the window
    assert w.window == 3 * MS
    th = Thread(SpinWindow(3 * MS)).run(pings(50, 2 * MS))
    assert th.woken == 1 and th.caught == 49  # the first request; replies wait in line
    assert th.spun > 49 * 1.9 * MS  # a whole core between echoes


def test_adaptive_starts_at_nothing_so_a_lone_frame_costs_no_spin() -> None:
    w = SpinWindow(3 * MS, adaptive=True)
    assert w.window == 0.0
    assert turn(w, 1.0) == 0.0 and w.wake_at() == 0.0  # no gap seen yet: sleep at once
    assert not w.ended_empty()  # so no spin to end


def test_adaptive_short_gaps_set_the_spin_after_a_turn_to_twice_them() -> None:
    w = SpinWindow(3 * MS, adaptive=True)
    turn(w, 1.0)
    until = turn(w, 1.0 + 40 * US)  # woke ~35 µs later: a 70 µs spin would have found it
    assert w.window == pytest.approx(70 * US)
    assert until == pytest.approx(1.0 + 45 * US + 70 * US)
    assert w.frames(1.0 + 100 * US, 1.0 + 105 * US) == FOUND  # within the spin: grows
    assert w.window == pytest.approx(110 * US)
    w.until()
    w.frames(1.0 + 110 * US, 1.0 + 115 * US)  # bulk: frames right away keep the window
    assert w.window == pytest.approx(110 * US)
    capped = SpinWindow(50 * US, adaptive=True)
    turn(capped, 1.0)
    turn(capped, 1.0 + 45 * US)
    assert capped.window == 50 * US


def test_adaptive_halves_on_every_empty_spin_then_sleeps_at_once() -> None:
    w = SpinWindow(3 * MS, adaptive=True)
    t = 1.0
    turn(w, t)
    turn(w, t + 155 * US)
    assert w.window == pytest.approx(300 * US)
    windows = []
    for _ in range(8):  # sparse traffic: every gap is 200 ms, longer than the max
        w.ended_empty()
        windows.append(w.window)
        t += 0.2
        turn(w, t)
        assert w.wake_at() == 0.0  # a gap over the max: nothing to spin ahead for
    assert windows[:3] == pytest.approx([150 * US, 75 * US, 37.5 * US])
    assert all(x == 0.0 or x >= FLOOR for x in windows)
    assert windows[-1] == 0.0 and w.until() == 0.0  # below FLOOR: no spin at all
    assert not w.ended_empty()  # the shell's report of a spin it never made is ignored


def test_sparse_traffic_costs_a_few_halving_spins_then_nothing() -> None:
    th = Thread(SpinWindow(3 * MS, adaptive=True)).run(pings(25, 0.2))
    assert th.aheads == 0 and th.spun < 50 * US
    assert th.woken == 25  # every request wakes the thread, as with busy_poll off


def test_periodic_gaps_are_met_by_a_spin_ahead_not_a_spin_across_them() -> None:
    th = Thread(SpinWindow(3 * MS, adaptive=True), timer_late=30 * US).run(
        pings(200, 2 * MS))
    assert th.woken <= 5  # the first requests, before the spins ahead are early enough
    assert th.caught >= 190 and th.aheads >= 190
    per_echo = th.spun / 200
    assert per_echo < 2 * MARGIN  # against the 2 ms a fixed window spins
    # it learnt how late its timer wakes it: the spin starts MARGIN before the frame
    assert th.w.lead == pytest.approx(MARGIN + 30 * US, abs=5 * US)
    assert th.w.predicted() == pytest.approx((2 * MS, 2 * MS), abs=15 * US)


def test_a_sender_that_jitters_widens_the_spin_ahead_on_the_side_it_misses() -> None:
    # requests every 2 ms give or take up to 80 µs (ping's own timer slack), a timer
    # that wakes the thread 20 µs late, a wakeup by a frame that costs 60 µs
    jitter = [((i * 37) % 17 - 8) * 10 * US for i in range(300)]
    arrivals = []
    for i, j in enumerate(jitter):
        arrivals += [1.0 + i * 2 * MS + j, 1.0 + i * 2 * MS + j + 3 * US]
    w = SpinWindow(3 * MS, adaptive=True)
    th = Thread(w, timer_late=20 * US, wake_cost=60 * US).run(arrivals)
    assert th.woken < 30 and th.caught > 270  # of 300 requests
    assert th.spun / 300 < 300 * US  # the 160 µs of jitter and the margins, not 2 ms
    assert w.late == pytest.approx(20 * US, rel=0.1)


def test_frames_at_random_get_no_spin_ahead_so_they_cannot_cost_a_core() -> None:
    # ~700 frames a second at random (a mix of pods' traffic, not one sender's clock):
    # gaps from 0.3 to 2.7 ms, mostly within the max
    rand = random.Random(12)
    arrivals, t = [], 1.0
    for _ in range(500):
        t += rand.uniform(0.3 * MS, 2.7 * MS)
        arrivals.append(t)
    w = SpinWindow(3 * MS, adaptive=True)
    th = Thread(w).run(arrivals)
    assert th.aheads == 0
    assert th.spun < 0.01 * (arrivals[-1] - arrivals[0])  # under 1 % of the time


def test_spins_ahead_stop_once_the_traffic_is_sparser_than_the_max() -> None:
    w = SpinWindow(3 * MS, adaptive=True)
    Thread(w).run(pings(10, 2 * MS))
    assert w.predicted() is not None
    th = Thread(w).run(pings(OVER, 1.0, t0=2.0))  # a stall or two: still predicted
    assert w.predicted() is not None
    th = Thread(w).run(pings(2, 1.0, t0=10.0))
    assert w.predicted() is None and w.wake_at() == 0.0
    assert th.aheads <= 1


def test_frames_before_the_spin_ahead_are_early_and_make_it_start_sooner() -> None:
    w = SpinWindow(3 * MS, adaptive=True)
    Thread(w).run(pings(10, 2 * MS))
    lead = w.lead
    th = Thread(w).run([1.0 + 10 * 2 * MS - 1 * MS])  # 1 ms early
    assert th.early == 1 and w.lead == pytest.approx(lead + MARGIN)
    lo, hi = w.predicted() or (0, 0)
    assert lo < 1.1 * MS and hi > 1.9 * MS  # the next spin covers both gaps


def test_frames_after_the_spin_ahead_make_it_last_longer_then_it_fades() -> None:
    w = SpinWindow(3 * MS, adaptive=True)
    late = 1.0 + 10 * 2 * MS + 500 * US  # 0.5 ms late: after the spin ended
    Thread(w).run(pings(10, 2 * MS) + [late])
    assert w.tail == pytest.approx(2 * MARGIN)
    w = SpinWindow(3 * MS, adaptive=True)
    Thread(w).run(pings(10, 2 * MS) + [late] + pings(20, 2 * MS, t0=late + 2 * MS))
    assert MARGIN <= w.tail < 2 * MARGIN  # each spin that finds its frame: an eighth off


def test_one_spin_ahead_per_turn_with_frames() -> None:
    w = SpinWindow(3 * MS, adaptive=True)
    for i in range(4):
        turn(w, 1.0 + i * 2 * MS)
    at = w.wake_at()
    assert at == pytest.approx(1.0 + 6 * MS + 5 * US + 2 * MS - 5 * US - MARGIN)
    assert w.woke(at - 1 * US) == 0.0  # not due yet
    until = w.woke(at)
    assert until == pytest.approx(1.0 + 8 * MS + MARGIN)
    assert w.ended_empty()  # nothing came
    assert w.wake_at() == 0.0  # not again before frames come
    assert w.frames(1.0 + 9 * MS, 1.0 + 9 * MS + 5 * US) == NONE


def test_request_response_past_the_max_spins_about_the_reply_time() -> None:
    # A client asks every 5 ms, the server answers 30 µs later, max 1 ms: the spin after
    # a request lasts about the reply's gap; the 5 ms gaps are not spun for.
    w = SpinWindow(1 * MS, adaptive=True)
    th = Thread(w, wake_cost=0.0).run(pings(40, 5 * MS, reply=30 * US))
    assert 20 * US <= w.window <= 100 * US
    assert th.caught > 30 and th.aheads == 0
    assert th.spun / 40 < 120 * US  # per exchange, against 5 ms between them


def test_request_response_within_the_max_spins_for_the_reply_and_ahead() -> None:
    w = SpinWindow(3 * MS, adaptive=True)
    th = Thread(w).run(pings(100, 2 * MS, reply=60 * US))
    assert th.caught >= 190 and th.woken <= 6
    assert th.spun / 100 < 60 * US + 4 * MARGIN + 2 * w.window


def test_adaptive_with_a_zero_max_is_off() -> None:
    w = SpinWindow(0.0, adaptive=True)
    assert not w.on and not w.adaptive
    assert turn(w, 1.0) == 0.0 and turn(w, 1.0001) == 0.0 and w.wake_at() == 0.0


def test_constants_agree() -> None:
    assert FLOOR < MARGIN < SHORT and HISTORY >= 4 and OVER < HISTORY // 2
    assert 0 < SHARP < 1
