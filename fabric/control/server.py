"""Control API: HTTP/1.1 + JSON on a unix socket.

A unix socket (not TCP) so access control is plain file permissions and nothing is exposed on
the network; HTTP so curl, scripts and the CLI can all talk to it. Parsing is done by h11
(sans-IO) and every limit (body size, connections, idle time) is enforced here so a broken or
hostile client can never take the daemon down.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import inspect
import ipaddress
import json
import logging
import os
import re
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import h11

from fabric.errors import ConfigError, FabricError, NotFound
from fabric.net import pcap
from fabric.runtime import families
from fabric.runtime import prometheus as metrics_mod

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
MAX_CONNECTIONS = 64
IDLE_TIMEOUT = 60.0
BUSY_TIMEOUT = 5.0
MAX_HEAD = 64 * 1024
READ_SIZE = 65536
REQUEST_TIMEOUT = 10.0  # from a request's first byte to its last: no slow-loris
SEND_TIMEOUT = 30.0  # a client that reads nothing for this long is dropped
LINGER_SECONDS = 1.0
LINGER_BYTES = 4 << 20
JSON_TYPE = "application/json"
NDJSON_TYPE = "application/x-ndjson"
PCAP_TYPE = "application/vnd.tcpdump.pcap"


class BadRequest(FabricError):
    status = 400
    code = "bad_request"


class MethodNotAllowed(FabricError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, allow: list[str]) -> None:
        super().__init__(message)
        self.allow = allow


class PayloadTooLarge(FabricError):
    status = 413
    code = "too_large"


class Busy(FabricError):
    status = 503
    code = "busy"


class EventLike(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


class Subscription(Protocol):
    """What events() and capture() return: an async iterator that must be closed."""

    def __aiter__(self) -> AsyncIterator[Any]: ...

    def close(self) -> Any: ...


class FabricAPI(Protocol):
    """The slice of fabric.runtime.worker.Fabric the control API needs (sync or async
    results accepted)."""

    worker_id: str

    async def apply_namespace(self, spec: dict[str, Any]) -> dict[str, Any]: ...
    async def remove_namespace(self, name: str) -> None: ...
    async def attach_pod(self, ns: str, spec: dict[str, Any]) -> dict[str, Any]: ...
    async def detach_pod(self, ns: str, name: str) -> None: ...
    def set_ready(self, ns: str, pod: str, ready: bool) -> None: ...
    def get_namespaces(self) -> list[dict[str, Any]]: ...
    def get_namespace(self, name: str) -> dict[str, Any]: ...
    def get_pods(self, ns: str | None = None) -> list[dict[str, Any]]: ...
    def get_services(self, ns: str | None = None) -> list[dict[str, Any]]: ...
    def get_peers(self) -> list[dict[str, Any]]: ...
    def events(self) -> Subscription: ...
    def metrics(self) -> list[metrics_mod.Metric]: ...
    def capture(self, ns: str, pod: str, max_frames: int | None) -> Subscription: ...
    def recent_events(self, ns: str | None, pod: str | None,
                      service: str | None) -> list[dict[str, Any]]: ...
    async def get_drops(self, ns: str | None = None) -> list[dict[str, Any]]: ...
    async def reload_activator(self, ns: str, service: str, port: int | None,
                               module: str | None) -> list[dict[str, Any]]: ...
    def monitor(self, ns: str | None, pod: str | None, reason: str | None) -> Subscription: ...


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a Fabric method that may be sync or async (the embedding API has both kinds)."""
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _close_subscription(sub: Any) -> None:
    """Release a subscription; never let a failing close break the connection teardown."""
    try:
        closer = getattr(sub, "close", None) or getattr(sub, "aclose", None)
        if closer is not None:
            result = closer()
            if inspect.isawaitable(result):
                await result
    except Exception:
        log.exception("closing subscription failed")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, (ipaddress._BaseAddress, ipaddress._BaseNetwork)):  # noqa: SLF001
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return str(obj)


