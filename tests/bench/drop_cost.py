"""What the drop log costs the data plane: the per-frame check, and a dropped frame.

`python -m tests.bench.drop_cost`: the shell's read loop, reduced to a receive() that
forwards, run with and without the check the data plane makes around each frame (the
port's drop count before and after). Then the cost of recording one dropped frame,
with and without a live `fabricd monitor`. Prints nanoseconds per frame, medians of 7.
"""

from __future__ import annotations

import statistics
import timeit
from collections.abc import Callable

from fabric.router.droplog import HEAD_BYTES, DropLog, Sink
from fabric.router.model import Port

FRAMES = 1000
FRAME = bytes.fromhex("020000000002020000000001080045000028000040004011"
                      "0000c0a80001c0a8000200350035001400000000") + bytes(60)


def _loop(check: bool) -> Callable[[], None]:
    port = Port(vnet=False, mtu=1500)
    buf = bytearray(2048)

    def receive(p: Port, b: bytearray, n: int, now: float) -> Port | None:
        return None

    if check:
        def run() -> None:
            for _ in range(FRAMES):
                d0 = port.ndrops
                receive(port, buf, 100, 0.0)
                if port.ndrops != d0:
                    pass
    else:
        def run() -> None:
            for _ in range(FRAMES):
                receive(port, buf, 100, 0.0)
    return run


def _per_frame(fn: Callable[[], None], frames: int = FRAMES) -> float:
    runs = [min(timeit.repeat(fn, number=50, repeat=3)) / 50 / frames * 1e9 for _ in range(7)]
    return statistics.median(runs)


def main() -> None:
    plain = _per_frame(_loop(False))
    checked = _per_frame(_loop(True))
    print(f"read loop, per frame: {plain:.0f} ns without the drop check, {checked:.0f} ns "
          f"with it (+{checked - plain:.0f} ns)")
    head = FRAME[:HEAD_BYTES]
    log = DropLog("bench")
    t = [0.0]

    def record() -> None:
        for _ in range(FRAMES):
            t[0] += 1e-4
            log.record("a", "spoofed_source", head, False, t[0])

    alone = _per_frame(record)
    log.sinks = [Sink(lambda e: None, None, None, 0.0)]
    watched = _per_frame(record)
    print(f"recording a dropped frame: {alone:.0f} ns; with a monitor attached "
          f"(rate-limited to 200/s, so mostly counted): {watched:.0f} ns")


if __name__ == "__main__":
    main()
