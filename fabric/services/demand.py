"""A service's demand: whether it is needed now (a level), and the signals its edges send
to the controller.

The level rises on a held packet, a new flow or an activator's request, and falls when
the service has had nothing to do (no held packet, no open flow, no traffic) for
`idle_timeout`. Each rise is an ``activate`` signal and each fall an ``idle`` signal, with
two rules that keep a flapping service from flooding its controller while never letting
it lose track of the level:

- Debounce: an activate within `debounce` of the previous one waits for the end of that
  interval (and is not sent at all if the level fell again meanwhile: then neither the
  rise nor the fall was news).
- Coalescing (``coalesce``): at most two signals wait, of alternating kinds, and the
  last one always gives the current level; a repeated kind keeps the first reason.

Sans-IO: the service core tells it about traffic and edges with the time, and asks
``next_timer()``/``handle_timer(now, busy)`` where `busy` says whether anything still
holds the service up (held packets, open flows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

ACTIVATE_DEBOUNCE = 1.0

# What check_idle()/handle_timer() report about a fall.
STAYED = 0  # still needed (or never was)
FELL = 1  # fell, and an idle signal is on its way
FELL_QUIETLY = 2  # fell before its rise was ever told: neither is news


class FlowId(NamedTuple):
    """A flow as the client sent it, for signals and status."""

    proto: str
    src: str
    sport: int
    dst: str
    dport: int

    def __str__(self) -> str:
        return f"{self.proto} {self.src}:{self.sport} -> {self.dst}:{self.dport}"


@dataclass(frozen=True, slots=True)
class Signal:
    kind: str  # "activate" or "idle"
    reason: str
    flow: FlowId | None


def coalesce(pending: list[Signal], sig: Signal) -> None:
    """Queue `sig` behind `pending` by the rules above (in place)."""
    if pending and pending[-1].kind == sig.kind:
        return  # the level did not change since the last one queued
    if len(pending) == 2:  # [x, y] + x: y was undone, the level is x again
        pending.pop()
        return
    pending.append(sig)


class Demand:
    """The need level and its signals (see module docstring)."""

    def __init__(self, idle_timeout: float, debounce: float = ACTIVATE_DEBOUNCE,
                 now: float = 0.0, counters: dict[str, int] | None = None) -> None:
        self.idle_timeout = idle_timeout
        self.debounce = debounce
        self.need = False
        self.last_traffic = now  # the hot path sets this directly
        # "activations" and "idles" are counted here (the service's counters when given).
        self.counters = counters if counters is not None else {"activations": 0, "idles": 0}
        self._last_activate: float | None = None
        self._deferred: tuple[float, str, FlowId | None] | None = None
        self._pending: list[Signal] = []
        self._pending_at = 0.0

    def rise(self, reason: str, flow: FlowId | None, now: float) -> None:
        """The service is wanted (call only while not needed)."""
        self.need = True
        last = self._last_activate
        if last is not None and now < last + self.debounce:
            if self._deferred is None:
                self._deferred = (last + self.debounce, reason, flow)
            return
        self._activate(reason, flow, now)

    def _activate(self, reason: str, flow: FlowId | None, now: float) -> None:
        self._last_activate = now
        self.counters["activations"] += 1
        self._queue(Signal("activate", reason, flow), now)

    def _queue(self, sig: Signal, now: float) -> None:
        if not self._pending:
            self._pending_at = now
        coalesce(self._pending, sig)

    @property
    def signals_pending(self) -> bool:
        return bool(self._pending)

    @property
    def queued(self) -> int:
        """How many signals wait (never more than two)."""
        return len(self._pending)

    def take_signals(self) -> list[Signal]:
        out = self._pending
        self._pending = []
        return out

    def idle_due(self, busy: bool) -> float | None:
        if not self.need or busy:
            return None
        return self.last_traffic + self.idle_timeout

    def check_idle(self, now: float, busy: bool) -> int:
        """Let the level fall if the service has been idle long enough: STAYED, FELL (an
        idle signal is queued) or FELL_QUIETLY."""
        due = self.idle_due(busy)
        if due is None or now < due:
            return STAYED
        self.need = False
        if self._deferred is not None:
            self._deferred = None  # the rise was never told: the fall is not news either
            return FELL_QUIETLY
        self.counters["idles"] += 1
        self._queue(Signal("idle", "idle_timeout", None), now)
        return FELL

    def next_timer(self, busy: bool) -> float | None:
        t = self.idle_due(busy)
        if self._deferred is not None and (t is None or self._deferred[0] < t):
            t = self._deferred[0]
        if self._pending and (t is None or self._pending_at < t):
            t = self._pending_at
        return t

    def handle_timer(self, now: float, busy: bool) -> int:
        """Send a deferred activate whose time came, then check for idleness (see
        check_idle for the result)."""
        d = self._deferred
        if d is not None and d[0] <= now:
            self._deferred = None
            if self.need:
                self._activate(d[1], d[2], now)
        return self.check_idle(now, busy)
