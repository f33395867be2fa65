"""A packet (L3) activator's replay: packets to the port, as the daemon's dispatch
(fabric.services.dispatch) hands them over while no backend is ready; no ticks."""

from __future__ import annotations

from fabric.activator import abi
from fabric.activator.harness import timeline as tl
from fabric.activator.harness.capture import PROTO_TCP, PROTO_UDP, IPPacket
from fabric.activator.harness.result import Ready
from fabric.activator.harness.run import Run
from fabric.activator.host import ActivatorHost


class PacketRun(Run):
    """An L3 activator: packets to the port, as the daemon's dispatch hands them over."""

    def __init__(self, host: ActivatorHost, port: int, packets: list[IPPacket], t0: float,
                 ready: Ready, names: dict[int, str]) -> None:
        super().__init__(host, port, t0, ready, names)
        self.pid = 0
        self.is_ready = False
        self.held: list[int] = []
        self.counts = {"packets_to_port": 0, "held": 0, "dropped": 0, "passed": 0,
                       "forwarded_ready": 0, "released": 0, "fallbacks": 0}
        flows = set()
        for p in packets:
            if p.proto in (PROTO_TCP, PROTO_UDP) and p.dport == port and p.data:
                t = p.ts - t0
                flows.add((p.src, p.sport, p.dst))
                self.last_input = t
                self.clock.at(t, lambda p=p: self._packet(p))
        self.connections = len(flows)

    def _packet(self, p: IPPacket) -> None:
        t = self.rec.now
        self.counts["packets_to_port"] += 1
        if self.is_ready:
            self.counts["forwarded_ready"] += 1
            self.sim(t, "forwarded", detail=tl.packet_summary(p.data) + " (backend ready)")
            return
        self.pid = pid = (self.pid + 1) & 0xFFFFFFFF
        d = p.data
        ihl = (d[0] & 15) << 2
        flow = (int.from_bytes(d[12:20], "big") ^ int.from_bytes(d[ihl:ihl + 4], "big")
                ) & 0xFFFFFFFF  # as fabric.services.dispatch hashes the flow
        actions = self.rec.process(self.port, [abi.Packet(pid, flow, d)])
        if actions is None:  # the daemon holds and activates without the activator
            self.counts["fallbacks"] += 1
            self._hold(t, pid, "held by the fallback")
            return
        verdict = abi.HOLD
        for a in actions:
            if type(a) is abi.PacketDecision and a.packet_id == pid:
                verdict = a.verdict
            elif type(a) is abi.SetBackendNeed:
                self.set_need(t, a.need)
        if verdict == abi.HOLD:
            self._hold(t, pid, "held")
        elif verdict == abi.DROP:
            self.counts["dropped"] += 1
        else:
            self.counts["passed"] += 1

    def _hold(self, t: float, pid: int, what: str) -> None:
        self.counts["held"] += 1
        self.held.append(pid)
        if not self.backend_up and self.wake_at is None:
            self.sim(t, "activate", detail=f"a packet {what} activates the service")
        self.woke(t)

    def on_gone(self, t: float) -> None:
        self.is_ready = False
        self.sim(t, "backend_gone")
        actions = self.rec.process(self.port, [abi.BackendUnavailable()])
        for a in actions or []:
            if type(a) is abi.SetBackendNeed:
                self.set_need(t, a.need)

    def on_ready(self, t: float) -> None:
        self.is_ready = True
        self.sim(t, "backend_ready")
        actions = self.rec.process(self.port, [abi.BackendAvailable()])
        for a in actions or []:
            if type(a) is abi.SetBackendNeed:
                self.set_need(t, a.need)
        if self.held:
            self.counts["released"] += len(self.held)
            self.sim(t, "released", detail=f"{len(self.held)} held packets, in arrival order")
            self.held.clear()

    def core_counters(self) -> dict[str, int]:
        return dict(self.counts)
