"""What delivering a small UDP datagram through a TAP write costs, one write per datagram
against one UDP GSO super-frame (`VIRTIO_NET_HDR_GSO_UDP_L4`) per run of datagrams:
`python -m tests.bench.tap_write_cost` (root; inside a throwaway namespace).

The fabric writes every forwarded frame to the destination pod's TAP, and that write
runs the pod's kernel receive path (IP, UDP, the socket's queue) in the writer's thread.
This measures the writer's CPU (`time.thread_time`, user and kernel) per datagram that
reached a UDP socket behind the TAP, for single frames and for super-frames of k
segments, which the kernel cuts back into datagrams (`udp_rcv_segment`): the figure
that says whether coalescing a wakeup's run of one flow's datagrams into one write would
pay (docs/performance.md).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Sequence

from fabric.net import checksum, packets
from fabric.ports.tap import IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, TUNSETIFF, _set_vnet

PAYLOAD = 64
LOCAL, PEER = "10.72.0.1", "10.72.0.2"
PEER_MAC = "02:00:00:00:00:02"
DEV = "fbtap0"
SO_RCVBUFFORCE = 33  # not in the socket module


def _super_frame(mac: bytes, k: int, seq: int) -> bytes:
    """A TAP frame: virtio-net header, Ethernet, IPv4, UDP, k segments of PAYLOAD bytes."""
    src, dst = packets.ip_bytes(PEER), packets.ip_bytes(LOCAL)
    payload = bytes([seq & 0xFF]) * (PAYLOAD * k)
    ulen = 8 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, seq & 0xFFFF, 0x4000, 64, 17, 0,
                     src, dst)
    ip = ip[:10] + struct.pack("!H", checksum.checksum(ip)) + ip[12:]
    if k == 1:
        udp = struct.pack("!HHHH", 40000, 9000, ulen, 0)  # no UDP checksum
        hdr = bytes(10)
    else:
        partial = checksum.pseudo_header_sum(src, dst, 17, ulen)  # NEEDS_CSUM: the kernel ends it
        udp = struct.pack("!HHHH", 40000, 9000, ulen, partial)
        # flags NEEDS_CSUM, GSO_UDP_L4, hdr_len, gso_size, csum_start, csum_offset
        hdr = struct.pack("<BBHHHH", 1, 5, 14 + 28, PAYLOAD, 14 + 20, 6)
    eth = packets.eth_header(mac, packets.mac_bytes(PEER_MAC), packets.ETH_P_IP)
    return hdr + eth + ip + udp + payload


def _inside(k_values: list[int], count: int, repeat: int) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", DEV.encode(),
                                           IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    _set_vnet(fd)
    for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{LOCAL}/24", "dev", DEV],
                ["ip", "link", "set", DEV, "up"]):
        subprocess.run(cmd, check=True)
    mac = bytes.fromhex(open(f"/sys/class/net/{DEV}/address").read().strip().replace(":", ""))
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    rx.bind((LOCAL, 9000))
    rx.setblocking(False)

    def drain() -> int:
        got = 0
        while True:
            try:
                rx.recv(65536)
            except BlockingIOError:
                return got
            got += 1

    print(f"writer CPU per {PAYLOAD}-byte datagram delivered (median of {repeat} x {count}):")
    base = None
    for k in k_values:
        frames = [_super_frame(mac, k, i) for i in range(count // k)]
        costs = []
        for _ in range(repeat):
            t = time.thread_time()
            for f in frames:
                os.write(fd, f)
            took = time.thread_time() - t
            got = drain()
            if got != len(frames) * k:
                print(f"  k={k}: {got} of {len(frames) * k} datagrams arrived", file=sys.stderr)
            costs.append(took / max(got, 1) * 1e6)
        us = statistics.median(costs)
        base = base or us
        print(f"  {k:3d} per write: {us:6.2f} µs ({us / base:4.0%} of one per write)")
    os.close(fd)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.tap_write_cost",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--k", default="1,2,4,8,16,32", help="segments per write")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    ks = [int(x) for x in a.k.split(",")]
    if a.inside:
        return _inside(ks, a.count, a.repeat)
    from fabric.tools.sandbox import Sandbox

    with Sandbox("fbb") as sb:
        ns = sb.netns("tapw")
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m",
                            "tests.bench.tap_write_cost", "--inside", "--count", str(a.count),
                            "--repeat", str(a.repeat), "--k", a.k])
        return p.returncode


if __name__ == "__main__":
    sys.exit(main())