def dumps(obj: Any) -> bytes:
    return (json.dumps(obj, default=_json_default) + "\n").encode()


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""

    def json_object(self) -> dict[str, Any]:
        """Bodies are always objects: a list or scalar is a client bug worth a clear 400."""
        if not self.body.strip():
            raise BadRequest("request body is empty; expected a JSON object")
        try:
            value = json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from None
        except ValueError as e:  # an integer of more than 4,300 digits
            raise BadRequest(f"request body has an invalid value: {e}") from None
        except RecursionError:
            raise BadRequest("request body is nested too deeply") from None
        if not isinstance(value, dict):
            raise BadRequest("request body must be a JSON object")
        return value


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = JSON_TYPE
    headers: list[tuple[str, str]] = field(default_factory=list)
    stream: AsyncIterator[bytes] | None = None
    subscription: Any = None


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(status=status, body=dumps(obj))


def error_response(exc: FabricError) -> Response:
    resp = json_response({"error": exc.to_dict()}, status=exc.status)
    if isinstance(exc, MethodNotAllowed):
        resp.headers.append(("allow", ", ".join(exc.allow)))
    return resp


Handler = Callable[..., Awaitable[Response]]


@dataclass
class Route:
    template: str
    methods: dict[str, Handler]
    regex: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.template)
        self.regex = re.compile(f"^{pattern}$")


