"""Stream ports end to end with the daemon: connections to a dormant service's VIP are
terminated in the namespace's local stack, held by the plain stream activator while the
backend starts, then relayed by the kernel (splice); a large download passes intact; a
guest that fails mid-stream hands its transparent connections to the host's proxy."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import subprocess
import sys
import time

from fabric.tools.sandbox import Daemon, Sandbox

VIP = "10.41.0.100"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def setup(sb: Sandbox, services: list[dict]) -> tuple[Daemon, str, str]:
    worker = sb.netns("worker")
    client, web = sb.netns("client"), sb.netns("web")
    ns = {"name": "shop", "id": 8, "cidr": "10.41.0.0/24",
          "pods": [{"name": "client", "ip": "10.41.0.2", "netns": client},
                   {"name": "web-1", "ip": "10.41.0.3", "netns": web}],
          "services": services}
    d = Daemon(sb, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    return d, client, web


def start_cmd(web: str, delay: float, port: int = 8080) -> str:
    return (f"sh -c '(sleep {delay}; exec ip netns exec {web} {sys.executable} -m "
            f"fabric.tools.sandbox http {port}) >/dev/null 2>&1 &'")


ECHO = ("import socket,sys,threading\n"
        "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        "s.bind(('0.0.0.0',int(sys.argv[1]))); s.listen()\n"
        "def echo(c):\n"
        "    while (b:=c.recv(65536)): c.sendall(b)\n"
        "    c.close()\n"
        "while True:\n"
        "    threading.Thread(target=echo,args=(s.accept()[0],)).start()\n")


def echo_server(sb: Sandbox, ns: str, port: int) -> None:
    """A TCP echo server in `ns`, one thread per connection."""
    sb.popen(ns, sys.executable, "-c", ECHO, str(port))
    sb.wait_port(ns, port)


def curl(sb: Sandbox, ns: str, url: str, timeout: float = 40
         ) -> subprocess.CompletedProcess[str]:
    return sb.run(ns, "curl", "-sS", "--max-time", str(timeout), url, check=False,
                  timeout=timeout + 10)


def test_stream_port_holds_then_splices(sandbox: Sandbox) -> None:
    web_ns = sandbox.name("web")
    d, client, web = setup(sandbox, [{
        "name": "web", "ip": VIP, "backends": ["web-1"], "idle_timeout": "3s",
        "ports": [{"port": 80, "target_port": 8080, "activator": "stream"}],
        "on_activate": start_cmd(web_ns, 2.0),
        "on_idle": f"sh -c 'ip netns pids {web_ns} | xargs -r kill'"}])
    svc = d.get("/v1/services")[0]
    assert svc["state"] == "dormant" and "80" in svc["streams"], (svc, d.log()[-3000:])
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda _: curl(sandbox, client, f"http://{VIP}/"),
                                range(50)))
    failed = [r for r in results if r.returncode != 0 or "hello from" not in r.stdout]
    assert not failed, (len(failed), failed[0].stderr if failed else "", d.log()[-3000:])
    st = d.get("/v1/services")[0]["streams"]["80"]
    c = st["counters"]
    assert c["streams_opened"] >= 50 and c["spliced"] >= 50, st
    assert c["upstream_connects"] >= 50 and c["guest_failures"] == 0, st
    # The wake as the stream port saw it, in its phases, in the status and the metrics.
    assert st["wake"]["count"] == 1, st["wake"]
    assert all(st["phases"][p]["count"] == 1 for p in ("activate", "connect", "first_byte"))
    from fabric.control.client import ControlClient

    text = ControlClient(d.control).get_text("/metrics")
    assert 'fabric_service_stream_total{namespace="shop",service="web",counter="spliced"}' \
        in text, text[-2000:]
    assert 'fabric_service_stream_wake_phase_seconds_count{namespace="shop",service="web",' \
        'phase="first_byte"} 1' in text
    # No open connection and need none: the service idles and its hook stops the server.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        s = d.get("/v1/services")[0]
        if s["state"] in ("idle", "dormant") and not sandbox.run(
                None, "ip", "netns", "pids", web).stdout.strip():
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"not idle: {d.get('/v1/services')[0]}")
    r = curl(sandbox, client, f"http://{VIP}/")
    assert r.returncode == 0 and "hello from" in r.stdout, (r.stderr, d.log()[-3000:])


def test_bulk_download_through_a_spliced_stream_is_intact(sandbox: Sandbox) -> None:
    d, client, web = setup(sandbox, [{
        "name": "bulk", "ip": VIP, "backends": ["web-1"],
        "ports": [{"port": 9000, "target_port": 9000, "activator": "stream"}]}])
    blob = os.urandom(1 << 20) * 32  # 32 MiB
    digest = hashlib.sha256(blob).hexdigest()
    path = os.path.join(sandbox.tmp, "blob")
    with open(path, "wb") as f:
        f.write(blob)
    server = sandbox.popen(web, sys.executable, "-c",
                           "import socket,threading\n"
                           "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,"
                           " socket.SO_REUSEADDR,1); s.bind(('0.0.0.0',9000)); s.listen()\n"
                           "def serve(c):\n"
                           "    try:\n"
                           "        if c.recv(1): c.sendfile(open(" + repr(path) + ",'rb'))\n"
                           "    except OSError: pass\n"
                           "    c.close()\n"
                           "while True:\n"
                           "    threading.Thread(target=serve,args=(s.accept()[0],)).start()\n")
    sandbox.wait_port(web, 9000)
    out = sandbox.run(client, sys.executable, "-c",
                      "import socket,hashlib\n"
                      f"c=socket.create_connection(({VIP!r},9000),timeout=30); c.send(b'x')\n"
                      "h=hashlib.sha256(); n=0\n"
                      "while True:\n"
                      "    b=c.recv(1<<16)\n"
                      "    if not b: break\n"
                      "    h.update(b); n+=len(b)\n"
                      "print(n, h.hexdigest())\n", timeout=60)
    n, got = out.stdout.split()
    assert int(n) == len(blob) and got == digest, (out.stdout, d.log()[-3000:])
    st = d.get("/v1/services")[0]["streams"]["9000"]
    assert st["counters"]["bytes_spliced"] >= len(blob), st
    server.kill()


def test_guest_failing_mid_stream_hands_streams_to_the_proxy(sandbox: Sandbox) -> None:
    """streamtrap relays bytes itself (no splice), then traps on a marker: the
    connection is transparent, so the host goes on as a byte proxy with nothing lost."""
    wasm = os.path.join(ROOT, "activators", "testing", "streamtrap.wasm")
    d, client, web = setup(sandbox, [{
        "name": "echo", "ip": VIP, "backends": ["web-1"],
        "ports": [{"port": 7000, "target_port": 7000, "activator": wasm}]}])
    echo_server(sandbox, web, 7000)
    out = sandbox.run(client, sys.executable, "-c",
                      "import socket\n"
                      f"c=socket.create_connection(({VIP!r},7000),timeout=20)\n"
                      "got=b''\n"
                      "for msg in (b'one ', b'two ', b'TRAP ', b'three ', b'four'):\n"
                      "    c.sendall(msg)\n"
                      "    want=len(msg)\n"
                      "    part=b''\n"
                      "    while len(part)<want: part+=c.recv(100)\n"
                      "    got+=part\n"
                      "print(got.decode())\n", check=False, timeout=40)
    assert out.returncode == 0 and out.stdout.strip() == "one two TRAP three four", (
        out.stdout, out.stderr, d.log()[-3000:])
    st = d.get("/v1/services")[0]["streams"]["7000"]["counters"]
    assert st["guest_failures"] >= 1 and st["fallback_proxied"] >= 1, st


def test_a_backend_that_does_not_read_cannot_grow_the_daemons_memory(
        sandbox: Sandbox) -> None:
    """streamtrap relays through the host's queues (no splice): a client pushing 64 MiB
    at a backend that never reads, from before the service is up, is stopped by
    back-pressure (its send times out), every byte the daemon took from it went to the
    backend's queue (none dropped while the backend was waking), and what the daemon
    queues stays within the per-stream bound."""
    wasm = os.path.join(ROOT, "activators", "testing", "streamtrap.wasm")
    d, client, web = setup(sandbox, [{
        "name": "sink", "ip": VIP, "backends": ["web-1"],
        "ports": [{"port": 7000, "target_port": 7000, "activator": wasm}]}])
    sandbox.popen(web, sys.executable, "-c",
                  "import socket,time\n"
                  "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
                  "s.bind(('0.0.0.0',7000)); s.listen(); conns=[]\n"
                  "while True: conns.append(s.accept()[0])\n")
    sandbox.wait_port(web, 7000)
    out = sandbox.run(client, sys.executable, "-c",
                      "import socket\n"
                      f"c=socket.create_connection(({VIP!r},7000),timeout=5)\n"
                      "sent=0\n"
                      "try:\n"
                      "    while sent < 64<<20:\n"
                      "        sent += c.send(b'x'*65536)\n"
                      "except TimeoutError:\n"
                      "    pass\n"
                      "print(sent)\n", check=False, timeout=60)
    assert out.returncode == 0, (out.stderr, d.log()[-3000:])
    sent = int(out.stdout)
    assert sent < 48 << 20, sent  # stopped well before the end
    st = d.get("/v1/services")[0]["streams"]["7000"]
    assert st["streams"] == 1 and st["queued_bytes"] <= 4 * 256 * 1024 + 65536, st
    c = st["counters"]
    assert c["buffer_overflow"] == 0, st
    assert c["bytes_from_clients"] == c["bytes_to_backends"] > 0, st  # nothing lost


def test_reload_swaps_the_module_by_generation(sandbox: Sandbox) -> None:
    """`fabricd activator reload`: a live connection stays with the old module, new
    ones go to the new; modules that cannot serve the port are refused with their
    reason and the old one keeps serving."""
    d, client, web = setup(sandbox, [{
        "name": "echo", "ip": VIP, "backends": ["web-1"],
        "ports": [{"port": 7000, "target_port": 7000, "activator": "stream"}]}])
    echo_server(sandbox, web, 7000)
    # A long-lived connection on generation 1: it sends, waits for a file, sends again.
    gate = os.path.join(sandbox.tmp, "gate")
    live = sandbox.popen(client, sys.executable, "-c",
                         "import os,socket,time\n"
                         f"c=socket.create_connection(({VIP!r},7000),timeout=20)\n"
                         "c.sendall(b'one'); assert c.recv(10)==b'one'\n"
                         f"while not os.path.exists({gate!r}): time.sleep(0.05)\n"
                         "c.sendall(b'two'); assert c.recv(10)==b'two'\n"
                         "print('ok')\n", stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while d.get("/v1/services")[0]["streams"]["7000"]["streams"] < 1:
        assert time.monotonic() < deadline, d.get("/v1/services")
        time.sleep(0.05)
    trap = os.path.join(ROOT, "activators", "testing", "streamtrap.wasm")
    out = d.cli("activator", "reload", "shop/echo:7000", trap)
    assert "generation 2" in out, out
    st = d.get("/v1/services")[0]["streams"]["7000"]
    assert st["generation"] == 2 and st["generations_live"] == 2, st
    # A new connection is served by the new module (it relays through the host).
    r = sandbox.run(client, sys.executable, "-c",
                    "import socket\n"
                    f"c=socket.create_connection(({VIP!r},7000),timeout=10)\n"
                    "c.sendall(b'new'); print(c.recv(10).decode())\n", timeout=30)
    assert r.stdout.strip() == "new"
    with open(gate, "w"):
        pass
    assert live.communicate(timeout=20)[0].strip() == "ok"
    # Refused: a packet activator on a stream port, a module without fab_process.
    for bad, why in (("tcp", "works on packets"),
                     (os.path.join(ROOT, "activators", "testing", "noexport.wasm"),
                      "no exported function")):
        p = subprocess.run(d.cli_argv("activator", "reload", "shop/echo:7000", bad),
                           capture_output=True, text=True, timeout=30)
        assert p.returncode != 0 and why in p.stderr and "keeps serving" in p.stderr, p.stderr
    assert d.get("/v1/services")[0]["streams"]["7000"]["generation"] == 2
    r = sandbox.run(client, sys.executable, "-c",
                    "import socket\n"
                    f"c=socket.create_connection(({VIP!r},7000),timeout=10)\n"
                    "c.sendall(b'still'); print(c.recv(10).decode())\n", timeout=30)
    assert r.stdout.strip() == "still"
    events = [e for e in d.get("/v1/events/recent") if e.get("kind") == "activator_reloaded"]
    assert events and events[-1]["port"] == 7000, events


def test_held_streams_connect_upstream_paced(sandbox: Sandbox) -> None:
    """40 connections held while the backend starts connect to it at most 4 per 50 ms
    (hold.release_burst/release_interval), and every one is served."""
    web_ns = sandbox.name("web")
    d, client, web = setup(sandbox, [{
        "name": "web", "ip": VIP, "backends": ["web-1"],
        "hold": {"release_burst": 4, "release_interval": "50ms"},
        "ports": [{"port": 80, "target_port": 8080, "activator": "stream"}],
        "on_activate": start_cmd(web_ns, 2.0)}])
    def timed(_: int) -> tuple[subprocess.CompletedProcess[str], float]:
        r = curl(sandbox, client, f"http://{VIP}/")
        return r, time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        done = list(pool.map(timed, range(40)))
    results = [r for r, _ in done]
    ends = sorted(t for _, t in done)
    failed = [r for r in results if r.returncode != 0 or "hello from" not in r.stdout]
    assert not failed, (len(failed), failed[0].stderr if failed else "", d.log()[-3000:])
    st = d.get("/v1/services")[0]["streams"]["80"]
    c = st["counters"]
    # All but the first burst wait at least one interval (some may arrive after the
    # backend is up, and queue behind the burst all the same).
    assert c["release_paced"] >= 30 and c["upstream_connects"] >= 40, st
    assert st["connects_paced"] == 0, st
    # Ten windows of 4: the last connect starts at least 9 intervals after the first
    # (0.45 s), so the answers are spread over about that long.
    assert ends[-1] - ends[0] >= 0.35, ends


CAP_CLIENT = """
import socket, sys, time
vip, n = sys.argv[1], int(sys.argv[2])
socks, alive = [], []
for i in range(n):
    s = socket.create_connection((vip, 80), timeout=10)
    socks.append(s)
    time.sleep(0.02)  # accepted in order
