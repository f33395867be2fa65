"""The harness's record of a replay: one line per event, action and simulated fact.

Deterministic by construction (times are the capture's, relative to its first packet;
nothing from the wall clock, no fuel figures, no addresses of the machine that ran it),
so a timeline can be checked in as a golden file and compared byte for byte.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fabric.activator import abi

PREVIEW_BYTES = 40
NEED_NAMES = ("none", "traffic", "active")
LOG_LEVELS = ("debug", "info", "warning", "error")
VERDICTS = ("hold", "drop", "pass")

EVENT = "->"  # the host gives the guest an event
ACTION = "<-"  # the guest answers an action
SIM = "**"  # the simulated world: clients, backend, readiness
NEED = "=="  # the port's need level changed
FAIL = "!!"  # the guest failed: trap, fuel, deadline, malformed answer


@dataclass(slots=True)
class Record:
    t: float  # seconds since the capture's first packet
    kind: str  # one of EVENT, ACTION, SIM, NEED, FAIL
    name: str
    stream: int | None = None
    packet: int | None = None
    data: bytes | None = None
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    ip: bytes | None = None  # a packet event's packet: summarized when shown

    def _detail(self) -> str:
        if self.ip is not None and not self.detail:
            self.detail = f"{packet_summary(self.ip)} ({len(self.ip)} B)"
        return self.detail

    def text(self) -> str:
        ident = ""
        if self.stream is not None:
            ident = f"#{self.stream}"
        elif self.packet is not None:
            ident = f"pkt {self.packet}"
        parts = [p for p in (ident, self._detail()) if p]
        if self.data is not None:
            parts.append(f"{len(self.data)} B {preview(self.data)}")
        return f"{self.t * 1000:12.3f} ms  {self.kind} {self.name:<24} {' '.join(parts)}".rstrip()

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t_ms": round(self.t * 1000, 3), "kind": _KINDS[self.kind],
                               "name": self.name}
        if self.stream is not None:
            out["stream"] = self.stream
        if self.packet is not None:
            out["packet"] = self.packet
        if self.data is not None:
            out["bytes"] = len(self.data)
            out["preview"] = preview(self.data)
        if self._detail():
            out["detail"] = self.detail
        out.update(self.extra)
        return out


_KINDS = {EVENT: "event", ACTION: "action", SIM: "sim", NEED: "need", FAIL: "failure"}


def preview(data: bytes, limit: int = PREVIEW_BYTES) -> str:
    """The first bytes, quoted, printable ASCII as is and the rest escaped."""
    out = []
    for b in data[:limit]:
        if b == 0x5C:
            out.append("\\\\")
        elif b == 0x22:
            out.append('\\"')
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        elif b == 0x0A:
            out.append("\\n")
        elif b == 0x0D:
            out.append("\\r")
        elif b == 0x09:
            out.append("\\t")
        else:
            out.append(f"\\x{b:02x}")
    more = "..." if len(data) > limit else ""
    return f'"{"".join(out)}"{more}'


def event_record(t: float, e: abi.Event) -> Record:
    """An event as the guest receives it."""
    if isinstance(e, abi.Packet):
        return Record(t, EVENT, "packet", packet=e.packet_id, ip=e.data)
    if isinstance(e, abi.Tick):
        return Record(t, EVENT, "tick", detail=f"now_ms={e.now_ms}")
    if isinstance(e, abi.StreamOpen):
        return Record(t, EVENT, "stream_open", stream=e.stream_id, detail=f"port {e.port}")
    if isinstance(e, abi.StreamData):
        return Record(t, EVENT, "stream_data", stream=e.stream_id, data=e.data)
    if isinstance(e, abi.StreamClose):
        return Record(t, EVENT, "stream_close", stream=e.stream_id)
    if isinstance(e, abi.UpstreamConnectResult):
        return Record(t, EVENT, "upstream_connect_result", stream=e.stream_id,
                      detail="ok" if e.ok else "failed")
    if isinstance(e, abi.UpstreamData):
        return Record(t, EVENT, "upstream_data", stream=e.stream_id, data=e.data)
    if isinstance(e, abi.UpstreamClosed):
        return Record(t, EVENT, "upstream_close", stream=e.stream_id)
    if isinstance(e, abi.BackendAvailable):
        return Record(t, EVENT, "backend_available")
    if isinstance(e, abi.BackendUnavailable):
        return Record(t, EVENT, "backend_unavailable")
    return Record(t, EVENT, type(e).__name__)


def action_record(t: float, a: abi.Action) -> Record:
    """An action as the guest answered it."""
    if isinstance(a, abi.SetBackendNeed):
        return Record(t, ACTION, "set_backend_need", detail=_name(NEED_NAMES, a.need))
    if isinstance(a, abi.Log):
        return Record(t, ACTION, "log", detail=f"{_name(LOG_LEVELS, a.level)}: "
                                               f"{one_line(a.message)}")
    if isinstance(a, abi.Count):
        return Record(t, ACTION, "count", detail=f"{a.name} +{a.n}")
    if isinstance(a, abi.PacketDecision):
        return Record(t, ACTION, "packet_decision", packet=a.packet_id,
                      detail=_name(VERDICTS, a.verdict))
    if isinstance(a, abi.ReplayPacket):
        return Record(t, ACTION, "replay_packet", packet=a.packet_id)
    if isinstance(a, abi.UpstreamConnect):
        return Record(t, ACTION, "upstream_connect", stream=a.stream_id,
                      detail=f"port {a.port}" if a.port else "target port")
    if isinstance(a, abi.UpstreamConnectLike):
        return Record(t, ACTION, "upstream_connect_like", stream=a.stream_id,
                      detail=(f"port {a.port}" if a.port else "target port")
                      + f", backend of stream {a.like}")
    data = getattr(a, "data", None)
    name = _ACTION_NAMES.get(type(a).__name__, type(a).__name__)
    return Record(t, ACTION, name, stream=getattr(a, "stream_id", None), data=data)


_ACTION_NAMES = {"DownstreamSend": "downstream_send", "DownstreamClose": "downstream_close",
                 "UpstreamSend": "upstream_send", "UpstreamClose": "upstream_close",
                 "Pause": "pause", "Resume": "resume", "Splice": "splice"}


def one_line(text: str) -> str:
    """Guest text on one timeline line: control characters escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _name(names: tuple[str, ...], value: int) -> str:
    return names[value] if 0 <= value < len(names) else str(value)


