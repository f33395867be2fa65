"""`cni`: CNI ADD and DEL latency of `fabricd-cni`, as a runtime sees it.

A worker namespace runs `fabricd` with one namespace `bench` (10.52.0.0/22); 20 network
namespaces per run (100 with the default 5 runs of 5 s; 10 when runs are shorter, as
with --quick) are made with `ip netns add`, then each is attached with a plugin ADD (a
process, the spec's environment, the network config on stdin; the fabric picks the
address), then each is detached with DEL. Reported: the median ADD and DEL wall time,
and the median of a VERSION call, which does no work at all: the interpreter starting,
the floor under both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from fabric.tools.sandbox import Daemon, Sandbox, prerequisites
from tests.bench.common import Report, Settings, median, percentile, progress

NAME = "cni"
PER_RUN = 20
CIDR = "10.52.0.0/22"


def _plugin() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "fabricd-cni")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "fabric.cni"]


def _call(command: str, conf: bytes, cid: str, netns: str | None) -> float:
    """One plugin run; its wall time in ms. A failure stops the benchmark."""
    env = {"PATH": os.environ.get("PATH", ""), "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
           "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"}
    if netns is not None:
        env["CNI_NETNS"] = netns
    t0 = time.perf_counter()
    p = subprocess.run(_plugin(), input=conf, env=env, capture_output=True, timeout=60,
                       check=False)
    ms = (time.perf_counter() - t0) * 1000
    if p.returncode:
        raise RuntimeError(f"CNI {command} {cid}: {p.stdout.decode().strip()}")
    return ms


def run(s: Settings) -> Report:
    why = prerequisites()
    if why:
        raise RuntimeError(why)
    per_run = PER_RUN if s.seconds >= 5 else PER_RUN // 2
    count = per_run * s.runs
    r = Report(NAME, f"fabricd-cni ADD and DEL wall time over {count} network namespaces, "
                     "a plugin process per call (as a runtime runs it)")
    adds: list[float] = []
    dels: list[float] = []
    versions: list[float] = []
    with Sandbox("fbb") as sb:
        worker = sb.netns("worker")
        d = Daemon(sb, worker, {"namespaces": [{"name": "bench", "cidr": CIDR}]}).start()
        conf = json.dumps({"cniVersion": "1.0.0", "name": "bench", "type": "fabricd-cni",
                           "namespace": "bench", "control": d.control}).encode()
        for run_no in range(s.runs):
            names = [sb.netns(f"c{run_no}-{i}") for i in range(per_run)]
            for name in names:
                versions.append(_call("VERSION", conf, name, None))
                adds.append(_call("ADD", conf, name, f"/run/netns/{name}"))
            attached = sum(1 for p in d.get("/v1/namespaces/bench/pods") if p["attached"])
            if attached != len(names):
                raise RuntimeError(f"{attached} of {len(names)} pods attached after ADD")
            for name in names:
                dels.append(_call("DEL", conf, name, f"/run/netns/{name}"))
            if d.get("/v1/namespaces/bench/pods"):
                raise RuntimeError("pods left after DEL")
            progress(NAME, f"run {run_no + 1}/{s.runs}: ADD median "
                           f"{median(adds[-per_run:]) or 0:.1f} ms, DEL median "
                           f"{median(dels[-per_run:]) or 0:.1f} ms")
        d.stop()

    def per_run_medians(xs: list[float]) -> list[float | None]:
        return [median(xs[i:i + per_run]) for i in range(0, len(xs), per_run)]

    r.add("ADD median", "ms", per_run_medians(adds))
    r.add("DEL median", "ms", per_run_medians(dels))
    r.add("VERSION median (interpreter start)", "ms", per_run_medians(versions))
    r.check(f"ADD median of {count}", median(adds), "ms", "", None)
    r.check("ADD p90", percentile(adds, 90), "ms", "", None)
    r.check(f"DEL median of {count}", median(dels), "ms", "", None)
    r.check("DEL p90", percentile(dels, 90), "ms", "", None)
    r.check("VERSION median", median(versions), "ms", "", None)
    add, ver = median(adds), median(versions)
    r.check("ADD median beyond the interpreter's start",
            add - ver if add is not None and ver is not None else None, "ms", "", None)
    r.extra = {"namespaces": count, "add_ms": adds, "del_ms": dels, "version_ms": versions}
    return r


if __name__ == "__main__":
    from tests.bench.common import render

    print(render(run(Settings(runs=int(sys.argv[1]) if len(sys.argv) > 1 else 5))))
