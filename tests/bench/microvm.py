"""`microvm`: waking a paused microVM behind a service, as examples/worker.py does it.

The worker (an embedded `Fabric`, QEMU with TCG here or KVM where it runs guests, one VM
of 128 MiB and one vCPU booted from Debian's kernel and the project's initramfs) runs in
a worker namespace with a client pod; the service idles after 1 s and the worker pauses
the VM (QMP `stop`). Each wake: the client (a Python socket client; its clock is
CLOCK_MONOTONIC, as the worker's) connects to the service and sends a GET; the fabric
holds the SYN and emits `activate`; the worker resumes the VM (QMP `cont`); the fabric's
probe sees the guest's port accept and releases the held SYN; the guest answers. 4 wakes
per run (20 with the default 5 runs).

Reported, medians over the wakes: request to first byte; resume (VM running) to first
byte; and the fabric's share: from the client's connect to the `activate` event in the
worker (the SYN through the fabric, held, the signal to the event loop, the events
stream), plus from the probe's accept to the held packets released. Target: the share at
most 1 ms. The rest is the VMM's and the guest's (TCG is slow: a translated kernel).
Then the second mode (`--snapshot`: asleep in a file, QEMU gone): one restore wake per
run, request to VM running and to first byte.
"""

from __future__ import annotations

import os
import signal
import sys

from fabric.tools.sandbox import Sandbox, prerequisites
from tests.bench.common import Report, Settings, median, percentile, progress
from tests.support import microvm as mv

NAME = "microvm"
PER_RUN = 4
IDLE = "1s"


def _stop(out: mv.Lines) -> None:
    if out.p.poll() is None:
        os.killpg(out.p.pid, signal.SIGTERM)
        out.p.wait(60)


def _restores(sb: Sandbox, worker: str, client: str, s: Settings,
              restore_total: list[float], restore_running: list[float]) -> None:
    """Asleep in a snapshot file (QEMU gone), restored on demand: request to VM running
    and to first byte, once per run."""
    out = mv.start_worker(sb, worker, client, "bench", "10.53.0.0/24",
                          os.path.join(sb.tmp, "vms-snap"), IDLE, "--snapshot")
    try:
        out.wait("ready", mv.BOOT_TIMEOUT)
        # booted and paused: one wake and idle puts it into its snapshot
        mv.http_get(sb, client, "web", "/")
        out.wait("idle", 60)
        for run_no in range(s.runs):
            g = mv.http_get(sb, client, "web", "/")
            act = out.wait("activate", 60)
            out.wait("woken", 60)
            t0, t_first = float(g["start"]), float(g["first_byte"])  # type: ignore[arg-type]
            restore_total.append((t_first - t0) * 1e3)
            restore_running.append((act["t_running"] - t0) * 1e3)
            out.wait("idle", 60)
            progress(NAME, f"restore {run_no + 1}/{s.runs}: first byte "
                           f"{restore_total[-1]:.0f} ms")
    finally:
        _stop(out)


def run(s: Settings) -> Report:
    why = prerequisites() or mv.skip_reason()
    if why:
        raise RuntimeError(why)
    per_run = PER_RUN
    r = Report(NAME, "a microVM woken by a request to its service (examples/worker.py: "
                     "QMP stop/cont on idle/activate; then restored from a snapshot)")
    total: list[float] = []
    after_resume: list[float] = []
    share: list[float] = []
    event_lag: list[float] = []
    release: list[float] = []
    restore_total: list[float] = []
    restore_running: list[float] = []
    with Sandbox("fbb") as sb:
        worker, client = sb.netns("worker"), sb.netns("client")
        out = mv.start_worker(sb, worker, client, "bench", "10.53.0.0/24",
                              os.path.join(sb.tmp, "vms"), IDLE)
        try:
            vm = out.wait("vm", 60)
            out.wait("ready", mv.BOOT_TIMEOUT)
            progress(NAME, f"VM booted ({vm['accel']})")
            for run_no in range(s.runs):
                for _ in range(per_run):
                    g = mv.http_get(sb, client, "web", "/")
                    if g["body"] != "hello from the microVM\n":
                        raise RuntimeError(f"unexpected answer {g['body']!r}")
                    act = out.wait("activate", 30)
                    woken = out.wait("woken", 30)
                    t0, t_first = float(g["start"]), float(g["first_byte"])  # type: ignore[arg-type]
                    total.append((t_first - t0) * 1e3)
                    after_resume.append((t_first - act["t_running"]) * 1e3)
                    event_lag.append((act["t_event"] - t0) * 1e3)
                    release.append(woken["release_ms"])
                    share.append(event_lag[-1] + release[-1])
                    out.wait("idle", 30)  # paused again before the next wake
                progress(NAME, f"run {run_no + 1}/{s.runs}: first byte median "
                               f"{median(total[-per_run:]) or 0:.1f} ms, fabric's share "
                               f"{median(share[-per_run:]) or 0:.2f} ms")
        finally:
            _stop(out)
        # the second mode: asleep in a snapshot file (QEMU gone), restored on demand; a
        # second boot under TCG, so --quick leaves it out
        if s.quick:
            r.notes.append("--quick: the snapshot restore was not measured")
        else:
            _restores(sb, worker, client, s, restore_total, restore_running)

    def per_run_medians(xs: list[float]) -> list[float | None]:
        return [median(xs[i:i + per_run]) for i in range(0, len(xs), per_run)]

    n = len(total)
    r.add("request to first byte", "ms", per_run_medians(total))
    r.add("VM running to first byte", "ms", per_run_medians(after_resume))
    r.add("fabric: connect to activate event in the worker", "ms", per_run_medians(event_lag))
    r.add("fabric: probe accepted to held packets released", "ms", per_run_medians(release))
    r.check(f"request to first byte, median of {n} wakes", median(total), "ms", "", None)
    r.check("request to first byte p90", percentile(total, 90), "ms", "", None)
    r.check("VM running to first byte, median", median(after_resume), "ms", "", None)
    r.add("restore from a snapshot: request to VM running", "ms", restore_running)
    r.add("restore from a snapshot: request to first byte", "ms", restore_total)
    r.check(f"restore: request to first byte, median of {len(restore_total)}",
            median(restore_total), "ms", "", None)
    m = median(share)
    r.check("the fabric's share, median", m, "ms", "<= 1 ms", m is not None and m <= 1.0)
    r.extra = {"wakes": n, "accel": vm.get("accel"), "total_ms": total,
               "after_resume_ms": after_resume, "event_lag_ms": event_lag,
               "release_ms": release, "restore_total_ms": restore_total,
               "restore_running_ms": restore_running}
    return r


if __name__ == "__main__":
    from tests.bench.common import render

    print(render(run(Settings(runs=int(sys.argv[1]) if len(sys.argv) > 1 else 5))))
