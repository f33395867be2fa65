"""Serve a stream activator on a unix socket, with a real server's socket as the backend.

Why: the unit tests of a stream activator should have real protocol peers on both
sides (psycopg, psql or a hand-driven client on one, a real PostgreSQL on the other),
not only hand-written bytes, and that needs no namespace, no root and no daemon. The
bridge is a small single-threaded relay that does what the fabric's stream host does
with the guest's actions (activators/ABI.md, "Streams"), on unix sockets: it is not the
host, it only plays it. ``backend_up`` decides whether an ``upstream_connect`` succeeds;
``set_backend(up)`` also sends the guest ``backend_available``/``backend_unavailable``.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fabric.activator import abi
from fabric.activator.host import ActivatorHost


@dataclass
class _Conn:
    client: socket.socket
    up: socket.socket | None = None
    paused: bool = False
    spliced: bool = False
    closed: bool = False
    up_bytes: int = 0


@dataclass
class Counters:
    upstream_bytes: int = 0  # bytes the guest sent toward the backend, all streams
    connects: int = 0
    needs: list[int] = field(default_factory=list)
    failed_calls: int = 0


class StreamBridge:
    """Listen on ``listen`` (a unix socket path); backends are ``backend`` (a path)."""

    def __init__(self, wasm: str | Path, config: dict[str, Any], listen: str, backend: str,
                 *, port: int = 5432, backend_up: bool = True) -> None:
        self.host = ActivatorHost(wasm, config)
        self.port = port
        self.listen_path = listen
        self.backend_path = backend
        self.backend_up = backend_up
        self.counters = Counters()
        self.logs: list[str] = []
        self.lock = threading.RLock()
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, _Conn] = {}
        self.next_id = 1
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(listen):
            os.unlink(listen)
        self.lsock.bind(listen)
        self.lsock.listen(64)
        self.lsock.setblocking(False)
        self.sel.register(self.lsock, selectors.EVENT_READ, ("listen", 0))
        self.stop_r, self.stop_w = os.pipe()
        self.sel.register(self.stop_r, selectors.EVENT_READ, ("stop", 0))
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    # --- control (from the test thread) ----------------------------------------------

    @property
    def need(self) -> int | None:
        return self.counters.needs[-1] if self.counters.needs else None

    def set_backend(self, up: bool) -> None:
        with self.lock:
            self.backend_up = up
            self._send([abi.BackendAvailable() if up else abi.BackendUnavailable()])

    def close(self) -> None:
        os.write(self.stop_w, b"x")
        self.thread.join(10)
        with self.lock:
            for c in self.conns.values():
                self._drop(c)
            self.host.close()
        self.lsock.close()
        os.close(self.stop_r)
        os.close(self.stop_w)

    def __enter__(self) -> StreamBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the relay ---------------------------------------------------------------------

    def _send(self, events: list[abi.Event]) -> None:
        while events:
            out = self.host.process(self.port, events, len(self.conns))
            events = []
            if out is None:
                self.counters.failed_calls += 1
                return
            for a in out:
                events.extend(self._apply(a))

    def _apply(self, a: abi.Action) -> list[abi.Event]:
        if isinstance(a, abi.SetBackendNeed):
            self.counters.needs.append(a.need)
            return []
        if isinstance(a, abi.Log):
            self.logs.append(a.message)
            return []
        c = self.conns.get(getattr(a, "stream_id", -1))
        if c is None:
            return []
        sid = a.stream_id  # type: ignore[attr-defined]
        if isinstance(a, abi.DownstreamSend):
            if not c.closed:
                try:
                    c.client.sendall(a.data)
                except OSError:
                    pass
        elif isinstance(a, abi.UpstreamSend):
            self.counters.upstream_bytes += len(a.data)
            if c.up is not None:
                c.up.sendall(a.data)
        elif isinstance(a, abi.UpstreamConnect):
            self.counters.connects += 1
            if c.up is not None or not self.backend_up:
                return [abi.UpstreamConnectResult(sid, 0)]
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                up.connect(self.backend_path)
            except OSError:
                up.close()
                return [abi.UpstreamConnectResult(sid, 0)]
            c.up = up
            self.sel.register(up, selectors.EVENT_READ, ("up", sid))
            return [abi.UpstreamConnectResult(sid, 1)]
        elif isinstance(a, abi.UpstreamClose):
            if c.up is not None:
                self.sel.unregister(c.up)
                c.up.close()
                c.up = None
        elif isinstance(a, abi.DownstreamClose):
            self._drop(c)
            del self.conns[sid]
        elif isinstance(a, abi.Pause):
            if not c.paused and not c.closed:
                c.paused = True
                self.sel.unregister(c.client)
        elif isinstance(a, abi.Resume):
            if c.paused and not c.closed:
                c.paused = False
                self.sel.register(c.client, selectors.EVENT_READ, ("client", sid))
        elif isinstance(a, abi.Splice):
            c.spliced = True
        return []

    def _drop(self, c: _Conn) -> None:
        if c.closed:
            return
        c.closed = True
        for s in (c.client, c.up):
            if s is None:
                continue
            if not (s is c.client and c.paused):
                try:
                    self.sel.unregister(s)
                except (KeyError, ValueError):
                    pass
            s.close()
        c.up = None

    def _loop(self) -> None:
        last_tick = 0.0
        while True:
            for key, _ in self.sel.select(0.05):
                what, sid = key.data
                with self.lock:
                    if what == "stop":
                        return
                    if what == "listen":
                        cs, _ = self.lsock.accept()
                        sid = self.next_id
                        self.next_id += 1
                        self.conns[sid] = _Conn(cs)
                        self.sel.register(cs, selectors.EVENT_READ, ("client", sid))
                        self._send([abi.StreamOpen(sid, self.port)])
                        continue
                    c = self.conns.get(sid)
                    if c is None or c.closed:
                        continue
                    src = c.client if what == "client" else c.up
                    if src is None:
                        continue
                    try:
                        data = src.recv(65536)
                    except OSError:
                        data = b""
                    if c.spliced:
                        dst = c.up if what == "client" else c.client
                        if data and dst is not None:
                            dst.sendall(data)
                        else:
                            self._drop(c)
                            del self.conns[sid]
                            self._send([abi.StreamClose(sid)])
                        continue
                    if what == "client":
                        ev: abi.Event = abi.StreamData(sid, data) if data else abi.StreamClose(sid)
                    else:
                        ev = abi.UpstreamData(sid, data) if data else abi.UpstreamClosed(sid)
                        if not data:
                            self.sel.unregister(src)
                            src.close()
                            c.up = None
                    if not data and what == "client":
                        self.sel.unregister(src)
                        c.paused = True  # no more reads from it
                    self._send([ev])
            now = time.monotonic()
            if now - last_tick >= 0.1:
                last_tick = now
                with self.lock:
                    if self.conns:
                        self._send([abi.Tick(int((now - self.t0) * 1000) + 1)])
