"""A namespace's services on the event loop: specs in, events and hooks out.

The service cores, their dispatch and their probes live on the data-plane thread; this
side only talks to them through ``call`` (DataPlane.call). It turns specs into cores
(with their activators), keeps backends in step with the pods (``sync_backend``), turns
the signals the data plane queued into events and runs the ``on_activate`` / ``on_idle``
hooks (fabric.services.hooks), and builds the views of ``fabricd get services``.

Narrow collaborators instead of the whole namespace: the data-plane call, the dispatch
and probe runner it adds services to, the signal queue it drains, an event emitter, and
a lookup of a backend pod's state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

from fabric.activator.host import ActivatorHost
from fabric.config.specs import ServiceSpec
from fabric.services.core import Service
from fabric.services.demand import Signal
from fabric.services.dispatch import Activator, ServiceDispatch, SignalQueue
from fabric.services.hooks import HookRunner
from fabric.services.probes import ProbeRunner

log = logging.getLogger("fabricd.services")

T = TypeVar("T")


class DataPlaneCalls(Protocol):
    """How this side reaches the data plane (fabric.runtime.dataplane.DataPlane)."""

    def post(self, fn: Callable[..., Any], *args: Any) -> None: ...

    async def acall(self, fn: Callable[..., T], *args: Any, timeout: float = ...) -> T: ...

Emit = Callable[..., None]


class BackendState(NamedTuple):
    """What a service needs to know of a backend pod."""

    ip: str
    ready: bool  # marked ready by the controller and able to take traffic (attached)
    remote: bool  # on another worker: ready on the controller's word alone


def shipped_activator(name: str) -> Path:
    """The .wasm of an activator shipped with fabricd (activators/<name>/<name>.wasm)."""
    return Path(str(resources.files("activators") / name / f"{name}.wasm"))


class ServiceManager:
    """The event-loop side of one namespace's services (see module docstring)."""

    def __init__(self, namespace: str, dataplane: DataPlaneCalls, dispatch: ServiceDispatch,
                 probes: ProbeRunner, signals: SignalQueue, emit: Emit,
                 backend: Callable[[str], BackendState | None]) -> None:
        self.namespace = namespace
        self.dataplane = dataplane
        self._post = dataplane.post
        self.dispatch = dispatch
        self.probes = probes
        self.signals = signals
        self._emit = emit
        self._backend = backend
        self.by_name: dict[str, Service] = {}
        self.specs: dict[str, ServiceSpec] = {}
        self.hosts: dict[str, dict[tuple[int, int], ActivatorHost]] = {}
        self._loop = asyncio.get_running_loop()
        self.hooks = HookRunner(namespace, emit, started=self._hook_started)
        self._loop.add_reader(signals.fd, self._on_signals)

    # --- specs ---------------------------------------------------------------------------

    async def add(self, spec: ServiceSpec) -> None:
        hosts: dict[tuple[int, int], ActivatorHost] = {}
        for p in spec.ports:
            if p.activator != "none":
                host = await self._activator(spec, p.port, p.activator, p.activator_config)
                if host is not None:
                    hosts[(p.port, 6 if p.protocol == "tcp" else 17)] = host
        activators: dict[tuple[int, int], Activator] = dict(hosts)
        svc = Service.from_spec(spec, now=time.monotonic())
        self._post(self.dispatch.add, svc, activators)
        self.by_name[spec.name] = svc
        self.specs[spec.name] = spec
        self.hosts[spec.name] = hosts
        for b in spec.backends:
            self.sync_backend(b)
        log.info("namespace %s: service %s at %s (%s)", self.namespace, spec.name, spec.ip,
                 ", ".join(f"{p.port}->{p.target_port}/{p.protocol}" for p in spec.ports))

    def remove(self, name: str) -> None:
        """Forget a service (its held packets are dropped and counted by its core)."""
        svc = self.by_name.pop(name)
        self.specs.pop(name)
        self.hooks.forget(name)
        self._post(self._remove_here, svc, list(self.hosts.pop(name, {}).values()))

    def _remove_here(self, svc: Service, hosts: list[ActivatorHost]) -> None:
        """On the data-plane thread, which may be inside an activator until then."""
        self.dispatch.remove(svc)
        self.probes.forget(svc)
        for host in hosts:
            host.close()

    async def _activator(self, spec: ServiceSpec, port: int, name: str,
                         config: Any) -> ActivatorHost | None:
        """The activator host of a service port: a shipped one by name, or a .wasm path,
        read, checked and compiled in a worker thread (never on the event loop: compiling
        takes up to seconds). One that cannot be loaded is logged and the port holds and
        activates without. The guest may name again as many packets as the service holds
        (``max_held``: how many actions of an answer are read beyond its per-call share)."""
        path = Path(name) if name.endswith(".wasm") else shipped_activator(name)
        try:
            cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
            host = await asyncio.to_thread(ActivatorHost, path, cfg,
                                           max_held=spec.hold.packets,
                                           label=f"{self.namespace}/{spec.name}:{port}")
        except Exception as e:  # a bad module must never take the namespace down
            log.error("namespace %s: service %s port %d: activator %s unusable (%s); "
                      "holding and activating without it", self.namespace, spec.name, port,
                      name, e)
            self._emit("activator_failed", self.namespace, None, service=spec.name,
                       port=port, error=str(e))
            return None
        log.info("namespace %s: service %s port %d: activator %s", self.namespace,
                 spec.name, port, path)
        return host

    def close(self) -> None:
        for name in list(self.by_name):
            self.remove(name)
        self._loop.remove_reader(self.signals.fd)
        self.hooks.close()

    # --- backends ------------------------------------------------------------------------

    def sync_backend(self, pod_name: str) -> None:
        """A pod's readiness, attachment or existence changed: tell every service it backs."""
        state = self._backend(pod_name)
        for name, spec in self.specs.items():
            if pod_name not in spec.backends:
                continue
            svc = self.by_name[name]
            now = time.monotonic()
            if state is None:
                self._post(self.dispatch.remove_backend, svc, pod_name, now)
                continue
            self._post(self.dispatch.set_backend, svc, pod_name, state.ip, state.ready, now)
            if state.ready and state.remote:
                # Our gateway address is also the other worker's: a probe's answer would
                # stay there. A backend on another worker is ready on the controller's
                # word alone (its own worker is where it could be probed).
                self._post(self.dispatch.probe_result, svc, pod_name, True, now)

    # --- signals and hooks -----------------------------------------------------------------

    def _on_signals(self) -> None:
        for service, sig in self.signals.drain():
            self.signal(service, sig)

    def signal(self, service: str, sig: Signal) -> None:
        flow = str(sig.flow) if sig.flow is not None else None
        self._emit(sig.kind, self.namespace, None, service=service, reason=sig.reason,
                   flow=flow)
        log.info("namespace %s: service %s: %s (%s%s)", self.namespace, service, sig.kind,
                 sig.reason, f", first flow {flow}" if flow else "")
        spec = self.specs.get(service)
        if spec is None:
            return
        cmd = spec.on_activate if sig.kind == "activate" else spec.on_idle
        if cmd:
            self.hooks.submit(service, sig.kind, cmd)

    def _hook_started(self, service: str, kind: str, t: float) -> None:
        svc = self.by_name.get(service)
        if kind == "activate" and svc is not None:
            self._post(svc.hook_started, t)

    # --- views ---------------------------------------------------------------------------

    async def views(self) -> list[dict[str, Any]]:
        """A row per service for `fabricd get services`, read on the data-plane thread;
        the hooks' counts are this side's."""
        rows = list(await self.dataplane.acall(self._views_here))
        for row in rows:
            row["hooks"] = dataclasses.asdict(self.hooks.stats(row["name"]))
            row["hooks"]["running"] = self.hooks.busy(row["name"])
        return rows

    def _views_here(self) -> list[dict[str, Any]]:
        rows = []
        for name, svc in self.by_name.items():
            row = svc.status()
            row["activators"] = {
                str(port) + ("" if proto == 6 else "/udp"):
                    {"module": host.label, **dataclasses.asdict(host.stats)}
                for (port, proto), host in self.hosts.get(name, {}).items()}
            rows.append({"namespace": self.namespace, **row})
        return rows
