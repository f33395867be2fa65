"""`fabricd demo`: a tour of the fabric inside throwaway network namespaces.

It runs the real daemon in a worker namespace, gives three pod namespaces a port each,
shows them talking and resolving each other by name, and wakes a service scaled to
zero with a real request, with timings; where KVM runs guests, a microVM sleeps and wakes
behind a service too (fabric/tools/demo_microvm.py). Everything is removed at the end,
also on failure.
"""

from __future__ import annotations

import os
import re
import sys
import time

from fabric.tools import demo_microvm
from fabric.tools.sandbox import Daemon, Sandbox, prerequisites, sweep


def _step(msg: str) -> float:
    print(f"==> {msg}", flush=True)
    return time.monotonic()


def _done(t0: float, detail: str = "") -> None:
    ms = (time.monotonic() - t0) * 1000
    print(f"    ok in {ms:.1f} ms{': ' + detail if detail else ''}", flush=True)


def main() -> int:
    why = prerequisites()
    if why:
        print(f"fabricd demo: {why}", file=sys.stderr)
        return 1
    sweep(["fbd"])
    with Sandbox("fbd") as sb:
        t = _step("creating namespaces: a worker and three pods")
        worker = sb.netns("worker")
        web = sb.netns("web")
        client = sb.netns("client")
        _done(t, f"{worker}, {web}, {client} (and the api pod's, below)")
        vm = demo_microvm.plan(sb, worker)  # None: said why it is skipped

        api = sb.netns("api")
        ready_file = os.path.join(sb.tmp, "api-ready")
        # The hook plays the controller resuming a VM: the server starts 0.5 s later.
        start_api = (f"sh -c '(sleep 0.5; exec ip netns exec {api} {sys.executable} -m "
                     f"fabric.tools.sandbox http 8080 --ready-file {ready_file}) "
                     f">/dev/null 2>&1 &'")
        cfg = {
            "worker": {"id": "demo"},
            "namespaces": [{
                "name": "shop",
                "id": 7,
                "cidr": "10.77.0.0/24",
                "pods": [
                    {"name": "web", "ip": "10.77.0.10", "netns": web},
                    {"name": "client", "ip": "10.77.0.20", "netns": client},
                    {"name": "api-1", "ip": "10.77.0.30", "netns": api},
                ],
                "services": [{
                    "name": "api", "ip": "10.77.0.100", "backends": ["api-1"],
                    "ports": [{"port": 80, "target_port": 8080, "activator": "tcp"}],
                    "on_activate": start_api, "idle_timeout": "60s",
                }],
            }],
        }
        if vm is not None:
            cfg["namespaces"][0]["pods"].append(vm.pod())
            cfg["namespaces"][0]["services"].append(vm.service())
        t = _step("starting fabricd in the worker namespace")
        d = Daemon(sb, worker, cfg).start()
        d.wait_attached(3)
        _done(t, "three pods attached (TAP with offloads, moved in as eth0)")
        print(d.cli("get", "pods"))

        t = _step("client pings the gateway 10.77.0.1 and the web pod 10.77.0.10")
        sb.run(client, "ping", "-c", "1", "-W", "2", "10.77.0.1")
        out = sb.run(client, "ping", "-c", "5", "-i", "0.2", "-W", "2", "10.77.0.10").stdout
        m = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)", out)
        _done(t, f"rtt min/avg/max {m.group(1)}/{m.group(2)}/{m.group(3)} ms" if m else out)

        t = _step("web starts an HTTP server on :8080")
        sb.http_server(web, 8080)
        _done(t)

        t = _step("client resolves web.shop.fabric.internal at the gateway's DNS")
        out = sb.run(client, "dig", "+short", "web.shop.fabric.internal").stdout.strip()
        _done(t, f"A {out} (resolv.conf was written for the pod: `curl http://web:8080/`"
                 " works too)")

        t = _step("client fetches http://web:8080/ with curl")
        out = sb.run(client, "curl", "-sS", "--max-time", "5", "-w",
                     "\n%{time_connect} %{time_total}", "http://web:8080/").stdout
        body, times = out.rsplit("\n", 1)
        connect, total = (float(x) * 1000 for x in times.split())
        _done(t, f"{body.strip()!r}, connect {connect:.2f} ms, total {total:.2f} ms")

        t = _step("client downloads 50 MB from web")
        out = sb.run(client, "curl", "-sS", "--max-time", "60", "-o", "/dev/null", "-w",
                     "%{size_download} %{speed_download}",
                     "http://10.77.0.10:8080/bytes/50000000", timeout=90).stdout
        size, speed = out.split()
        _done(t, f"{int(size) / 1e6:.0f} MB at {float(speed) * 8 / 1e9:.2f} Gbit/s")

        print(d.cli("get", "pods"))

        t = _step("client calls http://api/ -- a service scaled to zero (no server runs)")
        print(d.cli("get", "services"))
        # A tiny client that notes when its connection is established (CLOCK_MONOTONIC is
        # one clock for the whole machine, so it compares with the server's note).
        client_py = ("import socket,time\n"
                     "t0=time.monotonic()\n"
                     "s=socket.create_connection(('api',80),30)\n"
                     "t1=time.monotonic()\n"
                     "s.sendall(b'GET / HTTP/1.0\\r\\nHost: api\\r\\n\\r\\n')\n"
                     "d=b''\n"
                     "while (c:=s.recv(65536)): d+=c\n"
                     "print(t0, t1, time.monotonic())\n"
                     "print(d.split(b'\\r\\n\\r\\n',1)[1].decode().strip())\n")
        out = sb.run(client, sys.executable, "-c", client_py, timeout=40).stdout
        stamps, body = out.split("\n", 1)
        t0, t1, t2 = (float(x) for x in stamps.split())
        with open(ready_file) as f:
            t_listen = float(f.read())
        _done(t, f"{body.strip()!r} after {(t2 - t0) * 1000:.0f} ms: the backend's port "
                 f"accepted {(t_listen - t0) * 1000:.0f} ms after the connect (the hook's "
                 f"500 ms resume); the fabric had the connection established "
                 f"{(t1 - t_listen) * 1000:.1f} ms after that")
        print(d.cli("get", "services"))

        if vm is not None:
            try:
                vm.run(sb, d, client, _step, _done)
            finally:
                vm.close()

        t = _step("stopping fabricd (SIGTERM): it removes every interface it made")
        rc = d.stop()
        left = sb.run(web, "ip", "-o", "link", "show", "eth0", check=False)
        _done(t, f"exit {rc}, web's eth0 {'still there!' if left.returncode == 0 else 'gone'}")
    print("==> removed the demo's namespaces; done")
    return 0
