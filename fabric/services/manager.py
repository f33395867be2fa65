"""A namespace's services at run time: the shell around `fabric.services.core.Service` cores.

The cores live on the data-plane thread inside the router; this side keeps their
backends' readiness in step with the pods, probes backends from the gateway address
through the namespace's local stack, turns the cores' signals into events and runs the
`on_activate` / `on_idle` hooks (without a shell, with a timeout, output logged).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import shlex
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric.activator.host import ActivatorHost
from fabric.config.specs import ServiceSpec
from fabric.services.core import Service, Signal

if TYPE_CHECKING:
    from fabric.runtime.namespace import Namespace

log = logging.getLogger("fabricd.services")

MAX_PROBES_IN_FLIGHT = 4
POOL_SIZE = 32
PROBE_TIMEOUT = 1.0
HOOK_TIMEOUT = 60.0
# Shipped activators: activators/<name>/<name>.wasm beside the packages.
SHIPPED = Path(__file__).resolve().parents[2] / "activators"


class Services:
    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self.by_name: dict[str, Service] = {}
        self.specs: dict[str, ServiceSpec] = {}
        self._loop = asyncio.get_running_loop()
        self._probing: dict[tuple[str, str], int] = {}
        self._pool: list[Any] = []
        self._inflight: dict[int, tuple[Any, Service, str, str, float]] = {}
        self._refilling = False
        self._ticking = False
        self._last_ok: dict[tuple[str, str], float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        ns.dataplane.call(setattr, ns.router, "on_signal", self._signal_from_dataplane)

    # --- spec ----------------------------------------------------------------------------

    def apply(self, specs: tuple[ServiceSpec, ...]) -> None:
        """Make the services equal to `specs`; a changed service is rebuilt (its held
        packets are dropped and counted by its old core)."""
        wanted = {s.name: s for s in specs}
        for name in list(self.by_name):
            if name not in wanted or wanted[name] != self.specs[name]:
                self._remove(name)
        for spec in specs:
            if spec.name not in self.by_name:
                self._add(spec)
        if any(s.readiness == "probe" for s in specs) and not self._ticking:
            self._ticking = True
            self._want_sockets()
            self.ns.dataplane.call(self.ns.dataplane.fast_tickers.append, self._probe_tick)

    def _add(self, spec: ServiceSpec) -> None:
        svc = Service.from_spec(spec, now=time.monotonic())
        for p in spec.ports:
            if p.activator != "none":
                host = self._activator(spec, p.port, p.activator, p.activator_config)
                if host is not None:
                    svc.activators[(p.port, 6 if p.protocol == "tcp" else 17)] = host
        dp = self.ns.dataplane
        dp.call(self.ns.router.add_service, svc)
        self.by_name[spec.name] = svc
        self.specs[spec.name] = spec
        for b in spec.backends:
            self.sync_backend(b)
        log.info("namespace %s: service %s at %s (%s)", self.ns.name, spec.name, spec.ip,
                 ", ".join(f"{p.port}->{p.target_port}/{p.protocol}" for p in spec.ports))

    def _activator(self, spec: ServiceSpec, port: int, name: str,
                   config: Any) -> ActivatorHost | None:
        """The activator host of a service port: a shipped one by name, or a .wasm path.
        One that cannot be loaded is logged and the port holds and activates without."""
        path = Path(name) if name.endswith(".wasm") else SHIPPED / name / f"{name}.wasm"
        try:
            cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
            host = ActivatorHost(path, cfg, label=f"{self.ns.name}/{spec.name}:{port}")
        except Exception as e:  # a bad module must never take the namespace down
            log.error("namespace %s: service %s port %d: activator %s unusable (%s); "
                      "holding and activating without it", self.ns.name, spec.name, port,
                      name, e)
            self.ns.bus.emit("activator_failed", self.ns.name, None, service=spec.name,
                             port=port, error=str(e))
            return None
        log.info("namespace %s: service %s port %d: activator %s", self.ns.name, spec.name,
                 port, path)
        return host

    def _stop_probes(self) -> None:
        """On the data-plane thread: no more ticks, in-flight probes closed."""
        if self._probe_tick in self.ns.dataplane.fast_tickers:
            self.ns.dataplane.fast_tickers.remove(self._probe_tick)
        for fd, p in list(self._inflight.items()):
            self.ns.dataplane.remove_fd_here(fd)
            p[0].close()
        self._inflight.clear()

    def _remove(self, name: str) -> None:
        svc = self.by_name.pop(name)
        self.specs.pop(name)
        self.ns.dataplane.call(self.ns.router.remove_service, svc)
        for host in svc.activators.values():
            host.close()

    def close(self) -> None:
        for name in list(self.by_name):
            self._remove(name)
        if self._ticking:
            self._ticking = False
            self.ns.dataplane.call(self._stop_probes)
        for t in list(self._tasks):
            t.cancel()
        for sock in self._pool:
            sock.close()
        self._pool.clear()

    # --- backends ------------------------------------------------------------------------

    def sync_backend(self, pod_name: str) -> None:
        """A pod's readiness or attachment changed: tell every service it backs."""
        state = self.ns.pods.get(pod_name)
        for name, spec in self.specs.items():
            if pod_name not in spec.backends:
                continue
            svc = self.by_name[name]
            pod = self.ns.spec.pod(pod_name)
            if pod is None:
                continue
            ready = bool(state is not None and state.ready and
                         (state.port is not None or pod.kind == "remote"))
            now = time.monotonic()
            self.ns.dataplane.call(self.ns.router.set_backend, svc, pod_name, str(pod.ip),
                                   ready, now)
            if ready and pod.kind == "remote":
                # Our gateway address is also the other worker's: a probe's answer would
                # stay there. A backend on another worker is ready on the controller's
                # word alone (its own worker is where it could be probed).
                self.ns.dataplane.call(self.ns.router.probe_result, svc, pod_name, True, now)

    # --- probes (on the data-plane thread) ---------------------------------------------

    def _probe_tick(self, now: float) -> bool:
        """On the data-plane thread, every loop turn: start due probes as non-blocking
        connects from pooled local-stack sockets, expire stuck ones. A probe's SYN, the
        backend's answer and the release of held packets then all happen on this thread,
        often in the same loop turn. True while clients wait (turn fast)."""
        waiting = False
        inflight = self._inflight
        if inflight:
            for fd, p in list(inflight.items()):
                if now - p[4] > PROBE_TIMEOUT:
                    self._probe_done(fd, False, now)
        for name, svc in list(self.by_name.items()):
            if svc.held_packets:
                waiting = True
            if not svc.backends:
                continue
            for backend, ip, port in svc.probes_due(now):
                key = (name, backend)
                if self._probing.get(key, 0) >= MAX_PROBES_IN_FLIGHT:
                    continue
                if self.ns.local is None:
                    self.ns.router.probe_result(svc, backend, True, now)
                    continue
                if not self._pool:
                    self._want_sockets()
                    break
                sock = self._pool.pop()
                err = sock.connect_ex((ip, port))
                if err not in (0, errno.EINPROGRESS):
                    sock.close()
                    self._record(svc, name, backend, False, now, now)
                    continue
                self._probing[key] = self._probing.get(key, 0) + 1
                fd = sock.fileno()
                inflight[fd] = (sock, svc, name, backend, now)
                self.ns.dataplane.add_writer_here(fd, lambda fd=fd: self._writable(fd),
                                                  "probe")
        if len(self._pool) < POOL_SIZE // 2:
            self._want_sockets()
        return waiting

    def _writable(self, fd: int) -> None:
        p = self._inflight.get(fd)
        if p is None:
            return
        err = p[0].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._probe_done(fd, err == 0, time.monotonic())

    def _probe_done(self, fd: int, ok: bool, now: float) -> None:
        sock, svc, name, backend, started = self._inflight.pop(fd)
        self.ns.dataplane.remove_fd_here(fd)
        sock.close()
        key = (name, backend)
        left = self._probing.get(key, 1) - 1
        if left > 0:
            self._probing[key] = left
        else:
            self._probing.pop(key, None)
        self._record(svc, name, backend, ok, started, now)

    def _record(self, svc: Service, name: str, backend: str, ok: bool, started: float,
                now: float) -> None:
        key = (name, backend)
        if ok:
            self._last_ok[key] = max(self._last_ok.get(key, 0.0), started)
        elif started <= self._last_ok.get(key, -1.0):
            return  # an older probe failing after a newer one succeeded says nothing
        if self.by_name.get(name) is svc:
            self.ns.router.probe_result(svc, backend, ok, now)

    def _want_sockets(self) -> None:
        if not self._refilling:
            self._refilling = True
            try:
                self._loop.call_soon_threadsafe(self._start_refill)
            except RuntimeError:
                self._refilling = False

    def _start_refill(self) -> None:
        t = self._loop.create_task(self._refill())
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _refill(self) -> None:
        try:
            stack = self.ns.local
            if stack is not None:
                socks = await asyncio.to_thread(stack.tcp_sockets, str(self.ns.spec.gateway),
                                                POOL_SIZE)
                self._pool.extend(socks)
        except Exception as e:
            log.warning("namespace %s: no sockets for probes: %s", self.ns.name, e)
        finally:
            self._refilling = False

    # --- signals and hooks ---------------------------------------------------------------

    def _signal_from_dataplane(self, service: str, sig: Signal) -> None:
        try:
            self._loop.call_soon_threadsafe(self._signal, service, sig)
        except RuntimeError:  # the loop is gone: the daemon is stopping
            pass

    def _signal(self, service: str, sig: Signal) -> None:
        flow = str(sig.flow) if sig.flow is not None else None
        self.ns.bus.emit(sig.kind, self.ns.name, None, service=service, reason=sig.reason,
                         flow=flow)
        log.info("namespace %s: service %s: %s (%s%s)", self.ns.name, service, sig.kind,
                 sig.reason, f", first flow {flow}" if flow else "")
        spec = self.specs.get(service)
        if spec is None:
            return
        cmd = spec.on_activate if sig.kind == "activate" else spec.on_idle
        if cmd:
            t = self._loop.create_task(self._hook(service, sig.kind, cmd))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _hook(self, service: str, kind: str, cmd: str) -> None:
        env = {**os.environ, "FABRIC_NAMESPACE": self.ns.name, "FABRIC_SERVICE": service,
               "FABRIC_EVENT": kind}
        try:
            proc = await asyncio.create_subprocess_exec(
                *shlex.split(cmd), env=env, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            log.error("namespace %s: service %s: %s hook %r failed to start: %s",
                      self.ns.name, service, kind, cmd, e)
            self.ns.bus.emit("hook_failed", self.ns.name, None, service=service, hook=kind,
                             error=str(e))
            return
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), HOOK_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.error("namespace %s: service %s: %s hook %r killed after %.0fs",
                      self.ns.name, service, kind, cmd, HOOK_TIMEOUT)
            self.ns.bus.emit("hook_failed", self.ns.name, None, service=service, hook=kind,
                             error="timeout")
            return
        for line in out.decode(errors="replace").splitlines()[-20:]:
            log.info("namespace %s: service %s: %s hook: %s", self.ns.name, service, kind,
                     line)
        if proc.returncode:
            log.warning("namespace %s: service %s: %s hook %r exited with %d", self.ns.name,
                        service, kind, cmd, proc.returncode)
            self.ns.bus.emit("hook_failed", self.ns.name, None, service=service, hook=kind,
                             error=f"exit {proc.returncode}")

    # --- views ---------------------------------------------------------------------------

    def views(self) -> list[dict[str, Any]]:
        rows = []
        for svc in self.by_name.values():
            row = self.ns.dataplane.call(svc.status)
            row["activators"] = {
                str(port) + ("" if proto == 6 else "/udp"):
                    {"module": host.label, **dataclasses.asdict(host.stats)}
                for (port, proto), host in svc.activators.items()}
            rows.append({"namespace": self.ns.name, **row})
        return rows
