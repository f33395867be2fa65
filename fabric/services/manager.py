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
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

from fabric.activator.host import ActivatorHost
from fabric.config.specs import PortSpec, ServiceSpec
from fabric.errors import FabricError, NotFound
from fabric.net.sockpool import SocketPool
from fabric.services.core import Service
from fabric.services.demand import Signal
from fabric.services.dispatch import Activator, ServiceDispatch, SignalQueue, StreamWatch
from fabric.services.hooks import HookRunner
from fabric.services.probes import ProbeRunner
from fabric.streams.core import StreamCore
from fabric.streams.front import DataPlaneHost, StreamFront, default_thread
from fabric.streams.podlocal import PodLocal

log = logging.getLogger("fabricd.services")

# Upstream sockets of a stream port made at once when its pool ran dry (each batch is one
# call onto the local stack's thread).
UPSTREAM_BATCH = 128

T = TypeVar("T")


class DataPlaneCalls(Protocol):
    """How this side reaches the data plane (fabric.runtime.dataplane.DataPlane)."""

    def post(self, fn: Callable[..., Any], *args: Any) -> None: ...

    async def acall(self, fn: Callable[..., T], *args: Any, timeout: float = ...) -> T: ...

Emit = Callable[..., None]


class Stack(Protocol):
    """The local stack, as stream ports use it (fabric.ports.localstack.LocalStack)."""

    def add_address(self, ip: str, prefixlen: int = 32) -> None: ...

    def remove_address(self, ip: str, prefixlen: int = 32) -> None: ...

    def listen_tcp(self, ip: str, port: int, backlog: int = 1024) -> socket.socket: ...

    def tcp_sockets(self, src_ip: str, count: int) -> list[socket.socket]: ...

    def tcp_sockets_later(self, src_ip: str, count: int) -> Future[list[socket.socket]]: ...


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
                 backend: Callable[[str], BackendState | None],
                 stack: Stack | None = None, pod_local: PodLocal | None = None) -> None:
        self.namespace = namespace
        self.stack = stack  # where stream ports are terminated (none: they cannot be)
        # The netns pods stream ports with `upstream: pod-local` may connect from inside
        self.pod_local = pod_local
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
        self.fronts: dict[str, dict[int, StreamFront]] = {}
        # Where stream fronts run (fabric.streams.front): the data plane or this loop.
        self.stream_thread = default_thread()
        self._removing: dict[str, asyncio.Future[None]] = {}  # VIPs leaving the stack
        self._loop = asyncio.get_running_loop()
        self.hooks = HookRunner(namespace, emit, started=self._hook_started,
                                ended=self._hook_ended)
        self._loop.add_reader(signals.fd, self._on_signals)

    # --- specs ---------------------------------------------------------------------------

    async def add(self, spec: ServiceSpec) -> None:
        hosts: dict[tuple[int, int], ActivatorHost] = {}
        fronts: dict[int, StreamFront] = {}
        for p in spec.ports:
            if p.activator == "none":
                continue
            host = await self._activator(spec, p)
            if host is None:
                continue
            if host.streams:
                front = await self._stream_front(spec, p, host)
                if front is not None:
                    fronts[p.port] = front
                    hosts[(p.port, 6)] = host
                else:
                    host.close()
                continue
            if p.max_connections_per_client:
                log.warning("namespace %s: service %s port %d: max_connections_per_client "
                            "applies to stream activators; %s is a packet activator, so it "
                            "is ignored", self.namespace, spec.name, p.port, p.activator)
            hosts[(p.port, 6 if p.protocol == "tcp" else 17)] = host
        activators: dict[tuple[int, int], Activator] = {
            k: h for k, h in hosts.items() if k[0] not in fronts or k[1] != 6}
        svc = Service.from_spec(spec, now=time.monotonic())
        watch = None
        if fronts:
            loop = self._loop
            name = spec.name
            watch = StreamWatch(
                frozenset(fronts),
                frozenset(p.target_port for p in spec.ports if p.port in fronts),
                lambda ready: loop.call_soon_threadsafe(self._stream_backends, name, ready))
        self._post(self.dispatch.add, svc, activators, watch)
        self.by_name[spec.name] = svc
        self.specs[spec.name] = spec
        self.hosts[spec.name] = hosts
        self.fronts[spec.name] = fronts
        for b in spec.backends:
            self.sync_backend(b)
        log.info("namespace %s: service %s at %s (%s)", self.namespace, spec.name, spec.ip,
                 ", ".join(f"{p.port}->{p.target_port}/{p.protocol}" for p in spec.ports))

    def remove(self, name: str) -> None:
        """Forget a service (its held packets are dropped and counted by its core, its
        streams closed)."""
        svc = self.by_name.pop(name)
        spec = self.specs.pop(name)
        self.hooks.forget(name)
        fronts = self.fronts.pop(name, {})
        for front in fronts.values():
            front.close()
        if fronts and self.stack is not None:
            stack = self.stack
            vip = str(spec.ip)
            self._removing[vip] = self._loop.run_in_executor(None, _quietly,
                                                             stack.remove_address, vip)
        self._post(self._remove_here, svc, list(self.hosts.pop(name, {}).values()))

    def _remove_here(self, svc: Service, hosts: list[ActivatorHost]) -> None:
        """On the data-plane thread, which may be inside an activator until then."""
        self.dispatch.remove(svc)
        self.probes.forget(svc)
        for host in hosts:
            host.close()

    async def _activator(self, spec: ServiceSpec, p: PortSpec) -> ActivatorHost | None:
        """The activator host of a service port: a shipped one by name, or a .wasm path,
        read, checked and compiled in a worker thread (never on the event loop: compiling
        takes up to seconds). One that cannot be loaded is logged and the port holds and
        activates without. The guest may name again as many packets as the service holds
        (``max_held``: how many actions of an answer are read beyond its per-call share).
        The config gets the port's facts unless it sets them (ABI.md, "Streams")."""
        name, port = p.activator, p.port
        path = Path(name) if name.endswith(".wasm") else shipped_activator(name)
        try:
            cfg = _config(spec, p)
            host = await asyncio.to_thread(ActivatorHost, path, cfg,
                                           max_held=spec.hold.packets,
                                           memory_limit=p.activator_memory,
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

    async def _stream_front(self, spec: ServiceSpec, p: PortSpec,
                            host: ActivatorHost) -> StreamFront | None:
        """Terminate a stream activator's port in the local stack: the VIP is added there
        and VIP:port listened on; upstream connections leave from the VIP (with
        `upstream: pod-local`, from inside the backend pod when it can be entered)."""
        stack = self.stack
        where = f"namespace {self.namespace}: service {spec.name} port {p.port}"
        if stack is None or p.protocol != "tcp":
            why = "it is not TCP" if p.protocol != "tcp" else "the namespace has no local stack"
            log.error("%s: activator %s works on streams, but %s; holding and activating "
                      "without it", where, p.activator, why)
            self._emit("activator_failed", self.namespace, None, service=spec.name,
                       port=p.port, error=f"stream activator: {why}")
            return None
        vip = str(spec.ip)
        removing = self._removing.pop(vip, None)
        if removing is not None:  # the same VIP of a service just removed (a re-apply)
            await removing
        try:
            await asyncio.to_thread(stack.add_address, vip)
            listener = await asyncio.to_thread(stack.listen_tcp, vip, p.port)
        except Exception as e:
            log.error("%s: cannot listen on %s:%d in the local stack (%s); holding and "
                      "activating without the activator", where, vip, p.port, e)
            self._emit("activator_failed", self.namespace, None, service=spec.name,
                       port=p.port, error=str(e))
            return None
        pool = SocketPool(lambda n: stack.tcp_sockets_later(vip, n), what="upstreams")
        pool.refill()

        def upstream_socket() -> Any:
            sock = pool.take()
            if sock is None:  # a burst (a wake storm): one cross-thread call for a batch
                try:
                    socks = stack.tcp_sockets(vip, UPSTREAM_BATCH)
                except Exception as e:  # the stack is closing
                    log.warning("%s: no socket for an upstream connection: %s", where, e)
                    return None
                sock = socks.pop()
                pool.add(socks)
            return sock

        core = StreamCore(host, p.port, p.target_port, hold_timeout=spec.hold.timeout,
                          label=host.label, release_burst=spec.hold.release_burst,
                          release_interval=spec.hold.release_interval,
                          max_per_client=p.max_connections_per_client)
        name, port = spec.name, p.port
        dp: DataPlaneHost | None = None
        if self.stream_thread == "dataplane":
            dp = self.dataplane  # type: ignore[assignment]
        pod_local = self.pod_local if p.upstream == "pod-local" else None
        front = StreamFront(core, listener, upstream_socket,
                            lambda need: self._stream_need(name, port, need),
                            f"namespace {self.namespace}: service {spec.name}:{p.port}", dp,
                            pod_local)
        await front.start()
        log.info("%s: streams terminated at %s:%d by %s (upstream: %s)", where, vip, p.port,
                 p.activator, "pod-local" if pod_local is not None else "vip")
        return front

    async def reload_activator(self, service: str, port: int | None = None,
                               module: str | None = None) -> list[dict[str, Any]]:
        """Swap the activator of a service's port(s) for a fresh load of `module` (by
        default the configured one): new flows and streams go to it, live streams stay
        with the old module until they end. A module that cannot load, instantiate or
        init is refused with its reason and the old one keeps serving."""
        spec = self.specs.get(service)
        if spec is None:
            raise NotFound(f"service {self.namespace}/{service} not found")
        ports = [p for p in spec.ports if p.activator != "none"
                 and (port is None or p.port == port)]
        if not ports:
            what = f"port {port}" if port is not None else "any port"
            raise NotFound(f"service {self.namespace}/{service} has no activator on {what}")
        out = []
        for p in ports:
            new = dataclasses.replace(p, activator=module) if module else p
            host = await self._load_checked(spec, new)
            key = (p.port, 6 if p.protocol == "tcp" else 17)
            front = self.fronts.get(service, {}).get(p.port)
            if front is not None and not host.streams:
                host.close()
                raise ActivatorRefused(f"{host.label}: works on packets, but port {p.port} "
                                       "is a stream port; the old module keeps serving")
            if front is None and host.streams:
                host.close()
                raise ActivatorRefused(f"{host.label}: works on streams, but port {p.port} "
                                       "is a packet port (re-apply the service to change "
                                       "that); the old module keeps serving")
            if front is not None:
                generation = await front.reload(host)
            else:
                self._post(self.dispatch.replace_activator, self.by_name[service], key, host)
                generation = None
            self.hosts.setdefault(service, {})[key] = host
            row = {"service": service, "port": p.port, "module": host.label,
                   "streams": host.streams, "generation": generation}
            out.append(row)
            self._emit("activator_reloaded", self.namespace, None, **row)
            log.info("namespace %s: service %s port %d: activator reloaded from %s%s",
                     self.namespace, service, p.port, new.activator,
                     f" (generation {generation})" if generation else "")
        return out

    async def _load_checked(self, spec: ServiceSpec, p: PortSpec) -> ActivatorHost:
        """Load, check, compile and instantiate (ABI version, exports, init) a module
        off the event loop; ActivatorRefused with the reason when any step fails."""
        path = Path(p.activator) if p.activator.endswith(".wasm") else shipped_activator(
            p.activator)

        def load() -> ActivatorHost:
            host = ActivatorHost(path, _config(spec, p), max_held=spec.hold.packets,
                                 memory_limit=p.activator_memory,
                                 label=f"{self.namespace}/{spec.name}:{p.port}")
            inst = host.instance(p.port)
            if inst._store is None:
                f = host.last_failure or {}
                host.close()
                raise ActivatorRefused(f"{path}: {f.get('reason', 'unusable')}: "
                                       f"{f.get('message', '')}; the old module keeps "
                                       "serving")
            return host

        try:
            return await asyncio.to_thread(load)
        except ActivatorRefused:
            raise
        except Exception as e:
            raise ActivatorRefused(f"{e}; the old module keeps serving") from None

    def _stream_backends(self, service: str, ready: list[str]) -> None:
        for front in self.fronts.get(service, {}).values():
            front.backends(ready)

    def _stream_need(self, service: str, port: int, need: int) -> None:
        svc = self.by_name.get(service)
        if svc is not None:
            self._post(self.dispatch.stream_need, svc, port, need, time.monotonic())

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
        if svc is None:
            return
        if kind == "activate":
            self._post(svc.hook_started, t)
        elif kind == "idle":
            self._post(svc.idle_hook, True, t)

    def _hook_ended(self, service: str, kind: str, t: float) -> None:
        svc = self.by_name.get(service)
        if svc is not None and kind == "idle":
            self._post(svc.idle_hook, False, t)

    # --- views ---------------------------------------------------------------------------

    async def views(self) -> list[dict[str, Any]]:
        """A row per service for `fabricd get services`, read on the data-plane thread;
        the hooks' counts are this side's."""
        rows = list(await self.dataplane.acall(self._views_here))
        for row in rows:
            row["hooks"] = dataclasses.asdict(self.hooks.stats(row["name"]))
            row["hooks"]["running"] = self.hooks.busy(row["name"])
            fronts = self.fronts.get(row["name"])
            if fronts:
                row["streams"] = {str(port): await f.astatus() for port, f in fronts.items()}
        return rows

    def _views_here(self) -> list[dict[str, Any]]:
        rows = []
        for name, svc in self.by_name.items():
            row = svc.status()
            row["activators"] = {
                str(port) + ("" if proto == 6 else "/udp"):
                    {"module": host.label, **dataclasses.asdict(host.stats),
                     "last_failure": host.last_failure}
                for (port, proto), host in self.hosts.get(name, {}).items()}
            rows.append({"namespace": self.namespace, **row})
        return rows


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception as e:  # the stack may be closing with the namespace
        log.debug("%s%s: %s", getattr(fn, "__name__", fn), args, e)


def _config(spec: ServiceSpec, p: PortSpec) -> dict[str, Any]:
    """The JSON config a port's module gets: its activator_config, plus the port's facts
    unless it sets them (activators/ABI.md, "Streams")."""
    config = p.activator_config
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    cfg.setdefault("port", p.port)
    cfg.setdefault("target_port", p.target_port)
    cfg.setdefault("hold_timeout_ms", int(spec.hold.timeout * 1000))
    cfg.setdefault("hold_bytes", spec.hold.bytes)
    return cfg


class ActivatorRefused(FabricError):
    """A reload's module cannot be used (the old one keeps serving)."""

    status = 422
    code = "activator_refused"
