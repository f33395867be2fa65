"""Replay a capture through an activator: the real host, the real stream core, a fake clock.

The clock is the capture's: time 0 is its first packet, and every input happens at its
captured time (relative). Nothing reads the wall clock, so a replay gives the same
timeline every time (the one exception is the host's per-call deadline, a wall-clock
budget kept to catch a spinning guest; raise it with ``deadline_ms`` on a slow machine).

Packet (L3) activators get what the daemon's dispatch gives them (fabric.services.dispatch):
every packet to the service port, one ``packet`` event each, while the service has no ready
backend; once it has one, packets pass without the activator. A packet held (decision
``hold``, or none) activates the service, as the daemon's service core does. The daemon
sends L3 activators no ticks, so neither does the harness.

Stream activators (``fab_streams``) run under ``fabric.streams.core.StreamCore``, the sans-IO
core the daemon's front drives: this module plays the front. The capture's TCP connections
to the port are reassembled (tcpflows.py) and their clients replayed as accepted
connections, bytes and ends at their captured times (open-loop: a client sends when it
sent in the capture, whatever it received); the core's ticks run every 100 ms while streams
live, as in the daemon; upstream connections go to a simulated backend (backend.py) that
becomes ready at ``backend_ready_at``.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fabric.activator import abi
from fabric.activator.harness import timeline as tl
from fabric.activator.harness.backend import SimBackend
from fabric.activator.harness.capture import (
    PROTO_TCP,
    PROTO_UDP,
    CaptureError,
    IPPacket,
    read_capture,
)
from fabric.activator.harness.funcnames import function_names, name_frames
from fabric.activator.harness.tcpflows import Conversation, conversations, syn_ports
from fabric.activator.host import ActivatorHost
from fabric.activator.loader import ActivatorError
from fabric.streams import core as sc

#: A count action whose name ends so is a request the guest answered itself.
LOCAL_ANSWER_SUFFIX = "_answered"
DEFAULT_TAIL = 1.0  # seconds replayed after the last input, for ticks and late answers
HOLD_TIMEOUT = 30.0  # the service's hold.timeout default (config.specs.HoldSpec)
HOLD_BYTES = 8 << 20
CLIENT_WAIT = 5.0  # seconds a replayed client waits for the reply it had in the capture
PACINGS = ("replies", "capture")


class HarnessError(ValueError):
    """Bad input (a file, the port, the config): one line, exit status 2."""


@dataclass
class Ready:
    """When the simulated backend becomes ready: at a time, after the first wake, never."""

    at: float | None = None
    after_wake: float | None = None
    gone_at: float | None = None  # the backend goes away (scaled to zero) then

    @classmethod
    def parse(cls, text: str | float | None) -> Ready:
        if text is None or text == "never":
            return cls()
        if isinstance(text, int | float):
            return cls(at=float(text))
        s = str(text).strip()
        try:
            if s.startswith("wake+"):
                return cls(after_wake=_seconds(s[5:]))
            if s == "wake":
                return cls(after_wake=0.0)
            return cls(at=_seconds(s))
        except ValueError:
            raise HarnessError(f"--backend-ready-at {text!r}: want SECONDS, wake+SECONDS "
                               "or never") from None


def _seconds(s: str) -> float:
    v = float(s)
    if not math.isfinite(v) or v < 0:
        raise ValueError(s)
    return v


@dataclass
class Result:
    """What a replay did; ``records`` is the timeline."""

    wasm: str
    pcap: str
    port: int
    mode: str  # "packet" or "stream"
    records: list[tl.Record]
    need_history: list[tuple[float, str]]  # (time, level) at every change
    counters: dict[str, int]  # the guest's own (count actions)
    failures: list[dict[str, Any]]  # the host's last_failure of every failed call
    woke: bool
    wake_at: float | None
    backend_ready_at: float | None
    backend_gone_at: float | None
    to_clients: dict[int, bytes]  # per stream: every byte the client received
    host_stats: dict[str, int]
    core_counters: dict[str, int]
    packets: int  # capture packets read
    connections: int  # TCP connections to the port (stream mode)
    max_fuel: int  # the most one call used
    problems: list[str] = field(default_factory=list)  # unmet expectations

    @property
    def text(self) -> str:
        return tl.render(self.records)

    @property
    def final_need(self) -> str:
        return self.need_history[-1][1] if self.need_history else "none"

    @property
    def local_answers(self) -> int:
        return sum(n for k, n in self.counters.items() if k.endswith(LOCAL_ANSWER_SUFFIX))

    @property
    def ok(self) -> bool:
        return not self.failures and not self.problems

    def failure_line(self) -> str | None:
        """One line for people: the first failure of the guest, or the first unmet
        expectation; None when the replay passed."""
        if self.failures:
            f = self.failures[0]
            where = f" at {' <- '.join(f['frames'])}" if f.get("frames") else ""
            more = f" (+{len(self.failures) - 1} more failures)" if len(self.failures) > 1 else ""
            return (f"{f['reason']} at {f['t_ms']:.3f} ms during {f['during']}: "
                    f"{f['message']}{where}; fuel used {f['fuel_used']}; events "
                    f"{f['events'] or 'none'}{more}")
        if self.problems:
            return "expectation not met: " + self.problems[0]
        return None

    def summary(self) -> dict[str, Any]:
        return {"wasm": self.wasm, "pcap": self.pcap, "port": self.port, "mode": self.mode,
                "packets": self.packets, "connections": self.connections,
                "failures": self.failures, "traps": self.host_stats.get("traps", 0),
                "fuel_used": self.host_stats.get("fuel_used", 0),
                "max_fuel_per_call": self.max_fuel, "calls": self.host_stats.get("calls", 0),
                "need_history": [{"t_ms": round(t * 1000, 3), "need": n}
                                 for t, n in self.need_history],
                "final_need": self.final_need, "woke": self.woke,
                "wake_at_ms": None if self.wake_at is None else round(self.wake_at * 1000, 3),
                "backend_ready_at_ms": (None if self.backend_ready_at is None
                                        else round(self.backend_ready_at * 1000, 3)),
                "backend_gone_at_ms": (None if self.backend_gone_at is None
                                       else round(self.backend_gone_at * 1000, 3)),
                "counters": dict(sorted(self.counters.items())),
                "local_answers": self.local_answers,
                "bytes_to_clients": sum(len(b) for b in self.to_clients.values()),
                "host": self.host_stats, "core": self.core_counters,
                "expectations_failed": self.problems, "ok": self.ok}

    def json(self) -> str:
        return json.dumps({"records": [r.json() for r in self.records],
                           "summary": self.summary()}, indent=1)


class _Recorder:
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


class _Clock:
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


def guess_port(packets: list[IPPacket]) -> int:
    """The captured server's port: the destination of the capture's SYNs."""
    ports = syn_ports(packets)
    if len(ports) == 1:
        return next(iter(ports))
    if not ports:
        raise HarnessError("no TCP connection attempt (SYN) in the capture: "
                           "give the service port with --service-port")
    listed = ", ".join(f"{p} ({n} SYN)" for p, n in sorted(ports.items()))
    raise HarnessError(f"the capture has connections to several ports ({listed}): "
                       "choose one with --service-port")


def replay(wasm: str | Path, pcap: str | Path, *, service_port: int | None = None,
           backend_ready_at: str | float | Ready | None = None,
           backend_gone_at: float | None = None, config: dict[str, Any] | None = None,
           until: float | None = None, fuel_per_call: int | None = None,
           deadline_ms: int | None = None, client_pacing: str = "replies",
           client_wait: float = CLIENT_WAIT) -> Result:
    """Replay `pcap` through the activator `wasm` (see the module docstring).
    Raises HarnessError on bad input; guest failures are in the Result."""
    if client_pacing not in PACINGS:
        raise HarnessError(f"client pacing {client_pacing!r}: want one of {', '.join(PACINGS)}")
    if not math.isfinite(client_wait) or client_wait < 0:
        raise HarnessError(f"--client-wait {client_wait}: want SECONDS >= 0")
    if config is not None and not isinstance(config, dict):
        raise HarnessError("--config must be a JSON object")
    ready = backend_ready_at if isinstance(backend_ready_at, Ready) else Ready.parse(
        backend_ready_at)
    if backend_gone_at is not None:
        if not math.isfinite(backend_gone_at) or backend_gone_at < 0:
            raise HarnessError(f"--backend-gone-at {backend_gone_at}: want SECONDS >= 0")
        ready.gone_at = float(backend_gone_at)
    try:
        cap = read_capture(pcap)
    except CaptureError as e:
        raise HarnessError(str(e)) from None
    packets = cap.packets
    if not packets:
        raise HarnessError(f"{pcap}: no IPv4 packets in the capture")
    port = service_port if service_port is not None else guess_port(packets)
    if not 0 < port < 65536:
        raise HarnessError(f"--service-port {port}: not a port number")
    kw: dict[str, Any] = {}
    if fuel_per_call is not None:
        kw["fuel_per_call"] = fuel_per_call
    if deadline_ms is not None:
        kw["deadline_ms"] = deadline_ms
    try:
        probe = ActivatorHost(wasm, {}, label=Path(wasm).name, **kw)
    except ActivatorError as e:
        raise HarnessError(str(e)) from None
    except OSError as e:
        raise HarnessError(f"{wasm}: {e.strerror or e}") from None
    stream = probe.streams
    cfg = dict(config or {})
    if stream:  # the keys the daemon adds (fabric.services.manager._config)
        cfg.setdefault("port", port)
        cfg.setdefault("target_port", port)
        cfg.setdefault("hold_timeout_ms", int(HOLD_TIMEOUT * 1000))
        cfg.setdefault("hold_bytes", HOLD_BYTES)
    probe.close()
    host = ActivatorHost(wasm, cfg, label=Path(wasm).name, **kw)
    names = function_names(Path(wasm).read_bytes())
    t0 = packets[0].ts
    try:
        if stream:
            run: _Run = _StreamRun(host, port, packets, t0, ready, names, client_pacing,
                                   client_wait)
        else:
            run = _PacketRun(host, port, packets, t0, ready, names)
        run.go(until)
        rec = run.rec
        stats = {k: v for k, v in vars(host.stats).items()}
        return Result(str(wasm), str(pcap), port, "stream" if stream else "packet",
                      run.records, run.need_history, rec.counters, rec.failures,
                      run.wake_at is not None, run.wake_at, run.ready_time, run.gone_time,
                      dict(run.to_clients), stats, run.core_counters(), len(packets),
                      run.connections, rec.max_fuel)
    finally:
        host.close()


class _Run:
    """What both kinds of replay share: the agenda, the timeline, need and wake."""

    def __init__(self, host: ActivatorHost, port: int, t0: float, ready: Ready,
                 names: dict[int, str]) -> None:
        self.host = host
        self.port = port
        self.t0 = t0
        self.ready = ready
        self.records: list[tl.Record] = []
        self.rec = _Recorder(host, self.records, names)
        self.clock = _Clock()
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


class _PacketRun(_Run):
    """An L3 activator: packets to the port, as the daemon's dispatch hands them over."""

    def __init__(self, host: ActivatorHost, port: int, packets: list[IPPacket], t0: float,
                 ready: Ready, names: dict[int, str]) -> None:
        super().__init__(host, port, t0, ready, names)
        self.pid = 0
        self.is_ready = False
        self.held: list[int] = []
        self.counts = {"packets_to_port": 0, "held": 0, "dropped": 0, "passed": 0,
                       "forwarded_ready": 0, "released": 0, "fallbacks": 0}
        flows = set()
        for p in packets:
            if p.proto in (PROTO_TCP, PROTO_UDP) and p.dport == port and p.data:
                t = p.ts - t0
                flows.add((p.src, p.sport, p.dst))
                self.last_input = t
                self.clock.at(t, lambda p=p: self._packet(p))
        self.connections = len(flows)

    def _packet(self, p: IPPacket) -> None:
        t = self.rec.now
        self.counts["packets_to_port"] += 1
        if self.is_ready:
            self.counts["forwarded_ready"] += 1
            self.sim(t, "forwarded", detail=tl.packet_summary(p.data) + " (backend ready)")
            return
        self.pid = pid = (self.pid + 1) & 0xFFFFFFFF
        d = p.data
        ihl = (d[0] & 15) << 2
        flow = (int.from_bytes(d[12:20], "big") ^ int.from_bytes(d[ihl:ihl + 4], "big")
                ) & 0xFFFFFFFF  # as fabric.services.dispatch hashes the flow
        actions = self.rec.process(self.port, [abi.Packet(pid, flow, d)])
        if actions is None:  # the daemon holds and activates without the activator
            self.counts["fallbacks"] += 1
            self._hold(t, pid, "held by the fallback")
            return
        verdict = abi.HOLD
        for a in actions:
            if type(a) is abi.PacketDecision and a.packet_id == pid:
                verdict = a.verdict
            elif type(a) is abi.SetBackendNeed:
                self.set_need(t, a.need)
        if verdict == abi.HOLD:
            self._hold(t, pid, "held")
        elif verdict == abi.DROP:
            self.counts["dropped"] += 1
        else:
            self.counts["passed"] += 1

    def _hold(self, t: float, pid: int, what: str) -> None:
        self.counts["held"] += 1
        self.held.append(pid)
        if not self.backend_up and self.wake_at is None:
            self.sim(t, "activate", detail=f"a packet {what} activates the service")
        self.woke(t)

    def on_gone(self, t: float) -> None:
        self.is_ready = False
        self.sim(t, "backend_gone")
        actions = self.rec.process(self.port, [abi.BackendUnavailable()])
        for a in actions or []:
            if type(a) is abi.SetBackendNeed:
                self.set_need(t, a.need)

    def on_ready(self, t: float) -> None:
        self.is_ready = True
        self.sim(t, "backend_ready")
        actions = self.rec.process(self.port, [abi.BackendAvailable()])
        for a in actions or []:
            if type(a) is abi.SetBackendNeed:
                self.set_need(t, a.need)
        if self.held:
            self.counts["released"] += len(self.held)
            self.sim(t, "released", detail=f"{len(self.held)} held packets, in arrival order")
            self.held.clear()

    def core_counters(self) -> dict[str, int]:
        return dict(self.counts)


