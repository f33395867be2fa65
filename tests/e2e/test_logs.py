"""The daemon's log as a log shipper reads it: with `FABRICD_LOG_FORMAT=json` (what
`--log-format json` sets) every line it writes is one JSON object with ts, level,
logger and msg, and a pod's trouble carries the namespace and pod as fields."""

from __future__ import annotations

import json
import os
import signal
import time

from fabric.tools.sandbox import Daemon, Sandbox


def test_json_log_lines(sandbox: Sandbox) -> None:
    worker = sandbox.netns("worker")
    a = sandbox.netns("a")
    late = sandbox.name("late")  # no such namespace yet: the pod waits, with a warning
    ns = {"name": "shop", "id": 7, "cidr": "10.40.0.0/24",
          "pods": [{"name": "a", "ip": "10.40.0.2", "netns": a},
                   {"name": "late", "ip": "10.40.0.3", "netns": late}]}
    d = Daemon(sandbox, worker, {"namespaces": [ns]},
               env={**os.environ, "FABRICD_LOG_FORMAT": "json"}).start()
    d.wait_attached(1)
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reloaded" not in d.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.stop() == 0
    lines = d.log().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one object
    assert len(records) >= 4
    for r in records:
        assert {"ts", "level", "logger", "msg"} <= r.keys(), r
        assert r["ts"].endswith("Z") and r["level"] in ("info", "warning", "error")
        assert isinstance(r["logger"], str) and r["logger"]
    waiting = [r for r in records if "not attached yet" in r["msg"]]
    assert waiting and waiting[0]["namespace"] == "shop" and waiting[0]["pod"] == "late"
    assert waiting[0]["level"] == "warning"
    msgs = [r["msg"] for r in records]
    assert any(m.startswith("worker fabricd ready") for m in msgs), msgs
    assert any(m.startswith("reloaded ") for m in msgs), msgs
    assert msgs[-1].startswith("control API on") or "shutting down" in msgs, msgs
