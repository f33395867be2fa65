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
frame; default: the last event). Other keys are left to callers (see `setup`).

Replay is a simulated clock: all inputs are merged by timestamp (ties: attaches first, then
pods in case.json order, then capture order); before each event every timer that is due
(`next_timer() <= t`) runs at exactly its due time; a frame is fed with its capture
timestamp; outputs are stamped with the time of the call that made them, the frame
`receive` returns first and then `router.outputs`, as the data plane writes them.

Set FABRIC_REGEN_PCAPS=1 to rewrite every `<pod>.out.pcap` from the current router
(tests/replay/test_replay.py does it), then review the difference before committing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fabric.router import Port, Router
from fabric.vnet import ZERO_HDR

try:
    from fabric.pcap import read_pcap
except ImportError:  # pragma: no cover - fabric.pcap is written in parallel
    read_pcap = None  # type: ignore[assignment]

PCAPS = Path(__file__).resolve().parents[2] / "pcaps"
REGEN_ENV = "FABRIC_REGEN_PCAPS"
TOLERANCE = 1e-3
MAX_TIMER_RUNS = 100_000

Frames = list[tuple[float, bytes]]


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
    from scapy.utils import rdpcap  # fallback when fabric.pcap is not there yet

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


def replay(case_dir: str | Path,
           setup: Callable[[Router, Case], None] | None = None) -> dict[str, Frames]:
    """Run a case and return, per pod, the frames the router sent to it with their times.

    `setup(router, case)` runs after the pods are in the table and before any event, for
    cases that configure more (services, tunnels) from their own case.json keys.
    """
    case = load_case(case_dir)
    kwargs = {"gateway_mac": case.gateway_mac} if case.gateway_mac else {}
    router = Router(case.name, case.cidr, **kwargs)
    for spec in case.pods:
        router.add_pod(spec.name, spec.ip, spec.mac)
    if setup is not None:
        setup(router, case)

    # (time, kind: 0 attach / 1 frame, pod order, capture order, pod, frame)
    events: list[tuple[float, int, int, int, PodSpec, bytes]] = []
    for i, spec in enumerate(case.pods):
        if spec.attach is not None:
            events.append((float(spec.attach), 0, i, 0, spec, b""))
        for j, (ts, frame) in enumerate(read_frames(case.path / f"{spec.name}.in.pcap")):
            events.append((ts, 1, i, j, spec, frame))
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
    for ts, kind, _, _, spec, frame in events:
        run_timers(ts)
        last = ts
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


def check(case_dir: str | Path, setup: Callable[[Router, Case], None] | None = None) -> None:
    """Replay a case and assert it matches (or rewrite it when FABRIC_REGEN_PCAPS is set):
    the one-liner for tests of later features that add their own cases."""
    got = replay(case_dir, setup)
    if regen_requested():
        regenerate(case_dir, got)
        return
    problems = compare(expected(case_dir), got)
    if problems:
        raise AssertionError(f"{Path(case_dir).name}: {len(problems)} difference(s)\n"
                             + "\n".join(problems))
