"""A minimal QMP (QEMU Machine Protocol) client: enough to stop, continue, migrate to a
file and quit a VM. Blocking, one command at a time; asynchronous events are skipped."""

from __future__ import annotations

import json
import socket
import time
from typing import Any


class QMPError(Exception):
    """QEMU refused a command, or the socket failed; the message says which."""


class QMP:
    """`with QMP(path) as q: q.cmd("stop")`: connects, negotiates capabilities."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> QMP:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self, wait: float = 0.0) -> None:
        """Connect; with `wait`, retry that long while QEMU is not listening yet."""
        deadline = time.monotonic() + wait
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if time.monotonic() >= deadline:
                    raise QMPError(f"QMP socket {self.path}: {e.strerror}") from None
                time.sleep(0.02)
        self._sock = s
        greeting = self._read()
        if "QMP" not in greeting:
            raise QMPError(f"QMP socket {self.path}: no greeting")
        self.cmd("qmp_capabilities")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _read(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except OSError as e:
                raise QMPError(f"QMP socket {self.path}: {e}") from None
            if not chunk:
                raise QMPError(f"QMP socket {self.path}: QEMU closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg = json.loads(line)
        assert isinstance(msg, dict)
        return msg

    def cmd(self, name: str, **args: Any) -> Any:
        """Run one command; its `return`, or QMPError with QEMU's description."""
        if self._sock is None:
            raise QMPError("QMP: not connected")
        req: dict[str, Any] = {"execute": name}
        if args:
            req["arguments"] = args
        try:
            self._sock.sendall(json.dumps(req).encode() + b"\n")
        except OSError as e:
            raise QMPError(f"QMP socket {self.path}: {e}") from None
        while True:
            msg = self._read()
            if "event" in msg:
                continue
            if "error" in msg:
                raise QMPError(f"QMP {name}: {msg['error'].get('desc', msg['error'])}")
            return msg.get("return")

    def status(self) -> str:
        """The run state: running, paused, inmigrate, postmigrate, ..."""
        return str(self.cmd("query-status")["status"])
