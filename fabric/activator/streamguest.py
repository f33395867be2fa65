"""Drive a stream activator (activators/ABI.md, "Streams") with bytes, for tests.

A thin bookkeeping layer over the real ``ActivatorHost``: it hands the guest stream
events one call at a time and sorts the actions it answers into what each side of each
stream would receive, so a test reads ``g.to_client(1)`` instead of walking actions.
Nothing is simulated beyond the guest: no sockets, no backend (the test plays both peers).
In the package (not only the test suite) so an activator project's own tests
(``fabricd activator new``) can use it against the installed fabricd.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fabric.activator import abi
from fabric.activator.host import ActivatorHost


@dataclass
class StreamView:
    """What the guest has done to one stream so far."""

    client: bytearray = field(default_factory=bytearray)  # bytes sent to the client
    upstream: bytearray = field(default_factory=bytearray)  # bytes sent to the backend
    connects: list[int] = field(default_factory=list)  # upstream_connect ports
    connects_like: list[int] = field(default_factory=list)  # upstream_connect_like: the stream
    downstream_closed: bool = False
    upstream_closed: bool = False
    paused: bool = False
    spliced: bool = False


class StreamGuest:
    """One stream activator instance and the streams a test opened on it."""

    def __init__(self, wasm: str | Path, config: dict[str, Any] | None = None, *,
                 port: int = 80, **host_kw: Any) -> None:
        self.host = ActivatorHost(wasm, config or {}, **host_kw)
        self.port = port
        self.streams: dict[int, StreamView] = defaultdict(StreamView)
        self.need: int | None = None
        self.logs: list[tuple[int, str]] = []
        self.actions: list[abi.Action] = []  # every action, in order
        self.failed = 0  # calls that returned None (trap, fuel, malformed)

    def close(self) -> None:
        self.host.close()

    # --- events ----------------------------------------------------------------------

    def send(self, *events: abi.Event) -> list[abi.Action]:
        live = sum(1 for v in self.streams.values() if not v.downstream_closed)
        out = self.host.process(self.port, list(events), live)
        if out is None:
            self.failed += 1
            return []
        for a in out:
            self._apply(a)
        self.actions.extend(out)
        return out

    def open(self, sid: int) -> list[abi.Action]:
        return self.send(abi.StreamOpen(sid, self.port))

    def client(self, sid: int, data: bytes) -> list[abi.Action]:
        return self.send(abi.StreamData(sid, data))

    def client_close(self, sid: int) -> list[abi.Action]:
        return self.send(abi.StreamClose(sid))

    def connected(self, sid: int, ok: bool = True) -> list[abi.Action]:
        return self.send(abi.UpstreamConnectResult(sid, 1 if ok else 0))

    def backend(self, sid: int, data: bytes) -> list[abi.Action]:
        return self.send(abi.UpstreamData(sid, data))

    def backend_close(self, sid: int) -> list[abi.Action]:
        return self.send(abi.UpstreamClosed(sid))

    def available(self) -> list[abi.Action]:
        return self.send(abi.BackendAvailable())

    def unavailable(self) -> list[abi.Action]:
        return self.send(abi.BackendUnavailable())

    def tick(self, now_ms: int) -> list[abi.Action]:
        return self.send(abi.Tick(now_ms))

    # --- what came back --------------------------------------------------------------

    def to_client(self, sid: int) -> bytes:
        """Everything sent to the client so far (and forget it)."""
        v = self.streams[sid]
        out = bytes(v.client)
        v.client.clear()
        return out

    def to_backend(self, sid: int) -> bytes:
        """Everything sent to the backend so far (and forget it)."""
        v = self.streams[sid]
        out = bytes(v.upstream)
        v.upstream.clear()
        return out

    def _apply(self, a: abi.Action) -> None:
        if isinstance(a, abi.SetBackendNeed):
            self.need = a.need
        elif isinstance(a, abi.Log):
            self.logs.append((a.level, a.message))
        elif isinstance(a, abi.DownstreamSend):
            self.streams[a.stream_id].client += a.data
        elif isinstance(a, abi.DownstreamClose):
            self.streams[a.stream_id].downstream_closed = True
        elif isinstance(a, abi.UpstreamConnect):
            self.streams[a.stream_id].connects.append(a.port)
        elif isinstance(a, abi.UpstreamConnectLike):
            self.streams[a.stream_id].connects.append(a.port)
            self.streams[a.stream_id].connects_like.append(a.like)
        elif isinstance(a, abi.UpstreamSend):
            self.streams[a.stream_id].upstream += a.data
        elif isinstance(a, abi.UpstreamClose):
            self.streams[a.stream_id].upstream_closed = True
        elif isinstance(a, abi.Pause):
            self.streams[a.stream_id].paused = True
        elif isinstance(a, abi.Resume):
            self.streams[a.stream_id].paused = False
        elif isinstance(a, abi.Splice):
            self.streams[a.stream_id].spliced = True
