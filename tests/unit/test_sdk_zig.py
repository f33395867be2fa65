"""The Zig SDK (activators/sdk/zig) through the real host: its example, stream_hold.zig,
is activators/stream/stream.c rewritten on it, so both must answer every event sequence
alike (differential, random sequences over many streams: exercises the SDK's event loop,
actions, config reader, Table and Pool)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fabric.activator import abi as A
from fabric.activator.host import ActivatorHost
from tests.support.streamguest import StreamGuest

ROOT = Path(__file__).resolve().parents[2]
ZIG = ROOT / "activators" / "sdk" / "zig" / "examples" / "stream_hold.wasm"
C = ROOT / "activators" / "stream" / "stream.wasm"


def canon(actions: list[A.Action]) -> list[str]:
    """Per call, the actions as a sorted list: the two iterate their streams in different
    orders (a table by position vs. open addressing by id), nothing else may differ."""
    return sorted(repr(a) for a in actions)


def test_exports_and_size() -> None:
    g = StreamGuest(ZIG)
    try:
        names = {e.name for e in g.host.module.exports}
        assert {"memory", "fab_abi_version", "fab_alloc", "fab_init", "fab_process",
                "fab_streams"} <= names
        assert g.host.streams
    finally:
        g.close()


def test_hold_then_connect_resume_splice() -> None:
    g = StreamGuest(ZIG, {"hold_timeout_ms": 5000})
    try:
        assert g.open(1) == [A.Pause(1), A.SetBackendNeed(A.NEED_ACTIVE)]
        assert g.tick(100) == []
        assert g.available() == [A.UpstreamConnect(1, 0)]
        assert g.connected(1) == [A.Resume(1), A.Splice(1)]
        assert g.client_close(1) == [A.SetBackendNeed(A.NEED_NONE)]
        assert g.open(2) == [A.Pause(2), A.UpstreamConnect(2, 0),
                             A.SetBackendNeed(A.NEED_ACTIVE)]
        assert g.connected(2, ok=False) == []  # held again, retried on a tick
        assert g.tick(4000) == [A.UpstreamConnect(2, 0)]
        g.unavailable()
        assert g.connected(2, ok=False) == []
        out = g.tick(5200)  # opened at 100: past its 5 s hold
        assert out[-2:] == [A.DownstreamClose(2), A.SetBackendNeed(A.NEED_NONE)]
        assert g.logs == [(A.LOG_INFO, "stream activator: held connection timed out")]
        assert g.failed == 0
    finally:
        g.close()


def test_wake_on_data_holds_the_first_read_and_sends_it_first() -> None:
    g = StreamGuest(ZIG, {"wake_on_data": True})
    try:
        assert g.open(7) == [A.SetBackendNeed(A.NEED_NONE)]  # a bare connect wakes nothing
        assert g.client(7, b"hello") == [A.Pause(7), A.SetBackendNeed(A.NEED_ACTIVE)]
        g.available()
        assert g.connected(7) == [A.UpstreamSend(7, b"hello"), A.Resume(7), A.Splice(7)]
    finally:
        g.close()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("config", [{}, {"wake_on_data": 1, "hold_timeout_ms": 700}])
def test_same_answers_as_the_c_activator(seed: int, config: dict[str, Any]) -> None:
    rng = random.Random(seed)
    guests = [StreamGuest(C, config), StreamGuest(ZIG, config)]
    try:
        now, next_id, live = 0, 1, []
        for _ in range(400):
            op = rng.random()
            if (op < 0.25 and len(live) < 6) or not live:
                ev: A.Event = A.StreamOpen(next_id, 80)
                live.append(next_id)
                next_id += 1
            else:
                sid = rng.choice(live)
                ev = rng.choice([
                    A.StreamData(sid, bytes(rng.randrange(1, 200))),
                    A.StreamClose(sid), A.UpstreamConnectResult(sid, rng.randrange(2)),
                    A.UpstreamClosed(sid), A.BackendAvailable(), A.BackendUnavailable(),
                    A.Tick(now := now + rng.randrange(1, 300))])
                if isinstance(ev, A.StreamClose | A.UpstreamClosed) and rng.random() < 0.5:
                    live.remove(sid)  # ids are unique among live streams
            got = [canon(g.send(ev)) for g in guests]
            assert got[0] == got[1], (ev, got)
        assert [g.failed for g in guests] == [0, 0]
        assert guests[0].logs == guests[1].logs
    finally:
        for g in guests:
            g.close()


def test_the_sdks_own_zig_tests(tmp_path_factory: pytest.TempPathFactory) -> None:
    """JSON reader, Table (against a reference map), Buf, Pool, Tcp.parse: compiled
    natively in Debug mode, so every bounds or overflow slip panics."""
    pytest.importorskip("ziglang")
    cache = tmp_path_factory.getbasetemp() / "zig-cache"
    env = dict(os.environ, ZIG_GLOBAL_CACHE_DIR=str(cache / "global"),
               ZIG_LOCAL_CACHE_DIR=str(cache / "local"))
    r = subprocess.run([sys.executable, "-m", "ziglang", "test", "sdk/zig/fabricd.zig"],
                       cwd=ROOT / "activators", env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "All 4 tests passed" in r.stdout + r.stderr


TCP_C = ROOT / "activators" / "tcp" / "tcp.wasm"
TCP_ZIG = ROOT / "activators" / "sdk" / "zig" / "examples" / "tcp_hold.wasm"


@pytest.mark.parametrize("seed", range(4))
def test_tcp_hold_answers_as_the_c_sdk_tcp_activator(seed: int) -> None:
    """tcp_hold.zig is tcp.c on the Zig SDK: the same actions, in the same order, for
    random SYNs, retransmits, data, RSTs, strays, ticks and backend changes."""
    from fabric.net import packets as P

    rng = random.Random(seed)
    client, vip = P.ip_bytes("10.0.0.7"), P.ip_bytes("10.96.0.10")
    config = {"max_flows": 16, "hold_timeout_ms": 2000}
    hosts = [ActivatorHost(TCP_C, config, max_held=8192),
             ActivatorHost(TCP_ZIG, config, max_held=8192)]
    try:
        now, pid = 0, 0
        for _ in range(600):
            op = rng.random()
            if op < 0.04:
                batch: list[A.Event] = [rng.choice([A.BackendAvailable(),
                                                    A.BackendUnavailable()])]
            elif op < 0.1:
                now += rng.randrange(1, 1500)
                batch = [A.Tick(now)]
            else:
                batch = []
                for _ in range(rng.randrange(1, 6)):
                    pid += 1
                    sport = 30000 + rng.randrange(24)
                    flags = rng.choice([P.TCP_SYN, P.TCP_SYN, P.TCP_ACK, P.TCP_RST,
                                        P.TCP_SYN | P.TCP_ACK, P.TCP_FIN | P.TCP_ACK])
                    data = P.tcp_packet(client, vip, sport, 80, 1, 0, flags, b"")
                    if rng.random() < 0.05:
                        data = data[:rng.randrange(len(data))]  # garbage
                    batch.append(A.Packet(pid, sport % 7, data))  # colliding flow hashes
            got = [h.process(80, batch) for h in hosts]
            assert got[0] == got[1], (batch, got)
        assert [h.stats.traps for h in hosts] == [0, 0]
    finally:
        for h in hosts:
            h.close()
