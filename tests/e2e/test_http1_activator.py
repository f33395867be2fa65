"""The HTTP/1.1 activator end to end with the daemon: real curl and wrk in one pod, a real
HTTP/1.1 server (the sandbox's keep-alive server on http.server) in another, behind a
dormant service whose port is terminated in the local stack."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from fabric.tools.sandbox import Daemon, Sandbox

VIP = "10.43.0.100"
BACKEND = "10.43.0.3"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WASM = os.path.join(ROOT, "activators", "http1", "http1.wasm")

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed "
                                "(scripts/install-debs)")


def setup(sb: Sandbox, services: list[dict]) -> tuple[Daemon, str, str]:
    worker = sb.netns("worker")
    client, web = sb.netns("client"), sb.netns("web")
    ns = {"name": "h1", "id": 10, "cidr": "10.43.0.0/24",
          "pods": [{"name": "client", "ip": "10.43.0.2", "netns": client},
                   {"name": "web-1", "ip": BACKEND, "netns": web}],
          "services": services}
    d = Daemon(sb, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    return d, client, web


def service(name: str, **kw: object) -> dict:
    port = {"port": 80, "target_port": 8080, "activator": "http1"}
    if "activator_config" in kw:
        port["activator_config"] = kw.pop("activator_config")
    return {"name": name, "ip": VIP, "backends": ["web-1"], "ports": [port], **kw}


def start_cmd(sb: Sandbox, web_ns: str, marker: str, delay: float = 1.0) -> str:
    """on_activate: note the wake, then start the HTTP/1.1 server after `delay`."""
    return (f"sh -c 'touch {marker}; (sleep {delay}; exec ip netns exec {web_ns} "
            f"{sys.executable} -m fabric.tools.sandbox http 8080) >/dev/null 2>&1 &'")


def curl(sb: Sandbox, ns: str, *args: str, timeout: float = 30
         ) -> subprocess.CompletedProcess[str]:
    return sb.run(ns, "curl", "-sS", "--max-time", str(timeout), *args, check=False,
                  timeout=timeout + 10)


def wrk_result(out: str) -> dict[str, float]:
    """requests, rps, non2xx, socket errors of a wrk run (its summary as printed)."""
    m = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert m and rps, out
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                     out)
    return {"requests": int(m.group(1)), "rps": float(rps.group(1)),
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "errors": sum(map(int, sock.groups())) if sock else 0}


def wrk(sb: Sandbox, ns: str, url: str, seconds: int = 3, conns: int = 10,
        *extra: str) -> tuple[dict[str, float], str]:
    r = sb.run(ns, "wrk", "-t", "2", "-c", str(conns), "-d", f"{seconds}s", *extra, url,
               check=False, timeout=seconds + 60)
    assert r.returncode == 0, (r.stdout, r.stderr)
    return wrk_result(r.stdout), r.stdout


def http_exchange(sb: Sandbox, ns: str, payload: bytes, timeout: float = 30) -> bytes:
    """Send raw bytes on one connection (pipelined requests) and read until it closes."""
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                        "import socket,sys\n"
                        f"c=socket.create_connection(({VIP!r},80),timeout={timeout})\n"
                        "c.sendall(sys.stdin.buffer.read())\n"
                        "out=b''\n"
                        "while (b:=c.recv(65536)): out+=b\n"
                        "sys.stdout.buffer.write(out)\n"],
                       input=payload, capture_output=True, timeout=timeout + 10)
    assert r.returncode == 0, r.stderr
    return r.stdout


def bodies(raw: bytes) -> list[tuple[int, bytes]]:
    """Split a byte stream of Content-Length responses into (status, body)."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        m = re.search(rb"(?i)content-length: *(\d+)", head)
        n = int(m.group(1)) if m else 0
        out.append((status, rest[:n]))
        raw = rest[n:]
    return out


