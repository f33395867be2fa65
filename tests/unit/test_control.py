"""Control API server, client and CLI against a fake Fabric on a real unix socket.

The server runs on its own event loop in a thread because the client and CLI are blocking,
exactly as in production (daemon loop vs. a separate CLI process).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fabric.cli import main as cli
from fabric.control.client import ControlClient
from fabric.control.server import ControlServer
from fabric.errors import Conflict, FabricError, NotFound
from fabric.net.pcap import read_pcap
from fabric.runtime.prometheus import Metric

# ---- fake fabric -----------------------------------------------------------------------


class FakeEvent:
    def __init__(self, kind: str, **fields: Any) -> None:
        self.data = {"ts": 1700000000.25, "kind": kind, **fields}

    def to_dict(self) -> dict[str, Any]:
        return dict(self.data)


class FakeSubscription:
    """Yields what is queued; `None` ends it. Records close() so tests can see cleanup."""

    def __init__(self, items: list[Any], end: bool) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        for item in items:
            self.queue.put_nowait(item)
        if end:
            self.queue.put_nowait(None)
        self.closed = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Any]:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            yield item

    def close(self) -> None:
        self.closed = True


class FakeFabric:
    worker_id = "w-test"

    def __init__(self) -> None:
        self.namespaces: dict[str, dict[str, Any]] = {
            "blue": {
                "name": "blue",
                "id": 1,
                "cidr": "10.1.0.0/24",
                "gateway": "10.1.0.1",
                "mtu": 1500,
                "pods": 2,
            },
        }
        self.pods: list[dict[str, Any]] = [
            {
                "namespace": "blue",
                "name": "web",
                "ip": "10.1.0.2",
                "mac": "02:00:00:00:00:02",
                "kind": "tap",
                "attached": True,
                "ready": True,
                "rx_packets": 10,
                "rx_bytes": 1000,
                "tx_packets": 5,
                "tx_bytes": 500,
                "drops": 0,
            },
            {
                "namespace": "blue",
                "name": "db",
                "ip": "10.1.0.3",
                "mac": "02:00:00:00:00:03",
                "kind": "veth",
                "attached": False,
                "ready": False,
                "rx_packets": 0,
                "rx_bytes": 0,
                "tx_packets": 0,
                "tx_bytes": 0,
                "drops": 1,
            },
        ]
        self.ready_calls: list[tuple[str, str, bool]] = []
        self.applied: list[dict[str, Any]] = []
        self.event_items: list[Any] = []
        self.events_end = True
        self.frames: list[tuple[float, bytes]] = []
        self.capture_end = True
        self.subs: list[FakeSubscription] = []
        self.capture_args: list[tuple[str, str, int | None]] = []
        self.fail_with: BaseException | None = None
        self.peer_rows: list[dict[str, Any]] = []
        self.peer_calls: list[tuple[str, Any]] = []
        self.drop_items: list[dict[str, Any]] = []
        self.monitor_args: list[tuple[str | None, str | None, str | None]] = []

    def _maybe_fail(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    async def apply_namespace(self, spec: dict[str, Any]) -> dict[str, Any]:
        self._maybe_fail()
        self.applied.append(spec)
        return {"name": spec["name"], "id": 7, "pods": 0}

    async def remove_namespace(self, name: str) -> None:
        if name not in self.namespaces:
            raise NotFound(f"namespace {name!r} not found")
        del self.namespaces[name]

    async def attach_pod(self, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
        if any(p["name"] == spec["name"] for p in self.pods):
            raise Conflict(f"pod {ns}/{spec['name']} already exists")
        return {"namespace": ns, **spec, "dns": {"nameserver": "10.1.0.1"}}

    async def detach_pod(self, ns: str, name: str) -> None:
        self.pods = [p for p in self.pods if p["name"] != name]

    def set_ready(self, ns: str, pod: str, ready: bool) -> None:
        self.ready_calls.append((ns, pod, ready))

    def get_namespaces(self) -> list[dict[str, Any]]:
        self._maybe_fail()
        return list(self.namespaces.values())

    def get_namespace(self, name: str) -> dict[str, Any]:
        if name not in self.namespaces:
            raise NotFound(f"namespace {name!r} not found")
        return {**self.namespaces[name], "status": {"ok": True}}

    def get_pods(self, ns: str | None = None) -> list[dict[str, Any]]:
        return [p for p in self.pods if ns is None or p["namespace"] == ns]

    def get_services(self, ns: str | None = None) -> list[dict[str, Any]]:
        svcs = [{"namespace": "blue", "name": "api", "ip": "10.1.0.100", "state": "dormant",
                 "need": False, "held_packets": 3, "held_bytes": 180, "flows": 0,
                 "ports": [{"port": 80, "target_port": 8080, "protocol": "tcp"}],
                 "backends": [{"name": "api-1", "ready": False}],
                 "counters": {"activations": 1}}]
        return [s for s in svcs if ns is None or s["namespace"] == ns]

    def get_peers(self) -> list[dict[str, Any]]:
        return self.peer_rows

    def set_peer(self, spec: dict[str, Any]) -> dict[str, Any]:
        self.peer_calls.append(("set", spec))
        row = {"id": spec["id"], "public_key": spec["public_key"],
               "endpoint": spec.get("endpoint")}
        self.peer_rows = [p for p in self.peer_rows if p["id"] != spec["id"]] + [row]
        return row

    def remove_peer(self, peer: str) -> None:
        if not any(p["id"] == peer for p in self.peer_rows):
            raise NotFound(f"peer {peer} not found")
        self.peer_calls.append(("remove", peer))
        self.peer_rows = [p for p in self.peer_rows if p["id"] != peer]

    def rekey_peer(self, peer: str) -> None:
        self.peer_calls.append(("rekey", peer))

    def get_drops(self, ns: str | None = None) -> list[dict[str, Any]]:
        return [d for d in self.drop_items if ns is None or d["namespace"] == ns]

    def monitor(self, ns: str | None, pod: str | None, reason: str | None) -> FakeSubscription:
        self.monitor_args.append((ns, pod, reason))
        sub = FakeSubscription(self.drop_items, True)
        self.subs.append(sub)
        return sub

    def recent_events(self, ns: str | None, pod: str | None,
                      service: str | None) -> list[dict[str, Any]]:
        return [{"ts": 1.0, "kind": "pod_attached", "namespace": ns, "pod": pod or "web"}]

    def events(self) -> FakeSubscription:
        sub = FakeSubscription(self.event_items, self.events_end)
        self.subs.append(sub)
        return sub

    def metrics(self) -> list[Metric]:
        return [
            Metric(
                "fabric_rx_packets_total",
                "counter",
                "Frames received.",
                [({"namespace": "blue", "pod": 'we"b'}, 10.0)],
            )
        ]

    def capture(self, ns: str, pod: str, max_frames: int | None) -> FakeSubscription:
        if not any(p["namespace"] == ns and p["name"] == pod for p in self.pods):
            raise NotFound(f"pod {ns}/{pod} not found")
        self.capture_args.append((ns, pod, max_frames))
        sub = FakeSubscription(self.frames, self.capture_end)
        self.subs.append(sub)
        return sub


# ---- server harness --------------------------------------------------------------------


class Harness:
    def __init__(self, fabric: FakeFabric, path: str, **kw: Any) -> None:
        self.fabric = fabric
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ControlServer(fabric, path, **kw)  # type: ignore[arg-type]

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any]) -> Any:
        async def wrapper() -> Any:
            return fn()

        return self.run(wrapper())

    def start(self) -> Harness:
        self.run(self.server.start())
        return self

    def stop(self) -> None:
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def sockdir() -> Iterator[str]:
    # Short path: AF_UNIX paths are limited to 107 bytes and pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="fctl", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fabric() -> FakeFabric:
    return FakeFabric()


@pytest.fixture
def harness(fabric: FakeFabric, sockdir: str) -> Iterator[Harness]:
    h = Harness(fabric, os.path.join(sockdir, "run", "control.sock")).start()
    yield h
    h.stop()


@pytest.fixture
def client(harness: Harness) -> Iterator[ControlClient]:
    c = ControlClient(harness.path, timeout=5)
    yield c
    c.close()


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


# ---- raw HTTP helpers ------------------------------------------------------------------


def raw_connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def read_response(f: Any) -> tuple[int, dict[str, str], bytes]:
    status_line = f.readline()
    assert status_line, "connection closed before a response"
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = f.readline().rstrip(b"\r\n")
        if not line:
            break
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    body = f.read(int(headers.get("content-length", "0")))
    return status, headers, body


def raw_exchange(path: str, data: bytes) -> tuple[int, dict[str, str], Any]:
    with raw_connect(path) as s:
        s.sendall(data)
        status, headers, body = read_response(s.makefile("rb"))
    return status, headers, json.loads(body)


# ---- lifecycle -------------------------------------------------------------------------


def test_socket_created_with_mode_and_removed_on_close(fabric: FakeFabric, sockdir: str) -> None:
    path = os.path.join(sockdir, "a", "b", "ctl.sock")
    h = Harness(fabric, path, mode=0o660).start()
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
    finally:
        h.stop()
    assert not os.path.exists(path)


def test_socket_dir_others_can_write_is_refused(fabric: FakeFabric, sockdir: str) -> None:
    for mode in (0o777, 0o1777, 0o770):
        os.chmod(sockdir, mode)
        h = Harness(fabric, os.path.join(sockdir, "ctl.sock"))
        try:
            with pytest.raises(FabricError, match="writable by group or others"):
                h.start()
        finally:
            h.stop()
        assert os.listdir(sockdir) == []
    os.chmod(sockdir, 0o700)
    path = os.path.join(sockdir, "file")
    Path(path).write_text("")
    h = Harness(fabric, os.path.join(path, "ctl.sock"))
    try:
        with pytest.raises(FabricError, match="cannot create"):
            h.start()
    finally:
        h.stop()


def test_symlink_swapped_in_before_chmod_changes_nothing(
        fabric: FakeFabric, sockdir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old race: bind(path), someone replaces path with a symlink, chmod(path) follows
    it. Now the socket is bound and chmod-ed where nobody else can reach and renamed in."""
    path = os.path.join(sockdir, "ctl.sock")
    target = os.path.join(sockdir, "shadow")
    Path(target).write_text("secret")
    os.chmod(target, 0o600)
    real_chmod = os.chmod

    def racing_chmod(p: Any, mode: int, **kw: Any) -> None:
        if not os.path.lexists(path):
            os.symlink(target, path)  # the attacker wins the race to the final name
        real_chmod(p, mode, **kw)

    monkeypatch.setattr(os, "chmod", racing_chmod)
    h = Harness(fabric, path, mode=0o660).start()
    try:
        monkeypatch.setattr(os, "chmod", real_chmod)
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
        assert stat.S_ISSOCK(os.lstat(path).st_mode)  # the symlink was replaced, not followed
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
        with ControlClient(path) as c:
            assert c.get("/v1/health")["ok"] is True
        assert sorted(os.listdir(sockdir)) == ["ctl.sock", "shadow"]  # no staging left
    finally:
        h.stop()


