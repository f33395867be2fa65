"""The epoch ticker's resolution and the deadline in ticks (fabric.activator.runtime)."""

from __future__ import annotations

import pytest

from fabric.activator.runtime import TICK_SECONDS, deadline_ticks


@pytest.mark.parametrize("ms", [1, 2, 4, 5, 6, 9, 10, 11, 20, 49, 50, 51, 5000])
def test_a_deadline_in_ticks_is_never_shorter_than_asked(ms: int) -> None:
    """A call may begin just before a tick, so only ticks - 1 whole periods are sure to
    pass before the deadline fires: they must cover the milliseconds asked for."""
    ticks = deadline_ticks(ms)
    assert (ticks - 1) * TICK_SECONDS * 1000 >= ms
    assert (ticks - 2) * TICK_SECONDS * 1000 < ms  # and not much longer


def test_a_tick_is_coarse_enough_to_be_cheap() -> None:
    """The ticker takes the GIL once per tick on a busy port (docs/performance.md)."""
    assert 0.002 <= TICK_SECONDS <= 0.01
