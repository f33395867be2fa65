"""What handing a guest client bytes in CLIENT_CALL_MAX pieces costs a bulk upload that
the guest relays (fabric.streams.core: 16 KiB a call since the hostile campaign, 64 KiB
before). No sockets: a StreamCore with the real wasm host, one stream connected
upstream, 16 MiB of client bytes in 64 KiB reads; host time per MiB (the guest's calls,
event encoding, action decoding), medians of interleaved runs of both sizes.

`python -m tests.bench.client_call [--runs N] [--wasm PATH]` prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fabric.activator.host import ActivatorHost
from fabric.streams import core as sc
from fabric.streams.core import StreamCore

ROOT = Path(__file__).resolve().parents[2]
RELAY = ROOT / "activators" / "testing" / "streamtrap.wasm"  # relays bytes itself


def ms_per_mib(wasm: Path, step: int, mib: int = 16) -> float:
    saved = sc.CLIENT_CALL_MAX
    sc.CLIENT_CALL_MAX = step
    host = ActivatorHost(str(wasm), {})
    try:
        core = StreamCore(host, 80, 8080)
        core.backends(["10.0.0.3"], 0.0)
        sid = core.accepted(("10.0.0.2", 40000), 0.0)
        assert sid is not None
        core.handle_timer(0.2)
        for kind, _, _ in core.commands():
            if kind == sc.CONNECT:
                core.upstream_result(sid, True, 0.3)
        core.commands()
        chunk = bytes(range(256)) * 256
        sent = 0
        t0 = time.perf_counter()
        for i in range(mib * 16):
            core.client_data(sid, chunk, 1.0 + i * 1e-4)
            sent += sum(len(a) for k, _, a in core.commands()  # type: ignore[arg-type]
                        if k == sc.SEND_UPSTREAM)
        dt = time.perf_counter() - t0
        assert sent == mib << 20 and core.counters["guest_failures"] == 0, core.counters
        return dt / mib * 1000
    finally:
        sc.CLIENT_CALL_MAX = saved
        host.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.client_call")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--wasm", type=Path, default=RELAY)
    a = ap.parse_args(argv)
    sizes = (16 << 10, 64 << 10)
    got: dict[int, list[float]] = {s: [] for s in sizes}
    for _ in range(a.runs):
        for s in sizes:
            got[s].append(ms_per_mib(a.wasm, s))
    med = {s: statistics.median(v) for s, v in got.items()}
    print(json.dumps({"wasm": a.wasm.name, "runs": a.runs,
                      "ms_per_mib": {f"{s >> 10}KiB": round(med[s], 2) for s in sizes},
                      "ratio_16_to_64": round(med[16 << 10] / med[64 << 10], 2),
                      "all": {f"{s >> 10}KiB": [round(x, 2) for x in v]
                              for s, v in got.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
