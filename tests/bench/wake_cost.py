"""What one wakeup with one frame costs the data-plane thread in-process, against a bare
loop: `python -m tests.bench.wake_cost`.

The latency case (ping, a request and its answer): every frame comes alone, so what a
frame costs is a whole loop turn, not a share of a 256-frame batch. No root: pods on
datagram socketpairs, a real `Router` and `DataPlane`. Each round sends one ICMP echo
request into pod a's socket, runs one turn of the data plane's loop as `DataPlane._run`
does (epoll_wait, `_readable`: readv, route, write, the readv that finds EAGAIN; then the
timers' bookkeeping), and takes the frame out at pod b. The same is timed for a bare
hub (epoll_wait, readv/write until EAGAIN, no routing) and for the syscalls alone (send,
readv, write, recv). CPU time of this thread, medians of `--repeat` rounds of `--frames`;
the thread never sleeps here, so what a real wakeup adds (the scheduler, another vCPU
woken) is not in these figures: `tests.bench.ping_floor` measures that.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import sys
import time
from collections.abc import Sequence

from fabric.net import packets, vnet
from fabric.router.model import Port
from fabric.router.router import Router
from fabric.runtime.dataplane import DataPlane
from tests.support.pods import SocketPod


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.wake_cost",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=3000, help="wakeups per round")
    ap.add_argument("--repeat", type=int, default=9, help="rounds (the median is shown)")
    a = ap.parse_args(argv)
    n_frames = a.frames

    router = Router("cost", "10.60.0.0/24")
    pa = SocketPod("a", "10.60.0.2", "02:00:00:00:00:02", vnet=True)
    pb = SocketPod("b", "10.60.0.3", "02:00:00:00:00:03", vnet=True)
    dp = DataPlane()
    ports = {}
    for pod in (pa, pb):
        router.add_pod(pod.name, pod.ip)
        port = Port(vnet=True, mtu=1500, fd=pod.take_fd(), kind="fd")
        router.attach(pod.name, port, time.monotonic(), pod.mac)
        dp.add_owner(router)
        dp.add_port(router, port)
        ports[pod.name] = port
    gw = packets.mac_bytes("02:fa:b0:00:00:01")
    frame = (vnet.pack(0, vnet.GSO_NONE, 0, 0, 0, 0)
             + packets.eth_header(gw, pa.macb, packets.ETH_P_IP)
             + packets.icmp_echo(pa.ipb, pb.ipb, 0x1234, 1, b"x" * 56))
    fa, fb = ports["a"].fd, ports["b"].fd
    send, recv = pa.sock.send, pb.sock.recv

    def fabric() -> float:
        poll = dp._ep.poll
        entries = dp.ports
        t = time.thread_time()
        for _ in range(n_frames):
            send(frame)
            for fd, _ in poll(dp._wait()):
                entry = entries.get(fd)
                if entry is not None:
                    dp._readable(*entry)
            dp._due(time.monotonic())
            if dp._dirty:
                dp._rearm()
            recv(65536)
        return (time.thread_time() - t) / n_frames * 1e6

    ep = select.epoll()
    ep.register(fa, select.EPOLLIN)
    buf = bytearray(65536)
    mv = memoryview(buf)

    def hub() -> float:
        t = time.thread_time()
        for _ in range(n_frames):
            send(frame)
            for fd, _ in ep.poll(1.0):
                while True:
                    try:
                        n = os.readv(fd, [buf])
                    except BlockingIOError:
                        break
                    os.write(fb, mv[:n])
            recv(65536)
        return (time.thread_time() - t) / n_frames * 1e6

    def syscalls() -> float:
        n = len(frame)
        t = time.thread_time()
        for _ in range(n_frames):
            send(frame)
            os.readv(fa, [buf])
            os.write(fb, mv[:n])
            recv(65536)
        return (time.thread_time() - t) / n_frames * 1e6

    stages = {"fabricd loop turn": fabric, "bare hub loop turn": hub,
              "send, readv, write, recv only": syscalls}
    samples: dict[str, list[float]] = {k: [] for k in stages}
    rx0 = ports["a"].rx_packets
    for _ in range(a.repeat):
        for k, fn in stages.items():
            samples[k].append(fn())
    if ports["a"].rx_packets - rx0 != a.repeat * n_frames or router.drops:
        print(f"frames went astray: {router.drops}", file=sys.stderr)
        return 1
    print(f"µs of CPU per wakeup with one {len(frame)}-byte ICMP echo (median of "
          f"{a.repeat} x {n_frames}; Python {sys.version.split()[0]}):")
    figures = {k: statistics.median(v) for k, v in samples.items()}
    for k, v in figures.items():
        print(f"  {k:32s} {v:6.2f}")
    dp.close()
    ep.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
