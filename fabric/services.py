"""A namespace's services at run time: the shell around `fabric.service.Service` cores.

The cores live on the data-plane thread inside the router; this side keeps their
backends' readiness in step with the pods, probes backends from the gateway address
through the namespace's local stack, turns the cores' signals into events and runs the
`on_activate` / `on_idle` hooks (without a shell, with a timeout, output logged).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric.activator import ActivatorHost
from fabric.config import ServiceSpec
from fabric.service import Service, Signal

if TYPE_CHECKING:
    from fabric.namespace import Namespace

log = logging.getLogger("fabricd.services")

PROBE_TICK = 0.02
ACTIVE_PROBE_TICK = 0.001
MAX_PROBES_IN_FLIGHT = 4
POOL_SIZE = 32
PROBE_TIMEOUT = 1.0
HOOK_TIMEOUT = 60.0
# Shipped activators: activators/<name>/<name>.wasm beside the packages.
SHIPPED = Path(__file__).resolve().parent.parent / "activators"


class Services:
    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self.by_name: dict[str, Service] = {}
        self.specs: dict[str, ServiceSpec] = {}
        self._loop = asyncio.get_running_loop()
        self._probing: dict[tuple[str, str], int] = {}
        self._pool: list[Any] = []
        self._last_ok: dict[tuple[str, str], float] = {}
        self._probe_task: asyncio.Task[None] | None = None
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
        if any(s.readiness == "probe" for s in specs) and self._probe_task is None:
            self._probe_task = self._loop.create_task(self._probe_loop())

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

    def _remove(self, name: str) -> None:
        svc = self.by_name.pop(name)
        self.specs.pop(name)
        self.ns.dataplane.call(self.ns.router.remove_service, svc)
        for host in svc.activators.values():
            host.close()

    def close(self) -> None:
        for name in list(self.by_name):
            self._remove(name)
        if self._probe_task is not None:
            self._probe_task.cancel()
            self._probe_task = None
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

    async def _probe_loop(self) -> None:
        """TCP probes of backends marked ready, from the gateway address, so nothing is
        released to a backend whose port does not accept yet. While clients wait, a new
        probe starts every millisecond even if earlier ones are still in flight: the
        wake is only as late as the first probe after the port starts accepting."""
        while True:
            waiting = any(svc.held_packets for svc in self.by_name.values())
            await asyncio.sleep(ACTIVE_PROBE_TICK if waiting else PROBE_TICK)
            now = time.monotonic()
            for name, svc in list(self.by_name.items()):
                for backend, ip, port in self.ns.dataplane.call(svc.probes_due, now):
                    key = (name, backend)
                    if self._probing.get(key, 0) >= MAX_PROBES_IN_FLIGHT:
                        continue
                    self._probing[key] = self._probing.get(key, 0) + 1
                    t = self._loop.create_task(self._probe(svc, name, backend, ip, port))
                    self._tasks.add(t)
                    t.add_done_callback(self._tasks.discard)

    async def _socket(self) -> Any:
        """A TCP socket in the local stack, from a pool refilled in the background."""
        if not self._pool:
            stack = self.ns.local
            assert stack is not None
            self._pool.extend(await asyncio.to_thread(stack.tcp_sockets,
                                                      str(self.ns.spec.gateway), POOL_SIZE))
        return self._pool.pop()

    async def _probe(self, svc: Service, name: str, backend: str, ip: str,
                     port: int) -> None:
        started = time.monotonic()
        ok = False
        try:
            if self.ns.local is None:
                ok = True  # no local stack to probe from: trust the controller
            else:
                sock = await self._socket()
                try:
                    await asyncio.wait_for(self._loop.sock_connect(sock, (ip, port)),
                                           PROBE_TIMEOUT)
                    ok = True
                finally:
                    sock.close()
        except Exception:
            ok = False
        finally:
            left = self._probing.get((name, backend), 1) - 1
            if left > 0:
                self._probing[(name, backend)] = left
            else:
                self._probing.pop((name, backend), None)
        key = (name, backend)
        if ok:
            self._last_ok[key] = max(self._last_ok.get(key, 0.0), started)
        elif started <= self._last_ok.get(key, -1.0):
            return  # an older probe failing after a newer one succeeded says nothing
        if name in self.by_name and self.by_name[name] is svc:
            self.ns.dataplane.call(self.ns.router.probe_result, svc, backend, ok,
                                   time.monotonic())

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