def test_healthz_answered_asleep_real_request_wakes_then_wrk(sandbox: Sandbox) -> None:
    web_ns = sandbox.name("web")
    marker = os.path.join(sandbox.tmp, "woken")
    d, client, _ = setup(sandbox, [service(
        "web", on_activate=start_cmd(sandbox, web_ns, marker))])
    assert d.get("/v1/services")[0]["state"] == "dormant"
    for _ in range(5):
        r = curl(sandbox, client, "-i", f"http://{VIP}/healthz")
        assert r.returncode == 0 and r.stdout.startswith("HTTP/1.1 200") and \
            r.stdout.endswith("ok\n"), (r.stdout, r.stderr, d.log()[-3000:])
    r = curl(sandbox, client, "-I", f"http://{VIP}/healthz")  # HEAD
    assert r.stdout.startswith("HTTP/1.1 200"), r.stdout
    time.sleep(0.5)  # a wrong wake would have time to show (not a timed success)
    svc = d.get("/v1/services")[0]
    assert not os.path.exists(marker) and svc["state"] == "dormant", svc
    st = svc["streams"]["80"]
    assert st["guest_counters"]["health_answered"] == 6, st
    assert st["counters"].get("upstream_connects", 0) == 0, st
    # A real request wakes the backend, is held while it starts, then answered by it.
    r = curl(sandbox, client, f"http://{VIP}/")
    assert r.returncode == 0 and "hello from" in r.stdout, (r.stderr, d.log()[-3000:])
    assert os.path.exists(marker)
    # wrk through the activator, then straight at the backend, in the same run.
    via, out = wrk(sandbox, client, f"http://{VIP}/", 3, 10)
    assert via["requests"] > 0 and via["non2xx"] == 0 and via["errors"] == 0, (
        out, d.log()[-3000:])
    direct, out2 = wrk(sandbox, client, f"http://{BACKEND}:8080/", 3, 10)
    assert direct["non2xx"] == 0 and direct["errors"] == 0, out2
    print(f"\n[http1] wrk -t2 -c10 -d3s: {via['rps']:.0f} req/s through the activator, "
          f"{direct['rps']:.0f} req/s direct ({100 * via['rps'] / direct['rps']:.0f} %)")
    st = d.get("/v1/services")[0]["streams"]["80"]
    assert st["counters"]["guest_failures"] == 0, st
    assert st["guest_counters"]["requests"] >= via["requests"], st