time.sleep(0.5)
for s in socks:
    s.settimeout(0.5)
    try:
        s.sendall(b"ping")
        alive.append(s.recv(4) == b"ping")
    except OSError:
        alive.append(False)
print("alive", sum(alive))
for s in socks[:2]:
    s.close()
time.sleep(0.5)
t = socket.create_connection((vip, 80), timeout=10)
t.sendall(b"again")
print("after", t.recv(5).decode())
"""


def test_a_client_past_its_connection_cap_is_refused_and_others_are_not(
        sandbox: Sandbox) -> None:
    """max_connections_per_client: one pod opening more connections than its cap has the
    extra ones closed at once (counted); closing some frees their slots."""
    d, client, web = setup(sandbox, [{
        "name": "echo", "ip": VIP, "backends": ["web-1"],
        "ports": [{"port": 80, "target_port": 7000, "activator": "stream",
                   "max_connections_per_client": 5}]}])
    echo_server(sandbox, web, 7000)
    path = os.path.join(sandbox.tmp, "cap_client.py")
    with open(path, "w") as f:
        f.write(CAP_CLIENT)
    r = sandbox.run(client, sys.executable, path, VIP, "8", check=False, timeout=60)
    assert "alive 5" in r.stdout and "after again" in r.stdout, (r.stdout, r.stderr,
                                                                   d.log()[-3000:])
    c = d.get("/v1/services")[0]["streams"]["80"]["counters"]
    assert c["client_limit"] == 3, c
    assert "max_connections_per_client" in d.log()
