"""The HTTP/2 activator end to end with the daemon: real h2 clients (h2load, nghttp,
grpcio, python h2 on a socket) in one pod, real servers (nghttpd, grpcio) in another,
behind a dormant service whose port is terminated in the local stack."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from typing import IO

import pytest

from fabric.tools.sandbox import Daemon, Sandbox

VIP = "10.42.0.100"

GRPC_SERVER = """
import os, sys, time, grpc
from concurrent import futures
def unary(req, ctx):
    return b"echo:" + req
def stream(req, ctx):
    for i in range(int(req)):
        yield b"item%d" % i
def watch(req, ctx):  # one item, then open until the file argv[2] exists
    yield b"first"
    while not os.path.exists(sys.argv[2]) and ctx.is_active():
        time.sleep(0.05)
    yield b"last"
h = grpc.method_handlers_generic_handler("fab.Echo", {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "Stream": grpc.unary_stream_rpc_method_handler(stream),
    "Watch": grpc.unary_stream_rpc_method_handler(watch)})
s = grpc.server(futures.ThreadPoolExecutor(80))
s.add_generic_rpc_handlers((h,))
s.add_insecure_port("0.0.0.0:" + sys.argv[1])
s.start()
s.wait_for_termination()
"""

GRPC_CLIENT = """
import sys, grpc
ch = grpc.insecure_channel(sys.argv[1], options=[("grpc.enable_http_proxy", 0)])
timeout = float(sys.argv[3])
try:
    if sys.argv[2] == "unary":
        print(ch.unary_unary("/fab.Echo/Unary")(b"hi", timeout=timeout).decode())
    else:
        got = ch.unary_stream("/fab.Echo/Stream")(b"5", timeout=timeout)
        print(",".join(x.decode() for x in got))
except grpc.RpcError as e:
    print("status", e.code().name, e.details())
"""

PING_CLIENT = """
import socket, sys, h2.connection, h2.config, h2.events
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
s.sendall(c.data_to_send())
acks = 0
for i in range(3):
    c.ping(b"keep%04d" % i)
    s.sendall(c.data_to_send())
    while True:
        evs = c.receive_data(s.recv(65536))
        s.sendall(c.data_to_send())
        if any(isinstance(e, h2.events.PingAckReceived) for e in evs):
            acks += 1
            break
print("acks", acks)
"""


ECHO_SERVER = """
import socket, sys, threading, h2.connection, h2.config, h2.events
def serve(sock):
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    c.initiate_connection()
    sock.sendall(c.data_to_send())
    reqs = {}
    while (data := sock.recv(65536)):
        for e in c.receive_data(data):
            if isinstance(e, h2.events.RequestReceived):
                reqs[e.stream_id] = [dict(e.headers), 0]
            elif isinstance(e, h2.events.DataReceived) and e.stream_id in reqs:
                reqs[e.stream_id][1] += len(e.data)
                c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, h2.events.StreamEnded) and e.stream_id in reqs:
                # answered once the whole request is in, as a server that reads the body
                h, n = reqs.pop(e.stream_id)
                body = h.get(b"x-custom", b"-") + b" " + h.get(b":path", b"-")
                if n:
                    body += b" %d" % n
                c.send_headers(e.stream_id, [(":status", "200"), ("x-seen", "yes")])
                c.send_data(e.stream_id, body, end_stream=True)
        sock.sendall(c.data_to_send())
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""

TABLE_CLIENT = """
import socket, sys, time, h2.connection, h2.config, h2.events
s = socket.create_connection((sys.argv[1], 80), timeout=30)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
s.sendall(c.data_to_send())
big = "v" * 200
def get(sid, path):
    c.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "svc"),
                         (":path", path), ("x-custom", big)], end_stream=True)
    s.sendall(c.data_to_send())
    status, body = None, b""
    while True:
        for e in c.receive_data(s.recv(65536)):
            if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid:
                status = dict(e.headers)[b":status"].decode()
            if isinstance(e, h2.events.DataReceived) and e.stream_id == sid:
                body += e.data
                c.acknowledge_received_data(e.flow_controlled_length, sid)
            if isinstance(e, h2.events.StreamEnded) and e.stream_id == sid:
                s.sendall(c.data_to_send())
                return status, body
        s.sendall(c.data_to_send())
print("first", *get(1, "/first"))  # answered 503 by the activator (no backend)
open(sys.argv[2], "w").close()    # the test starts the backend now
time.sleep(float(sys.argv[3]))
print("second", *get(3, "/second"))  # x-custom is a dynamic-table index now
print("third", *get(5, "/third"))
"""