class _Http:
    """One connection's h11 state plus its streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        # When the request being read must be complete: set at its first byte, so a
        # client that trickles a byte at a time cannot keep a connection for ever.
        self.deadline: float | None = None

    async def next_event(self, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                wait = timeout
                if self.deadline is not None:
                    wait = min(wait, self.deadline - loop.time())
                    if wait <= 0:
                        raise TimeoutError
                data = await asyncio.wait_for(self.reader.read(READ_SIZE), wait)
                if self.deadline is None and data:
                    self.deadline = loop.time() + REQUEST_TIMEOUT
                self.h11.receive_data(data)
                continue
            return event

    async def send(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            self.writer.write(data)
            transport = self.writer.transport
            if transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
                async with asyncio.timeout(SEND_TIMEOUT):  # the client is not reading
                    await self.writer.drain()
            else:
                await self.writer.drain()

    def can_respond(self) -> bool:
        return self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE)


def check_socket_dir(parent: str) -> None:
    """The control socket's directory: made 0755 if missing; refused if someone else
    owns it or can write to it (they could replace the socket under its clients)."""
    try:
        os.makedirs(parent, mode=0o755, exist_ok=True)
        st = os.stat(parent)
    except OSError as e:
        raise FabricError(f"cannot create {parent} for the control socket: "
                          f"{e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise FabricError(f"{parent} is not a directory; the control socket cannot go there")
    if st.st_uid not in (0, os.geteuid()):
        raise FabricError(f"{parent} belongs to uid {st.st_uid}, not to this daemon: put "
                          "the control socket in a directory of its own (e.g. /run/fabricd)")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise FabricError(f"{parent} is writable by group or others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}): anyone who can write there can "
                          "replace the control socket; use a directory of its own "
                          "(e.g. /run/fabricd)")


class ControlServer:
    """Serves the Fabric over HTTP/1.1 on a unix socket; start() then close()."""

    def __init__(
        self,
        fabric: FabricAPI,
        path: str,
        mode: int = 0o600,
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_body: int = MAX_BODY,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.fabric = fabric
        self.path = os.fspath(path)
        self.mode = mode
        self.max_connections = max_connections
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._active: set[asyncio.Task[Any]] = set()
        self._rejecting: set[asyncio.Task[Any]] = set()
        self._requests: dict[int, int] = {}
        self._routes = self._build_routes()

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._server is not None:
            raise FabricError(f"control server on {self.path} is already started")
        parent = os.path.dirname(os.path.abspath(self.path))
        check_socket_dir(parent)
        await self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        private = None
        try:
            # Bound and chmod-ed in a directory only we can enter, then renamed into place:
            # nobody can connect while the mode is still the umask's, and nobody can swap
            # the path for a symlink between bind() and chmod().
            private = tempfile.mkdtemp(prefix=".fabricd-", dir=parent)
            staged = os.path.join(private, "control.sock")
            sock.bind(staged)
            os.chmod(staged, self.mode)
            st = os.stat(staged)
            os.rename(staged, self.path)
            self._inode = (st.st_dev, st.st_ino)
            self._server = await asyncio.start_unix_server(self._on_connect, sock=sock)
        except OSError as e:
            sock.close()
            raise FabricError(f"cannot listen on {self.path}: {e.strerror or e}") from None
        finally:
            if private is not None:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(private, "control.sock"))
                with contextlib.suppress(OSError):
                    os.rmdir(private)
        log.info("control API listening on %s (mode %04o)", self.path, self.mode)

    async def _remove_stale(self) -> None:
        """A crashed daemon leaves its socket behind; only a socket nobody answers is stale."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FabricError(f"{self.path} exists and is not a socket; refusing to replace it")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_unix_connection(self.path), 2.0)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            log.info("removed stale control socket %s", self.path)
            return
        except (TimeoutError, OSError):
            pass
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        raise FabricError(f"another fabricd is running on {self.path}")

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._active | self._rejecting)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2.0)
        self._unlink_own_socket()
        log.info("control API on %s closed", self.path)

    def _unlink_own_socket(self) -> None:
        """Unlink only our socket: a newer daemon may have replaced the path meanwhile."""
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except OSError:
            pass

    @property
    def connections(self) -> int:
        return len(self._active)

    # ---- connections -----------------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        busy = len(self._active) >= self.max_connections
        if busy and len(self._rejecting) >= self.max_connections:
            writer.close()
            return
        (self._rejecting if busy else self._active).add(task)
        conn = _Http(reader, writer)
        try:
            await self._serve(conn, busy)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # close() cancels us; ending normally keeps asyncio from logging it
        except Exception:
            log.exception("control connection failed")
        finally:
            try:
                await self._finish(conn)
            finally:
                self._active.discard(task)
                self._rejecting.discard(task)

    async def _finish(self, conn: _Http) -> None:
        """Close; if the client may still be sending, drain briefly so it can read our error
        (closing a unix socket with unread data makes the peer see ECONNRESET instead)."""
        writer = conn.writer
        try:
            if conn.h11.their_state not in (h11.DONE, h11.CLOSED, h11.MUST_CLOSE, h11.IDLE):
                if writer.can_write_eof():
                    writer.write_eof()
                loop = asyncio.get_running_loop()
                deadline = loop.time() + LINGER_SECONDS
                drained = 0
                while drained < LINGER_BYTES:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    data = await asyncio.wait_for(conn.reader.read(READ_SIZE), remaining)
                    if not data:
                        break
                    drained += len(data)
        except (Exception, asyncio.CancelledError):
            pass
        writer.close()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await writer.wait_closed()

    async def _serve(self, conn: _Http, busy: bool) -> None:
        while True:
            timeout = BUSY_TIMEOUT if busy else self.idle_timeout
            try:
                event = await conn.next_event(timeout)
            except h11.RemoteProtocolError as e:
                await self._reject(conn, BadRequest(f"malformed request: {e}"), e.error_status_hint)
                return
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed (or a timeout raised above)
            if busy:
                limit = self.max_connections
                await self._reject(conn, Busy(f"too many control connections ({limit}); retry"))
                return
            resp = await self._handle_request(conn, event)
            if resp is None:
                return
            self._requests[resp.status] = self._requests.get(resp.status, 0) + 1
            if resp.stream is not None:
                await self._send_stream(conn, resp)
                return
            await self._send_response(conn, resp)
            if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
                conn.h11.start_next_cycle()
                conn.deadline = None
            else:
                return

    async def _reject(self, conn: _Http, exc: FabricError, status: int | None = None) -> None:
        if status is not None and status != exc.status:
            exc.status = status
        self._requests[exc.status] = self._requests.get(exc.status, 0) + 1
        if conn.can_respond():
            with contextlib.suppress(Exception):
                await self._send_response(conn, error_response(exc), close=True)

    async def _handle_request(self, conn: _Http, event: h11.Request) -> Response | None:
        """Read the body within limits, route, and turn every failure into a JSON error."""
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
        length = headers.get("content-length")
        if length is not None and int(length) > self.max_body:
            await self._reject(conn, self._too_large())
            return None
        body = bytearray()
        while True:
            if conn.h11.client_is_waiting_for_100_continue:
                await conn.send(h11.InformationalResponse(status_code=100, headers=[]))
            try:
                ev = await conn.next_event(self.idle_timeout)
            except h11.RemoteProtocolError as e:
                await self._reject(conn, BadRequest(f"malformed request: {e}"), e.error_status_hint)
                return None
            if isinstance(ev, h11.Data):
                body += ev.data
                if len(body) > self.max_body:
                    await self._reject(conn, self._too_large())
                    return None
            elif isinstance(ev, h11.EndOfMessage):
                break
            else:
                return None
        try:
            split = urlsplit(target)
            query = dict(parse_qsl(split.query, keep_blank_values=True))
            req = Request(method, split.path, query, headers, bytes(body))
            resp = await self._dispatch(req)
        except FabricError as e:
            resp = error_response(e)
        except Exception as e:
            log.exception("control API %s %s failed", method, target)
            resp = error_response(FabricError(f"internal error: {type(e).__name__}: {e}"))
        log.debug("control %s %s -> %d", method, target, resp.status)
        return resp

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body exceeds {self.max_body} bytes")

    async def _send_response(self, conn: _Http, resp: Response, close: bool = False) -> None:
        headers = self._headers(resp)
        headers.append(("content-length", str(len(resp.body))))
        if close:
            headers.append(("connection", "close"))
        await conn.send(self._h11_response(resp, headers))
        if resp.body:
            await conn.send(h11.Data(data=resp.body))
        await conn.send(h11.EndOfMessage())

    @staticmethod
    def _headers(resp: Response) -> list[tuple[str, str]]:
        return [("content-type", resp.content_type), ("server", "fabricd"), *resp.headers]

    @staticmethod
    def _h11_response(resp: Response, headers: list[tuple[str, str]]) -> h11.Response:
        try:
            reason = http.HTTPStatus(resp.status).phrase
        except ValueError:
            reason = ""
        return h11.Response(status_code=resp.status, headers=headers, reason=reason)

    async def _send_stream(self, conn: _Http, resp: Response) -> None:
        """Stream until the source ends or the client goes away, whichever is first; the
        subscription is always closed. Streams end the connection (no keep-alive after)."""
        assert resp.stream is not None
        pump: asyncio.Task[None] | None = None
        watch: asyncio.Task[None] | None = None
        try:
            headers = self._headers(resp)
            headers += [("connection", "close"), ("cache-control", "no-store")]
            await conn.send(self._h11_response(resp, headers))
            pump = asyncio.create_task(self._pump(conn, resp.stream))
            watch = asyncio.create_task(_wait_disconnect(conn.reader))
            done, _ = await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            if pump in done and pump.exception() is None:
                await conn.send(h11.EndOfMessage())
            elif pump in done:
                exc = pump.exception()
                if isinstance(exc, TimeoutError):
                    log.warning("control stream: the client read nothing for %.0fs; dropped",
                                SEND_TIMEOUT)
                elif not isinstance(exc, ConnectionError):
                    log.error("control stream failed: %r", exc)
        finally:
            for task in (pump, watch):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
            with contextlib.suppress(Exception):
                await resp.stream.aclose()
            await _close_subscription(resp.subscription)

    @staticmethod
    async def _pump(conn: _Http, chunks: AsyncIterator[bytes]) -> None:
        async for chunk in chunks:
            await conn.send(h11.Data(data=chunk))

    # ---- routing ---------------------------------------------------------------------------

    def _build_routes(self) -> list[Route]:
        return [
            Route("/v1/health", {"GET": self._health}),
            Route("/v1/namespaces", {"GET": self._list_namespaces}),
            Route(
                "/v1/namespaces/{ns}",
                {
                    "GET": self._get_namespace,
                    "PUT": self._put_namespace,
                    "DELETE": self._delete_namespace,
                },
            ),
            Route("/v1/namespaces/{ns}/pods", {"GET": self._list_ns_pods}),
            Route(
                "/v1/namespaces/{ns}/pods/{pod}",
                {"GET": self._get_pod, "PUT": self._put_pod, "DELETE": self._delete_pod},
            ),
            Route("/v1/namespaces/{ns}/pods/{pod}/ready", {"PUT": self._put_ready}),
            Route("/v1/namespaces/{ns}/pods/{pod}/capture", {"GET": self._capture}),
            Route("/v1/pods", {"GET": self._list_pods}),
            Route("/v1/services", {"GET": self._list_services}),
            Route("/v1/namespaces/{ns}/services/{svc}/activator/reload",
                  {"POST": self._reload_activator}),
            Route("/v1/peers", {"GET": self._list_peers}),
            Route("/v1/peers/{peer}", {"PUT": self._put_peer, "DELETE": self._delete_peer}),
            Route("/v1/peers/{peer}/rekey", {"POST": self._rekey_peer}),
            Route("/v1/events", {"GET": self._events}),
            Route("/v1/events/recent", {"GET": self._recent_events}),
            Route("/v1/drops", {"GET": self._drops}),
            Route("/v1/monitor", {"GET": self._monitor}),
            Route("/metrics", {"GET": self._metrics}),
        ]

    @property
    def routes(self) -> list[tuple[str, list[str]]]:
        """(template, methods) pairs, so docs and tests can check they agree."""
        return [(r.template, sorted(r.methods)) for r in self._routes]

    async def _dispatch(self, req: Request) -> Response:
        path = req.path.rstrip("/") or "/"
        for route in self._routes:
            m = route.regex.match(path)
            if m is None:
                continue
            handler = route.methods.get(req.method)
            if handler is None:
                allow = sorted(route.methods)
                raise MethodNotAllowed(
                    f"method {req.method} not allowed on {path}; allowed: {', '.join(allow)}",
                    allow,
                )
            params = {k: unquote(v) for k, v in m.groupdict().items()}
            return await handler(req, **params)
        raise NotFound(f"no such endpoint: {path}")

    # ---- handlers --------------------------------------------------------------------------

    async def _health(self, req: Request) -> Response:
        """503 when the data plane is dead or stuck, so a supervisor can restart it."""
        check = getattr(self.fabric, "health", None)
        if check is None:
            return json_response({"ok": True, "worker": getattr(self.fabric, "worker_id", None)})
        state = await check()
        return json_response(state, 200 if state.get("ok") else 503)

    async def _list_namespaces(self, req: Request) -> Response:
        return json_response(await _call(self.fabric.get_namespaces))

    async def _get_namespace(self, req: Request, ns: str) -> Response:
        return json_response(await _call(self.fabric.get_namespace, ns))

    @staticmethod
    def _spec(req: Request, name: str) -> dict[str, Any]:
        """The path names the object; a body name is optional but must not contradict it."""
        spec = req.json_object()
        if "name" in spec and spec["name"] != name:
            raise ConfigError(
                f"{req.method} {req.path}",
                "name",
                f"{spec['name']!r} does not match {name!r} from the path",
            )
        spec["name"] = name
        return spec

    async def _put_namespace(self, req: Request, ns: str) -> Response:
        return json_response(await _call(self.fabric.apply_namespace, self._spec(req, ns)))

    async def _delete_namespace(self, req: Request, ns: str) -> Response:
        await _call(self.fabric.remove_namespace, ns)
        return json_response({"ok": True, "namespace": ns})

    async def _list_ns_pods(self, req: Request, ns: str) -> Response:
        return json_response(await _call(self.fabric.get_pods, ns))

    async def _list_pods(self, req: Request) -> Response:
        return json_response(await _call(self.fabric.get_pods, req.query.get("namespace") or None))

    async def _get_pod(self, req: Request, ns: str, pod: str) -> Response:
        for p in await _call(self.fabric.get_pods, ns):
            if p.get("name") == pod:
                return json_response(p)
        raise NotFound(f"pod {ns}/{pod} not found")

    async def _put_pod(self, req: Request, ns: str, pod: str) -> Response:
        return json_response(await _call(self.fabric.attach_pod, ns, self._spec(req, pod)))

    async def _delete_pod(self, req: Request, ns: str, pod: str) -> Response:
        await _call(self.fabric.detach_pod, ns, pod)
        return json_response({"ok": True, "namespace": ns, "pod": pod})

    async def _put_ready(self, req: Request, ns: str, pod: str) -> Response:
        body = req.json_object()
        ready = body.get("ready")
        extra = sorted(set(body) - {"ready"})
        if not isinstance(ready, bool) or extra:
            raise BadRequest('body must be {"ready": true} or {"ready": false}')
        await _call(self.fabric.set_ready, ns, pod, ready)
        return json_response({"namespace": ns, "pod": pod, "ready": ready})

    async def _list_services(self, req: Request) -> Response:
        ns = req.query.get("namespace") or None
        return json_response(await _call(self.fabric.get_services, ns))

    async def _list_peers(self, req: Request) -> Response:
        return json_response(await _call(self.fabric.get_peers))

    async def _put_peer(self, req: Request, peer: str) -> Response:
        spec = req.json_object()
        if "id" in spec and spec["id"] != peer:
            raise ConfigError(f"{req.method} {req.path}", "id",
                              f"{spec['id']!r} does not match {peer!r} from the path")
        spec["id"] = peer
        return json_response(await _call(self.fabric.set_peer, spec))

    async def _delete_peer(self, req: Request, peer: str) -> Response:
        await _call(self.fabric.remove_peer, peer)
        return json_response({"ok": True, "peer": peer})

    async def _rekey_peer(self, req: Request, peer: str) -> Response:
        await _call(self.fabric.rekey_peer, peer)
        return json_response({"ok": True, "peer": peer})

    async def _reload_activator(self, req: Request, ns: str, svc: str) -> Response:
        body = req.json_object() if req.body.strip() else {}
        if set(body) - {"port", "module"}:
            raise BadRequest('body must be {"port": N, "module": "PATH.wasm"} (both optional)')
        port, module = body.get("port"), body.get("module")
        if port is not None and (not isinstance(port, int) or isinstance(port, bool)
                                 or not 0 < port < 65536):
            raise BadRequest(f"port must be a port number, not {port!r}")
        if module is not None and (not isinstance(module, str) or not module):
            raise BadRequest("module must be a .wasm path or a shipped activator's name")
        rows = await _call(self.fabric.reload_activator, ns, svc, port, module)
        return json_response(rows)

    async def _metrics(self, req: Request) -> Response:
        families = list(await _call(self.fabric.metrics)) + self._own_metrics()
        text = metrics_mod.render(families)
        return Response(body=text.encode(), content_type=metrics_mod.CONTENT_TYPE)

    def _own_metrics(self) -> list[metrics_mod.Metric]:
        conns = families.new("fabricd_control_connections")
        conns.samples.append(({}, len(self._active)))
        reqs = families.new("fabricd_control_requests_total")
        reqs.samples += [({"code": str(code)}, n) for code, n in sorted(self._requests.items())]
        out = [conns, reqs]
        sinks = getattr(self.fabric, "monitor_sinks", None)
        if sinks is not None:
            mon = families.new("fabricd_monitor_sinks")
            mon.samples.append(({}, sinks()))
            out.append(mon)
        return out

    async def _events(self, req: Request) -> Response:
        sub = await _call(self.fabric.events)
        return Response(content_type=NDJSON_TYPE, stream=_event_lines(sub), subscription=sub)

    async def _recent_events(self, req: Request) -> Response:
        q = req.query
        return json_response(await _call(self.fabric.recent_events, q.get("namespace") or None,
                                         q.get("pod") or None, q.get("service") or None))

    async def _drops(self, req: Request) -> Response:
        ns = req.query.get("namespace") or None
        return json_response(await _call(self.fabric.get_drops, ns))

    async def _monitor(self, req: Request) -> Response:
        q = req.query
        pod = q.get("pod") or None
        ns = q.get("namespace") or None
        if pod is not None and ns is None:
            raise BadRequest("pod needs namespace (pod names are per namespace)")
        sub = await _call(self.fabric.monitor, ns, pod, q.get("reason") or None)
        return Response(content_type=NDJSON_TYPE, stream=_event_lines(sub), subscription=sub)

    async def _capture(self, req: Request, ns: str, pod: str) -> Response:
        count: int | None = None
        raw = req.query.get("count")
        if raw:
            try:
                count = int(raw)
            except ValueError:
                count = 0
            if count < 1:
                raise BadRequest(f"count must be a positive integer, not {raw!r}")
        # Opened before the response starts so an unknown pod is still a clean 404.
        sub = await _call(self.fabric.capture, ns, pod, count)
        return Response(content_type=PCAP_TYPE, stream=_pcap_records(sub, count), subscription=sub)


async def _wait_disconnect(reader: asyncio.StreamReader) -> None:
    """Returns once the client closes; anything it sends meanwhile is ignored."""
    try:
        while await reader.read(READ_SIZE):
            pass
    except ConnectionError:
        pass


async def _event_lines(sub: Any) -> AsyncIterator[bytes]:
    async for event in sub:
        yield dumps(event.to_dict() if hasattr(event, "to_dict") else event)


async def _pcap_records(sub: Any, count: int | None) -> AsyncIterator[bytes]:
    snaplen = pcap.DEFAULT_SNAPLEN
    yield pcap.global_header(snaplen)
    sent = 0
    async for ts, frame in sub:
        yield pcap.record(ts, frame, snaplen)
        sent += 1
        if count is not None and sent >= count:
            return