def test_pipelined_order_and_503_when_the_hold_runs_out(sandbox: Sandbox) -> None:
    """No backend ever comes: a pipelined /healthz is answered at once, the real request
    behind it gets the 503 with Retry-After when the 2 s hold runs out, then a close."""
    d, client, _ = setup(sandbox, [service(
        "web", hold={"timeout": "2s"}, activator_config={"retry_after_s": 9})])
    raw = http_exchange(sandbox, client,
                        b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
                        b"GET /real HTTP/1.1\r\nHost: a\r\n\r\n"
                        b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    got = bodies(raw)
    assert [s for s, _ in got] == [200, 503], (raw, d.log()[-3000:])
    assert got[0][1] == b"ok\n"
    head503 = raw[raw.index(b"HTTP/1.1 503"):]
    assert b"Retry-After: 9\r\n" in head503 and b"Connection: close\r\n" in head503
    c = d.get("/v1/services")[0]["streams"]["80"]["guest_counters"]
    assert c["hold_timeouts"] == 1 and c["health_answered"] == 1, c


def test_pipelining_keeps_order_across_a_wake(sandbox: Sandbox) -> None:
    """healthz (local), a real request (wakes, held), healthz, all on one connection:
    the answers come back in request order."""
    web_ns = sandbox.name("web")
    marker = os.path.join(sandbox.tmp, "woken")
    d, client, _ = setup(sandbox, [service(
        "web", on_activate=start_cmd(sandbox, web_ns, marker, 0.5))])
    raw = http_exchange(sandbox, client,
                        b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
                        b"GET /bytes/7 HTTP/1.1\r\nHost: a\r\n\r\n"
                        b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
                        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    got = bodies(raw)
    assert [s for s, _ in got] == [200, 200, 200, 200], (raw, d.log()[-3000:])
    assert got[0][1] == b"ok\n" and got[1][1] == b"xxxxxxx", got
    # once awake the third (a health check) went to the backend: it says hello
    assert got[2][1].startswith(b"hello from") and got[3][1].startswith(b"hello from"), got


FRESH_CLIENT = """
import http.client, os, sys
ok = failed = 0
while not os.path.exists(sys.argv[2]):
    c = http.client.HTTPConnection(sys.argv[1], 80, timeout=20)
    try:
        c.request("GET", "/")
        r = c.getresponse()
        if r.status == 200 and r.read().startswith(b"hello from"):
            ok += 1
        else:
            failed += 1
    except OSError as e:
        failed += 1
        print("error", e, file=sys.stderr)
    finally:
        c.close()
print(ok, failed)
"""


def test_hot_reload_three_times_under_wrk(sandbox: Sandbox) -> None:
    """wrk on keep-alive connections (they stay with the generation they opened on) and
    http.client on a new connection per request (they move to each new generation) while
    the module is swapped three times: no failed request; a broken module is refused and
    the last one keeps serving."""
    d, client, web = setup(sandbox, [service("web")])
    sandbox.popen(web, sys.executable, "-m", "fabric.tools.sandbox", "http", "8080")
    sandbox.wait_port(web, 8080)
    r = curl(sandbox, client, f"http://{VIP}/")
    assert "hello from" in r.stdout, (r.stderr, d.log()[-3000:])
    stop = os.path.join(sandbox.tmp, "stop")
    script = os.path.join(sandbox.tmp, "fresh.py")
    with open(script, "w") as f:
        f.write(FRESH_CLIENT)
    keep = subprocess.Popen(["ip", "netns", "exec", client, "wrk", "-t", "1", "-c", "8",
                             "-d", "6s", f"http://{VIP}/"], stdout=subprocess.PIPE, text=True)
    fresh = subprocess.Popen(["ip", "netns", "exec", client, sys.executable, script, VIP,
                              stop], stdout=subprocess.PIPE, text=True)
    try:
        gens = []
        for i in range(3):
            time.sleep(1.0)
            copy = os.path.join(sandbox.tmp, f"http1-{i}.wasm")
            shutil.copy(WASM, copy)
            out = d.cli("activator", "reload", "h1/web:80", copy)
            gens.append(int(re.search(r"generation (\d+)", out).group(1)))  # type: ignore
        broken = os.path.join(sandbox.tmp, "broken.wasm")
        with open(WASM, "rb") as src, open(broken, "wb") as dst:
            dst.write(src.read()[:4000])  # cut short: not a module
        p = subprocess.run(d.cli_argv("activator", "reload", "h1/web:80", broken),
                           capture_output=True, text=True, timeout=30)
        assert p.returncode != 0 and "keeps serving" in p.stderr, (p.stdout, p.stderr)
        ko = keep.communicate(timeout=60)[0]
        with open(stop, "w"):
            pass
        fo = fresh.communicate(timeout=60)[0]
    finally:
        for proc in (keep, fresh):
            if proc.poll() is None:
                proc.kill()
    assert gens == [2, 3, 4], gens
    k = wrk_result(ko)
    ok, failed = map(int, fo.split())
    print(f"\n[http1 reload] 3 swaps under load: wrk keep-alive {k['requests']:.0f} requests "
          f"({k['non2xx'] + k['errors']:.0f} failed), a new connection per request {ok} "
          f"({failed} failed)")
    assert k["requests"] > 0 and k["non2xx"] == 0 and k["errors"] == 0, (ko, d.log()[-3000:])
    assert ok > 0 and failed == 0, (fo, d.log()[-3000:])
    st = d.get("/v1/services")[0]["streams"]["80"]
    assert st["generation"] == 4 and st["counters"]["guest_failures"] == 0, st
    r = curl(sandbox, client, "-i", f"http://{VIP}/healthz")  # still served (by gen 4)
    assert r.stdout.startswith("HTTP/1.1 200"), r.stdout


KEEPALIVE_CLIENT = """
import os, socket, sys, time
c = socket.create_connection((sys.argv[1], 80), timeout=60)
f = c.makefile("rb")
def get():
    c.sendall(b"GET / HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")
    status = f.readline()
    n = 0
    while (line := f.readline()) != b"\\r\\n":
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":")[1])
    return status.split()[1].decode(), f.read(n).decode().strip()
print(*get(), flush=True)
open(sys.argv[2] + ".first", "w").close()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
print(*get(), flush=True)
"""


def test_an_idle_keepalive_connection_does_not_pin_the_backend(sandbox: Sandbox) -> None:
    """After its answer a keep-alive connection is idle: need drops to none, the service
    idles and its hook stops the server under the open connection; the next request on
    the same connection wakes it again."""
    web_ns = sandbox.name("web")
    marker = os.path.join(sandbox.tmp, "woken")
    d, client, web = setup(sandbox, [service(
        "web", idle_timeout="2s", on_activate=start_cmd(sandbox, web_ns, marker, 0.3),
        on_idle=f"sh -c 'ip netns pids {web_ns} | xargs -r kill'")])
    gate = os.path.join(sandbox.tmp, "gate")
    script = os.path.join(sandbox.tmp, "keepalive.py")
    with open(script, "w") as f:
        f.write(KEEPALIVE_CLIENT)
    cl = sandbox.popen(client, sys.executable, script, VIP, gate, text=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(gate + ".first"):
        assert time.monotonic() < deadline and cl.poll() is None, (cl.stderr.read()
                                                                   if cl.stderr else "")
        time.sleep(0.05)
    while True:  # the service idles with the connection still open
        svc = d.get("/v1/services")[0]
        if svc["state"] in ("idle", "dormant") and not sandbox.run(
                None, "ip", "netns", "pids", web).stdout.strip():
            break
        assert time.monotonic() < deadline, (svc, d.log()[-3000:])
        time.sleep(0.2)
    assert svc["streams"]["80"]["streams"] == 1, svc["streams"]["80"]
    with open(gate, "w"):
        pass
    out, err = cl.communicate(timeout=60)
    lines = out.splitlines()
    assert len(lines) == 2 and all(ln.startswith("200 hello from") for ln in lines), (
        out, err, d.log()[-3000:])
    assert d.get("/v1/services")[0]["streams"]["80"]["counters"]["upstream_connects"] == 2


def test_curl_uploads_through_a_dormant_service(sandbox: Sandbox) -> None:
    """curl PUT with Expect: 100-continue (the activator sends no 100 while it holds:
    curl sends its body after its own wait, and the backend's 100 is relayed) and a
    chunked POST, each waking the backend; the backend counts the bytes it got."""
    web_ns = sandbox.name("web")
    server = os.path.join(ROOT, "tests", "support", "h1server.py")
    start = (f"sh -c '(sleep 0.5; exec ip netns exec {web_ns} {sys.executable} {server} "
             "8080) >/dev/null 2>&1 &'")
    d, client, _ = setup(sandbox, [service("web", on_activate=start)])
    blob = os.path.join(sandbox.tmp, "blob")
    with open(blob, "wb") as f:
        f.write(os.urandom(300_000))
    r = curl(sandbox, client, "-T", blob, "-H", "Expect: 100-continue",
             f"http://{VIP}/upload")
    assert r.returncode == 0 and r.stdout == "got 300000 bytes\n", (r.stdout, r.stderr,
                                                                     d.log()[-3000:])
    r = curl(sandbox, client, "-H", "Transfer-Encoding: chunked", "--data-binary",
             f"@{blob}", f"http://{VIP}/post")
    assert r.returncode == 0 and r.stdout == "got 300000 bytes\n", (r.stdout, r.stderr)
    c = d.get("/v1/services")[0]["streams"]["80"]
    assert c["counters"]["guest_failures"] == 0 and c["guest_counters"]["requests"] == 2, c
