"""Service hooks with real processes: serialized per service, bounded output, the whole
process group killed on timeout, a minimal environment."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from fabric.services.hooks import HOOK_OUTPUT_LINES, HookRunner

PY = sys.executable


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, kind: str, namespace: str, pod: str | None, **kw: Any) -> None:
        self.seen.append((kind, kw))


def py(code: str) -> str:
    return f"{PY} -c {shlex.quote(code)}"


async def settle(runner: HookRunner, service: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while runner.busy(service):
        assert time.monotonic() < deadline, "hooks still running"
        await asyncio.sleep(0.02)


def test_hooks_of_a_service_run_in_order_and_a_repeat_is_skipped(tmp_path: Path) -> None:
    log = tmp_path / "log"

    def hook(kind: str, delay: float) -> str:
        return py(f"import time; time.sleep({delay}); open({str(log)!r}, 'a').write("
                  f"'{kind}\\n')")

    async def main() -> None:
        runner = HookRunner("ns", Events())
        runner.submit("web", "activate", hook("activate", 0.4))  # slow start
        runner.submit("web", "idle", hook("idle", 0.0))  # must not overtake it
        await settle(runner, "web")
        assert log.read_text() == "activate\nidle\n"
        # activate, idle, activate while the first runs: the net wish is "active".
        log.write_text("")
        runner.submit("web", "activate", hook("activate", 0.3))
        runner.submit("web", "idle", hook("idle", 0.0))
        runner.submit("web", "activate", hook("activate", 0.0))
        await settle(runner, "web")
        assert log.read_text() == "activate\n"
        st = runner.stats("web")
        assert (st.run, st.replaced, st.skipped, st.failed) == (3, 1, 1, 0)
    asyncio.run(main())


def test_hook_output_is_read_as_it_comes_and_kept_bounded(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    """100 MB of output (long lines and many short ones) costs the daemon kilobytes."""
    code = ("import sys; w = sys.stdout.buffer.write\n"
            "for i in range(50): w(b'x' * 1000000 + b'\\n')\n"
            "for i in range(500000): w(b'line %d\\n' % i)\n"
            "w(b'y' * 49000000)")

    async def main() -> None:
        events = Events()
        runner = HookRunner("ns", events)
        tracemalloc.start()
        runner.submit("web", "activate", py(code))
        await settle(runner, "web", 60)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        st = runner.stats("web")
        assert st.output_bytes > 100_000_000 and st.failed == 0
        assert peak < 2_000_000, f"peak {peak} bytes of Python memory"
        assert events.seen == []
    with caplog.at_level("INFO", logger="fabricd.services"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if "activate hook:" in r.getMessage()]
    assert len(lines) == HOOK_OUTPUT_LINES
    assert lines[-2].endswith("line 499999") and len(lines[-1]) < 1200


def test_a_hook_that_hangs_is_killed_with_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    cmd = f"sh -c 'sleep 600 & echo $! > {pidfile}; wait'"

    async def main() -> None:
        events = Events()
        runner = HookRunner("ns", events, timeout=1.0)
        t0 = time.monotonic()
        runner.submit("web", "activate", cmd)
        await settle(runner, "web")
        assert time.monotonic() - t0 < 5
        assert events.seen == [("hook_failed", {"service": "web", "hook": "activate",
                                                "error": "timeout"})]
        assert runner.stats("web").timed_out == 1
        child = int(pidfile.read_text())
        deadline = time.monotonic() + 5
        while _alive(child):
            assert time.monotonic() < deadline, f"grandchild {child} survived the hook"
            await asyncio.sleep(0.05)
    asyncio.run(main())


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_hooks_see_a_minimal_environment(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "env"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    monkeypatch.setenv("LD_PRELOAD", "/tmp/evil.so")
    code = f"import os, json; open({str(out)!r}, 'w').write(json.dumps(dict(os.environ)))"

    async def main() -> None:
        runner = HookRunner("shop", Events())
        runner.submit("web", "idle", py(code))
        await settle(runner, "web")
    asyncio.run(main())
    import json
    env = json.loads(out.read_text())
    env.pop("LC_CTYPE", None)  # Python may set it for a C locale
    assert set(env) == {"PATH", "LANG", "FABRIC_NAMESPACE", "FABRIC_SERVICE", "FABRIC_EVENT"}
    assert (env["FABRIC_NAMESPACE"], env["FABRIC_SERVICE"], env["FABRIC_EVENT"]) == (
        "shop", "web", "idle")
    assert env["PATH"] == os.environ["PATH"]


def test_failures_are_events_and_a_removed_service_kills_its_hook(tmp_path: Path) -> None:
    async def main() -> None:
        events = Events()
        runner = HookRunner("ns", events)
        runner.submit("a", "activate", "/nonexistent/start")
        runner.submit("b", "activate", py("raise SystemExit(3)"))
        runner.submit("c", "activate", "echo 'unterminated")
        for s in "abc":
            await settle(runner, s)
        errors = {kw["service"]: kw["error"] for _, kw in events.seen}
        assert errors["b"] == "exit 3" and errors["c"].startswith("bad command")
        assert "No such file" in errors["a"]
        runner.submit("d", "activate", "sleep 600")
        await asyncio.sleep(0.2)
        runner.forget("d")
        await asyncio.sleep(0.2)
        assert not runner.busy("d")
    asyncio.run(main())


def test_every_started_hook_is_reported_ended_however_it_ends() -> None:
    """The service core keeps a wake's probes back while on_idle runs; it learns the hook
    ended from this report, so it comes for an exit, a failure and a timeout alike."""
    seen: list[tuple[str, str, str]] = []

    async def main() -> None:
        runner = HookRunner("ns", Events(), timeout=1.0,
                            started=lambda svc, kind, t: seen.append(("start", svc, kind)),
                            ended=lambda svc, kind, t: seen.append(("end", svc, kind)))
        runner.submit("a", "idle", py("pass"))
        runner.submit("b", "idle", py("raise SystemExit(3)"))
        runner.submit("c", "idle", py("import time; time.sleep(30)"))
        for svc in "abc":
            await settle(runner, svc)
    asyncio.run(main())
    for svc in "abc":
        assert [e for e in seen if e[1] == svc] == [("start", svc, "idle"), ("end", svc, "idle")]
