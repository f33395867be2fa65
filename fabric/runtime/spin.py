"""How long the data-plane thread polls after frames instead of sleeping (`worker.busy_poll`).

Why poll at all: on a VM, waking a thread that sleeps in `epoll_wait` from another vCPU
costs tens of µs (an IPI through the hypervisor: docs/performance.md, "ping"); a frame
that comes while the thread still polls costs none. Polling costs a CPU for as long as it
lasts, so the window is where latency is traded for CPU.

Sans-IO: the shell (`DataPlane._run`) tells it what happened, with explicit times, and
asks it when to spin.

- fixed (`busy_poll: 3ms`): after every loop turn that read frames, poll for `cap`.
- adaptive (`busy_poll: {max: 3ms}` or `adaptive`): the spin follows the gaps between
  turns with frames (a gap: from the end of one such turn to the poll that returned the
  next frames), two kinds of them:
  - short gaps (at most SHORT, a reply coming back through the fabric): a gap makes the
    spin right after a turn at least twice that long (up to `cap`); a spin that ends
    with no frames halves it, and below FLOOR it is 0. So a request's spin lasts about
    as long as its reply takes.
  - longer gaps (a client's next request, ping's interval): the frames after them come
    at a period, the time between two such frames (from one's poll to the next's), and
    the last HISTORY periods up to `cap` predict the next (`predicted`; periods, not
    gaps: a sender's clock does not move with how long the fabric took over the reply).
    Once the turn's own spin is over, the thread sleeps until `lead` before the shortest
    period is up and spins until `tail` past the longest: a wake by its own timer, on
    its own vCPU, off the frame's path, instead of a wake by the sender's vCPU when the
    frame comes. Both are MARGIN plus what misses taught:
    `lead` also covers how late the timer wakes the thread (a moving average) and each
    end grows (doubles, plus MARGIN) when a frame misses the spin on its side (a sender
    that jitters more than the history shows), shrinking by an eighth per spin that
    found its frame. No such spin when more than OVER of the periods were longer than
    `cap`, with fewer than two, or when the spin would last more than SHARP of the
    shortest period (frames that come at random, not at a period: spinning for them
    would cost most of a core).
  So periodic traffic spins about its jitter, traffic sparser than `cap` costs nothing
  past a few halving spins, bulk traffic (frames always waiting) spins only across its
  short gaps, idle costs nothing (every spin follows a turn that read frames).
"""

from __future__ import annotations

import math
from collections import deque

FLOOR = 10e-6  # an adaptive window below this is 0: shorter spins cannot catch a frame
SHORT = 200e-6  # about twice what a cross-vCPU wakeup costs the thread here
MARGIN = 50e-6  # what a spin ahead should wait for its frame
HISTORY = 16  # periods that predict the next
OVER = 4  # of them at most this many longer than the max (a stall) and still predict
SHARP = 0.25  # a spin ahead at most this share of the period: else it is no prediction

NONE, FOUND, EARLY = 0, 1, 2  # what frames() says about the turn's frames
_IDLE, _SHORT, _WAIT, _AHEAD = range(4)