FREEZE_CLIENT = """
import os, socket, sys, time, h2.connection, h2.config, h2.events
s = socket.create_connection((sys.argv[1], 80), timeout=60)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
s.sendall(c.data_to_send())
backlog = []
def wait(pred):
    while True:
        while backlog:
            e = backlog.pop(0)
            if pred(e):
                return e
        evs = c.receive_data(s.recv(65536))
        for e in evs:
            if isinstance(e, h2.events.DataReceived):
                c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        s.sendall(c.data_to_send())
        backlog.extend(evs)
def get(sid):
    c.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "svc"),
                         (":path", "/")], end_stream=True)
    s.sendall(c.data_to_send())
    e = wait(lambda e: isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid)
    wait(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == sid)
    return dict(e.headers)[b":status"].decode()
def flag(name):
    open(os.path.join(sys.argv[2], name), "w").close()
def until(name):
    while not os.path.exists(os.path.join(sys.argv[2], name)):
        time.sleep(0.05)
print("first", get(1), flush=True)
flag("asked")
until("frozen")
for i in range(3):
    c.ping(b"idle%04d" % i)
    s.sendall(c.data_to_send())
    wait(lambda e: isinstance(e, h2.events.PingAckReceived))
print("pings answered", flush=True)
flag("pinged")
until("go")
print("second", get(3), flush=True)
"""


HALFCLOSE_CLIENT = """
import socket, sys, h2.connection, h2.config, h2.events
s = socket.create_connection((sys.argv[1], 80), timeout=30)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
for sid in range(1, 11, 2):
    c.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "svc"),
                         (":path", "/")], end_stream=True)
s.sendall(c.data_to_send())
s.shutdown(socket.SHUT_WR)  # FIN after the last request, like h2load at its end
ok = body = 0
while (data := s.recv(65536)):
    for e in c.receive_data(data):
        if isinstance(e, h2.events.ResponseReceived) and dict(e.headers)[b":status"] == b"200":
            ok += 1
        if isinstance(e, h2.events.DataReceived):
            body += len(e.data)
print("responses", ok, "bytes", body)
"""

NEVER_THAWED_CLIENT = """
import os, socket, sys, time, h2.connection, h2.config, h2.events
s = socket.create_connection((sys.argv[1], 80), timeout=60)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
s.sendall(c.data_to_send())
def get(sid):
    c.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "svc"),
                         (":path", "/")], end_stream=True)
    s.sendall(c.data_to_send())
    status = None
    while True:
        for e in c.receive_data(s.recv(65536)):
            if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid:
                status = dict(e.headers)[b":status"].decode()
            if isinstance(e, h2.events.StreamEnded) and e.stream_id == sid:
                return status
        s.sendall(c.data_to_send())
print("first", get(1), flush=True)
open(os.path.join(sys.argv[2], "asked"), "w").close()
while not os.path.exists(os.path.join(sys.argv[2], "frozen")):
    time.sleep(0.05)
print("second", get(3), flush=True)
"""

def setup(sb: Sandbox, services: list[dict]) -> tuple[Daemon, str, str]:
    worker = sb.netns("worker")
    client, web = sb.netns("client"), sb.netns("web")
    ns = {"name": "h2", "id": 9, "cidr": "10.42.0.0/24",
          "pods": [{"name": "client", "ip": "10.42.0.2", "netns": client},
                   {"name": "web-1", "ip": "10.42.0.3", "netns": web}],
          "services": services}
    d = Daemon(sb, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    return d, client, web


def script(sb: Sandbox, name: str, text: str) -> str:
    path = os.path.join(sb.tmp, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def nghttpd_cmd(sb: Sandbox, web_ns: str, delay: float, port: int = 8080) -> str:
    root = os.path.join(sb.tmp, "docroot")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "index.html"), "w") as f:
        f.write("hello over h2\n")
    return (f"sh -c '(sleep {delay}; exec ip netns exec {web_ns} nghttpd --no-tls -d {root} "
            f"{port}) >/dev/null 2>&1 &'")


def service(name: str, **kw: object) -> dict:
    return {"name": name, "ip": VIP, "backends": ["web-1"],
            "ports": [{"port": 80, "target_port": kw.pop("target_port", 8080),
                       "activator": "http2"}], **kw}


def h2load(sb: Sandbox, ns: str, url: str, n: int, clients: int = 10,
           streams: int = 50) -> tuple[dict[str, int], str]:
    r = sb.run(ns, "h2load", "-c", str(clients), "-m", str(streams), "-n", str(n), url,
               check=False, timeout=180)
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", r.stdout)
    assert m, (r.stdout, r.stderr)
    keys = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
    return dict(zip(keys, map(int, m.groups()), strict=True)), r.stdout


