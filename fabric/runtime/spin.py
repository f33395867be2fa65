"""How long the data-plane thread polls after frames instead of sleeping (`worker.busy_poll`).

Why poll at all: on a VM, waking a thread that sleeps in `epoll_wait` from another vCPU
costs tens of µs (an IPI through the hypervisor: docs/performance.md, "ping"); a frame
that comes while the thread still polls costs none. Polling costs a CPU for as long as it
lasts, so the window is where latency is traded for CPU.

Sans-IO: the shell (`DataPlane._run`) tells it what happened, with explicit times, and
asks it when the current spin ends.

- fixed (`busy_poll: 3ms`): after every loop turn that read frames, poll for `cap`.
- adaptive (`busy_poll: {max: 3ms}` or `adaptive`): the window follows the gaps between
  turns with frames. A gap no longer than `cap` (frames a spin found, or frames that woke
  the thread when a longer spin would have found them) makes the window at least twice
  that gap, up to `cap`; a spin that ends with no frames halves it, and once it is below
  FLOOR it is 0 (sleep at once). So request/response traffic spins about as long as its
  gaps up to `cap`, traffic sparser than `cap` costs a few halving spins and then none,
  bulk traffic (frames always waiting) spins only across its short gaps, idle costs
  nothing (a spin starts only after a turn that read frames).
"""

from __future__ import annotations

FLOOR = 10e-6  # an adaptive window below this is 0: shorter spins cannot catch a frame


class SpinWindow:
    """The busy-poll window and its counters (the data-plane thread owns it)."""

    def __init__(self, cap: float = 0.0, adaptive: bool = False) -> None:
        self.cap = cap
        self.adaptive = adaptive and cap > 0
        # The spin window now: fixed, the cap; adaptive, starts at 0 (nothing seen yet).
        self.window = 0.0 if self.adaptive else cap
        self._last: float | None = None  # when the last turn with frames ended
        self._spinning = False

    @property
    def on(self) -> bool:
        return self.cap > 0

    def frames(self, start: float, end: float) -> bool:
        """A loop turn read frames: its poll returned at `start`, the turn ended at `end`.
        Whether a spin found them (the shell counts spins: a reload replaces the window)."""
        found = self._spinning
        self._spinning = False
        last = self._last
        if self.adaptive and last is not None:
            gap = start - last
            if gap <= self.cap:  # a spin this long would have found (or did find) them
                self.window = max(self.window, min(self.cap, 2 * gap))
        self._last = end
        return found

    def until(self) -> float:
        """When the spin after the last turn with frames ends (0: do not spin)."""
        if self._last is None or self.window <= 0:
            return 0.0
        self._spinning = True
        return self._last + self.window

    def ended_empty(self) -> bool:
        """The spin's window passed with no frames: the thread sleeps now. False if no
        spin was under way (nothing changes)."""
        if not self._spinning:
            return False
        self._spinning = False
        if self.adaptive:
            w = self.window / 2
            self.window = w if w >= FLOOR else 0.0
        return True
