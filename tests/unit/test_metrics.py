"""Prometheus text rendering: exact output, escaping, and the failure modes that would make
a scrape fail silently."""

from __future__ import annotations

import re

import pytest

from fabric.histogram import Histogram, HistogramSnapshot
from fabric.runtime.prometheus import Metric, format_value, render

SAMPLE_RE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*\})? \S+$'
)


def test_render_exact() -> None:
    text = render(
        [
            Metric(
                "fabric_rx_packets_total",
                "counter",
                "Frames received by a pod port.",
                [
                    ({"namespace": "blue", "pod": "web"}, 12.0),
                    ({"namespace": "blue", "pod": "db"}, 0),
                ],
            ),
            Metric("fabric_pods", "gauge", "Attached pods.", [({}, 3)]),
        ]
    )
    assert text == (
        "# HELP fabric_rx_packets_total Frames received by a pod port.\n"
        "# TYPE fabric_rx_packets_total counter\n"
        'fabric_rx_packets_total{namespace="blue",pod="web"} 12\n'
        'fabric_rx_packets_total{namespace="blue",pod="db"} 0\n'
        "# HELP fabric_pods Attached pods.\n"
        "# TYPE fabric_pods gauge\n"
        "fabric_pods 3\n"
    )


def test_escaping() -> None:
    text = render([Metric("m", "gauge", "line1\nback\\slash", [({"l": 'a"b\\c\nd'}, 1)])])
    assert "# HELP m line1\\nback\\\\slash\n" in text
    assert 'm{l="a\\"b\\\\c\\nd"} 1\n' in text
    for line in text.splitlines():
        assert line.startswith("#") or SAMPLE_RE.match(line), line


def test_values() -> None:
    assert format_value(1.5) == "1.5"
    assert format_value(2.0) == "2"
    assert format_value(True) == "1"
    assert format_value(float("nan")) == "NaN"
    assert format_value(float("inf")) == "+Inf"
    assert format_value(float("-inf")) == "-Inf"
    assert format_value(1e20) == "1e+20"


def test_repeated_family_is_merged() -> None:
    text = render(
        [
            Metric("x_total", "counter", "X.", [({"a": "1"}, 1)]),
            Metric("x_total", "counter", "X.", [({"a": "2"}, 2)]),
        ]
    )
    assert text.count("# TYPE x_total") == 1
    assert text.splitlines()[2:] == ['x_total{a="1"} 1', 'x_total{a="2"} 2']


def test_empty() -> None:
    assert render([]) == ""
    assert render([Metric("y", "gauge", "Y.")]) == "# HELP y Y.\n# TYPE y gauge\n"


@pytest.mark.parametrize(
    "metric",
    [
        Metric("bad-name", "gauge", "h"),
        Metric("ok", "summary", "h"),  # type: ignore[arg-type]
        Metric("ok", "histogram", "h", [({}, 1.0)]),
        Metric("ok", "histogram", "h", [({"le": "1"}, Histogram((1.0,)).snapshot())]),
        Metric("ok", "gauge", "h", [({}, Histogram((1.0,)).snapshot())]),
        Metric("ok", "gauge", "h", [({"bad-label": "v"}, 1)]),
        Metric("ok", "gauge", "h", [({"__reserved": "v"}, 1)]),
    ],
)
def test_invalid(metric: Metric) -> None:
    with pytest.raises(ValueError):
        render([metric])


def test_conflicting_kinds() -> None:
    with pytest.raises(ValueError, match="both"):
        render([Metric("z", "gauge", "h"), Metric("z", "counter", "h")])


def test_histogram_buckets_are_inclusive_upper_bounds() -> None:
    h = Histogram((0.001, 0.01, 1.0))
    for v in (0.0, 0.001, 0.0011, 0.01, 0.5, 1.0, 1.5, 100.0):
        h.observe(v)
    # le=0.001: 0 and 0.001; le=0.01: 0.0011, 0.01; le=1: 0.5, 1.0; above: 1.5, 100
    assert h.counts == [2, 2, 2, 2]
    assert h.count == 8 and h.sum == pytest.approx(103.0121)


def test_histogram_rejects_bad_bounds() -> None:
    for bounds in ((), (1.0, 1.0), (2.0, 1.0)):
        with pytest.raises(ValueError):
            Histogram(bounds)


def test_histogram_render_exact() -> None:
    h = Histogram((0.005, 0.1))
    h.observe(0.001)
    h.observe(0.05)
    h.observe(3.0)
    empty = Histogram((0.005, 0.1)).snapshot()
    text = render([Metric("x_seconds", "histogram", "X.",
                          [({"ns": "a"}, h.snapshot()), ({}, empty)])])
    assert text == (
        "# HELP x_seconds X.\n"
        "# TYPE x_seconds histogram\n"
        'x_seconds_bucket{ns="a",le="0.005"} 1\n'
        'x_seconds_bucket{ns="a",le="0.1"} 2\n'
        'x_seconds_bucket{ns="a",le="+Inf"} 3\n'
        'x_seconds_sum{ns="a"} 3.051\n'
        'x_seconds_count{ns="a"} 3\n'
        'x_seconds_bucket{le="0.005"} 0\n'
        'x_seconds_bucket{le="0.1"} 0\n'
        'x_seconds_bucket{le="+Inf"} 0\n'
        "x_seconds_sum 0\n"
        "x_seconds_count 0\n"
    )


def test_histogram_merge() -> None:
    a, b = Histogram((1.0,)), Histogram((1.0,))
    a.observe(0.5)
    b.observe(2.0)
    m = a.snapshot().merged(b.snapshot())
    assert m == HistogramSnapshot((1.0,), (1, 1), 2.5) and m.count == 2
    with pytest.raises(ValueError):
        a.snapshot().merged(Histogram((2.0,)).snapshot())


def test_histogram_observe_keeps_no_memory() -> None:
    """The packet path observes: nothing may pile up per observation."""
    import tracemalloc

    h = Histogram((0.001, 0.01, 0.1))
    h.observe(0.005)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20000):
            h.observe(i * 1e-5)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert h.count == 20001
    assert grown < 1024, grown  # a few boxed numbers at most, not one object per call