def test_h2load_through_a_dormant_service(sandbox: Sandbox) -> None:
    web_ns = sandbox.name("web")
    d, client, _ = setup(sandbox, [service(
        "web", on_activate=nghttpd_cmd(sandbox, web_ns, 1.0))])
    assert d.get("/v1/services")[0]["state"] == "dormant"
    res, out = h2load(sandbox, client, f"http://{VIP}/", 5000)
    assert res["succeeded"] == 5000 and res["failed"] == res["errored"] == 0, (
        out, d.log()[-3000:])
    st = d.get("/v1/services")[0]["streams"]["80"]
    c = st["counters"]
    # one upstream connection per client connection, every request relayed by the guest
    assert c["guest_failures"] == 0 and c["upstream_connects"] == 10, st
    assert st["guest_counters"]["requests"] == 5000, st
    r = sandbox.run(client, "nghttp", "-v", f"http://{VIP}/", check=False, timeout=30)
    assert "hello over h2" in r.stdout, (r.stdout, r.stderr)


def test_500_client_connections_through_a_dormant_service(sandbox: Sandbox) -> None:
    """h2load -c 500: five hundred client connections at once on one port (the activator
    serves 1,024; at most 18 busy at a time, the others paused until a block frees), two
    requests each, through the wake: every request succeeds, none is refused."""
    web_ns = sandbox.name("web")
    d, client, _ = setup(sandbox, [service(
        "web", on_activate=nghttpd_cmd(sandbox, web_ns, 1.0))])
    res, out = h2load(sandbox, client, f"http://{VIP}/", 1000, clients=500, streams=1)
    assert res["succeeded"] == 1000 and res["failed"] == res["errored"] == 0, (
        out, d.log()[-3000:])
    st = d.get("/v1/services")[0]["streams"]["80"]
    assert st["guest_counters"]["requests"] == 1000, st
    assert "connections_refused" not in st["guest_counters"], st
    assert st["counters"]["guest_failures"] == 0, st


def test_ping_while_the_backend_sleeps_gets_its_ack_and_no_wake(sandbox: Sandbox) -> None:
    marker = os.path.join(sandbox.tmp, "woken")
    d, client, _ = setup(sandbox, [service("web", on_activate=f"touch {marker}")])
    ping = script(sandbox, "ping.py", PING_CLIENT)
    r = sandbox.run(client, sys.executable, ping, VIP, "80", check=False, timeout=40)
    assert r.stdout.strip() == "acks 3", (r.stdout, r.stderr, d.log()[-3000:])
    time.sleep(0.5)  # give a wrong wake time to show (not a timed assertion of success)
    svc = d.get("/v1/services")[0]
    assert not os.path.exists(marker) and svc["state"] == "dormant", svc
    st = svc["streams"]["80"]
    assert st["guest_counters"]["pings_answered"] == 3, st
    assert st["counters"].get("upstream_connects", 0) == 0, st


def test_grpc_unary_and_server_streaming_through_a_dormant_service(sandbox: Sandbox) -> None:
    web_ns = sandbox.name("web")
    server = script(sandbox, "grpc_server.py", GRPC_SERVER)
    start = (f"sh -c '(sleep 1; exec ip netns exec {web_ns} {sys.executable} {server} 50051)"
             " >/dev/null 2>&1 &'")
    d, client, _ = setup(sandbox, [service("rpc", target_port=50051, on_activate=start)])
    cli = script(sandbox, "grpc_client.py", GRPC_CLIENT)
    r = sandbox.run(client, sys.executable, cli, f"{VIP}:80", "unary", "30", check=False,
                    timeout=60)
    assert r.stdout.strip() == "echo:hi", (r.stdout, r.stderr, d.log()[-3000:])
    r = sandbox.run(client, sys.executable, cli, f"{VIP}:80", "stream", "30", check=False,
                    timeout=60)
    assert r.stdout.strip() == "item0,item1,item2,item3,item4", (r.stdout, r.stderr)


WATCH_CLIENT = """
import sys, threading, grpc
target, n, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
# One connection per channel: a local subchannel pool, so the channels share none.
opts = [("grpc.enable_http_proxy", 0), ("grpc.use_local_subchannel_pool", 1)]
firsts, results = threading.Semaphore(0), []
def watcher():
    ch = grpc.insecure_channel(target, options=opts)
    got = []
    try:
        for item in ch.unary_stream("/fab.Echo/Watch")(b"", timeout=120):
            got.append(item.decode())
            if len(got) == 1:
                firsts.release()
    except grpc.RpcError as e:
        got.append("status " + e.code().name)
        firsts.release()
    results.append(",".join(got))
threads = [threading.Thread(target=watcher) for _ in range(n)]
for t in threads:
    t.start()
for _ in range(n):
    assert firsts.acquire(timeout=60), "a watch got no first item"
ch = grpc.insecure_channel(target, options=opts)
try:
    print("unary", ch.unary_unary("/fab.Echo/Unary")(b"hi", timeout=10).decode(), flush=True)
except grpc.RpcError as e:
    print("unary status", e.code().name, flush=True)
open(stop, "w").close()
for t in threads:
    t.join(60)
print("watches", sorted(set(results)), len(results), flush=True)
"""


