"""Pcap replay: drive a Router with what pods sent, compare with what they must receive.

A case is a directory `pcaps/<case>/` holding

    case.json          {"cidr": "10.0.0.0/24",
                        "pods": [{"name": "a", "ip": "10.0.0.2", "mac": "02:..." | null,
                                  "attach": 0.0 | null, "mtu": 1500, "vnet": false}, ...],
                        "until": 40.0}
    <pod>.in.pcap      what the pod sent (Ethernet, with capture timestamps); may be absent
    <pod>.out.pcap     what the router must send to that pod; absent or empty: nothing

`mac: null` means the router learns it; `attach: null` means the pod never gets a port;
`mtu` (default 1500) and `vnet` (default false: no virtio-net header; when true, frames get
a zero header in and must come out with a zero header) describe its port. Optional keys:
"name" (namespace name), "gateway_mac", "until" (run timers up to this time after the last
frame; default: the last event), "services" and "events" (below). Other keys are left to
callers (see `setup`).

Services (the router's service core, with the shipped activators) are declared as

    "services": [{"name": "web", "ip": "10.0.0.100",
                  "ports": [{"port": 80, "target_port": 8080, "protocol": "tcp",
                             "activator": "tcp" | "none", "activator_config": {...}}],
                  "backends": ["web"],              # pod names, not ready at the start
                  "readiness": "external",          # the only kind a replay can drive
                  "hold": {"packets": 1024, "bytes": 8388608, "timeout": 30.0},
                  "idle_timeout": 300.0}]
    "events":   [{"t": 1.0, "backend": "web", "ready": true, "service": "web"}]

An event marks a backend (ready or not) at its time in every service that lists it (or only
in "service"), as the controller would with `Router.set_backend`; services, their activators
and their backends (not ready, at t=0) are set up before `setup` runs.

Replay is a simulated clock: all inputs are merged by timestamp (ties: attaches first, then
events and hooks, then pods in case.json order, then capture order); before each event
every timer that is due (`next_timer() <= t`) runs at exactly its due time; a frame is fed
with its capture timestamp; outputs are stamped with the time of the call that made them, the frame
`receive` returns first and then `router.outputs`, as the data plane writes them.

Set FABRIC_REGEN_PCAPS=1 to rewrite every `<pod>.out.pcap` from the current router
(tests/replay/test_replay.py does it), then review the difference before committing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fabric.activator.host import ActivatorHost
from fabric.config.specs import DEFAULT_IDLE_TIMEOUT, HoldSpec, PortSpec
from fabric.net.vnet import ZERO_HDR
from fabric.router.model import Port
from fabric.router.router import Router
from fabric.services.core import Service
from fabric.services.demand import Signal
from fabric.services.dispatch import ServiceDispatch

try:
    from fabric.net.pcap import read_pcap
except ImportError:  # pragma: no cover - fabric.net.pcap is written in parallel
    read_pcap = None  # type: ignore[assignment]

PCAPS = Path(__file__).resolve().parents[2] / "pcaps"
ACTIVATORS = PCAPS.parent / "activators"  # shipped activators: <name>/<name>.wasm
REGEN_ENV = "FABRIC_REGEN_PCAPS"
TOLERANCE = 1e-3
MAX_TIMER_RUNS = 100_000

Frames = list[tuple[float, bytes]]
Hook = Callable[[Router, float], None]


@dataclass
class PodSpec:
    name: str
    ip: str
    mac: str | None
    attach: float | None
    mtu: int = 1500
    vnet: bool = False


@dataclass
class Case:
    path: Path
    cidr: str
    pods: list[PodSpec]
    until: float | None
    name: str
    gateway_mac: str | None
    raw: dict[str, Any]


def regen_requested() -> bool:
    return os.environ.get(REGEN_ENV, "") not in ("", "0")


def load_case(case_dir: str | Path) -> Case:
    path = Path(case_dir)
    raw = json.loads((path / "case.json").read_text())
    pods = [PodSpec(name=p["name"], ip=p["ip"], mac=p.get("mac"), attach=p.get("attach"),
                    mtu=int(p.get("mtu", 1500)), vnet=bool(p.get("vnet", False)))
            for p in raw["pods"]]
    names = [p.name for p in pods]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate pod names {names}")
    return Case(path=path, cidr=raw["cidr"], pods=pods, until=raw.get("until"),
                name=raw.get("name", path.name), gateway_mac=raw.get("gateway_mac"), raw=raw)


def read_frames(path: Path) -> Frames:
    """(timestamp, frame) records of a pcap; an absent file is an empty capture."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if read_pcap is not None:
        return read_pcap(data)
    from scapy.utils import rdpcap  # fallback when fabric.net.pcap is not there yet

    return [(float(p.time), bytes(p)) for p in rdpcap(str(path))]


def write_frames(path: Path, frames: Frames) -> None:
    """Write a classic pcap (Ethernet, microseconds) the way make_pcaps.py does (scapy)."""
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    pkts = []
    for ts, frame in frames:
        p = Ether(frame)
        p.time = ts
        pkts.append(p)
    wrpcap(str(path), pkts, linktype=1)


