"""What making pod-local upstream sockets costs (fabric.streams.podlocal), as root:
`python -m tests.bench.podlocal_cost`.

A throwaway netns (`ip netns add`), then, CPU and wall time of the calling thread per
socket: a batch of `--batch` sockets made by `sockets_in` (a short-lived thread joins
the namespace; what a pod's pool refill and a burst that emptied it cost), against
`socket()` in the caller's own namespace, and, for reference, the inline alternative
the design avoids: setns into the pod and back around each `socket()` on the calling
thread. Medians of `--repeat` rounds; the netns is deleted at the end, also on failure.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

from fabric.ports.netlink import join_netns
from fabric.ports.podsockets import sockets_in
from fabric.streams.podlocal import PodNs


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.podlocal_cost",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="sockets per batch")
    ap.add_argument("--repeat", type=int, default=200, help="rounds (the median is shown)")
    a = ap.parse_args(argv)
    name = f"fbb-plc-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        pod = PodNs("p", "10.0.0.2", f"/run/netns/{name}", (0, 0))
        pod.fd = fd
        rows: dict[str, list[tuple[float, float]]] = {"thread batch": [], "here": [],
                                                       "inline setns": []}

        def timed(key: str, fn: object, n: int) -> None:
            c0, w0 = time.thread_time(), time.perf_counter()
            fn()  # type: ignore[operator]
            c1, w1 = time.thread_time(), time.perf_counter()
            rows[key].append(((c1 - c0) / n * 1e6, (w1 - w0) / n * 1e6))

        def batch() -> None:
            for s in sockets_in(pod, a.batch).result(5):
                s.close()

        def here() -> None:
            for _ in range(a.batch):
                socket.socket().close()

        def inline() -> None:
            for _ in range(a.batch):
                join_netns(fd)
                s = socket.socket()
                join_netns(home)
                s.close()

        for _ in range(a.repeat):
            timed("thread batch", batch, a.batch)
            timed("here", here, a.batch)
            timed("inline setns", inline, a.batch)
        print(f"per socket, batches of {a.batch}, median of {a.repeat}: caller's CPU µs / "
              "wall µs")
        for key, vals in rows.items():
            cpu = statistics.median(v[0] for v in vals)
            wall = statistics.median(v[1] for v in vals)
            print(f"  {key:<14} {cpu:8.2f} {wall:8.2f}")
        os.close(home)
        pod.close()
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