def test_grpc_streams_held_open_on_many_connections_leave_room_for_new_calls(
        sandbox: Sandbox) -> None:
    """Long-lived server-streaming calls (watches) keep their connections busy for their
    whole life; with `activator_memory_mib` a port has room for more of them than the
    default 18 busy connections, and a new client's call is served at once."""
    web_ns = sandbox.name("web")
    stop = os.path.join(sandbox.tmp, "stop-watches")
    server = script(sandbox, "grpc_server.py", GRPC_SERVER)
    start = (f"sh -c '(exec ip netns exec {web_ns} {sys.executable} {server} 50051 {stop})"
             " >/dev/null 2>&1 &'")
    svc = service("rpc", target_port=50051, on_activate=start)
    svc["ports"][0]["activator_memory_mib"] = 32
    d, client, _ = setup(sandbox, [svc])
    cli = script(sandbox, "watch_client.py", WATCH_CLIENT)
    r = sandbox.run(client, sys.executable, cli, f"{VIP}:80", "30", stop, check=False,
                    timeout=180)
    assert "unary echo:hi" in r.stdout, (r.stdout, r.stderr, d.log()[-3000:])
    assert "watches ['first,last'] 30" in r.stdout, (r.stdout, r.stderr)
    st = d.get("/v1/services")[0]["streams"]["80"]
    assert "work_block_waits" not in st["guest_counters"], st
    assert st["counters"]["guest_failures"] == 0, st


def test_grpc_call_times_out_unavailable_when_the_backend_never_comes(
        sandbox: Sandbox) -> None:
    d, client, _ = setup(sandbox, [service("rpc", target_port=50051,
                                           hold={"timeout": "2s"})])
    cli = script(sandbox, "grpc_client.py", GRPC_CLIENT)
    r = sandbox.run(client, sys.executable, cli, f"{VIP}:80", "unary", "20", check=False,
                    timeout=60)
    assert r.stdout.startswith("status UNAVAILABLE"), (r.stdout, r.stderr, d.log()[-3000:])
    assert "backend unavailable" in r.stdout



def test_dynamic_table_across_a_locally_answered_stream(sandbox: Sandbox) -> None:
    """The client's header blocks index entries inserted by a block whose stream the
    activator answered itself (503: no backend within the hold); the backend still
    decodes them."""
    d, client, web = setup(sandbox, [service("web", hold={"timeout": "1s"})])
    server = script(sandbox, "echo_server.py", ECHO_SERVER)
    cli = script(sandbox, "table_client.py", TABLE_CLIENT)
    go = os.path.join(sandbox.tmp, "go")
    p = sandbox.popen(client, sys.executable, cli, VIP, go, "0", stdout=subprocess.PIPE,
                      text=True)
    deadline = time.monotonic() + 20
    while not os.path.exists(go) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    sandbox.popen(web, sys.executable, server, "8080")
    out, _ = p.communicate(timeout=60)
    lines = out.splitlines()
    assert lines[0] == "first 503 b''", (out, d.log()[-3000:])
    assert lines[1] == f"second 200 b'{'v' * 200} /second'", (out, d.log()[-3000:])
    assert lines[2] == f"third 200 b'{'v' * 200} /third'", out


def _nghttpd_pid(top: int) -> int:
    """The nghttpd process under the sandbox's `ip netns exec` (it may exec in place)."""
    with open(f"/proc/{top}/comm") as f:
        if f.read().strip() == "nghttpd":
            return top
    out = subprocess.run(["pgrep", "-P", str(top), "-x", "nghttpd"], capture_output=True,
                         text=True, check=True).stdout
    return int(out.split()[0])


def _tail(f: IO[str]) -> str:
    """What the client wrote to its stderr file so far (for assertion messages)."""
    f.seek(0)
    return f.read()[-2000:]


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split()[1] for line in f if line.startswith("State:"))