@dataclass
class _Conn:
    """The front's view of one replayed client connection."""

    conv: Conversation
    sid: int | None = None
    paused: bool = False
    queued: list[Callable[[], None]] = field(default_factory=list)
    # the client's pacing: the next of conv.client_events, when the last one went
    next_event: int = 0
    fed_at: float = 0.0
    prev_ts: float = 0.0
    received: int = 0  # bytes the client received from the fabric
    marks: list[tuple[int, float]] = field(default_factory=list)  # (received, when)
    waiting: bool = False
    token: int = 0
    client_gone: bool = False  # the guest closed the client connection
    client_ended: bool = False  # the client sent its FIN/RST
    backend: SimBackend | None = None
    given: int = 0  # client bytes handed to the guest
    upstream_ended: bool = False
    spliced: bool = False
    forgotten: bool = False


class _StreamRun(_Run):
    """A stream activator under the real StreamCore, with this class as its front."""

    def __init__(self, host: ActivatorHost, port: int, packets: list[IPPacket], t0: float,
                 ready: Ready, names: dict[int, str], pacing: str = "replies",
                 client_wait: float = CLIENT_WAIT) -> None:
        super().__init__(host, port, t0, ready, names)
        self.core = sc.StreamCore(self.rec, port, port, hold_timeout=HOLD_TIMEOUT,
                                  label=f"replay:{port}")
        self.by_sid: dict[int, _Conn] = {}
        convs = conversations(packets, port)
        self.connections = len(convs)
        self.server_ip = convs[0].server[0] if convs else "10.0.0.1"
        self.pacing = pacing
        self.client_wait = client_wait
        for conv in convs:
            c = _Conn(conv)
            self.clock.at(conv.opened - t0, lambda c=c: self._open(c))
            for ev in conv.client_events:
                self.last_input = max(self.last_input, ev.ts - t0)
            self.last_input = max(self.last_input, conv.opened - t0)

    # --- the clients' pacing -------------------------------------------------------------

    def _next(self, c: _Conn) -> None:
        """Schedule the client's next event: after the think time it had in the capture,
        once it has received as many bytes as it had then (pacing "replies"), or at
        its captured time (pacing "capture")."""
        events = c.conv.client_events
        if c.next_event >= len(events):
            return
        ev = events[c.next_event]
        base = c.fed_at + max(0.0, ev.ts - c.prev_ts)
        c.waiting = False
        if self.pacing == "capture":
            at = max(self.rec.now, ev.ts - self.t0)
        elif ev.server_before <= c.received:
            think = max(0.0, ev.ts - c.conv.server_reached(ev.server_before))
            at = max(base, self._reached(c, ev.server_before) + think)
        else:
            c.waiting = True  # until enough arrives, or at most client_wait
            at = base + self.client_wait
        c.token += 1
        tok = c.token
        self.clock.at(at, lambda: self._fire(c, tok))

    @staticmethod
    def _reached(c: _Conn, count: int) -> float:
        for n, t in c.marks:
            if n >= count:
                return t
        return c.fed_at

    def _fire(self, c: _Conn, tok: int) -> None:
        if tok != c.token:
            return  # rescheduled since
        ev = c.conv.client_events[c.next_event]
        c.next_event += 1
        c.fed_at = self.rec.now
        c.prev_ts = ev.ts
        if c.waiting:
            self.sim(self.rec.now, "client_gave_up_waiting", c.sid,
                     f"sends on after {self.client_wait:g} s without the reply it had "
                     "in the capture")
        self._client(c, ev.kind, ev.data)
        self._next(c)

    def _to_client(self, c: _Conn, sid: int, data: bytes) -> None:
        self.to_clients.setdefault(sid, bytearray()).extend(data)
        c.received += len(data)
        c.marks.append((c.received, self.rec.now))
        if c.waiting:
            self._next(c)

    # --- the front's side of the core ----------------------------------------------------

    def after(self) -> None:
        """Carry out what the core asked for (as fabric.streams.front._run does)."""
        core, t = self.core, self.rec.now
        while True:
            cmds = core.commands()
            if not cmds:
                break
            for kind, sid, arg in cmds:
                c = self.by_sid.get(sid)
                if c is None:
                    continue
                self._command(t, c, kind, sid, arg)
        core.logs.clear()  # the guest's log actions are in the timeline already
        self.set_need(t, core.need)

    def _command(self, t: float, c: _Conn, kind: int, sid: int, arg: object) -> None:
        if kind == sc.SEND_CLIENT:
            if not c.client_gone:
                self._to_client(c, sid, arg)  # type: ignore[arg-type]
        elif kind == sc.SEND_UPSTREAM:
            if c.backend is not None and not c.upstream_ended:
                c.backend.receive(arg, c.given)  # type: ignore[arg-type]
                self._release(c)
        elif kind == sc.CLOSE_CLIENT:
            if not c.client_gone:
                c.client_gone = True
                self.sim(t, "client_closed", sid, "the fabric closed the client connection")
        elif kind == sc.CLOSE_UPSTREAM:
            if c.backend is not None and not c.upstream_ended:
                c.upstream_ended = True
                self.sim(t, "backend_closed", sid, "the fabric closed the upstream")
        elif kind == sc.CONNECT:
            ip, port = arg  # type: ignore[misc]
            ok = not c.conv.refused
            self.sim(t, "backend_connect", sid, f"{ip}:{port} " + (
                "accepted" if ok else "refused (as in the capture)"))
            if ok:
                c.backend = SimBackend(c.conv)
            self.clock.at(t, lambda: self._connected(c, ok))
        elif kind == sc.READ_CLIENT:
            c.paused = not arg
            if not c.paused and c.queued:
                queued, c.queued = c.queued, []
                for fn in queued:
                    self.clock.at(t, fn)
        elif kind == sc.SPLICE:
            c.spliced = True
            self.sim(t, "spliced", sid, "the fabric relays the pair from now on")
            if c.client_ended and c.upstream_ended:
                self.clock.at(t, lambda: self._splice_end(c))
        elif kind == sc.FORGET:
            c.forgotten = True
            c.client_gone = True
            c.upstream_ended = True
            self.by_sid.pop(sid, None)

    def _open(self, c: _Conn) -> None:
        t = self.rec.now
        ip, cport = c.conv.client
        sid = self.core.accepted((ip, cport), t)
        if sid is None:
            self.sim(t, "refused", detail=f"{ip}:{cport}: max_streams reached")
            c.client_gone = True
        else:
            c.sid = sid
            self.by_sid[sid] = c
            c.fed_at = t
            c.prev_ts = c.conv.opened
        self.after()
        if sid is not None:
            self._next(c)

    def _client(self, c: _Conn, kind: str, data: bytes) -> None:
        t = self.rec.now
        if c.paused and not c.forgotten:
            c.queued.append(lambda: self._client(c, kind, data))
            return
        sid = c.sid
        if sid is None or c.forgotten or c.client_gone:
            if kind == "data" and sid is not None:
                self.sim(t, "client_data_lost", sid, "the connection was closed", data)
            return
        if kind != "data":
            c.client_ended = True
        if c.spliced:
            if kind == "data":
                self.sim(t, "relay_to_backend", sid, data=data)
                c.given += len(data)
                if c.backend is not None and not c.upstream_ended:
                    c.backend.receive(data, c.given)
                    self._release(c)
            elif c.upstream_ended:
                self._splice_end(c)
            return
        if kind == "data":
            c.given += len(data)
            self.core.client_data(sid, data, t)
        else:
            self.core.client_closed(sid, t, reset=kind == "reset")
        self.after()

    def _connected(self, c: _Conn, ok: bool) -> None:
        if c.sid is None or c.forgotten:
            return
        self.core.upstream_result(c.sid, ok, self.rec.now)
        self.after()
        if ok:
            self._release(c)

    def _release(self, c: _Conn) -> None:
        """Schedule the backend's replies the guest has earned."""
        b = c.backend
        if b is None:
            return
        t = self.rec.now
        for at, ch in b.due(t):
            self.clock.at(at, lambda ch=ch: self._server(c, ch.data, ch.end))

    def _server(self, c: _Conn, data: bytes, end: str) -> None:
        t = self.rec.now
        sid = c.sid
        if sid is None or c.forgotten or c.upstream_ended:
            return
        if c.spliced:
            if data:
                self.sim(t, "relay_to_client", sid, data=data)
                if not c.client_gone:
                    self._to_client(c, sid, data)
                    self.core.first_byte(t)
            else:
                c.upstream_ended = True
                if c.client_ended:
                    self._splice_end(c)
            return
        if data:
            self.core.upstream_data(sid, data, t)
        else:
            c.upstream_ended = True
            self.sim(t, "backend_" + end, sid, "as in the capture")
            self.core.upstream_closed(sid, t)
        self.after()

    def _splice_end(self, c: _Conn) -> None:
        if c.sid is None or c.forgotten:
            return
        self.sim(self.rec.now, "splice_ended", c.sid)
        self.core.splice_ended(c.sid, self.rec.now)
        self.after()

    def on_ready(self, t: float) -> None:
        self.sim(t, "backend_ready", detail=self.server_ip)
        self.core.backends([self.server_ip], t)
        self.after()

    def on_gone(self, t: float) -> None:
        self.sim(t, "backend_gone", detail="the service scaled to zero")
        self.core.backends([], t)
        self.after()

    def timers(self, until: float) -> None:
        core = self.core
        while True:
            due = core.next_timer()
            if due is None or due > until + 1e-9:
                return
            self.rec.now = due
            core.handle_timer(due)
            self.after()

    def core_counters(self) -> dict[str, int]:
        return dict(self.core.counters)