class SignalLog(list[tuple[str, Signal]]):
    """The signals a replay's services raised, in order: (service, signal)."""

    def put(self, service: str, sig: Signal) -> None:
        self.append((service, sig))


def _dispatch(router: Router) -> ServiceDispatch:
    glue = router.services
    assert isinstance(glue, ServiceDispatch)
    return glue


def setup_services(router: Router, case: Case) -> list[ActivatorHost]:
    """Add the case's "services" to the router (with their activators and backends, not
    ready, at t=0) through a ServiceDispatch whose signals go to a SignalLog; returns the
    activator hosts, for closing."""
    hosts: list[ActivatorHost] = []
    dispatch = ServiceDispatch(router, SignalLog())
    router.attach_services(dispatch)
    pod_ips = {p.name: p.ip for p in case.pods}
    for s in case.raw.get("services", []):
        readiness = s.get("readiness", "external")
        if readiness != "external":
            raise ValueError(f"{case.path.name}: service {s['name']}: a replay drives "
                             f"readiness external only, not {readiness!r}")
        ports = [PortSpec(port=int(p["port"]), target_port=int(p.get("target_port", p["port"])),
                          protocol=p.get("protocol", "tcp"), activator=p.get("activator", "none"))
                 for p in s["ports"]]
        svc = Service(s["name"], s["ip"], ports, hold=HoldSpec(**s.get("hold", {})),
                      idle_timeout=float(s.get("idle_timeout", DEFAULT_IDLE_TIMEOUT)),
                      readiness=readiness, now=0.0)
        activators = {}
        for p, raw in zip(ports, s["ports"], strict=True):
            if p.activator != "none":
                host = ActivatorHost(ACTIVATORS / p.activator / f"{p.activator}.wasm",
                                     raw.get("activator_config", {}),
                                     max_held=svc.hold_spec.packets,  # as ServiceManager does
                                     label=f"{case.name}/{svc.name}:{p.port}")
                hosts.append(host)
                activators[(p.port, 6 if p.protocol == "tcp" else 17)] = host
        dispatch.add(svc, activators)
        for b in s.get("backends", []):
            dispatch.set_backend(svc, b, pod_ips[b], False, 0.0)
    return hosts


def case_hooks(router: Router, case: Case) -> list[tuple[float, Hook]]:
    """The case's "events" as timed hooks: backends becoming ready or not."""
    by_name = {svc.name: svc for svc in _dispatch(router)}
    hooks: list[tuple[float, Hook]] = []
    for ev in case.raw.get("events", []):
        backend, ready, only = ev["backend"], bool(ev["ready"]), ev.get("service")
        svcs = [svc for svc in by_name.values() if backend in svc.backends
                and (only is None or svc.name == only)]
        if not svcs:
            raise ValueError(f"{case.path.name}: event {ev}: no service has backend {backend}")

        def apply(r: Router, now: float, svcs: list[Service] = svcs, backend: str = backend,
                  ready: bool = ready) -> None:
            for svc in svcs:
                _dispatch(r).set_backend(svc, backend, str(svc.backends[backend].addr), ready,
                                         now)

        hooks.append((float(ev["t"]), apply))
    return hooks


def replay(case_dir: str | Path,
           setup: Callable[[Router, Case], None] | None = None,
           hooks: Sequence[tuple[float, Hook]] = ()) -> dict[str, Frames]:
    """Run a case and return, per pod, the frames the router sent to it with their times.

    `setup(router, case)` runs after the pods and the case's services are in place and
    before any event, for cases that configure more (tunnels) from their own case.json
    keys. `hooks` are (time, hook(router, now)) run at their time like the case's "events"
    (after them on a tie), e.g. to look at counters at a given moment.
    """
    case = load_case(case_dir)
    kwargs = {"gateway_mac": case.gateway_mac} if case.gateway_mac else {}
    router = Router(case.name, case.cidr, **kwargs)
    for spec in case.pods:
        router.add_pod(spec.name, spec.ip, spec.mac)
    hosts = setup_services(router, case)
    try:
        timed = case_hooks(router, case) + list(hooks)
        if setup is not None:
            setup(router, case)
        return _run(case, router, timed)
    finally:
        for host in hosts:
            host.close()


