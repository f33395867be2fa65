"""The benchmark report's table: medians and the spread of interleaved runs."""

from __future__ import annotations

import pytest

from tests.bench.common import Report, render


def test_the_table_shows_each_series_spread_and_json_keeps_it() -> None:
    r = Report("x", "title")
    r.add("fabric", "Gbit/s", [8.2, 7.9, None, 9.1])
    r.add("once", "ms", [1.0])
    text = render(r)
    assert "spread" in text.splitlines()[1]
    assert "7.90-9.10 (15 %)" in text  # (9.1 - 7.9) / 8.2
    once = next(line for line in text.splitlines() if line.strip().startswith("once"))
    assert once.rstrip().endswith("-")
    js = r.to_json()["series"]
    assert (js[0]["min"], js[0]["max"], js[0]["median"]) == (7.9, 9.1, 8.2)
    assert js[1]["min"] is None


def test_egress_cost_runs_the_router_path_without_drops(capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    """tests.bench.egress_cost opens its flow through a real NAT and checks that every
    call was translated and forwarded (no outputs, no drops): exit 0 with its rows."""
    from tests.bench import egress_cost

    assert egress_cost.main(["--frames", "3", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "NAT outbound" in out and "pod to pod" in out
