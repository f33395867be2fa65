"""The `on_activate` / `on_idle` hooks of services: commands run for the controller's
wake and idle signals.

They run as the daemon (root), so they get as little as possible of it: no shell, a
minimal environment (PATH, LANG, the FABRIC_* variables), a timeout after which the whole
process group is killed, and output read as it comes and kept to the last lines.

Hooks of one service run one at a time, in order: an activate (`systemctl start`, slow)
and the next idle (`systemctl stop`) must not race and finish the wrong way round. While
one runs, only the latest signal waits; one that would repeat what just ran is skipped
(activate, idle, activate while the first activate runs is just that activate).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fabric.config.specs import split_command

log = logging.getLogger("fabricd.services")

Emit = Callable[..., None]
# (service, kind, monotonic time): a hook's process started (the wake's first phase ends),
# or ended (however: exit, failure, timeout, cancel).
Started = Callable[[str, str, float], None]

HOOK_TIMEOUT = 60.0
HOOK_OUTPUT_LINES = 20  # kept and logged when the hook ends
HOOK_LINE_MAX = 1024  # characters kept of one line
HOOK_READ = 65536
HOOK_CONCURRENCY = 8  # hooks running at once in a namespace (across its services)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def hook_env(namespace: str, service: str, kind: str) -> dict[str, str]:
    """What a hook sees: not the daemon's environment (secrets, proxies, LD_PRELOAD)."""
    return {"PATH": os.environ.get("PATH", DEFAULT_PATH), "LANG": "C.UTF-8",
            "FABRIC_NAMESPACE": namespace, "FABRIC_SERVICE": service, "FABRIC_EVENT": kind}


@dataclass
class HookStats:
    """Per service, for `fabricd get services` and the metrics."""

    run: int = 0
    failed: int = 0
    timed_out: int = 0
    skipped: int = 0  # a waiting signal that repeated what had just run
    replaced: int = 0  # a waiting signal overtaken by a newer one
    output_bytes: int = 0


@dataclass
class _Lane:
    """One service's hooks: the one running and the one waiting."""

    task: asyncio.Task[Any] | None = None
    waiting: tuple[str, str] | None = None  # (kind, cmd)
    last: str | None = None
    stats: HookStats = field(default_factory=HookStats)


class HookRunner:
    """Runs one namespace's hooks (see module docstring)."""

    def __init__(self, namespace: str, emit: Emit, *, timeout: float = HOOK_TIMEOUT,
                 concurrency: int = HOOK_CONCURRENCY, started: Started | None = None,
                 ended: Started | None = None) -> None:
        self.namespace = namespace
        self._emit = emit
        self._started = started
        self._ended = ended
        self.timeout = timeout
        self._lanes: dict[str, _Lane] = {}
        self._slots = asyncio.Semaphore(concurrency)

    def stats(self, service: str) -> HookStats:
        lane = self._lanes.get(service)
        return lane.stats if lane is not None else HookStats()

    def busy(self, service: str) -> bool:
        lane = self._lanes.get(service)
        return lane is not None and lane.task is not None

    def submit(self, service: str, kind: str, cmd: str) -> None:
        lane = self._lanes.setdefault(service, _Lane())
        if lane.task is None:
            lane.task = asyncio.get_running_loop().create_task(
                self._drain(service, lane, kind, cmd))
            return
        if lane.waiting is not None:
            lane.stats.replaced += 1
        lane.waiting = (kind, cmd)

    def forget(self, service: str) -> None:
        """The service is gone: its running hook is killed, the waiting one dropped."""
        lane = self._lanes.pop(service, None)
        if lane is not None and lane.task is not None:
            lane.task.cancel()

    def close(self) -> None:
        for name in list(self._lanes):
            self.forget(name)

    async def _drain(self, service: str, lane: _Lane, kind: str, cmd: str) -> None:
        try:
            while True:
                await self._run(service, lane, kind, cmd)
                lane.last = kind
                nxt, lane.waiting = lane.waiting, None
                if nxt is None:
                    return
                kind, cmd = nxt
                if kind == lane.last:
                    lane.stats.skipped += 1
                    log.info("namespace %s: service %s: %s hook skipped (it just ran)",
                             self.namespace, service, kind)
                    return
        finally:
            lane.task = None

    async def _run(self, service: str, lane: _Lane, kind: str, cmd: str) -> None:
        where = f"namespace {self.namespace}: service {service}: {kind} hook"
        stats = lane.stats

        def failed(error: str) -> None:
            stats.failed += 1
            self._emit("hook_failed", self.namespace, None, service=service, hook=kind,
                       error=error)

        try:
            argv = split_command(cmd)
        except ValueError as e:  # the config checks this; a spec built in code may not
            log.error("%s %r cannot be split: %s", where, cmd, e)
            failed(f"bad command: {e}")
            return
        async with self._slots:
            stats.run += 1
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, env=hook_env(self.namespace, service, kind),
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                log.error("%s %r failed to start: %s", where, cmd, e.strerror or e)
                failed(str(e))
                return
            if self._started is not None:
                self._started(service, kind, time.monotonic())
            try:
                await self._wait(proc, where, cmd, stats, failed)
            finally:
                if self._ended is not None:
                    self._ended(service, kind, time.monotonic())

    async def _wait(self, proc: asyncio.subprocess.Process, where: str, cmd: str,
                    stats: HookStats, failed: Callable[[str], None]) -> None:
        """Wait for a started hook: its output read and logged, killed at the timeout."""
        tail: deque[str] = deque(maxlen=HOOK_OUTPUT_LINES)
        try:
            await asyncio.wait_for(self._read(proc, tail, stats), self.timeout)
            code = await proc.wait()
        except TimeoutError:
            _kill_group(proc)
            await proc.wait()
            stats.timed_out += 1
            log.error("%s %r killed (with its process group) after %.0fs", where, cmd,
                      self.timeout)
            failed("timeout")
            return
        except asyncio.CancelledError:
            _kill_group(proc)
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())
            raise
        finally:
            for line in tail:
                log.info("%s: %s", where, line)
        if code:
            log.warning("%s %r exited with %d", where, cmd, code)
            failed(f"exit {code}")

    @staticmethod
    async def _read(proc: asyncio.subprocess.Process, tail: deque[str],
                    stats: HookStats) -> None:
        """Read all output as it comes; keep only the last lines, each cut to a bound."""
        assert proc.stdout is not None
        partial = ""
        while True:
            chunk = await proc.stdout.read(HOOK_READ)
            if not chunk:
                break
            stats.output_bytes += len(chunk)
            text = partial + chunk.decode(errors="replace")
            *lines, partial = text.split("\n")
            for line in lines[-HOOK_OUTPUT_LINES:]:
                tail.append(line[:HOOK_LINE_MAX])
            partial = partial[:HOOK_LINE_MAX]
        if partial:
            tail.append(partial)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """The hook and whatever it started: start_new_session made it a group leader."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