def test_backend_frozen_under_an_open_connection_and_thawed_by_a_request(
        sandbox: Sandbox) -> None:
    """on_idle stops nghttpd (SIGSTOP) under the client's open connection; PINGs are
    answered meanwhile and wake nothing; the next request wakes it (SIGCONT)."""
    root = os.path.join(sandbox.tmp, "docroot")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "index.html"), "w") as f:
        f.write("hi\n")
    pidfile = os.path.join(sandbox.tmp, "nghttpd.pid")
    d, client, web = setup(sandbox, [service(
        "web", idle_timeout="2s", on_idle=f"sh -c 'kill -STOP $(cat {pidfile})'",
        on_activate=f"sh -c 'kill -CONT $(cat {pidfile})'")])
    server = sandbox.popen(web, "nghttpd", "--no-tls", "-d", root, "8080",
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sandbox.wait_port(web, 8080)
    pid = _nghttpd_pid(server.pid)
    with open(pidfile, "w") as f:
        f.write(str(pid))
    flags = os.path.join(sandbox.tmp, "flags")
    os.makedirs(flags)
    cli = script(sandbox, "freeze_client.py", FREEZE_CLIENT)
    err = open(os.path.join(sandbox.tmp, "client.err"), "w+")
    p = sandbox.popen(client, sys.executable, cli, VIP, flags, stdout=subprocess.PIPE,
                      stderr=err, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(flags, "asked")) and p.poll() is None:
            assert time.monotonic() < deadline, (_tail(err), d.log()[-3000:])
            time.sleep(0.05)
        while _state(pid) != "T":  # the service went idle under the open connection
            assert time.monotonic() < deadline, (d.get("/v1/services"), d.log()[-3000:])
            time.sleep(0.1)
        open(os.path.join(flags, "frozen"), "w").close()
        while not os.path.exists(os.path.join(flags, "pinged")) and p.poll() is None:
            assert time.monotonic() < deadline, d.log()[-3000:]
            time.sleep(0.05)
        assert _state(pid) == "T", "a PING woke the backend"
        open(os.path.join(flags, "go"), "w").close()
        out, _ = p.communicate(timeout=30)
    finally:
        os.kill(pid, signal.SIGCONT)  # the sandbox's cleanup stops it
    assert out.splitlines() == ["first 200", "pings answered", "second 200"], (
        out, _tail(err), d.log()[-3000:])
    st = d.get("/v1/services")[0]["streams"]["80"]
    assert st["guest_counters"]["pings_answered"] == 3, st
    assert st["counters"]["upstream_connects"] == 1, st


REOPEN_CLIENT = """
import os, socket, sys, time, h2.connection, h2.config, h2.events
s = socket.create_connection((sys.argv[1], 80), timeout=60)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
s.sendall(c.data_to_send())
backlog, goaways = [], 0
def wait(pred):
    global goaways
    while True:
        while backlog:
            e = backlog.pop(0)
            if pred(e):
                return e
        evs = c.receive_data(s.recv(65536))
        goaways += sum(isinstance(e, h2.events.ConnectionTerminated) for e in evs)
        s.sendall(c.data_to_send())
        backlog.extend(evs)
def get(sid):
    c.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "svc"),
                         (":path", "/"), ("x-same", "v" * 100)], end_stream=True)
    s.sendall(c.data_to_send())
    e = wait(lambda e: isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid)
    wait(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == sid)
    return dict(e.headers)[b":status"].decode()
print("first", get(1), flush=True)
open(os.path.join(sys.argv[2], "asked"), "w").close()
while not os.path.exists(os.path.join(sys.argv[2], "stopped")):
    time.sleep(0.05)
s.settimeout(0.5)  # whatever the backend's stop made the activator send: read it now
try:
    backlog.extend(c.receive_data(s.recv(65536)))
except socket.timeout:
    pass
goaways += sum(isinstance(e, h2.events.ConnectionTerminated) for e in backlog)
s.settimeout(60)
print("goaways", goaways, flush=True)
print("second", get(3), flush=True)
"""


def test_backend_stopped_under_an_open_connection_with_reopen_upstream(
        sandbox: Sandbox) -> None:
    """`reopen_upstream`: the first request starts nghttpd (on_activate), on_idle kills it
    (a stop, not a freeze) under the client's open connection; the client is sent no
    GOAWAY, and its next request on the same connection starts a new server and is
    answered by it."""
    root = os.path.join(sandbox.tmp, "docroot")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "index.html"), "w") as f:
        f.write("hi\n")
    pidfile = os.path.join(sandbox.tmp, "nghttpd.pid")
    starter = os.path.join(sandbox.tmp, "start.sh")  # written once the namespace exists
    svc = service("web", idle_timeout="2s", on_idle=f"sh -c 'kill $(cat {pidfile})'",
                  on_activate=f"sh {starter}")
    svc["ports"][0]["activator_config"] = {"reopen_upstream": True}
    d, client, web_ns = setup(sandbox, [svc])
    with open(starter, "w") as f:
        f.write(f"ip netns exec {web_ns} nghttpd --no-tls -d {root} 8080 >/dev/null 2>&1 &\n"
                f"echo $! > {pidfile}\n")
    flags = os.path.join(sandbox.tmp, "flags")
    os.makedirs(flags)
    cli = script(sandbox, "reopen_client.py", REOPEN_CLIENT)
    err = open(os.path.join(sandbox.tmp, "client.err"), "w+")
    p = sandbox.popen(client, sys.executable, cli, VIP, flags, stdout=subprocess.PIPE,
                      stderr=err, text=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(flags, "asked")) and p.poll() is None:
        assert time.monotonic() < deadline, (_tail(err), d.log()[-3000:])
        time.sleep(0.05)
    pid = int(_read(pidfile))  # the first request started it (on_activate)
    while os.path.exists(f"/proc/{pid}"):  # on_idle stopped it under the open connection
        assert time.monotonic() < deadline, (d.get("/v1/services"), d.log()[-3000:])
        time.sleep(0.1)
    open(os.path.join(flags, "stopped"), "w").close()
    out, _ = p.communicate(timeout=40)
    assert out.splitlines() == ["first 200", "goaways 0", "second 200"], (
        out, _tail(err), d.log()[-3000:])
    st = d.get("/v1/services")[0]["streams"]["80"]
    assert st["guest_counters"].get("upstreams_reopened", 0) >= 1, repr(st)
    assert st["counters"]["upstream_connects"] == 2, st
    assert st["counters"]["bad_actions"] == 0, st  # the client's close, in the right order
    assert int(_read(pidfile)) != pid, "the second request was not served by a new server"