def test_stale_socket_is_replaced(fabric: FakeFabric, sockdir: str) -> None:
    path = os.path.join(sockdir, "ctl.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # leaves the file behind, like a crashed daemon
    h = Harness(fabric, path).start()
    try:
        with ControlClient(path) as c:
            assert c.get("/v1/health") == {"ok": True, "worker": "w-test"}
    finally:
        h.stop()


def test_live_daemon_is_not_replaced(harness: Harness, fabric: FakeFabric) -> None:
    other = Harness(fabric, harness.path)
    try:
        with pytest.raises(FabricError, match="another fabricd is running on"):
            other.start()
    finally:
        other.stop()
    with ControlClient(harness.path) as c:
        assert c.get("/v1/health")["ok"] is True


def test_regular_file_is_not_replaced(fabric: FakeFabric, sockdir: str) -> None:
    path = os.path.join(sockdir, "ctl.sock")
    Path(path).write_text("precious")
    h = Harness(fabric, path)
    try:
        with pytest.raises(FabricError, match="not a socket"):
            h.start()
    finally:
        h.stop()
    assert Path(path).read_text() == "precious"


# ---- JSON routes via the client --------------------------------------------------------


def test_health_and_lists(client: ControlClient, fabric: FakeFabric) -> None:
    assert client.get("/v1/health") == {"ok": True, "worker": "w-test"}
    assert client.get("/v1/namespaces")[0]["name"] == "blue"
    assert client.get("/v1/namespaces/blue")["status"] == {"ok": True}
    assert [p["name"] for p in client.get("/v1/pods")] == ["web", "db"]
    assert len(client.get("/v1/namespaces/blue/pods")) == 2
    assert client.get("/v1/namespaces/blue/pods/db")["kind"] == "veth"
    assert client.get("/v1/services?namespace=blue")[0]["ip"] == "10.1.0.100"
    assert client.get("/v1/services?namespace=red") == []
    assert client.get("/v1/peers") == []


def test_put_and_delete(client: ControlClient, fabric: FakeFabric) -> None:
    out = client.put("/v1/namespaces/red", {"cidr": "10.2.0.0/24"})
    assert out == {"name": "red", "id": 7, "pods": 0}
    assert fabric.applied == [{"cidr": "10.2.0.0/24", "name": "red"}]
    pod = client.put("/v1/namespaces/blue/pods/cache", {"name": "cache", "ip": "10.1.0.9"})
    assert pod["dns"] == {"nameserver": "10.1.0.1"}
    assert client.put("/v1/namespaces/blue/pods/web/ready", {"ready": False})["ready"] is False
    assert fabric.ready_calls == [("blue", "web", False)]
    assert client.delete("/v1/namespaces/blue/pods/db") == {
        "ok": True,
        "namespace": "blue",
        "pod": "db",
    }
    assert client.delete("/v1/namespaces/blue") == {"ok": True, "namespace": "blue"}


def test_fabric_errors_are_mapped(client: ControlClient, fabric: FakeFabric) -> None:
    with pytest.raises(NotFound) as nf:
        client.get("/v1/namespaces/nope")
    assert (nf.value.status, nf.value.code) == (404, "not_found")
    assert nf.value.message == "namespace 'nope' not found"
    with pytest.raises(Conflict) as cf:
        client.put("/v1/namespaces/blue/pods/web", {"ip": "10.1.0.2"})
    assert cf.value.status == 409
    with pytest.raises(FabricError) as mismatch:
        client.put("/v1/namespaces/red", {"name": "green"})
    assert (mismatch.value.status, mismatch.value.code) == (400, "invalid")
    assert "'green' does not match 'red'" in mismatch.value.message
    with pytest.raises(FabricError) as bad_ready:
        client.put("/v1/namespaces/blue/pods/web/ready", {"ready": "yes"})
    assert bad_ready.value.code == "bad_request"


def test_unexpected_exception_is_500_and_server_survives(
    client: ControlClient, fabric: FakeFabric, caplog: pytest.LogCaptureFixture
) -> None:
    fabric.fail_with = RuntimeError("boom")
    with pytest.raises(FabricError) as e:
        client.get("/v1/namespaces")
    assert (e.value.status, e.value.code) == (500, "internal")
    assert "boom" in e.value.message
    assert any("failed" in r.getMessage() for r in caplog.records)
    fabric.fail_with = None
    assert client.get("/v1/health")["ok"] is True


def test_metrics_text(client: ControlClient) -> None:
    text = client.get("/metrics")
    assert client.get_text("/metrics").startswith("# HELP")
    assert client.get_text("/v1/peers") == "[]\n"
    assert "# TYPE fabric_rx_packets_total counter" in text
    assert 'fabric_rx_packets_total{namespace="blue",pod="we\\"b"} 10' in text
    assert "# TYPE fabricd_control_connections gauge" in text


def test_client_reuses_connection_and_recovers(client: ControlClient, harness: Harness) -> None:
    client.get("/v1/health")
    first = client._conn
    client.get("/v1/peers")
    assert client._conn is first
    assert harness.call(lambda: harness.server.connections) == 1
    first.sock.close()  # type: ignore[union-attr]  # simulate a dropped keep-alive connection
    first.sock = None  # type: ignore[union-attr]
    assert client.get("/v1/health")["ok"] is True


# ---- raw HTTP edge cases ---------------------------------------------------------------


def test_unknown_route_is_404_json(harness: Harness) -> None:
    status, _, body = raw_exchange(harness.path, b"GET /v2/nothing HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 404
    assert body["error"]["code"] == "not_found"


def test_wrong_method_is_405_with_allow(harness: Harness) -> None:
    status, headers, body = raw_exchange(
        harness.path, b"POST /v1/namespaces/blue HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    assert status == 405
    assert headers["allow"] == "DELETE, GET, PUT"
    assert body["error"]["code"] == "method_not_allowed"


def test_malformed_request_line_is_400(harness: Harness) -> None:
    status, headers, body = raw_exchange(harness.path, b"THIS IS NOT HTTP\r\n\r\n")
    assert status == 400
    assert headers["connection"] == "close"
    assert body["error"]["code"] == "bad_request"


def test_bad_json_is_400(harness: Harness) -> None:
    payload = b"{not json"
    req = (
        b"PUT /v1/namespaces/red HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(payload)
    ) + payload
    status, _, body = raw_exchange(harness.path, req)
    assert status == 400
    assert "not valid JSON" in body["error"]["message"]


def test_oversized_body_is_413(harness: Harness) -> None:
    payload = b"x" * ((1 << 20) + 1)
    req = (
        b"PUT /v1/namespaces/red HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(payload)
    ) + payload
    status, _, body = raw_exchange(harness.path, req)
    assert status == 413
    assert body["error"]["code"] == "too_large"


def test_oversized_chunked_body_is_413(fabric: FakeFabric, sockdir: str) -> None:
    h = Harness(fabric, os.path.join(sockdir, "c.sock"), max_body=100).start()
    try:
        chunk = b"x" * 80
        req = (
            b"PUT /v1/namespaces/red HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + (b"50\r\n" + chunk + b"\r\n") * 2
            + b"0\r\n\r\n"
        )
        status, _, body = raw_exchange(h.path, req)
        assert status == 413
    finally:
        h.stop()


def test_keep_alive_two_requests_one_connection(harness: Harness) -> None:
    with raw_connect(harness.path) as s:
        f = s.makefile("rb")
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = read_response(f)
        s.sendall(b"GET /v1/namespaces HTTP/1.1\r\nHost: x\r\n\r\n")
        second = read_response(f)
    assert first[0] == second[0] == 200
    assert json.loads(first[2])["worker"] == "w-test"
    assert json.loads(second[2])[0]["name"] == "blue"


def test_pipelined_requests(harness: Harness) -> None:
    with raw_connect(harness.path) as s:
        f = s.makefile("rb")
        s.sendall(
            b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /v1/peers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert read_response(f)[0] == 200
        status, headers, body = read_response(f)
        assert (status, body) == (200, b"[]\n")
        assert f.read() == b""  # server honoured Connection: close


def test_connection_limit_gives_503(fabric: FakeFabric, sockdir: str) -> None:
    h = Harness(fabric, os.path.join(sockdir, "l.sock"), max_connections=1).start()
    try:
        with raw_connect(h.path) as held:
            held.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(held.makefile("rb"))[0] == 200  # now counted and idle
            status, _, body = raw_exchange(h.path, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == 503
            assert body["error"]["code"] == "busy"
        wait_for(lambda: h.call(lambda: h.server.connections) == 0)
        with ControlClient(h.path) as c:
            assert c.get("/v1/health")["ok"] is True
    finally:
        h.stop()


# ---- streams ---------------------------------------------------------------------------


def test_events_stream_lines_until_end(client: ControlClient, fabric: FakeFabric) -> None:
    fabric.event_items = [
        FakeEvent("pod_attached", namespace="blue", pod="web"),
        FakeEvent("peer_up", peer="w2"),
    ]
    events = list(client.events())
    assert [e["kind"] for e in events] == ["pod_attached", "peer_up"]
    assert events[0]["namespace"] == "blue"
    wait_for(lambda: fabric.subs[0].closed)


def test_events_live_and_closed_on_disconnect(
    client: ControlClient, fabric: FakeFabric, harness: Harness
) -> None:
    fabric.events_end = False
    lines = client.lines("/v1/events")
    wait_for(lambda: len(fabric.subs) == 1)
    sub = fabric.subs[0]
    harness.call(lambda: sub.queue.put_nowait(FakeEvent("ready_changed", namespace="blue")))
    assert json.loads(next(lines))["kind"] == "ready_changed"
    harness.call(lambda: sub.queue.put_nowait(FakeEvent("second")))
    assert json.loads(next(lines))["kind"] == "second"
    lines.close()  # type: ignore[attr-defined]
    wait_for(lambda: sub.closed)
    wait_for(lambda: harness.call(lambda: harness.server.connections) == 0)


def test_capture_stream_is_pcap(client: ControlClient, fabric: FakeFabric) -> None:
    fabric.frames = [(1.5, b"\x01" * 60), (2.25, b"\x02" * 70), (3.0, b"\x03" * 80)]
    data = b"".join(client.stream("/v1/namespaces/blue/pods/web/capture?count=2"))
    assert read_pcap(data) == [(1.5, b"\x01" * 60), (2.25, b"\x02" * 70)]
    assert fabric.capture_args == [("blue", "web", 2)]
    wait_for(lambda: fabric.subs[0].closed)
    data = b"".join(client.capture("blue", "web"))
    assert len(read_pcap(data)) == 3


def test_capture_errors(client: ControlClient) -> None:
    with pytest.raises(NotFound):
        client.stream("/v1/namespaces/blue/pods/ghost/capture")
    with pytest.raises(FabricError) as e:
        client.stream("/v1/namespaces/blue/pods/web/capture?count=zero")
    assert e.value.status == 400


def test_close_ends_open_streams(fabric: FakeFabric, sockdir: str) -> None:
    fabric.events_end = False
    h = Harness(fabric, os.path.join(sockdir, "s.sock")).start()
    lines = ControlClient(h.path).lines("/v1/events")
    wait_for(lambda: len(fabric.subs) == 1)
    h.stop()
    assert fabric.subs[0].closed
    with pytest.raises(FabricError, match="lost the stream"):
        next(lines)


# ---- unreachable -----------------------------------------------------------------------


def test_unreachable_socket_message(sockdir: str) -> None:
    path = os.path.join(sockdir, "missing.sock")
    with pytest.raises(FabricError) as e:
        ControlClient(path).get("/v1/health")
    assert e.value.message == (
        f"cannot reach fabricd at {path}: No such file or directory "
        "(is the daemon running? set --control or $FABRICD_CONTROL)"
    )


def test_refused_socket_message(sockdir: str) -> None:
    path = os.path.join(sockdir, "dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    with pytest.raises(FabricError, match="Connection refused"):
        ControlClient(path).stream("/v1/events")


# ---- CLI -------------------------------------------------------------------------------


def test_cli_get_tables(harness: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["get", "pods", "--control", harness.path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "NAMESPACE",
        "NAME",
        "IP",
        "MAC",
        "KIND",
        "ATTACHED",
        "READY",
        "RX-PKTS",
        "RX-BYTES",
        "TX-PKTS",
        "TX-BYTES",
        "DROPS",
    ]
    assert lines[1].split()[:3] == ["blue", "web", "10.1.0.2"]
    assert lines[0].index("IP") == lines[1].index("10.1.0.2")  # aligned
    assert cli.main(["--control", harness.path, "get", "po", "-n", "blue"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["blue", "web", "10.1.0.2"]
    assert cli.main(["get", "namespaces", "--control", harness.path]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "ID", "CIDR", "GATEWAY", "MTU", "PODS", "ATTACHED",
                             "EGRESS", "FLOWS", "HELD", "DROPS"]
    assert out[1].split()[:6] == ["blue", "1", "10.1.0.0/24", "10.1.0.1", "1500", "2"]
    assert cli.main(["get", "svc", "--control", harness.path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "IP", "PORTS", "STATE", "NEED", "HELD",
                                "FLOWS", "BACKENDS", "WAKES", "STREAMS", "STREAM-WAKE(ms)"]
    assert lines[1].split() == ["blue", "api", "10.1.0.100", "80->8080/tcp", "dormant",
                                "false", "3/180B", "0", "api-1(not-ready)", "1", "-", "-"]
    assert cli.main(["get", "peers", "--control", harness.path]) == 0
    assert "No peers found" in capsys.readouterr().err


def test_cli_get_json_and_env(
    harness: Harness, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FABRICD_CONTROL", harness.path)
    assert cli.main(["get", "pods", "-o", "json"]) == 0
    assert [p["name"] for p in json.loads(capsys.readouterr().out)] == ["web", "db"]
    assert cli.main(["get", "ns", "-n", "blue", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == {"ok": True}
    assert cli.main(["get", "ns", "-n", "nope"]) == 1
    assert capsys.readouterr().err == "fabricd: namespace 'nope' not found\n"


def test_cli_ready(
    harness: Harness, fabric: FakeFabric, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["ready", "blue/web", "--control", harness.path]) == 0
    assert cli.main(["ready", "blue/db", "--unready", "--control", harness.path]) == 0
    assert fabric.ready_calls == [("blue", "web", True), ("blue", "db", False)]
    assert "marked unready" in capsys.readouterr().out
    assert cli.main(["ready", "justapod", "--control", harness.path]) == 2
    assert capsys.readouterr().err == "fabricd: expected NS/POD, got 'justapod'\n"


def test_cli_events(
    harness: Harness, fabric: FakeFabric, capsys: pytest.CaptureFixture[str]
) -> None:
    fabric.event_items = [FakeEvent("pod_attached", namespace="blue", pod="web", ip="10.1.0.2")]
    assert cli.main(["events", "-o", "json", "--control", harness.path]) == 0
    out = capsys.readouterr().out.splitlines()
    assert json.loads(out[0])["pod"] == "web"
    assert cli.main(["events", "--control", harness.path]) == 0
    line = capsys.readouterr().out.strip()
    assert " pod_attached " in line and " blue/web " in line and line.endswith("ip=10.1.0.2")


def test_cli_capture_to_file_and_stdout(
    harness: Harness,
    fabric: FakeFabric,
    sockdir: str,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    fabric.frames = [(10.0, b"\xaa" * 64), (11.0, b"\xbb" * 64)]
    out = os.path.join(sockdir, "cap.pcap")
    assert cli.main(["capture", "blue/web", "-w", out, "-c", "1", "--control", harness.path]) == 0
    assert read_pcap(Path(out).read_bytes()) == [(10.0, b"\xaa" * 64)]
    assert b"1 frames written" in capsysbinary.readouterr().err
    assert cli.main(["capture", "blue/web", "--control", harness.path]) == 0
    assert len(read_pcap(capsysbinary.readouterr().out)) == 2
    assert cli.main(["capture", "blue/web", "-c", "0", "--control", harness.path]) == 2


def test_cli_broken_pipe_is_quiet(harness: Harness, fabric: FakeFabric) -> None:
    import subprocess
    import sys

    fabric.event_items = [FakeEvent("tick", n=i) for i in range(20000)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fabric.cli.main", "events", "-o", "json", "--control",
         harness.path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert json.loads(proc.stdout.readline())["kind"] == "tick"
    proc.stdout.close()  # like `| head -1`
    assert proc.wait(15) == 0
    assert proc.stderr.read() == b""
    proc.stderr.close()


def test_cli_unreachable(sockdir: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = os.path.join(sockdir, "nope.sock")
    assert cli.main(["get", "pods", "--control", path]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fabricd: cannot reach fabricd at {path}: ")
    assert err.endswith("(is the daemon running? set --control or $FABRICD_CONTROL)\n")
    assert err.count("\n") == 1


def test_cli_usage_errors_and_misc(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["get", "bananas"]) == 2
    assert capsys.readouterr().err.startswith("fabricd: argument KIND: invalid choice")
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    capsys.readouterr()
    assert cli.main(["activator", "test", "x.wasm"]) == 2  # the capture is required
    assert "arguments are required: --pcap" in capsys.readouterr().err


def test_cli_keygen(capsys: pytest.CaptureFixture[str]) -> None:
    import base64

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    assert cli.main(["keygen"]) == 0
    lines = dict(line.split(": ") for line in capsys.readouterr().out.splitlines())
    priv = X25519PrivateKey.from_private_bytes(base64.b64decode(lines["private_key"]))
    assert priv.public_key().public_bytes_raw() == base64.b64decode(lines["public_key"])


def test_cli_run_and_demo_are_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    calls: list[Any] = []
    daemon = types.ModuleType("fabric.control.daemon")
    daemon.run = lambda path, fmt: calls.append(("run", path, fmt))  # type: ignore[attr-defined]
    demo = types.ModuleType("fabric.tools.demo")
    demo.main = lambda: calls.append(("demo",)) or 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fabric.control.daemon", daemon)
    monkeypatch.setitem(sys.modules, "fabric.tools.demo", demo)
    import fabric.control
    import fabric.tools

    monkeypatch.setattr(fabric.control, "daemon", daemon, raising=False)
    monkeypatch.setattr(fabric.tools, "demo", demo, raising=False)
    assert cli.main(["run", "-c", "/etc/fabricd.yaml"]) == 0
    assert cli.main(["run", "--log-format", "json"]) == 0
    assert cli.main(["demo"]) == 3
    assert calls == [("run", "/etc/fabricd.yaml", "text"), ("run", None, "json"), ("demo",)]


# ---- docs agree with the server --------------------------------------------------------


def test_openapi_documents_every_route(fabric: FakeFabric) -> None:
    doc = yaml.safe_load((Path(__file__).parents[2] / "docs" / "openapi.yaml").read_text())
    assert doc["openapi"].startswith("3.0")
    server = ControlServer(fabric, "/nonexistent/x.sock")  # type: ignore[arg-type]
    for template, methods in server.routes:
        assert template in doc["paths"], template
        documented = {m.upper() for m in doc["paths"][template] if m != "parameters"}
        assert documented == set(methods), template


def test_a_request_trickled_byte_by_byte_is_cut_off(
        fabric: FakeFabric, sockdir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slow-loris: every byte arrives before the idle timeout, but the request as a
    whole must be complete within REQUEST_TIMEOUT; others are served meanwhile."""
    import time

    from fabric.control import server

    monkeypatch.setattr(server, "REQUEST_TIMEOUT", 1.0)
    h = Harness(fabric, os.path.join(sockdir, "s.sock")).start()
    try:
        with raw_connect(h.path) as s:
            t0 = time.monotonic()
            closed = False
            for b in b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100:
                try:
                    s.sendall(bytes([b]))
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                s.settimeout(0.2)
                try:
                    if s.recv(1) == b"":
                        closed = True
                        break
                except TimeoutError:
                    pass
                if time.monotonic() - t0 > 30:  # a guard only: the bytes run out first
                    break
            # cut off before the last byte (about 1 s in), not after the whole request:
            # no wall-clock bound, which a loaded machine would break
            assert closed
            assert ControlClient(h.path).get("/v1/health")["ok"] is True
    finally:
        h.stop()


# ---- operator commands: drops, monitor, peers, status, describe, completion --------------

DROP = {"ts": 1700000000.5, "namespace": "blue", "pod": "web", "reason": "spoofed_source",
        "count": 3, "src": "10.9.9.9", "dst": "10.1.0.3", "proto": "tcp", "sport": 4000,
        "dport": 80, "flags": "S", "length": 60}


def test_cli_get_drops_and_monitor(
    harness: Harness, fabric: FakeFabric, capsys: pytest.CaptureFixture[str]
) -> None:
    fabric.drop_items = [DROP]
    assert cli.main(["get", "drops", "-n", "blue", "--control", harness.path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["TIME", "NAMESPACE", "POD", "REASON"]
    assert "spoofed_source" in lines[1] and "10.9.9.9:4000" in lines[1]
    assert cli.main(["get", "drops", "-o", "yaml", "--control", harness.path]) == 0
    assert yaml.safe_load(capsys.readouterr().out)[0]["reason"] == "spoofed_source"
    assert cli.main(["monitor", "-n", "blue", "--pod", "web", "--reason", "spoofed_source",
                     "--control", harness.path]) == 0
    line = capsys.readouterr().out.strip()
    assert "blue/web spoofed_source tcp 10.9.9.9:4000 -> 10.1.0.3:80 [S] len 60 x3" in line
    assert fabric.monitor_args == [("blue", "web", "spoofed_source")]
    assert cli.main(["monitor", "--pod", "web", "--control", harness.path]) == 2
    assert "--pod needs -n" in capsys.readouterr().err


def test_cli_peer_commands(
    harness: Harness, fabric: FakeFabric, capsys: pytest.CaptureFixture[str]
) -> None:
    c = ["--control", harness.path]
    assert cli.main(["peer", "add", "w2", "--public-key", "K2", "--endpoint",
                     "192.0.2.2:51820", *c]) == 0
    assert fabric.peer_calls[-1] == ("set", {"id": "w2", "public_key": "K2",
                                             "endpoint": "192.0.2.2:51820"})
    assert cli.main(["peer", "add", "w2", "--public-key", "K2", *c]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["peer", "set", "w2", "--endpoint", "192.0.2.7:51820", *c]) == 0
    assert fabric.peer_calls[-1][1] == {"id": "w2", "public_key": "K2",
                                        "endpoint": "192.0.2.7:51820"}
    assert cli.main(["peer", "set", "w3", "--endpoint", "192.0.2.7:1", *c]) == 1
    assert cli.main(["peer", "rekey", "w2", *c]) == 0
    assert cli.main(["peer", "remove", "w2", *c]) == 0
    assert fabric.peer_calls[-2:] == [("rekey", "w2"), ("remove", "w2")]
    assert cli.main(["peer", "remove", "w2", *c]) == 1
    assert cli.main(["peer", *c]) == 2


def test_cli_peers_like_wg(
    harness: Harness, fabric: FakeFabric, capsys: pytest.CaptureFixture[str]
) -> None:
    fabric.peer_rows = [{"id": "w2", "public_key": "K2", "endpoint": "192.0.2.2:51820",
                         "keepalive": 25, "last_handshake_age": 65.2, "rx_bytes": 1536,
                         "tx_bytes": 3 * 1024 * 1024, "drops_total": 0}]
    assert cli.main(["get", "peers", "-o", "wg", "--control", harness.path]) == 0
    out = capsys.readouterr().out
    assert "peer: w2" in out and "endpoint: 192.0.2.2:51820" in out
    assert "latest handshake: 1 minute, 5 seconds ago" in out
    assert "transfer: 1.50 KiB received, 3.00 MiB sent" in out
    assert "persistent keepalive: every 25 seconds" in out
    assert cli.main(["get", "peers", "--control", harness.path]) == 0
    assert "1 minute, 5 seconds ago" in capsys.readouterr().out


def test_cli_status_and_describe(
    harness: Harness, fabric: FakeFabric, capsys: pytest.CaptureFixture[str]
) -> None:
    fabric.peer_rows = [{"id": "w2", "last_handshake_age": None}]
    assert cli.main(["status", "--control", harness.path]) == 0
    out = capsys.readouterr().out
    assert "healthy" in out and "services: 1 (dormant 1)" in out
    assert "peers: 1 (0 up, 1 down): down w2" in out
    assert cli.main(["describe", "pod", "blue/web", "--control", harness.path]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Pod: web") and "pod_attached" in out
    assert cli.main(["describe", "svc", "api", "-n", "blue", "--control", harness.path]) == 0
    assert capsys.readouterr().out.startswith("Service: api")
    assert cli.main(["describe", "service", "nope", "--control", harness.path]) == 1
    assert cli.main(["describe", "pod", "web", "--control", harness.path]) == 2


def test_cli_completion_scripts(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["completion", "bash"]) == 0
    script = tmp_path / "c.bash"
    script.write_text(capsys.readouterr().out)
    probe = (f"source {script}; COMP_WORDS=(fabricd peer add w2 --); COMP_CWORD=4; _fabricd;"
             " echo \"${COMPREPLY[*]}\"; COMP_WORDS=(fabricd get pods -o ''); COMP_CWORD=4;"
             " _fabricd; echo \"${COMPREPLY[*]}\"")
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert "--endpoint" in out[0].split() and "--public-key" in out[0].split()
    assert out[1].split() == ["table", "json", "yaml", "wg"]
    assert cli.main(["completion", "zsh"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("#compdef fabricd") and "'peer add')" in text
    if shutil.which("zsh") is None:  # installed by scripts/install-debs when root
        pytest.skip("zsh is not installed")
    (tmp_path / "_fabricd").write_text(text)
    subprocess.run(["zsh", "-n", str(tmp_path / "_fabricd")], check=True)
    loaded = subprocess.run(["zsh", "-f", "-c", f"autoload -U compinit; compinit -u; "
                             f"source {tmp_path / '_fabricd'}; whence -w _fabricd"],
                            capture_output=True, text=True)
    assert "_fabricd: function" in loaded.stdout, loaded.stderr
