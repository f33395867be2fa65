"""Replay a capture through an activator: the real host, the real stream core, a fake clock.

The clock is the capture's: time 0 is its first packet, and every input happens at its
captured time (relative). Nothing reads the wall clock, so a replay gives the same
timeline every time (the one exception is the host's per-call deadline, a wall-clock
budget kept to catch a spinning guest; raise it with ``deadline_ms`` on a slow machine).

Packet (L3) activators get what the daemon's dispatch gives them (fabric.services.dispatch):
every packet to the service port, one ``packet`` event each, while the service has no ready
backend; once it has one, packets pass without the activator. A packet held (decision
``hold``, or none) activates the service, as the daemon's service core does. The daemon
sends L3 activators no ticks, so neither does the harness.

Stream activators (``fab_streams``) run under ``fabric.streams.core.StreamCore``, the sans-IO
core the daemon's front drives; streamrun.py plays the front. The capture's TCP
connections to the port are reassembled (tcpflows.py) and their clients replayed as
accepted connections, bytes and ends, each after the think time it had in the capture and
once it has received as many bytes as it had by then (or at its captured time with
``client_pacing="capture"``); the core's ticks run every 100 ms while streams live, as in
the daemon; upstream connections go to a simulated backend (backend.py) that becomes
ready at ``backend_ready_at``. The model and its limits: docs/activators.md, "Testing
with a capture".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fabric.activator.harness.capture import CaptureError, IPPacket, read_capture
from fabric.activator.harness.funcnames import function_names
from fabric.activator.harness.packetrun import PacketRun
from fabric.activator.harness.result import LOCAL_ANSWER_SUFFIX, HarnessError, Ready, Result
from fabric.activator.harness.run import Run
from fabric.activator.harness.streamrun import CLIENT_WAIT, HOLD_TIMEOUT, PACINGS, StreamRun
from fabric.activator.harness.tcpflows import syn_ports
from fabric.activator.host import ActivatorHost
from fabric.activator.loader import ActivatorError

__all__ = ["LOCAL_ANSWER_SUFFIX", "HarnessError", "Ready", "Result", "guess_port", "replay"]

HOLD_BYTES = 8 << 20  # the service's hold.bytes default


def guess_port(packets: list[IPPacket]) -> int:
    """The captured server's port: the destination of the capture's SYNs."""
    ports = syn_ports(packets)
    if len(ports) == 1:
        return next(iter(ports))
    if not ports:
        raise HarnessError("no TCP connection attempt (SYN) in the capture: "
                           "give the service port with --service-port")
    listed = ", ".join(f"{p} ({n} SYN)" for p, n in sorted(ports.items()))
    raise HarnessError(f"the capture has connections to several ports ({listed}): "
                       "choose one with --service-port")


def replay(wasm: str | Path, pcap: str | Path, *, service_port: int | None = None,
           backend_ready_at: str | float | Ready | None = None,
           backend_gone_at: float | None = None, config: dict[str, Any] | None = None,
           until: float | None = None, fuel_per_call: int | None = None,
           deadline_ms: int | None = None, client_pacing: str = "replies",
           client_wait: float = CLIENT_WAIT) -> Result:
    """Replay `pcap` through the activator `wasm` (see the module docstring).
    Raises HarnessError on bad input; guest failures are in the Result."""
    if client_pacing not in PACINGS:
        raise HarnessError(f"client pacing {client_pacing!r}: want one of {', '.join(PACINGS)}")
    if not math.isfinite(client_wait) or client_wait < 0:
        raise HarnessError(f"--client-wait {client_wait}: want SECONDS >= 0")
    if config is not None and not isinstance(config, dict):
        raise HarnessError("--config must be a JSON object")
    ready = backend_ready_at if isinstance(backend_ready_at, Ready) else Ready.parse(
        backend_ready_at)
    if backend_gone_at is not None:
        if not math.isfinite(backend_gone_at) or backend_gone_at < 0:
            raise HarnessError(f"--backend-gone-at {backend_gone_at}: want SECONDS >= 0")
        ready.gone_at = float(backend_gone_at)
    try:
        cap = read_capture(pcap)
    except CaptureError as e:
        raise HarnessError(str(e)) from None
    packets = cap.packets
    if not packets:
        raise HarnessError(f"{pcap}: no IPv4 packets in the capture")
    port = service_port if service_port is not None else guess_port(packets)
    if not 0 < port < 65536:
        raise HarnessError(f"--service-port {port}: not a port number")
    kw: dict[str, Any] = {}
    if fuel_per_call is not None:
        kw["fuel_per_call"] = fuel_per_call
    if deadline_ms is not None:
        kw["deadline_ms"] = deadline_ms
    try:
        probe = ActivatorHost(wasm, {}, label=Path(wasm).name, **kw)
    except ActivatorError as e:
        raise HarnessError(str(e)) from None
    except OSError as e:
        raise HarnessError(f"{wasm}: {e.strerror or e}") from None
    stream = probe.streams
    cfg = dict(config or {})
    if stream:  # the keys the daemon adds (fabric.services.manager._config)
        cfg.setdefault("port", port)
        cfg.setdefault("target_port", port)
        cfg.setdefault("hold_timeout_ms", int(HOLD_TIMEOUT * 1000))
        cfg.setdefault("hold_bytes", HOLD_BYTES)
    probe.close()
    host = ActivatorHost(wasm, cfg, label=Path(wasm).name, **kw)
    names = function_names(Path(wasm).read_bytes())
    t0 = packets[0].ts
    try:
        if stream:
            run: Run = StreamRun(host, port, packets, t0, ready, names, client_pacing,
                                   client_wait)
        else:
            run = PacketRun(host, port, packets, t0, ready, names)
        run.go(until)
        rec = run.rec
        stats = {k: v for k, v in vars(host.stats).items()}
        return Result(str(wasm), str(pcap), port, "stream" if stream else "packet",
                      run.records, run.need_history, rec.counters, rec.failures,
                      run.wake_at is not None, run.wake_at, run.ready_time, run.gone_time,
                      dict(run.to_clients), stats, run.core_counters(), len(packets),
                      run.connections, rec.max_fuel)
    finally:
        host.close()