class SpinWindow:
    """The busy-poll windows of one data plane (its thread owns it)."""

    def __init__(self, cap: float = 0.0, adaptive: bool = False) -> None:
        self.cap = cap
        self.adaptive = adaptive and cap > 0
        # The spin right after a turn with frames: fixed, the cap; adaptive, starts at 0.
        self.window = 0.0 if self.adaptive else cap
        self.late = 0.0  # how late the timer woke the thread for a spin ahead (average)
        self._boost_lead = self._boost_tail = 0.0  # what frames missing a spin taught
        self._periods: deque[float] = deque(maxlen=HISTORY)  # (inf: over cap)
        self._last: float | None = None  # when the last turn with frames ended
        self._anchor: float | None = None  # when the last frames after a longer gap came
        self._phase = _IDLE
        self._ahead_done = False  # one spin ahead per turn with frames
        self._from = self._to = self._woke = 0.0
        self._missed = False  # the last spin ahead ended before its frame came

    @property
    def on(self) -> bool:
        return self.cap > 0

    def frames(self, start: float, end: float) -> int:
        """A loop turn read frames: its poll returned at `start`, the turn ended at `end`.
        FOUND if a spin found them, EARLY if they came while the thread slept towards a
        spin ahead, else NONE (the shell counts these: a reload replaces the window)."""
        phase = self._phase
        said = FOUND if phase in (_SHORT, _AHEAD) else NONE
        self._phase = _IDLE
        self._ahead_done = False
        missed, self._missed = self._missed, False
        last = self._last
        self._last = end
        if not self.adaptive or last is None:
            return said
        gap = start - last
        if gap <= min(SHORT, self.cap):  # a reply (or frames waiting): not the long gap
            self.window = max(self.window, min(self.cap, 2 * gap))
            return said
        anchor, self._anchor = self._anchor, start
        if anchor is not None:
            period = start - anchor
            self._periods.append(period if period <= self.cap else math.inf)
        if phase == _WAIT:  # it beat the spin ahead: start earlier
            self._boost_lead = min(self.cap, 2 * self._boost_lead + MARGIN)
            return EARLY
        if phase == _AHEAD:  # found: what misses taught fades
            self._boost_lead *= 7 / 8
            self._boost_tail *= 7 / 8
        elif missed and gap <= self.cap:  # it came after the spin ahead: end later
            self._boost_tail = min(self.cap, 2 * self._boost_tail + MARGIN)
        return said

    @property
    def lead(self) -> float:
        """How long before the shortest predicted gap a spin ahead starts."""
        return MARGIN + self.late + self._boost_lead

    @property
    def tail(self) -> float:
        """How long past the longest predicted gap a spin ahead lasts."""
        return MARGIN + self._boost_tail

    def until(self) -> float:
        """When the spin right after the last turn with frames ends (0: no such spin; ask
        wake_at)."""
        if self._last is None or self.window <= 0:
            return 0.0
        self._phase = _SHORT
        return self._last + self.window

    def ended_empty(self) -> bool:
        """The spin's window passed with no frames (ask wake_at next). False if no spin
        was under way (nothing changes)."""
        phase = self._phase
        if phase not in (_SHORT, _AHEAD):
            return False
        self._phase = _IDLE
        if phase == _SHORT and self.adaptive:
            w = self.window / 2
            self.window = w if w >= FLOOR else 0.0
        self._missed = phase == _AHEAD
        return True

    def wake_at(self) -> float:
        """When to wake for a spin ahead of the predicted next frames (0: sleep until
        something comes). Once per turn with frames, after its own spin (if any)."""
        if not self.adaptive or self._last is None or self._phase != _IDLE \
                or self._ahead_done:
            return 0.0
        self._ahead_done = True
        bounds = self.predicted()
        if bounds is None:
            return 0.0
        lo, hi = bounds
        if hi + self.tail - (lo - self.lead) > SHARP * lo:
            return 0.0
        self._phase = _WAIT
        assert self._anchor is not None
        self._from = self._anchor + lo - self.lead
        self._to = self._anchor + hi + self.tail
        return self._from

    def woke(self, now: float) -> float:
        """The thread woke at `now` for the spin ahead: spin until this (0: none due)."""
        if self._phase != _WAIT or now < self._from:
            return 0.0
        self._woke = now
        self.late += (now - self._from - self.late) / 8
        self._phase = _AHEAD
        return max(self._to, now)

    def predicted(self) -> tuple[float, float] | None:
        """The next period's bounds (shortest, longest) among the last HISTORY that were
        not longer than `cap`; None with fewer than two, or when more than OVER of them
        were (the traffic is sparser than that, or its sender stalls)."""
        periods = [p for p in self._periods if p != math.inf]
        if len(self._periods) - len(periods) > OVER or len(periods) < 2:
            return None
        return min(periods), max(periods)
