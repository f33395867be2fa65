"""The data-counter replay window."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tunnels.replay import COUNTER_LIMIT, WINDOW, ReplayFilter


def test_in_order_duplicates_and_reordering():
    f = ReplayFilter()
    assert f.update(0) and not f.update(0)
    assert f.update(5)
    assert f.check(3) and f.update(3) and not f.check(3) and not f.update(3)
    assert f.update(1) and f.update(2) and f.update(4)
    assert not any(f.check(i) for i in range(6))
    assert f.check(6)


def test_window_edges():
    f = ReplayFilter()
    top = 10_000
    assert f.update(top)
    assert f.check(top - (WINDOW - 1))  # oldest counter still inside
    assert not f.check(top - WINDOW)  # first one outside
    assert f.update(top - (WINDOW - 1))
    assert not f.update(top - WINDOW)


def test_big_jump_forgets_everything_behind():
    f = ReplayFilter()
    for i in range(100):
        assert f.update(i)
    assert f.update(10 * WINDOW)
    assert not f.check(50)
    assert f.check(10 * WINDOW - 1)


def test_near_wrap_is_refused():
    f = ReplayFilter()
    assert f.check(COUNTER_LIMIT - 1) and f.update(COUNTER_LIMIT - 1)
    assert not f.check(COUNTER_LIMIT) and not f.update(COUNTER_LIMIT)
    assert not f.check((1 << 64) - 1)


def test_check_does_not_modify():
    f = ReplayFilter()
    f.update(7)
    state = (f.top, f.bits)
    for c in (0, 7, 8, 100_000):
        f.check(c)
    assert (f.top, f.bits) == state


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=6000), max_size=300))
def test_matches_a_reference_model(counters):
    f = ReplayFilter()
    seen: set[int] = set()
    top = -1
    for c in counters:
        expected = c not in seen and (c > top or top - c < WINDOW)
        assert f.check(c) == expected
        assert f.update(c) == expected
        if expected:
            seen.add(c)
            top = max(top, c)