def _run(case: Case, router: Router, timed: list[tuple[float, Hook]]) -> dict[str, Frames]:
    # (time, kind: 0 attach / 1 hook / 2 frame, order, capture order, pod, frame, hook)
    events: list[tuple[float, int, int, int, PodSpec | None, bytes, Hook | None]] = []
    for k, (ts, hook) in enumerate(timed):
        events.append((float(ts), 1, k, 0, None, b"", hook))
    for i, spec in enumerate(case.pods):
        if spec.attach is not None:
            events.append((float(spec.attach), 0, i, 0, spec, b"", None))
        for j, (ts, frame) in enumerate(read_frames(case.path / f"{spec.name}.in.pcap")):
            events.append((ts, 2, i, j, spec, frame, None))
    events.sort(key=lambda e: e[:4])

    ports: dict[str, Port] = {}
    owner: dict[int, PodSpec] = {}
    got: dict[str, Frames] = {spec.name: [] for spec in case.pods}

    def collect(now: float, first: tuple[Port, bytes] | None = None) -> None:
        outs = ([first] if first is not None else []) + router.outputs
        router.outputs.clear()
        for port, frame in outs:
            spec = owner.get(id(port))
            if spec is None:
                raise AssertionError(f"{case.path.name}: output for a port that is not a pod's")
            if spec.vnet:
                if frame[:10] != ZERO_HDR:
                    raise AssertionError(
                        f"{case.path.name}: frame for {spec.name} has a virtio-net header "
                        f"{frame[:10].hex()} that a pcap cannot hold")
                frame = frame[10:]
            got[spec.name].append((now, bytes(frame)))

    def run_timers(until: float) -> None:
        for _ in range(MAX_TIMER_RUNS):
            due = router.next_timer()
            if due is None or due > until:
                return
            router.handle_timer(due)
            collect(due)
            if router.next_timer() == due:
                raise AssertionError(f"{case.path.name}: timer due at {due} does not advance")
        raise AssertionError(f"{case.path.name}: timers keep firing before {until}")

    last = 0.0
    for ts, kind, _, _, spec, frame, hook in events:
        run_timers(ts)
        last = ts
        if hook is not None:
            hook(router, ts)
            collect(ts)
            continue
        assert spec is not None
        if kind == 0:
            port = Port(vnet=spec.vnet, mtu=spec.mtu, kind="replay")
            ports[spec.name] = port
            owner[id(port)] = spec
            router.attach(spec.name, port, ts)
            collect(ts)
            continue
        port = ports.get(spec.name)
        if port is None:
            raise ValueError(f"{case.path.name}: {spec.name} sends at {ts} but has no port "
                             f"(attach: {spec.attach})")
        data = (ZERO_HDR if spec.vnet else b"") + frame
        buf = bytearray(data)
        out = router.receive(port, buf, len(data), ts)
        collect(ts, (out, bytes(buf[:len(data)])) if out is not None else None)
    run_timers(max(last, float(case.until)) if case.until is not None else last)
    return got


def expected(case_dir: str | Path) -> dict[str, Frames]:
    case = load_case(case_dir)
    return {spec.name: read_frames(case.path / f"{spec.name}.out.pcap") for spec in case.pods}


def _describe(frame: bytes) -> str:
    try:
        from scapy.layers.l2 import Ether

        return Ether(frame).summary()
    except Exception:  # pragma: no cover - only for messages
        return frame[:64].hex()


def compare(want: dict[str, Frames], got: dict[str, Frames],
            tolerance: float = TOLERANCE) -> list[str]:
    """Differences, one line each: frames must match exactly and in order, timestamps
    within `tolerance` seconds."""
    problems: list[str] = []
    for pod in sorted(set(want) | set(got)):
        w, g = want.get(pod, []), got.get(pod, [])
        for i in range(max(len(w), len(g))):
            if i >= len(w):
                problems.append(f"{pod} #{i}: unexpected frame at {g[i][0]:.6f}: "
                                f"{_describe(g[i][1])}")
            elif i >= len(g):
                problems.append(f"{pod} #{i}: missing frame at {w[i][0]:.6f}: "
                                f"{_describe(w[i][1])}")
            else:
                (wt, wf), (gt, gf) = w[i], g[i]
                if wf != gf:
                    at = next((k for k in range(min(len(wf), len(gf))) if wf[k] != gf[k]),
                              min(len(wf), len(gf)))
                    problems.append(f"{pod} #{i}: frame differs at byte {at} "
                                    f"(want {len(wf)} bytes, got {len(gf)}):\n"
                                    f"    want {_describe(wf)}\n    got  {_describe(gf)}")
                if abs(wt - gt) > tolerance:
                    problems.append(f"{pod} #{i}: time {gt:.6f}, want {wt:.6f}")
    return problems


def regenerate(case_dir: str | Path, got: dict[str, Frames]) -> None:
    """Rewrite the expected outputs of a case from `got` (every pod gets a file)."""
    case = load_case(case_dir)
    for spec in case.pods:
        write_frames(case.path / f"{spec.name}.out.pcap", got.get(spec.name, []))


def case_dirs(root: Path = PCAPS) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/case.json"))


def check(case_dir: str | Path, setup: Callable[[Router, Case], None] | None = None,
          hooks: Sequence[tuple[float, Hook]] = ()) -> None:
    """Replay a case and assert it matches (or rewrite it when FABRIC_REGEN_PCAPS is set):
    the one-liner for tests of later features that add their own cases."""
    got = replay(case_dir, setup, hooks)
    if regen_requested():
        regenerate(case_dir, got)
        return
    problems = compare(expected(case_dir), got)
    if problems:
        raise AssertionError(f"{Path(case_dir).name}: {len(problems)} difference(s)\n"
                             + "\n".join(problems))
