"""A stream activator's replay: the real StreamCore, with this module as its front
(fabric.streams.front): reassembled client connections paced by what they receive, ticks,
and upstream connections to the simulated backend (backend.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fabric.activator.harness.backend import SimBackend
from fabric.activator.harness.capture import IPPacket
from fabric.activator.harness.result import Ready
from fabric.activator.harness.run import Run
from fabric.activator.harness.tcpflows import Conversation, conversations
from fabric.activator.host import ActivatorHost
from fabric.streams import core as sc

HOLD_TIMEOUT = 30.0  # the service's hold.timeout default (config.specs.HoldSpec)
CLIENT_WAIT = 5.0  # seconds a replayed client waits for the reply it had in the capture
PACINGS = ("replies", "capture")


@dataclass
class Conn:
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


class StreamRun(Run):
    """A stream activator under the real StreamCore, with this class as its front."""

    def __init__(self, host: ActivatorHost, port: int, packets: list[IPPacket], t0: float,
                 ready: Ready, names: dict[int, str], pacing: str = "replies",
                 client_wait: float = CLIENT_WAIT) -> None:
        super().__init__(host, port, t0, ready, names)
        self.core = sc.StreamCore(self.rec, port, port, hold_timeout=HOLD_TIMEOUT,
                                  label=f"replay:{port}")
        self.by_sid: dict[int, Conn] = {}
        convs = conversations(packets, port)
        self.connections = len(convs)
        self.server_ip = convs[0].server[0] if convs else "10.0.0.1"
        self.pacing = pacing
        self.client_wait = client_wait
        for conv in convs:
            c = Conn(conv)
            self.clock.at(conv.opened - t0, lambda c=c: self._open(c))
            for ev in conv.client_events:
                self.last_input = max(self.last_input, ev.ts - t0)
            self.last_input = max(self.last_input, conv.opened - t0)

    # --- the clients' pacing -------------------------------------------------------------

    def _next(self, c: Conn) -> None:
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
    def _reached(c: Conn, count: int) -> float:
        for n, t in c.marks:
            if n >= count:
                return t
        return c.fed_at

    def _fire(self, c: Conn, tok: int) -> None:
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

    def _to_client(self, c: Conn, sid: int, data: bytes) -> None:
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

    def _command(self, t: float, c: Conn, kind: int, sid: int, arg: object) -> None:
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

    def _open(self, c: Conn) -> None:
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

    def _client(self, c: Conn, kind: str, data: bytes) -> None:
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

    def _connected(self, c: Conn, ok: bool) -> None:
        if c.sid is None or c.forgotten:
            return
        self.core.upstream_result(c.sid, ok, self.rec.now)
        self.after()
        if ok:
            self._release(c)

    def _release(self, c: Conn) -> None:
        """Schedule the backend's replies the guest has earned."""
        b = c.backend
        if b is None:
            return
        t = self.rec.now
        for at, ch in b.due(t):
            self.clock.at(at, lambda ch=ch: self._server(c, ch.data, ch.end))

    def _server(self, c: Conn, data: bytes, end: str) -> None:
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

    def _splice_end(self, c: Conn) -> None:
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
