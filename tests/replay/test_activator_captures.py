"""`fabricd activator test` on captures of real clients, for every shipped activator.

The captures (tests/replay/captures/*.pcap, made by record.py: curl against a plain HTTP
server, also as an uptime monitor's health checks, h2load, nghttp and a python-h2 PING
client against nghttpd, psql and pgbench against PostgreSQL 15) are replayed through the
shipped modules with the harness, and
each timeline must equal its golden file (captures/<case>.timeline). After a change to
an activator or the harness, regenerate them with

    FABRIC_REGEN_TIMELINES=1 .venv/bin/python -m pytest -q tests/replay/test_activator_captures.py

and review the difference before committing. Beyond the goldens, each case states what
the activator is for, so a regenerated golden cannot hide a regression.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fabric.activator.harness.pytest_plugin import (
    activator_replay,  # noqa: F401 - the fixture
    assert_ok,
    replay,
)
from fabric.activator.harness.replay import Result

ROOT = Path(__file__).resolve().parents[2]
CAPTURES = Path(__file__).resolve().parent / "captures"
ACT = ROOT / "activators"

Replay = Callable[..., Result]
# The per-call deadline is the one wall-clock input of a replay: generous here, so a
# loaded machine descheduling the test for 50 ms cannot fail a golden.
SLOW_OK = {"deadline_ms": 2000}

# name: (activator, capture, replay keywords, expectations)
CASES: dict[str, tuple[str, str, dict[str, Any], list[str]]] = {
    # L3: curl's two connections wake the service, their packets held, then released
    "tcp_curl": ("tcp", "http_curl", {"backend_ready_at": "wake+0.05"},
                 ["wake", "need=active"]),
    # the plain stream activator holds curl's requests, then relays the replies
    "stream_curl": ("stream", "http_curl", {"backend_ready_at": "wake+0.05"},
                    ["wake", "client-bytes>=500"]),
    "http2_h2load": ("http2", "h2_h2load", {"backend_ready_at": "wake+0.05"},
                     ["wake", "count:requests=10", "need=none"]),
    "http2_nghttp": ("http2", "h2_nghttp", {"backend_ready_at": "wake+0.05"},
                     ["wake", "count:requests=1", "need=none"]),
    # PINGs on an idle connection: answered by the guest, nothing wakes
    "http2_ping": ("http2", "h2_ping", {}, ["no-wake", "local-answers=3", "need=none"]),
    # psql works, the service scales to zero, then the idle session's SELECT 1s are
    # answered locally without waking it
    "postgres_psql": ("postgres", "pg_psql", {"backend_ready_at": 0, "backend_gone_at": 0.45},
                      ["no-wake", "local-answers=4", "need=none"]),
    # pgbench -M extended with a SELECT 1 script: the whole load is keep-alives
    "postgres_pgbench": ("postgres", "pg_pgbench", {"backend_ready_at": 0},
                         ["no-wake", "local-answers=5"]),
    # an uptime monitor's three GET /healthz answered while the backend sleeps, then a
    # real request wakes it and is relayed
    "http1_healthz": ("http1", "http_healthz", {"backend_ready_at": "wake+0.05"},
                      ["wake", "local-answers=3", "count:health_answered=3"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_capture_replays_as_expected(case: str, activator_replay: Replay) -> None:  # noqa: F811
    act, cap, kw, expect = CASES[case]
    activator_replay(ACT / act / f"{act}.wasm", CAPTURES / f"{cap}.pcap", expect=expect,
                     golden=CAPTURES / f"{case}.timeline", **kw, **SLOW_OK)


def test_curl_gets_the_servers_replies_through_the_stream_activator(
        activator_replay: Replay) -> None:  # noqa: F811
    r = activator_replay(ACT / "stream" / "stream.wasm", CAPTURES / "http_curl.pcap",
                         backend_ready_at="wake+0.05")
    assert len(r.to_clients) == 2
    for data in r.to_clients.values():
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"x" * 300 in r.to_clients[1]  # curl's second request on the same connection
    assert r.wake_at == 0.0 and r.backend_ready_at == pytest.approx(0.05)


def test_the_real_request_after_health_checks_reaches_the_backend(
        activator_replay: Replay) -> None:  # noqa: F811
    r = activator_replay(ACT / "http1" / "http1.wasm", CAPTURES / "http_healthz.pcap",
                         backend_ready_at="wake+0.05")
    replies = [d for d in r.to_clients.values() if d.startswith(b"HTTP/1.1 200")]
    assert len(replies) == 4  # three local health answers, one relayed from the server
    assert r.wake_at is not None and r.wake_at > 0.6  # only the real request woke it


def test_the_postgres_session_wakes_when_the_keepalives_are_not_answered(
        activator_replay: Replay) -> None:  # noqa: F811
    """The same capture with local answers off (a baseline): the first SELECT 1 after
    the backend went away wakes it. Shows the no-wake above is the activator's doing."""
    r = activator_replay(ACT / "postgres" / "postgres.wasm", CAPTURES / "pg_psql.pcap",
                         backend_ready_at=0, backend_gone_at=0.45,
                         config={"local_keepalive": 0}, check=False)
    assert r.woke and r.local_answers == 0
    assert r.wake_at is not None and r.wake_at > 0.45


def test_h2_pings_answered_while_a_request_wakes(activator_replay: Replay) -> None:  # noqa: F811
    r = activator_replay(ACT / "http2" / "http2.wasm", CAPTURES / "h2_nghttp.pcap",
                         backend_ready_at="wake+0.05")
    body = b"".join(r.to_clients.values())
    assert b"hello from nghttpd" in body  # the DATA frame of nghttpd's index.html


def test_the_need_falls_back_to_none_after_a_short_session(activator_replay: Replay) -> None:  # noqa: F811
    r = activator_replay(ACT / "postgres" / "postgres.wasm", CAPTURES / "pg_pgbench.pcap",
                         backend_ready_at=0, check=False)
    assert r.final_need == "none"


def test_clients_wait_for_their_replies_unless_told_to_keep_captured_times() -> None:
    """nghttp got its response in 2 ms in the capture; with the backend waking in 50 ms,
    a paced client waits for it, while one on the captured clock sends its GOAWAY and
    FIN at 2.8 ms, long before (the activator then still finishes the request it had:
    a half-close does not cancel what is in flight)."""
    wasm, pcap = ACT / "http2" / "http2.wasm", CAPTURES / "h2_nghttp.pcap"
    paced = replay(wasm, pcap, backend_ready_at="wake+0.05")
    fixed = replay(wasm, pcap, backend_ready_at="wake+0.05", client_pacing="capture")

    def client_fin(r: Result) -> float:
        return min((x.t for x in r.records if x.name == "stream_close"), default=1e9)

    assert client_fin(fixed) < 0.01 and client_fin(paced) > 0.05
    for r in (paced, fixed):
        assert b"hello from nghttpd" in b"".join(r.to_clients.values())
        assert r.ok


def test_the_fixture_fails_a_test_with_the_harness_line_and_the_timeline() -> None:
    r = replay(ACT / "http2" / "http2.wasm", CAPTURES / "h2_ping.pcap",
               expect=["local-answers=2"])
    with pytest.raises(pytest.fail.Exception) as e:
        assert_ok(r)
    text = str(e.value)
    assert text.startswith("expectation not met: local-answers=2: 3 answered locally "
                           "(pings_answered=3)")
    assert "--- timeline (last" in text and "<- count                    pings_answered +1" in text
