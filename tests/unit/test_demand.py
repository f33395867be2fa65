"""fabric.services.demand: the need level, debounce, and signal coalescing as a table."""

from __future__ import annotations

import pytest

from fabric.services.demand import FELL, FELL_QUIETLY, STAYED, Demand, FlowId, Signal, coalesce

A = Signal("activate", "held", None)
A2 = Signal("activate", "traffic", None)
IDLE = Signal("idle", "idle_timeout", None)


@pytest.mark.parametrize("pending,new,after", [
    ([], A, [A]),
    ([], IDLE, [IDLE]),
    ([A], A2, [A]),  # a repeated kind keeps the first reason
    ([A], IDLE, [A, IDLE]),
    ([IDLE], A, [IDLE, A]),
    ([A, IDLE], A2, [A]),  # [x, y] + x: y was undone, the level is x again
    ([A, IDLE], IDLE, [A, IDLE]),
    ([IDLE, A], IDLE, [IDLE]),
    ([IDLE, A], A2, [IDLE, A]),
])
def test_coalescing_table(pending: list[Signal], new: Signal, after: list[Signal]) -> None:
    p = list(pending)
    coalesce(p, new)
    assert p == after and len(p) <= 2
    if p:
        assert p[-1].kind == new.kind  # the last one always gives the current level


def test_rise_then_idle_after_the_timeout() -> None:
    d = Demand(idle_timeout=10.0, now=0.0)
    flow = FlowId("tcp", "10.0.0.2", 40000, "10.0.0.100", 80)
    d.rise("held", flow, 1.0)
    assert d.need and d.take_signals() == [Signal("activate", "held", flow)]
    assert d.next_timer(busy=True) is None  # held up: no idle timer
    d.last_traffic = 5.0
    assert d.next_timer(busy=False) == 15.0
    assert d.handle_timer(14.9, busy=False) == STAYED and d.need
    assert d.handle_timer(15.0, busy=False) == FELL and not d.need
    assert d.take_signals() == [IDLE]
    assert d.counters == {"activations": 1, "idles": 1}


def test_debounce_defers_and_a_quick_fall_cancels_both() -> None:
    d = Demand(idle_timeout=0.5, debounce=1.0, now=0.0)
    d.rise("held", None, 0.0)
    d.take_signals()
    d.last_traffic = 0.0
    assert d.check_idle(0.5, busy=False) == FELL
    d.take_signals()
    d.rise("traffic", None, 0.6)  # within the debounce: deferred to 1.0
    assert not d.signals_pending and d.next_timer(busy=True) == 1.0
    d.last_traffic = 0.6
    # Falls again before the deferred rise was told: neither is news.
    assert d.check_idle(1.1, busy=False) == FELL_QUIETLY
    assert d.handle_timer(1.2, busy=False) == STAYED and not d.signals_pending
    # A deferred rise that is still wanted goes out at its time.
    d.rise("traffic", None, 1.5)
    assert d.take_signals() == [Signal("activate", "traffic", None)]
    d.last_traffic = 1.5
    assert d.check_idle(2.0, busy=False) == FELL and d.take_signals() == [IDLE]
    d.rise("again", None, 2.1)  # 0.6 s after the last activate: deferred to 2.5
    assert d.handle_timer(2.4, busy=True) == STAYED and not d.signals_pending
    assert d.handle_timer(2.5, busy=True) == STAYED
    assert d.take_signals() == [Signal("activate", "again", None)]


def test_pending_signals_make_the_timer_due_at_once() -> None:
    d = Demand(idle_timeout=100.0, now=0.0)
    d.rise("held", None, 3.0)
    assert d.next_timer(busy=True) == 3.0
    d.take_signals()
    assert d.next_timer(busy=True) is None
