"""The registry of metric families (fabric.runtime.families): Prometheus' naming
conventions, docs/metrics.md generated from it, and the Grafana dashboard
(docs/grafana/fabricd.json) asking only for what the daemon exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fabric.runtime import families
from fabric.runtime.families import BY_NAME, FAMILIES, sample_names
from tests.support.promql import PromQLError, selectors

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana" / "fabricd.json"
METRICS_MD = ROOT / "docs" / "metrics.md"
# Labels Prometheus adds to every series it scrapes.
TARGET_LABELS = {"instance", "job"}
# Label names that would carry a flow, an address or a port: unbounded values.
UNBOUNDED = {"ip", "src", "dst", "address", "addr", "client", "flow", "port", "sport",
             "dport", "query", "qname", "name", "endpoint"}


def _base(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in BY_NAME \
                and BY_NAME[name[: -len(suffix)]].kind == "histogram":
            return name[: -len(suffix)]
    return name


# --- the registry -------------------------------------------------------------------


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_family_follows_the_naming_conventions(fam: families.Family) -> None:
    assert re.fullmatch(r"fabricd?_[a-z][a-z0-9_]*[a-z0-9]", fam.name), fam.name
    assert "__" not in fam.name
    if fam.kind == "counter":
        assert fam.name.endswith("_total"), "a counter ends in _total"
    else:
        assert not fam.name.endswith("_total"), "only counters end in _total"
    if fam.kind == "histogram":
        assert fam.name.endswith(("_seconds", "_bytes")), "a histogram says its base unit"
    for bad in ("_ms", "_milliseconds", "_microseconds", "_kb", "_kib", "_mb", "_percent"):
        assert bad + "_" not in fam.name + "_", f"{bad}: use base units (seconds, bytes)"
    assert not fam.name.endswith(("_bucket", "_sum", "_count")), "reserved for histograms"
    assert len(fam.help) > 10 and "\n" not in fam.help, "# HELP says what it means"
    assert len(set(fam.labels)) == len(fam.labels)
    for label in fam.labels:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", label), label
        assert label not in UNBOUNDED, f"{label}: an unbounded label value"
        assert label != "le" and label not in TARGET_LABELS


def test_sample_names_cover_histogram_series() -> None:
    names = sample_names()
    assert "fabric_service_wake_seconds_bucket" in names
    assert "fabric_service_wake_seconds_count" in names
    assert "fabric_service_wake_seconds" not in names  # no sample carries the bare name
    assert "fabric_drops_total" in names
    assert len(FAMILIES) == len(BY_NAME)


def test_new_makes_the_declared_family() -> None:
    m = families.new("fabric_tunnel_handshake_seconds")
    assert (m.name, m.kind, m.samples) == ("fabric_tunnel_handshake_seconds", "histogram", [])
    with pytest.raises(KeyError):
        families.new("fabric_not_declared_total")


def test_docs_metrics_md_is_the_registry() -> None:
    text = METRICS_MD.read_text()
    m = re.search(r"<!-- families:begin -->\n(.*)<!-- families:end -->", text, re.S)
    assert m, "docs/metrics.md lost its families markers"
    assert m.group(1) == families.markdown(), (
        "docs/metrics.md differs from fabric/runtime/families.py: regenerate the table with "
        "python -m fabric.runtime.families")


# --- the PromQL parser the dashboard test relies on ------------------------------------------


def test_parser_finds_selectors() -> None:
    sels = selectors('histogram_quantile(0.99, sum by (le, phase) (rate('
                     'fabric_service_wake_phase_seconds_bucket{namespace=~"$namespace"}'
                     '[$__rate_interval])))')
    assert [(s.name, s.matchers) for s in sels] == [
        ("fabric_service_wake_phase_seconds_bucket", [("namespace", "=~", "$namespace")])]
    sels = selectors('time() - max by (peer) (a) / on (peer) group_left b{x!="1"} offset 5m'
                     ' > bool 2 or {__name__="c"}[5m:1m]')
    assert [s.name for s in sels] == ["a", "b", "c"]


@pytest.mark.parametrize("bad", [
    "sum(rate(x[5m])", "rate(x[5m]))", "x{a=1}", "x{a~\"1\"}", "nosuchfn(x)", "x[5]",
    "sum by (a x)", "x +", '{a="1"}', "x{a=~\"(\"}", "by (a) x", "x $y",
])
def test_parser_rejects_what_is_not_promql(bad: str) -> None:
    with pytest.raises(PromQLError):
        selectors(bad)


# --- the dashboard -----------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out += p.get("panels", [])  # panels of a collapsed row
    return out


def _exprs(d: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query: panels' targets and query variables."""
    out = [(p["title"], t["expr"]) for p in _panels(d) for t in p.get("targets", [])]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q)
            assert m, f"variable {v['name']}: {q}"
            out.append((f"${v['name']}", m.group(1)))
    return out


def test_dashboard_is_a_grafana_dashboard_on_a_prometheus_variable() -> None:
    d = _dashboard()
    assert d["title"] and d["uid"] and isinstance(d["schemaVersion"], int)
    (ds,) = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    assert ds["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": "${" + ds["name"] + "}"}
    ids = set()
    for p in _panels(d):
        assert p["id"] not in ids
        ids.add(p["id"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        if p["type"] == "row":
            continue
        assert p["datasource"] == ref, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t.get("datasource", ref) == ref and t["refId"], p["title"]


def test_every_dashboard_query_uses_exported_metrics_and_labels() -> None:
    exported = sample_names()
    used: set[str] = set()
    for title, expr in _exprs(_dashboard()):
        try:
            sels = selectors(expr)
        except PromQLError as e:
            pytest.fail(f"{title}: {e}: {expr}")
        assert sels, f"{title}: asks for no metric: {expr}"
        for s in sels:
            assert s.name in exported, f"{title}: {s.name} is not exported"
            fam = BY_NAME[_base(s.name)]
            allowed = set(fam.labels) | TARGET_LABELS | (
                {"le"} if s.name.endswith("_bucket") else set())
            for label, _, _ in s.matchers:
                assert label in allowed, f"{title}: {s.name} has no label {label}"
            used.add(fam.name)
    # What the dashboard is for: one panel at least on each of these.
    for name in ("fabric_port_rx_bytes_total", "fabric_port_tx_bytes_total",
                 "fabric_drops_total", "fabric_dns_total", "fabric_dns_answer_seconds",
                 "fabric_egress_flows", "fabric_service_state", "fabric_service_held_packets",
                 "fabric_service_wakes_total", "fabric_service_wake_seconds",
                 "fabric_service_wake_phase_seconds", "fabric_tunnel_events_total",
                 "fabric_tunnel_handshake_seconds", "fabric_peer_rx_bytes_total",
                 "fabric_tunnel_drops_total"):
        assert name in used, f"no panel shows {name}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus)")
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Prometheus' own parser agrees (each query as a recording rule)."""
    rules = [{"record": f"fabricd:q{i}", "expr": expr.replace("$__rate_interval", "5m")
              .replace("$namespace", ".*")} for i, (_, expr) in enumerate(_exprs(_dashboard()))]
    path = tmp_path / "rules.yaml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