def test_client_half_close_still_gets_every_response(sandbox: Sandbox) -> None:
    """The client sends its requests and then its FIN (shutdown(SHUT_WR)) while the
    service is dormant: the held requests wake it and every response still arrives."""
    web_ns = sandbox.name("web")
    d, client, _ = setup(sandbox, [service(
        "web", on_activate=nghttpd_cmd(sandbox, web_ns, 1.0))])
    cli = script(sandbox, "halfclose_client.py", HALFCLOSE_CLIENT)
    r = sandbox.run(client, sys.executable, cli, VIP, check=False, timeout=60)
    assert r.stdout.strip() == "responses 5 bytes 70", (r.stdout, r.stderr, d.log()[-3000:])


def test_request_to_a_backend_frozen_for_good_gets_503_at_the_hold_timeout(
        sandbox: Sandbox) -> None:
    """nghttpd is stopped (SIGSTOP from on_idle) and never continued: a request the
    activator sends it on the open upstream connection is answered 503 when the hold
    runs out, not left waiting for ever."""
    root = os.path.join(sandbox.tmp, "docroot")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "index.html"), "w") as f:
        f.write("hi\n")
    pidfile = os.path.join(sandbox.tmp, "nghttpd.pid")
    d, client, web = setup(sandbox, [service(
        "web", idle_timeout="2s", hold={"timeout": "2s"},
        on_idle=f"sh -c 'kill -STOP $(cat {pidfile})'", on_activate="true")])
    server = sandbox.popen(web, "nghttpd", "--no-tls", "-d", root, "8080",
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sandbox.wait_port(web, 8080)
    pid = _nghttpd_pid(server.pid)
    with open(pidfile, "w") as f:
        f.write(str(pid))
    flags = os.path.join(sandbox.tmp, "flags")
    os.makedirs(flags)
    cli = script(sandbox, "never_thawed_client.py", NEVER_THAWED_CLIENT)
    err = open(os.path.join(sandbox.tmp, "client.err"), "w+")
    p = sandbox.popen(client, sys.executable, cli, VIP, flags, stdout=subprocess.PIPE,
                      stderr=err, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(flags, "asked")) and p.poll() is None:
            assert time.monotonic() < deadline, (_tail(err), d.log()[-3000:])
            time.sleep(0.05)
        while _state(pid) != "T":
            assert time.monotonic() < deadline, (d.get("/v1/services"), d.log()[-3000:])
            time.sleep(0.1)
        open(os.path.join(flags, "frozen"), "w").close()
        out, _ = p.communicate(timeout=30)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert out.splitlines() == ["first 200", "second 503"], (out, _tail(err), d.log()[-3000:])
    st = d.get("/v1/services")[0]["streams"]["80"]
    assert st["guest_counters"]["upstream_timeouts"] == 1, st


MALFORMED_CLIENT = """
import socket, struct, sys, hpack
def fr(t, fl, sid, p=b""):
    return struct.pack(">I", len(p))[1:] + bytes([t, fl]) + struct.pack(">I", sid) + p
s = socket.create_connection((sys.argv[1], 80), timeout=20)
enc = hpack.Encoder()
base = [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "svc")]
bad = enc.encode(base + [("connection", "close")])
injected = enc.encode(base + [("x-a", "1\\r\\nx-injected: 1")])
s.sendall(b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n" + fr(4, 0, 0) + fr(1, 5, 1, bad) +
          fr(1, 5, 3, injected) + fr(6, 0, 0, b"afterbad"))
buf, seen = b"", []
while not (("rst", 1) in seen and ("pingack", 0) in seen):
    d = s.recv(65536)
    if not d:
        break
    buf += d
    while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
        n = int.from_bytes(buf[:3], "big")
        t, fl, p = buf[3], buf[4], buf[9:9 + n]
        buf = buf[9 + n:]
        if t == 3:
            seen.append(("rst", int.from_bytes(p, "big")))
        elif t == 6 and fl & 1:
            seen.append(("pingack", 0))
        elif t == 7:
            seen.append(("goaway", int.from_bytes(p[4:8], "big")))
print(" ".join(f"{k}:{v}" for k, v in seen))
"""


def test_curl_prior_knowledge_get_and_post_through_a_dormant_service(
        sandbox: Sandbox) -> None:
    """curl --http2-prior-knowledge: a GET and a POST with a body (held while the backend
    wakes, its content-length checked by the guest) both succeed, and the whole body
    reaches the backend through the flow-control windows the guest relays."""
    web_ns = sandbox.name("web")
    server = script(sandbox, "echo_server.py", ECHO_SERVER)
    start = (f"sh -c '(sleep 1; exec ip netns exec {web_ns} {sys.executable} {server} 8080)"
             " >/dev/null 2>&1 &'")
    d, client, _ = setup(sandbox, [service("web", on_activate=start)])
    r = sandbox.run(client, "curl", "-sS", "--http2-prior-knowledge", "-H", "x-custom: got",
                    f"http://{VIP}/get", check=False, timeout=60)
    assert r.stdout == "got /get", (r.stdout, r.stderr, d.log()[-3000:])
    r = sandbox.run(client, "curl", "-sS", "--http2-prior-knowledge", "-H", "x-custom: posted",
                    "--data-binary", "x" * 100000, f"http://{VIP}/post", check=False,
                    timeout=60)
    assert r.stdout == "posted /post 100000", (r.stdout, r.stderr, d.log()[-3000:])
    st = d.get("/v1/services")[0]["streams"]["80"]
    assert st["counters"]["guest_failures"] == 0, st


EARLY_SERVER = """
import socket, sys, threading, h2.connection, h2.config, h2.events
# answers every request on its headers and reads none of the body (never acknowledged);
# "reset": then resets the stream with NO_ERROR itself, as nghttpd and Go's server do
own_reset = sys.argv[2] == "reset"
log = open(sys.argv[3], "a", buffering=1)
def serve(sock):
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    c.initiate_connection()
    sock.sendall(c.data_to_send())
    while (data := sock.recv(65536)):
        for e in c.receive_data(data):
            if isinstance(e, h2.events.RequestReceived):
                path = dict(e.headers)[b":path"]
                c.send_headers(e.stream_id, [(":status", "200")])
                c.send_data(e.stream_id, b"early " + path, end_stream=True)
                if own_reset:
                    c.reset_stream(e.stream_id, 0)
            elif isinstance(e, h2.events.StreamReset):
                log.write("reset %d %d\\n" % (e.stream_id, e.error_code))
        sock.sendall(c.data_to_send())
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""


@pytest.mark.parametrize("backend", ["silent", "reset"])
def test_curl_large_post_answered_before_its_body(sandbox: Sandbox, backend: str) -> None:
    """curl 7.88 uploading 1 MB to a backend that answers on the headers and reads none
    of the body. A backend that resets the stream itself (NO_ERROR, RFC 9113 8.1) has its
    reset relayed behind the response: curl ends as it does against that backend
    directly. One that does not gets RST_STREAM(CANCEL) from the guest, which resets the
    client's stream with NO_ERROR behind the response, as Go's server or nghttpd
    --early-response would. Before, curl uploaded into a window that never opened, for ever (the
    --max-time's exit 28). curl 7.88 reports an upload its server stopped as error 92
    (curl#986), also for a 2xx; later curls end 0 with the response."""
    web_ns = sandbox.name("web")
    server = script(sandbox, "early_server.py", EARLY_SERVER)
    log = os.path.join(sandbox.tmp, "early.log")
    start = (f"sh -c '(exec ip netns exec {web_ns} {sys.executable} {server} 8080 {backend} "
             f"{log}) >/dev/null 2>&1 &'")
    d, client, _ = setup(sandbox, [service("web", on_activate=start)])
    body = os.path.join(sandbox.tmp, "body")
    with open(body, "wb") as f:
        f.write(b"x" * 1_000_000)

    def post(url: str) -> subprocess.CompletedProcess[str]:
        return sandbox.run(client, "curl", "-sS", "--http2-prior-knowledge", "--max-time",
                           "20", "-H", "Expect:", "--data-binary", f"@{body}", url,
                           check=False, timeout=40)

    r = post(f"http://{VIP}/post")
    assert r.returncode in (0, 92), (r.returncode, r.stdout, r.stderr, d.log()[-3000:])
    if r.returncode == 0:
        assert r.stdout == "early /post", r.stdout
    st = d.get("/v1/services")[0]["streams"]["80"]
    assert st["guest_counters"]["early_responses"] == 1, st
    assert st["counters"]["guest_failures"] == 0, st
    if backend == "silent":  # the guest told the backend the rest of the body is not coming
        deadline = time.monotonic() + 10
        while not _read(log):
            assert time.monotonic() < deadline, d.log()[-3000:]
            time.sleep(0.05)
        assert _read(log) == "reset 1 8\n"  # CANCEL
    else:  # the same backend without the activator: curl ends the same way
        direct = post("http://10.42.0.3:8080/post")
        assert direct.returncode == r.returncode, (direct.returncode, direct.stderr)


def test_malformed_request_refused_without_a_wake(sandbox: Sandbox) -> None:
    """A request with a connection-specific field (RFC 9113 8.2.2), and one with CR LF in
    a value (8.2.1: header injection toward an HTTP/1 hop), are stream errors the guest
    answers itself: RST_STREAM(PROTOCOL_ERROR) each, counted, the connection still serves
    (its PING answered), and the dormant backend is not woken."""
    marker = os.path.join(sandbox.tmp, "woken")
    d, client, _ = setup(sandbox, [service("web", on_activate=f"touch {marker}")])
    cli = script(sandbox, "malformed.py", MALFORMED_CLIENT)
    r = sandbox.run(client, sys.executable, cli, VIP, check=False, timeout=40)
    assert r.stdout.split() == ["rst:1", "rst:1", "pingack:0"], (r.stdout, r.stderr,
                                                                  d.log()[-3000:])
    time.sleep(0.5)  # give a wrong wake time to show (not a timed assertion of success)
    svc = d.get("/v1/services")[0]
    assert not os.path.exists(marker) and svc["state"] == "dormant", svc
    assert svc["streams"]["80"]["guest_counters"]["malformed_requests"] == 2, svc


ERRING_CLIENT = """
import socket, struct, sys, time
def fr(t, fl, sid, p=b""):
    return struct.pack(">I", len(p))[1:] + bytes([t, fl]) + struct.pack(">I", sid) + p
s = socket.create_connection((sys.argv[1], 80), timeout=20)
# a PING on stream 1 is a connection error, and the client keeps writing after it
s.sendall(b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n" + fr(4, 0, 0) + fr(6, 0, 1, b"12345678"))
junk = fr(0x20, 0, 0, b"x" * 16000) * 16
try:
    for _ in range(8):
        s.sendall(junk)
except OSError:
    pass
time.sleep(0.5)  # a reset, if one came, has arrived before we read
buf = b""
try:
    while (d := s.recv(65536)):
        buf += d
except OSError as e:
    print("error", type(e).__name__)
codes = []
while len(buf) >= 9:
    n = int.from_bytes(buf[:3], "big")
    if buf[3] == 7:
        codes.append(int.from_bytes(buf[13:17], "big"))
    buf = buf[9 + n:]
print("goaway", codes)
"""


def test_goaway_reaches_a_client_that_keeps_writing_after_its_error(sandbox: Sandbox) -> None:
    """A connection error while the client is still writing: the GOAWAY with its code
    reaches the client (no TCP reset destroys it), then the connection closes."""
    d, client, _ = setup(sandbox, [service("web", on_activate="true")])
    cli = script(sandbox, "erring.py", ERRING_CLIENT)
    r = sandbox.run(client, sys.executable, cli, VIP, check=False, timeout=40)
    assert r.stdout.strip().splitlines()[-1] == "goaway [1]", (r.stdout, r.stderr,
                                                               d.log()[-3000:])
