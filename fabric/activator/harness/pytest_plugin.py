"""pytest support for activator authors: replay a capture, assert what the guest did.

Load it with ``-p fabric.activator.harness.pytest_plugin`` or ``pytest_plugins =
["fabric.activator.harness.pytest_plugin"]`` in your top-level conftest.py, then::

    def test_ping_answered_locally(activator_replay):
        r = activator_replay("http2.wasm", "captures/h2_ping.pcap",
                             expect=["local-answers=3", "no-wake"],
                             golden="captures/h2_ping.timeline")
        assert r.counters["pings_answered"] == 3

The fixture fails the test with the harness's one line (the trap with its function, or the
unmet expectation) and the timeline's tail. ``golden=FILE`` compares the timeline with FILE,
or writes it when the environment has ``FABRIC_REGEN_TIMELINES=1`` (review the difference,
then commit). ``replay`` is the same without pytest: it returns the Result unchecked.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from fabric.activator.harness.expect import Expectation, check_all
from fabric.activator.harness.replay import Result
from fabric.activator.harness.replay import replay as _replay

REGEN_ENV = "FABRIC_REGEN_TIMELINES"
TAIL_LINES = 25


def regen_requested() -> bool:
    return os.environ.get(REGEN_ENV, "") not in ("", "0")


def replay(wasm: str | Path, pcap: str | Path, *, expect: Sequence[str] = (),
           golden: str | Path | None = None, update_golden: bool | None = None,
           **kw: Any) -> Result:
    """Replay and check `expect` (``--expect`` strings); unmet ones are in
    ``Result.problems``, failures in ``Result.failures``. Keywords are replay()'s:
    service_port, backend_ready_at, config, until, fuel_per_call, deadline_ms."""
    exps = [Expectation.parse(e) for e in expect]
    if golden is not None:
        exps.append(Expectation("golden", str(golden)))
    r = _replay(wasm, pcap, **kw)
    check_all(r, exps, regen_requested() if update_golden is None else update_golden)
    return r


def assert_ok(r: Result) -> None:
    """Fail with the harness's line and the end of the timeline unless the replay passed."""
    line = r.failure_line()
    if line is not None:
        tail = r.text.splitlines()[-TAIL_LINES:]
        pytest.fail(f"{line}\n--- timeline (last {len(tail)} lines) ---\n" + "\n".join(tail),
                    pytrace=False)


@pytest.fixture
def activator_replay() -> Callable[..., Result]:
    """``activator_replay(wasm, pcap, expect=[...], golden=FILE, check=True, **replay_kw)``:
    the Result, after failing the test on a guest failure or an unmet expectation
    (``check=False`` returns it unchecked)."""

    def run(wasm: str | Path, pcap: str | Path, *, check: bool = True, **kw: Any) -> Result:
        r = replay(wasm, pcap, **kw)
        if check:
            assert_ok(r)
        return r

    return run
