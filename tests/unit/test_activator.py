"""The activator host (fabric/activator/), the TCP activator and the hostile activators."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fabric.activator import abi as A
from fabric.activator import runtime
from fabric.activator.host import ActivatorHost, ActivatorInstance
from fabric.net import packets as P

ROOT = Path(__file__).resolve().parents[2]
ACT = ROOT / "activators"
TCP = ACT / "tcp" / "tcp.wasm"
HOSTILE = ACT / "testing"

CLIENT = P.ip_bytes("10.0.0.7")
VIP = P.ip_bytes("10.96.0.10")


def seg(sport: int, flags: int, payload: bytes = b"", *, seq: int = 1000) -> bytes:
    return P.tcp_packet(CLIENT, VIP, sport, 80, seq, 0 if flags == P.TCP_SYN else 1, flags,
                        payload)


class Feed:
    """Numbers packets like the dataplane does and remembers their bytes."""

    def __init__(self, inst: ActivatorInstance) -> None:
        self.inst = inst
        self.next_id = 1
        self.sent: dict[int, bytes] = {}

    def packet(self, data: bytes, flow_hash: int | None = None) -> list[A.Action]:
        pid = self.next_id
        self.next_id += 1
        self.sent[pid] = data
        ev = A.Packet(pid, flow_hash if flow_hash is not None else hash(data[12:24]) & 0xFFFF,
                      data)
        out = self.inst.process([ev])
        assert out is not None
        return out


def decisions(actions: list[A.Action]) -> dict[int, int]:
    return {a.packet_id: a.verdict for a in actions if isinstance(a, A.PacketDecision)}


def wakes(actions: list[A.Action]) -> int:
    return sum(1 for a in actions if isinstance(a, A.SetBackendNeed) and a.need == A.NEED_ACTIVE)


@pytest.fixture
def tcp_host():
    # max_held: a service hold as large as the TCP activator's own (8192 packets)
    with ActivatorHost(TCP, {"hold_timeout_ms": 30000}, max_held=8192) as host:
        yield host


# ---- ABI encoding ----

ALL_EVENTS: list[A.Event] = [
    A.BackendAvailable(), A.BackendUnavailable(), A.Tick(2**40 + 5),
    A.Packet(7, 0xDEADBEEF, seg(1234, P.TCP_SYN)), A.StreamOpen(9, 443),
    A.StreamData(9, b"GET / HTTP/1.1\r\n"), A.StreamClose(9), A.UpstreamConnectResult(9, 1),
    A.UpstreamData(9, b"\x00\xff"), A.UpstreamClosed(9),
]
ALL_ACTIONS: list[A.Action] = [
    A.SetBackendNeed(A.NEED_TRAFFIC), A.Log(A.LOG_WARNING, "héllo"),
    A.PacketDecision(3, A.DROP), A.ReplayPacket(4), A.DownstreamSend(1, b"HTTP/1.1 503"),
    A.DownstreamClose(1), A.UpstreamConnect(1, 8080), A.UpstreamSend(1, b"x" * 100),
    A.UpstreamClose(1), A.Pause(1), A.Resume(1), A.Splice(1),
]


def test_round_trip_events_and_actions() -> None:
    assert A.decode_events(A.encode_batch(ALL_EVENTS)) == ALL_EVENTS
    assert A.decode_actions(A.encode_batch(ALL_ACTIONS)) == ALL_ACTIONS
    assert A.decode_actions(A.encode_batch([])) == []


def test_encoding_is_the_documented_bytes() -> None:
    """Pin the wire format (ABI.md) byte by byte, so a refactor cannot drift it."""
    got = A.encode_batch([A.Tick(1), A.Packet(2, 3, b"\x45")])
    assert got == (b"\x02\x00"
                   + b"\x03\x00\x00\x00\x08\x00\x00\x00" + b"\x01" + b"\x00" * 7
                   + b"\x04\x00\x00\x00\x09\x00\x00\x00" + b"\x02\x00\x00\x00\x03\x00\x00\x00"
                   + b"\x45")
    assert A.encode_batch([A.PacketDecision(0x01020304, A.PASS)]) == (
        b"\x01\x00\x03\x00\x00\x00\x05\x00\x00\x00\x04\x03\x02\x01\x02")


@pytest.mark.parametrize("bad", [
    b"",                                                   # no count
    b"\x01\x00",                                           # count 1, no record
    b"\x01\x00\xc8\x00\x00\x00\x00\x00\x00\x00",           # unknown kind 200
    b"\x01\x00\x04\x00\x00\x00\x03\x00\x00\x00\x01\x00\x00",  # replay with 3-byte payload
    b"\x01\x00\x04\x00\x00\x00\xe8\x03\x00\x00\x01\x00\x00\x00",  # length past the end
    b"\x01\x00\x04\x01\x00\x00\x04\x00\x00\x00\x01\x00\x00\x00",  # non-zero flags
    b"\x01\x00\x01\x00\x00\x00\x01\x00\x00\x00\x07",       # need 7
    b"\x00\x00\x00",                                       # trailing byte
])
def test_decode_rejects_malformed(bad: bytes) -> None:
    with pytest.raises(A.MalformedBatch):
        A.decode_actions(bad)


# ---- the TCP activator ----


def test_syn_wakes_once_and_is_held_then_replayed_in_order(tcp_host) -> None:
    feed = Feed(tcp_host.instance(80))
    out = feed.packet(seg(40000, P.TCP_SYN))
    assert wakes(out) == 1 and decisions(out) == {1: A.HOLD}
    out = feed.packet(seg(40000, P.TCP_SYN))          # retransmitted SYN: held, no new wake
    assert wakes(out) == 0 and decisions(out) == {2: A.HOLD}
    out = feed.packet(seg(40001, P.TCP_SYN))          # another client: wakes for itself
    assert wakes(out) == 1 and decisions(out) == {3: A.HOLD}
    out = feed.packet(seg(40000, P.TCP_ACK | P.TCP_PSH, b"GET /"))  # data of a held flow
    assert wakes(out) == 0 and decisions(out) == {4: A.HOLD}

    out = feed.inst.process([A.BackendAvailable()])
    assert out == [A.ReplayPacket(1), A.ReplayPacket(2), A.ReplayPacket(3), A.ReplayPacket(4)]
    # Forgotten after the replay; the backend is up now, so traffic passes.
    out = feed.packet(seg(40000, P.TCP_ACK, b"more"))
    assert decisions(out) == {5: A.PASS}
    assert feed.inst.process([A.BackendAvailable()]) == []


def test_strays_and_rsts_are_dropped_without_waking(tcp_host) -> None:
    feed = Feed(tcp_host.instance(80))
    for flags in (P.TCP_ACK, P.TCP_ACK | P.TCP_PSH, P.TCP_RST, P.TCP_RST | P.TCP_ACK,
                  P.TCP_SYN | P.TCP_ACK, P.TCP_FIN | P.TCP_ACK):
        out = feed.packet(seg(50000, flags))
        assert wakes(out) == 0
        assert decisions(out) == {feed.next_id - 1: A.DROP}
    # Not TCP at all, and garbage: dropped, no wake.
    out = feed.packet(P.udp_packet(CLIENT, VIP, 5353, 80, b"hi"))
    assert decisions(out) == {feed.next_id - 1: A.DROP} and wakes(out) == 0
    out = feed.packet(b"\x45\x00")
    assert decisions(out) == {feed.next_id - 1: A.DROP}
    assert feed.inst.process([A.BackendAvailable()]) == []


def test_rst_forgets_a_held_flow(tcp_host) -> None:
    feed = Feed(tcp_host.instance(80))
    feed.packet(seg(40000, P.TCP_SYN))
    out = feed.packet(seg(40000, P.TCP_RST))
    assert decisions(out) == {1: A.DROP, 2: A.DROP}   # the held SYN is released as well
    assert feed.inst.process([A.BackendAvailable()]) == []


def test_backend_unavailable_starts_holding_again(tcp_host) -> None:
    feed = Feed(tcp_host.instance(80))
    feed.inst.process([A.BackendAvailable()])
    assert decisions(feed.packet(seg(40000, P.TCP_SYN))) == {1: A.PASS}
    feed.inst.process([A.BackendUnavailable()])
    out = feed.packet(seg(40000, P.TCP_SYN))
    assert wakes(out) == 1 and decisions(out) == {2: A.HOLD}


def test_hold_timeout_on_tick(tcp_host) -> None:
    feed = Feed(tcp_host.instance(80))
    feed.inst.process([A.Tick(1000)])
    feed.packet(seg(40000, P.TCP_SYN))
    assert decisions(feed.inst.process([A.Tick(30999)])) == {}
    out = feed.inst.process([A.Tick(31000)])
    assert decisions(out) == {1: A.DROP}
    assert any(isinstance(a, A.Log) and "timed out" in a.message for a in out)


def test_flow_table_is_bounded_and_evicts_the_oldest() -> None:
    with ActivatorHost(TCP, {"max_flows": 4}) as host:
        feed = Feed(host.instance(80))
        for sport in range(1000, 1004):
            feed.packet(seg(sport, P.TCP_SYN))
        out = feed.packet(seg(1004, P.TCP_SYN))
        assert decisions(out) == {1: A.DROP, 5: A.HOLD}
        assert any(isinstance(a, A.Log) and a.level == A.LOG_WARNING and "evicted" in a.message
                   for a in out)
        out = feed.inst.process([A.BackendAvailable()])
        assert out == [A.ReplayPacket(i) for i in (2, 3, 4, 5)]


def test_many_flows_in_one_batch_and_default_bound(tcp_host) -> None:
    """4096 flows fit; the 4097th evicts; a 5000-event batch is split by the host."""
    inst = tcp_host.instance(80)
    events = [A.Packet(i, i * 2654435761 & 0xFFFFFFFF, seg(1 + i % 60000, P.TCP_SYN,
                                                          seq=i))
              for i in range(1, 5001)]
    out = inst.process(events)
    assert out is not None
    assert wakes(out) == 5000
    assert sum(1 for a in out if isinstance(a, A.Log) and "evicted" in a.message) == 5000 - 4096
    out = inst.process([A.BackendAvailable()])
    assert out == [A.ReplayPacket(i) for i in range(5000 - 4096 + 1, 5001)]
    assert inst.stats.calls == 2 and inst.stats.traps == 0


def test_instances_per_port_are_independent(tcp_host) -> None:
    a, b = Feed(tcp_host.instance(80)), Feed(tcp_host.instance(443))
    a.packet(seg(40000, P.TCP_SYN))
    assert b.inst.process([A.BackendAvailable()]) == []
    assert a.inst.process([A.BackendAvailable()]) == [A.ReplayPacket(1)]
    assert tcp_host.stats.calls == 3


def test_public_api_fallback_behaves_the_same(monkeypatch) -> None:
    monkeypatch.setattr(runtime, "FORCE_PUBLIC_API", True)
    with ActivatorHost(TCP, {}) as host:
        feed = Feed(host.instance(80))
        assert not feed.inst.raw_path
        out = feed.packet(seg(40000, P.TCP_SYN))
        assert wakes(out) == 1 and decisions(out) == {1: A.HOLD}
        assert feed.inst.process([A.BackendAvailable()]) == [A.ReplayPacket(1)]


def test_module_is_compiled_once(tcp_host) -> None:
    with ActivatorHost(TCP.read_bytes(), {}) as other:
        assert other.module is tcp_host.module
        assert other.engine is tcp_host.engine


# ---- hostile activators ----

TRIGGER = [A.Packet(0, 0, b"x")]   # the hostile activators misbehave on any packet event


def alive(actions: list[A.Action] | None) -> bool:
    return actions == [A.Log(A.LOG_DEBUG, "alive")]


@pytest.mark.parametrize("name,counter,kwargs", [
    ("loop", "out_of_fuel", {"fuel_per_call": 2_000_000}),
    ("loop", "deadline", {"fuel_per_call": 2**62, "deadline_ms": 20}),
    ("trap", "traps", {}),
    ("membomb", "memory_cap", {"memory_limit": 4 << 20}),
    ("garbage", "malformed", {}),
])
def test_hostile_instance_is_recycled_and_its_neighbour_works(name, counter, kwargs) -> None:
    with ActivatorHost(HOSTILE / f"{name}.wasm", {}, **kwargs) as host:
        bad, good = host.instance(1), host.instance(2)
        assert alive(bad.process([A.Tick(1)])) and alive(good.process([A.Tick(1)]))
        t0 = time.monotonic()
        assert bad.process(TRIGGER) is None
        elapsed = time.monotonic() - t0
        st = bad.stats
        assert getattr(st, counter) == 1, st
        assert st.recreated == 1 and st.fallbacks == 1
        if counter in ("out_of_fuel", "deadline"):
            assert st.traps == 1 and elapsed < 5
        # The neighbour never noticed; the recreated instance works again.
        assert alive(good.process([A.Tick(2)])) and good.stats.recreated == 0
        assert alive(bad.process([A.Tick(2)]))
        assert host.stats.calls == 5


def test_garbage_every_kind_of_malformed_batch() -> None:
    with ActivatorHost(HOSTILE / "garbage.wasm", {}) as host:
        inst = host.instance(1)
        for mode in range(5):   # packet_id % 5 picks the kind of garbage (garbage.c)
            assert inst.process([A.Packet(mode, 0, b"x")]) is None
            assert alive(inst.process([A.Tick(1)]))
        assert inst.stats.malformed == 5 and inst.stats.recreated == 5


def test_memory_never_exceeds_the_limit() -> None:
    with ActivatorHost(HOSTILE / "membomb.wasm", {}, memory_limit=2 << 20) as host:
        inst = host.instance(1)
        assert inst.process(TRIGGER) is None
        assert inst.stats.memory_cap == 1
        assert inst._size <= 2 << 20  # the fresh instance's memory


def test_missing_export_is_refused_and_other_hosts_work(tcp_host) -> None:
    with ActivatorHost(HOSTILE / "noexport.wasm", {}) as host:
        inst = host.instance(1)
        assert inst.process([A.Tick(1)]) is None
        assert inst.process(TRIGGER) is None
        assert inst.stats.bad_module >= 2 and inst.stats.fallbacks == 2
        feed = Feed(tcp_host.instance(80))
        assert decisions(feed.packet(seg(40000, P.TCP_SYN))) == {1: A.HOLD}


def test_not_wasm_at_all_raises_at_construction() -> None:
    with pytest.raises(Exception):  # noqa: B017 - wasmtime's own error type
        ActivatorHost(b"\x00asm garbage", {})


# ---- reproducible build ----


def test_build_check_matches_committed_wasm() -> None:
    pytest.importorskip("ziglang")
    r = subprocess.run([sys.executable, str(ACT / "build.py"), "--check"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


# ---- cost ----


def test_call_cost_is_printed(tcp_host, capsys) -> None:
    """Measured, printed, asserted only loosely (CI machines vary)."""
    inst = tcp_host.instance(80)
    inst.process([A.BackendAvailable()])
    pkt = A.Packet(1, 5, seg(40000, P.TCP_ACK, b"x" * 1360))
    assert len(pkt.data) == 1400

    def per_call(events: list[A.Event], n: int = 5000) -> float:
        for _ in range(200):
            inst.process(events)
        t = time.perf_counter()
        for _ in range(n):
            inst.process(events)
        return (time.perf_counter() - t) / n * 1e6

    empty, packet = per_call([]), per_call([pkt])
    with capsys.disabled():
        print(f"\nactivator call cost (raw={inst.raw_path}): empty batch {empty:.1f} us, "
              f"1.4 KB packet {packet:.1f} us")
    assert packet < 1000


def test_an_unclosed_host_does_not_hang_the_interpreter_exit() -> None:
    """Collected at exit, a host must not wait for the epoch thread's lock (that thread
    may have been stopped holding it)."""
    script = '''if True:
        import wasmtime
        from fabric.activator import abi as A
        from fabric.activator.host import ActivatorHost
        wasm = wasmtime.wat2wasm("""(module (memory (export "memory") 2) (table 3 3 funcref)
          (func $a) (func $b) (elem (i32.const 1) func $a $b)
          (func (export "fab_abi_version") (result i32) i32.const 1)
          (func (export "fab_alloc") (param i32) (result i32) i32.const 4096)
          (func (export "fab_init") (param i32 i32) (result i32) i32.const 0)
          (func (export "fab_process") (param i32 i32) (result i64)
            i64.const 0x0000040000000002))""")
        host = ActivatorHost(wasm, {})
        assert host.process(1, [A.Tick(1)]) == []
    '''
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_a_trap_is_reported_with_its_cause_frames_fuel_and_events(caplog: Any) -> None:
    """What a person needs to act on a trap: the cause, where in the module, the fuel
    the call used and the batch that caused it; in the log line and in the host's
    last_failure (shown by fabricd get services -o json)."""
    with ActivatorHost(HOSTILE / "trap.wasm") as host, \
            caplog.at_level(logging.WARNING, logger="fabric.activator.host"):
        assert host.process(80, [A.Tick(1), A.Packet(7, 0, b"E" + bytes(39))]) is None
        f = host.last_failure
        assert f is not None and f["reason"] == "traps" and f["during"] == "process"
        assert "unreachable" in f["message"] and f["frames"], f
        assert f["events"] == "2: tick, packet(#7, 40 B)", f
        line = caplog.records[-1].getMessage()
        assert "unreachable" in line and "packet(#7, 40 B)" in line and "fuel used" in line
    with ActivatorHost(HOSTILE / "loop.wasm", fuel_per_call=100_000) as host:
        assert host.process(80, [A.Packet(1, 0, b"E" + bytes(39))]) is None
        f = host.last_failure
        assert f is not None and f["reason"] == "out_of_fuel" and f["fuel_used"] == 100_000


def test_the_epoch_ticker_parks_when_idle_and_still_stops_a_loop() -> None:
    """No guest call for a while: the ticker thread parks (no CPU for dormant services);
    the next call wakes it before the guest runs, so a looping guest is still stopped by
    its deadline."""
    from fabric.activator.runtime import epoch_ticker

    before = epoch_ticker.idle_after
    try:
        with ActivatorHost(HOSTILE / "loop.wasm", fuel_per_call=10**12,
                           deadline_ms=20) as host:
            epoch_ticker.idle_after = 0.2  # (other tests' hosts may have raised it)
            assert host.process(80, [A.Tick(1)]) is not None
            deadline = time.monotonic() + 5
            while not epoch_ticker.parked and time.monotonic() < deadline:
                time.sleep(0.01)
            assert epoch_ticker.parked
            woke = epoch_ticker.wakeups
            assert host.process(80, [A.Packet(1, 0, b"E" + bytes(39))]) is None
            assert epoch_ticker.wakeups == woke + 1
            assert host.stats.deadline == 1
    finally:
        epoch_ticker.idle_after = before
