"""Blocking client for the control API, used by the CLI, tests and scripts.

Standard library only (http.client over a unix socket) so the CLI starts fast and works
without the daemon's dependencies. Errors come back as FabricError with the server's status,
code and message intact, so callers handle local and remote failures the same way.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

from fabric.errors import Conflict, FabricError, NotFound, PortError

DEFAULT_CONTROL = "/run/fabricd/control.sock"
ENV_CONTROL = "FABRICD_CONTROL"
DEFAULT_TIMEOUT = 30.0

_ERROR_CLASSES: dict[str, type[FabricError]] = {
    NotFound.code: NotFound,
    Conflict.code: Conflict,
    PortError.code: PortError,
}


def resolve_control_path(explicit: str | None = None) -> str:
    """--control beats $FABRICD_CONTROL beats the packaged default."""
    return explicit or os.environ.get(ENV_CONTROL) or DEFAULT_CONTROL


def remote_error(status: int, code: str, message: str) -> FabricError:
    """Rebuild the server's error; known codes get their class so `except NotFound` works."""
    exc = _ERROR_CLASSES.get(code, FabricError)(message)
    exc.status = status
    exc.code = code
    return exc


def error_from_body(status: int, reason: str, data: bytes) -> FabricError:
    try:
        err = json.loads(data)["error"]
        return remote_error(status, str(err["code"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        text = data.decode("utf-8", "replace").strip()[:200]
        return remote_error(status, f"http_{status}", f"HTTP {status} {reason}: {text}".strip())


def _json_lines(lines: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    try:
        for line in lines:
            if line.strip():
                yield json.loads(line)
    finally:
        lines.close()


def _pod_path(ns: str, pod: str) -> str:
    return f"/v1/namespaces/{quote(ns, safe='')}/pods/{quote(pod, safe='')}"


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over AF_UNIX: the Host header is cosmetic, the path is the address."""

    def __init__(self, socket_path: str, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ControlClient:
    """One keep-alive connection for requests; streams get their own connection each."""

    def __init__(self, path: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = resolve_control_path(path)
        self.timeout = timeout
        self._conn: UnixHTTPConnection | None = None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ---- plumbing --------------------------------------------------------------------------

    def _unreachable(self, e: OSError) -> FabricError:
        reason = e.strerror or str(e) or type(e).__name__
        exc = FabricError(
            f"cannot reach fabricd at {self.path}: {reason} "
            f"(is the daemon running? set --control or ${ENV_CONTROL})"
        )
        exc.status = 503
        exc.code = "unreachable"
        return exc

    def _connect(self, timeout: float | None) -> UnixHTTPConnection:
        conn = UnixHTTPConnection(self.path, timeout=timeout)
        try:
            conn.connect()
        except OSError as e:
            conn.close()
            raise self._unreachable(e) from None
        return conn

    def __del__(self) -> None:
        # Scripts often do ControlClient(p).get(...) without closing; don't leak the socket.
        try:
            self.close()
        except Exception:
            pass

    def request(self, method: str, path: str, body: Any = None, *, text: bool = False) -> Any:
        """Send one request; JSON answers are parsed (unless text=True), others are text."""
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            reused = self._conn is not None and self._conn.sock is not None
            if not reused:
                self.close()
                self._conn = self._connect(self.timeout)
            assert self._conn is not None
            try:
                self._conn.request(method, path, body=payload, headers=headers)
                resp = self._conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, ConnectionError) as e:
                self.close()
                if reused and attempt == 0:
                    continue  # the daemon closed an idle keep-alive connection: retry once
                raise FabricError(f"fabricd at {self.path} closed the connection: {e}") from None
            except TimeoutError:
                self.close()
                raise FabricError(
                    f"fabricd at {self.path} did not answer within {self.timeout:g}s"
                ) from None
            except http.client.HTTPException as e:
                self.close()
                raise FabricError(f"bad answer from fabricd at {self.path}: {e!r}") from None
            if resp.will_close:
                self.close()
            if resp.status >= 400:
                raise error_from_body(resp.status, resp.reason, data)
            if text:
                return data.decode("utf-8", "replace")
            if not data:
                return None
            if (resp.getheader("Content-Type") or "").startswith("application/json"):
                return json.loads(data)
            return data.decode("utf-8", "replace")
        raise AssertionError("unreachable")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def get_text(self, path: str) -> str:
        """The body as text whatever its type (e.g. /metrics)."""
        return self.request("GET", path, text=True)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body)

    def _open_stream(self, path: str) -> tuple[UnixHTTPConnection, http.client.HTTPResponse]:
        """Errors (unreachable, 404, ...) surface here, at call time, not on first next()."""
        conn = self._connect(self.timeout)
        sock = conn.sock  # http.client detaches it from conn for Connection: close answers
        assert sock is not None
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            if resp.status >= 400:
                raise error_from_body(resp.status, resp.reason, resp.read())
            sock.settimeout(None)  # streams may be quiet for a long time
        except FabricError:
            conn.close()
            raise
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise FabricError(f"fabricd at {self.path} failed to open {path}: {e!r}") from None
        return conn, resp

    def stream(self, path: str, chunk_size: int = 65536) -> Iterator[bytes]:
        """Raw body chunks as they arrive; closing the iterator hangs up on the daemon."""
        conn, resp = self._open_stream(path)
        return self._chunks(conn, resp, chunk_size)

    def lines(self, path: str) -> Iterator[bytes]:
        """Body lines as they arrive (events are one JSON object per line)."""
        conn, resp = self._open_stream(path)
        return self._lines(conn, resp)

    def _chunks(
        self, conn: UnixHTTPConnection, resp: http.client.HTTPResponse, size: int
    ) -> Iterator[bytes]:
        try:
            while True:
                chunk = self._read(resp, lambda: resp.read1(size))
                if not chunk:
                    return
                yield chunk
        finally:
            resp.close()
            conn.close()

    def _lines(self, conn: UnixHTTPConnection, resp: http.client.HTTPResponse) -> Iterator[bytes]:
        # Built on read1, not readline: readline hides a truncated chunked body as a clean EOF.
        buf = b""
        try:
            while True:
                chunk = self._read(resp, lambda: resp.read1(65536))
                if not chunk:
                    if buf:
                        yield buf
                    return
                buf += chunk
                *complete, buf = buf.split(b"\n")
                for line in complete:
                    yield line + b"\n"
        finally:
            resp.close()
            conn.close()

    def _read(self, resp: http.client.HTTPResponse, read: Any) -> bytes:
        try:
            return bytes(read())
        except (http.client.IncompleteRead, ConnectionError) as e:
            raise FabricError(f"lost the stream from fabricd at {self.path}: {e!r}") from None

    # ---- conveniences ----------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self.get("/v1/health")

    def namespaces(self) -> list[dict[str, Any]]:
        return self.get("/v1/namespaces")

    def namespace(self, name: str) -> dict[str, Any]:
        return self.get(f"/v1/namespaces/{quote(name, safe='')}")

    def apply_namespace(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self.put(f"/v1/namespaces/{quote(spec['name'], safe='')}", spec)

    def remove_namespace(self, name: str) -> None:
        self.delete(f"/v1/namespaces/{quote(name, safe='')}")

    def pods(self, ns: str | None = None) -> list[dict[str, Any]]:
        if ns is None:
            return self.get("/v1/pods")
        return self.get(f"/v1/namespaces/{quote(ns, safe='')}/pods")

    def attach_pod(self, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.put(_pod_path(ns, spec["name"]), spec)

    def detach_pod(self, ns: str, name: str) -> None:
        self.delete(_pod_path(ns, name))

    def set_ready(self, ns: str, pod: str, ready: bool = True) -> dict[str, Any]:
        return self.put(_pod_path(ns, pod) + "/ready", {"ready": ready})

    def services(self, ns: str | None = None) -> list[dict[str, Any]]:
        suffix = f"?{urlencode({'namespace': ns})}" if ns else ""
        return self.get("/v1/services" + suffix)

    def peers(self) -> list[dict[str, Any]]:
        return self.get("/v1/peers")

    def metrics_text(self) -> str:
        return self.get("/metrics")

    def events(self) -> Iterator[dict[str, Any]]:
        """Parsed events until the daemon ends the stream or the iterator is closed."""
        return _json_lines(self.lines("/v1/events"))

    def capture(self, ns: str, pod: str, count: int | None = None) -> Iterator[bytes]:
        suffix = f"?count={count}" if count else ""
        return self.stream(_pod_path(ns, pod) + "/capture" + suffix)
