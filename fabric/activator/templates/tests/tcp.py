"""{{name}} through fabricd's real activator host (the wasmtime sandbox the daemon runs)."""

from __future__ import annotations

from pathlib import Path

from fabric.activator import abi as A
from fabric.activator.host import ActivatorHost
from fabric.net import packets as P

CLIENT, VIP = P.ip_bytes("10.0.0.7"), P.ip_bytes("10.96.0.10")


def seg(sport: int, flags: int) -> bytes:
    return P.tcp_packet(CLIENT, VIP, sport, 80, 1000, 0 if flags == P.TCP_SYN else 1, flags,
                        b"")


def test_a_syn_wakes_and_is_held_then_replayed(wasm: Path) -> None:
    with ActivatorHost(wasm, {}) as host:
        out = host.process(80, [A.Packet(1, 11, seg(40000, P.TCP_SYN))])
        assert out == [A.SetBackendNeed(A.NEED_ACTIVE), A.Count(1, "wakes"),
                       A.PacketDecision(1, A.HOLD)]
        # a retransmitted SYN of the same connection is held without a second wake
        assert host.process(80, [A.Packet(2, 11, seg(40000, P.TCP_SYN))]) == [
            A.PacketDecision(2, A.HOLD)]
        assert host.process(80, [A.BackendAvailable()]) == [A.ReplayPacket(1),
                                                            A.ReplayPacket(2)]
        assert host.process(80, [A.Packet(3, 12, seg(40001, P.TCP_ACK))]) == [
            A.PacketDecision(3, A.PASS)]


def test_strays_and_resets_are_dropped_without_waking(wasm: Path) -> None:
    with ActivatorHost(wasm, {}) as host:
        for pid, flags in ((1, P.TCP_ACK), (2, P.TCP_RST), (3, P.TCP_FIN | P.TCP_ACK)):
            out = host.process(80, [A.Packet(pid, 5, seg(41000 + pid, flags))])
            assert out == [A.PacketDecision(pid, A.DROP), A.Count(1, "dropped")]
        assert host.process(80, [A.Packet(4, 5, b"garbage")]) == [A.PacketDecision(4, A.DROP)]
        assert host.stats.traps == 0
