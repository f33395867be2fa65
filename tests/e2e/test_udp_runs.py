"""Bursts of small UDP datagrams between two pods: the data plane gathers a wakeup's run of
one flow's datagrams into one UDP GSO write (fabric.net.coalesce.UdpRun), and the pod
must still get every datagram, intact and in order, whatever the sizes and flows."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from fabric.tools.sandbox import Daemon, Sandbox
from tests.e2e.test_daemon import two_pods

BURSTS = 10
PER_BURST = 200

SENDER = textwrap.dedent("""
    import socket, struct, sys, time
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    seq = 0
    for burst in range({bursts}):
        for i in range({per}):
            # Mostly one flow of 64-byte datagrams; now and then a second flow, and the
            # last of each burst shorter, then a bigger one.
            size = 64 if i < {per} - 2 else (17 if i == {per} - 2 else 600)
            s = socks[1] if i % 37 == 36 else socks[0]
            body = struct.pack("!I", seq) + bytes([seq & 0xFF]) * (size - 4)
            s.sendto(body, ("{dst}", 9000))
            seq += 1
        time.sleep(0.02)
""")

RECEIVER = textwrap.dedent("""
    import json, socket, struct
    r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    r.bind(("0.0.0.0", 9000))
    r.settimeout(3.0)
    print("ready", flush=True)
    got, bad, flows = [], 0, {{}}
    try:
        while len(got) < {total}:
            data, addr = r.recvfrom(2048)
            seq = struct.unpack("!I", data[:4])[0]
            if data[4:] != bytes([seq & 0xFF]) * (len(data) - 4):
                bad += 1
            flows.setdefault(addr[1], []).append(seq)
            got.append(seq)
    except socket.timeout:
        pass
    print(json.dumps({{"got": len(got), "bad": bad,
                      "ordered": all(s == sorted(s) for s in flows.values()),
                      "distinct": len(set(got)), "flows": len(flows)}}))
""")


def test_bursts_of_small_datagrams_arrive_whole_and_in_order(sandbox: Sandbox) -> None:
    worker = sandbox.netns("worker")
    a, b, ns = two_pods(sandbox, "burst")
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    sandbox.run(a, "ping", "-c", "2", "-i", "0.2", "-W", "2", "10.40.0.3")
    total = BURSTS * PER_BURST
    rx = sandbox.popen(b, sys.executable, "-c", RECEIVER.format(total=total),
                       stdout=subprocess.PIPE, text=True)
    assert rx.stdout is not None
    assert rx.stdout.readline().strip() == "ready"
    sandbox.run(a, sys.executable, "-c",
                SENDER.format(bursts=BURSTS, per=PER_BURST, dst="10.40.0.3"), timeout=60)
    out, _ = rx.communicate(timeout=30)
    res = json.loads(out.strip().splitlines()[-1])
    assert res == {"got": total, "bad": 0, "ordered": True, "distinct": total, "flows": 2}
