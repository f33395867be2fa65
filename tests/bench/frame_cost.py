"""What one small frame costs the data-plane thread, stage by stage, in-process:
`python -m tests.bench.frame_cost`.

No root and no namespaces: two pods on datagram socketpairs (as the shell tests), a real
`Router` and a real `DataPlane` whose read loop is called directly on a prefilled
socket. CPU time of this thread (`time.thread_time`), so a busy machine slows the run
but barely moves the figures. Stages, each the median of `--repeat` rounds of
`--frames` 64-byte-payload UDP frames with a virtio-net header (the TAP framing):

- `receive`: `Router.receive` alone (parse, checks, lookup, TTL, MACs, counters); the
  frame is restored before each call and that copy's own cost is subtracted;
- `readv` / `write`: the two syscalls of a forwarded frame on a socketpair (a TAP's
  write also runs the receiving pod's kernel stack, which this does not include);
- `loop`: `DataPlane._readable` draining the prefilled socket, everything a forwarded
  frame costs the thread (readv, receive, write, bookkeeping, the EAGAIN at the end);
- `loop, runs`: the same with the destination taken for a TAP, so the datagrams leave
  in UDP GSO runs of up to 64 (one write per run; the pod kernel's segmentation, which
  a socketpair does not do, is not in it: tests/bench/tap_write_cost.py measures that).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from collections.abc import Sequence

from fabric.net import checksum, packets, vnet
from fabric.router.model import Port
from fabric.router.router import Router
from fabric.runtime.dataplane import DataPlane
from tests.support.pods import SocketPod

PAYLOAD = 64


def _frame(a: SocketPod, b: SocketPod, ident: int = 0) -> bytes:
    """As a pod's stack sends it over a TAP with checksum offload: NEEDS_CSUM, the UDP
    checksum field holding the pseudo-header sum."""
    gw = packets.mac_bytes("02:fa:b0:00:00:01")
    pkt = bytearray(packets.udp_packet(a.ipb, b.ipb, 40000, 5201, b"x" * PAYLOAD,
                                       ident=ident))
    pkt[26:28] = checksum.pseudo_header_sum(a.ipb, b.ipb, 17, 8 + PAYLOAD).to_bytes(2, "big")
    hdr = vnet.pack(vnet.F_NEEDS_CSUM, vnet.GSO_NONE, 0, 0, 34, 6)
    return hdr + packets.eth_header(gw, a.macb, packets.ETH_P_IP) + pkt


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.frame_cost",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=2000, help="frames per round")
    ap.add_argument("--repeat", type=int, default=15, help="rounds (the median is shown)")
    a = ap.parse_args(argv)
    n_frames = a.frames

    router = Router("cost", "10.60.0.0/24")
    pa = SocketPod("a", "10.60.0.2", "02:00:00:00:00:02", vnet=True)
    pb = SocketPod("b", "10.60.0.3", "02:00:00:00:00:03", vnet=True)
    for s in (pa.sock, pa.port_sock, pb.sock, pb.port_sock):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    dp = DataPlane()
    ports = {}
    for pod in (pa, pb):
        router.add_pod(pod.name, pod.ip)
        port = Port(vnet=True, mtu=1500, fd=pod.take_fd(), kind="fd")
        router.attach(pod.name, port, time.monotonic(), pod.mac)
        dp.add_owner(router)
        dp.add_port(router, port)
        ports[pod.name] = port
    frame = _frame(pa, pb)
    n = len(frame)
    buf = dp.buf
    now = time.monotonic()
    port_a = ports["a"]

    def copy_only() -> float:
        t = time.thread_time()
        for _ in range(n_frames):
            buf[:n] = frame
        return (time.thread_time() - t) / n_frames * 1e6

    def receive() -> float:
        rcv = router.receive
        t = time.thread_time()
        for _ in range(n_frames):
            buf[:n] = frame
            if rcv(port_a, buf, n, now) is None:
                raise RuntimeError("the frame was not forwarded")
        return (time.thread_time() - t) / n_frames * 1e6

    def drain(sock: socket.socket) -> None:
        while True:
            try:
                sock.recv(65536)
            except BlockingIOError:
                return

    stream = [_frame(pa, pb, i & 0xFFFF) for i in range(n_frames)]  # IP ids one apart

    def fill() -> None:
        for f in stream:
            pa.sock.send(f)

    def readv() -> float:
        fill()
        bufs = [buf]
        fd = port_a.fd
        t = time.thread_time()
        for _ in range(n_frames):
            os.readv(fd, bufs)
        return (time.thread_time() - t) / n_frames * 1e6

    def write() -> float:
        mv = dp.mv
        fd = ports["b"].fd
        t = time.thread_time()
        for _ in range(n_frames):
            os.write(fd, mv[:n])
        took = (time.thread_time() - t) / n_frames * 1e6
        drain(pb.sock)
        return took

    def loop() -> float:
        fill()
        entry = dp.ports[port_a.fd]
        t = time.thread_time()
        end = port_a.rx_packets + n_frames
        while port_a.rx_packets < end:
            dp._readable(*entry)
        took = (time.thread_time() - t) / n_frames * 1e6
        drain(pb.sock)
        return took

    def loop_runs() -> float:
        # The same with b's port taken for a TAP: the datagrams leave in UDP GSO runs (a
        # socketpair does not segment them, so the pod kernel's share is not in this).
        ports["b"].kind = "netns"
        try:
            return loop()
        finally:
            ports["b"].kind = "fd"

    # Rounds interleaved, so that a change in the machine's load hits every stage alike.
    stages = {"copy": copy_only, "receive": receive, "readv": readv, "write": write,
              "loop": loop, "loop, runs": loop_runs}
    samples: dict[str, list[float]] = {k: [] for k in stages}
    for _ in range(a.repeat):
        for k, fn in stages.items():
            samples[k].append(fn())
    figures = {k: statistics.median(v) for k, v in samples.items()}
    figures["receive"] -= figures.pop("copy")
    print(f"µs of CPU per {n}-byte frame (median of {a.repeat} x {n_frames}; "
          f"Python {sys.version.split()[0]}):")
    for k, v in figures.items():
        print(f"  {k:10s} {v:6.2f}")
    rest = figures["loop"] - figures["receive"] - figures["readv"] - figures["write"]
    print(f"  {'rest':10s} {rest:6.2f}  (loop minus the three: the loop's own bookkeeping)")
    dp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
