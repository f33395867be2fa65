"""Stream ports with `upstream: pod-local` end to end with the daemon: the upstream
connection is made inside the backend pod's namespace (to its own IP, over its
loopback), so a spliced download arrives intact without one of its bytes crossing the
backend's TAP, the backend sees its own IP as the peer, and a pod whose netns is
deleted and made anew gets the next connection in the new namespace."""

from __future__ import annotations

import hashlib
import os
import sys
import time

from fabric.tools.sandbox import Daemon, Sandbox
from tests.e2e.test_streams import setup

VIP = "10.41.0.100"
WEB_IP = "10.41.0.3"
BLOB = 32 << 20

# Sends the file to each connection after its first byte, and records the peer.
SERVER = ("import socket,sys,threading\n"
          "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
          "s.bind(('0.0.0.0',9000)); s.listen()\n"
          "def serve(c,a):\n"
          "    open(sys.argv[2],'a').write(a[0]+'\\n')\n"
          "    try:\n"
          "        if c.recv(1): c.sendfile(open(sys.argv[1],'rb'))\n"
          "    except OSError: pass\n"
          "    c.close()\n"
          "while True:\n"
          "    threading.Thread(target=serve,args=s.accept()).start()\n")

CLIENT = ("import socket,hashlib,sys\n"
          "c=socket.create_connection((sys.argv[1],9000),timeout=30); c.send(b'x')\n"
          "h=hashlib.sha256(); n=0\n"
          "while True:\n"
          "    b=c.recv(1<<16)\n"
          "    if not b: break\n"
          "    h.update(b); n+=len(b)\n"
          "print(n, h.hexdigest())\n")

SERVICE = {"name": "bulk", "ip": VIP, "backends": ["web-1"],
           "ports": [{"port": 9000, "target_port": 9000, "activator": "stream",
                      "upstream": "pod-local"}]}


def _blob(sb: Sandbox) -> tuple[str, str]:
    blob = os.urandom(1 << 20) * (BLOB >> 20)
    path = os.path.join(sb.tmp, "blob")
    with open(path, "wb") as f:
        f.write(blob)
    return path, hashlib.sha256(blob).hexdigest()


def _pod(d: Daemon, name: str) -> dict:
    return next(p for p in d.get("/v1/pods") if p["name"] == name)


def _download(sb: Sandbox, client: str) -> tuple[int, str]:
    out = sb.run(client, sys.executable, "-c", CLIENT, VIP, timeout=60)
    n, got = out.stdout.split()
    return int(n), got


def test_a_pod_local_download_is_intact_and_never_crosses_the_backends_port(
        sandbox: Sandbox) -> None:
    d, client, web = setup(sandbox, [SERVICE])
    path, digest = _blob(sandbox)
    peers = os.path.join(sandbox.tmp, "peers")
    server = sandbox.popen(web, sys.executable, "-c", SERVER, path, peers)
    sandbox.wait_port(web, 9000)
    before = _pod(d, "web-1")
    n, got = _download(sandbox, client)
    assert n == BLOB and got == digest, (n, d.log()[-3000:])
    after = _pod(d, "web-1")
    st = d.get("/v1/services")[0]["streams"]["9000"]
    c = st["counters"]
    assert c["pod_local_connects"] == 1 and c["pod_local_fallback_not_local"] == 0, st
    assert c["spliced"] == 1 and c["bytes_spliced"] >= BLOB, st
    assert c["splices_handed"] == 1, st  # the bulk moved on the splicer thread
    # The 32 MiB went over the pod's loopback: its TAP carried at most a few probes
    # (readiness), never the download (the VIP path moves all of it through there).
    moved = (after["tx_bytes"] - before["tx_bytes"]) + (after["rx_bytes"] - before["rx_bytes"])
    assert moved < 64 << 10, (before, after)
    # The backend saw its own address as the peer, not the VIP.
    with open(peers) as f:
        assert f.read().split() == [WEB_IP]
    from fabric.control.client import ControlClient

    text = ControlClient(d.control).get_text("/metrics")
    assert ('fabric_service_stream_total{namespace="shop",service="bulk",'
            'counter="pod_local_connects"} 1') in text
    server.kill()


def test_a_pod_in_a_new_netns_gets_connections_there_not_in_the_old_one(
        sandbox: Sandbox) -> None:
    d, client, web = setup(sandbox, [SERVICE])
    path, digest = _blob(sandbox)
    peers = os.path.join(sandbox.tmp, "peers")
    server = sandbox.popen(web, sys.executable, "-c", SERVER, path, peers)
    sandbox.wait_port(web, 9000)
    assert _download(sandbox, client) == (BLOB, digest)
    # The netns goes (its server with it) and comes back empty under the same name.
    sandbox.stop(server)
    sandbox.run(None, "ip", "netns", "del", web)
    deadline = time.monotonic() + 20
    while _pod(d, "web-1")["attached"]:
        assert time.monotonic() < deadline, _pod(d, "web-1")
        time.sleep(0.1)
    sandbox.run(None, "ip", "netns", "add", web)
    while not _pod(d, "web-1")["attached"]:
        assert time.monotonic() < deadline, _pod(d, "web-1")
        time.sleep(0.1)
    sandbox.run(web, "ip", "link", "set", "lo", "up", check=False)
    server = sandbox.popen(web, sys.executable, "-c", SERVER, path, peers)
    sandbox.wait_port(web, 9000)
    # A connection into the old namespace (still held) would find nothing listening.
    assert _download(sandbox, client) == (BLOB, digest), d.log()[-3000:]
    c = d.get("/v1/services")[0]["streams"]["9000"]["counters"]
    assert c["pod_local_connects"] == 2 and c["pod_local_fallback_netns"] == 0, c
    server.kill()


def test_a_pod_given_by_its_process_namespace_is_not_held_and_uses_the_vip(
        sandbox: Sandbox) -> None:
    """/proc/PID/ns/net: the fabric moves a TAP in and sees the pod gone when the
    namespace goes with its process; holding it for pod-local upstreams would keep it
    alive, so such a backend's connections come from the VIP, counted."""
    worker, client, web = sandbox.netns("worker"), sandbox.netns("client"), sandbox.netns("web")
    holder = sandbox.popen(web, "sleep", "600")
    ns = {"name": "shop", "id": 8, "cidr": "10.41.0.0/24",
          "pods": [{"name": "client", "ip": "10.41.0.2", "netns": client},
                   {"name": "web-1", "ip": WEB_IP, "netns": f"/proc/{holder.pid}/ns/net"}],
          "services": [SERVICE]}
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    path, digest = _blob(sandbox)
    peers = os.path.join(sandbox.tmp, "peers")
    server = sandbox.popen(web, sys.executable, "-c", SERVER, path, peers)
    sandbox.wait_port(web, 9000)
    assert _download(sandbox, client) == (BLOB, digest), d.log()[-3000:]
    c = d.get("/v1/services")[0]["streams"]["9000"]["counters"]
    assert c["pod_local_connects"] == 0 and c["pod_local_fallback_netns"] == 1, c
    with open(peers) as f:
        assert f.read().split() == [VIP]  # the VIP path: the backend sees the VIP
    server.kill()
