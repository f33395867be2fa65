"""Prometheus text rendering: exact output, escaping, and the failure modes that would make
a scrape fail silently."""

from __future__ import annotations

import re

import pytest

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
        Metric("ok", "histogram", "h"),  # type: ignore[arg-type]
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