def packet_summary(pkt: bytes) -> str:
    """`TCP 10.0.0.2:40000 > 10.0.0.100:80 [S]`, enough to follow a flow."""
    if len(pkt) < 20:
        return "short packet"
    ihl = (pkt[0] & 15) * 4
    proto = pkt[9]
    src, dst = socket.inet_ntoa(pkt[12:16]), socket.inet_ntoa(pkt[16:20])
    l4 = pkt[ihl:]
    if proto in (6, 17) and len(l4) >= 4:
        sport, dport = int.from_bytes(l4[0:2], "big"), int.from_bytes(l4[2:4], "big")
        head = f"{'TCP' if proto == 6 else 'UDP'} {src}:{sport} > {dst}:{dport}"
        if proto == 6 and len(l4) >= 20:
            flags = "".join(c for bit, c in ((2, "S"), (1, "F"), (4, "R"), (8, "P"),
                                             (16, "."))
                            if l4[13] & bit)
            payload = len(l4) - (l4[12] >> 4) * 4
            return f"{head} [{flags}]" + (f" len {payload}" if payload > 0 else "")
        return head
    return f"proto {proto} {src} > {dst}"


def render(records: list[Record]) -> str:
    """The timeline as text: the golden file's format."""
    return "".join(r.text() + "\n" for r in records)


def golden_diff(path: str | Path, text: str) -> str | None:
    """None when the file holds exactly `text`, else one line saying where it differs."""
    p = Path(path)
    try:
        want = p.read_text()
    except FileNotFoundError:
        return f"golden {p}: no such file (write it with --update-golden)"
    if want == text:
        return None
    wl, gl = want.splitlines(), text.splitlines()
    for i in range(max(len(wl), len(gl))):
        w = wl[i] if i < len(wl) else "<end of file>"
        g = gl[i] if i < len(gl) else "<end of timeline>"
        if w != g:
            return f"golden {p}: line {i + 1} differs: want {w.strip()!r}, got {g.strip()!r}"
    return f"golden {p}: differs in line endings"
