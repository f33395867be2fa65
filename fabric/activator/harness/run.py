"""What both kinds of replay share: the recorder around the real host (every batch in,
every answer out, into the timeline), the agenda of the fake clock, and need and wake."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import Any

from fabric.activator import abi
from fabric.activator.harness import timeline as tl
from fabric.activator.harness.funcnames import name_frames
from fabric.activator.harness.result import Ready
from fabric.activator.host import ActivatorHost

DEFAULT_TAIL = 1.0  # seconds replayed after the last input, for ticks and late answers


class Recorder:
    """Wraps the real ActivatorHost: every batch in, every answer out, into the timeline."""

    def __init__(self, host: ActivatorHost, records: list[tl.Record],
                 names: dict[int, str] | None = None) -> None:
        self.host = host
        self.names = names or {}
        self.records = records
        self.now = 0.0
        self.failures: list[dict[str, Any]] = []
        self.counters: dict[str, int] = {}
        self.max_fuel = 0
        self.quiet_ticks = 0

    def process(self, port: int, events: Sequence[abi.Event], streams: int = 0
                ) -> list[abi.Action] | None:
        recs, t = self.records, self.now
        mark = len(recs)
        for e in events:
            recs.append(tl.event_record(t, e))
        actions = self.host.process(port, events, streams)
        inst = self.host.instances.get(port)
        if inst is not None:
            self.max_fuel = max(self.max_fuel, inst.last_fuel)
        if actions is None:
            f = dict(self.host.last_failure or {"reason": "failed", "during": "process",
                                                "message": "no details", "frames": [],
                                                "fuel_used": 0, "events": ""})
            f["t_ms"] = round(t * 1000, 3)
            f["frames"] = name_frames(list(f.get("frames") or []), self.names)
            f["message"] = name_frames([str(f.get("message", ""))], self.names)[0]
            self.failures.append(f)
            where = f" at {' <- '.join(f['frames'])}" if f.get("frames") else ""
            recs.append(tl.Record(t, tl.FAIL, f["reason"], detail=(
                f"during {f['during']}: {f['message']}{where}; fuel used {f['fuel_used']}; "
                f"events {f['events'] or 'none'}"), extra={"failure": f}))
            return None
        if not actions and all(type(e) is abi.Tick for e in events):
            del recs[mark:]  # a tick that changed nothing: left out of the timeline
            self.quiet_ticks += len(events)
            return actions
        for a in actions:
            recs.append(tl.action_record(t, a))
            if type(a) is abi.Count:
                self.counters[a.name] = self.counters.get(a.name, 0) + a.n
        return actions


class Agenda:
    """The replay's agenda: (time, order) -> callable, run in that order."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn))

    def next_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop(self) -> tuple[float, Callable[[], None]]:
        t, _, fn = heapq.heappop(self._heap)
        return t, fn


class Run:
    """What both kinds of replay share: the agenda, the timeline, need and wake."""

    def __init__(self, host: ActivatorHost, port: int, t0: float, ready: Ready,
                 names: dict[int, str]) -> None:
        self.host = host
        self.port = port
        self.t0 = t0
        self.ready = ready
        self.records: list[tl.Record] = []
        self.rec = Recorder(host, self.records, names)
        self.clock = Agenda()
        self.need_history: list[tuple[float, str]] = []
        self.wake_at: float | None = None
        self.ready_time: float | None = None
        self.to_clients: dict[int, bytearray] = {}
        self.connections = 0
        self.last_input = 0.0
        self.backend_up = False
        self.ready_pending = False
        self.need = abi.NEED_NONE
        self.gone_time: float | None = None
        if ready.at is not None:
            self.ready_pending = True
            self.clock.at(ready.at, self._backend_ready)
        if ready.gone_at is not None:
            self.clock.at(ready.gone_at, self._backend_gone)

    def sim(self, t: float, name: str, stream: int | None = None, detail: str = "",
            data: bytes | None = None) -> None:
        self.records.append(tl.Record(t, tl.SIM, name, stream=stream, detail=detail,
                                      data=data))

    def set_need(self, t: float, need: int) -> None:
        name = tl.NEED_NAMES[need] if 0 <= need < 3 else str(need)
        if not self.need_history or self.need_history[-1][1] != name:
            if self.need_history or name != "none":
                self.need_history.append((t, name))
                self.records.append(tl.Record(t, tl.NEED, "need", detail=name))
        self.need = need
        if need == abi.NEED_ACTIVE:
            self.woke(t)

    def woke(self, t: float) -> None:
        """A backend is wanted now: a wake if none is ready (as the daemon activates)."""
        if self.backend_up:
            return
        if self.wake_at is None:
            self.wake_at = t
            self.sim(t, "wake", detail="a backend is needed and none is ready")
        if self.ready.after_wake is not None and not self.ready_pending:
            self.ready_pending = True
            self.clock.at(t + self.ready.after_wake, self._backend_ready)

    def _backend_ready(self) -> None:
        self.ready_pending = False
        if self.backend_up:
            return
        t = self.rec.now
        if self.ready_time is None:
            self.ready_time = t
        self.backend_up = True
        self.on_ready(t)

    def _backend_gone(self) -> None:
        if not self.backend_up:
            return
        t = self.rec.now
        self.gone_time = t
        self.backend_up = False
        self.on_gone(t)
        if self.need == abi.NEED_ACTIVE:
            self.woke(t)

    def on_ready(self, t: float) -> None:
        raise NotImplementedError

    def on_gone(self, t: float) -> None:
        raise NotImplementedError

    def timers(self, until: float) -> None:
        """Timers due up to `until` (none by default)."""

    def go(self, until: float | None) -> None:
        clock = self.clock
        while True:
            t = clock.next_time()
            if t is None or (until is not None and t > until):
                break
            self.timers(t)
            t, fn = clock.pop()
            self.rec.now = t
            fn()
        end = max(self.rec.now, self.last_input, self.ready.at or 0.0,
                  self.ready.gone_at or 0.0, self.ready_time or 0.0) + DEFAULT_TAIL
        if until is not None:
            end = until
        self.timers(end)
        while clock.next_time() is not None and clock.next_time() <= end:  # type: ignore[operator]
            t, fn = clock.pop()
            self.rec.now = t
            fn()
            self.timers(end)

    def core_counters(self) -> dict[str, int]:
        return {}
