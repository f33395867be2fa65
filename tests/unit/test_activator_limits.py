"""The activator sandbox's limits on what the host itself spends: module files (size, file
type), what a module may declare (memories, tables, imports), store limits, how many
actions of an answer are decoded, the compiled-module cache, and compiling off the loop."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import threading
import time
from pathlib import Path

import pytest
import wasmtime

from fabric.activator import abi as A
from fabric.activator import host as hostmod
from fabric.activator import runtime
from fabric.activator.host import ACTION_SLACK, ACTIONS_PER_EVENT, ActivatorError, ActivatorHost
from fabric.activator.loader import MAX_MODULE_BYTES, MAX_TABLE_ELEMENTS, check_module
from fabric.net import packets as P

ROOT = Path(__file__).resolve().parents[2]
TCP = ROOT / "activators" / "tcp" / "tcp.wasm"
HOSTILE = ROOT / "activators" / "testing"
TRIGGER = [A.Packet(0, 0, b"x")]  # the hostile activators misbehave on any packet event
MiB = 1 << 20


def rss() -> int:
    """Resident set size in bytes, from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ABI v1 exports around a module's own declarations, in the text format: the host's buffer
# at 4096, the answer (an empty batch) at 1024.
EXPORTS = """
  (func (export "fab_abi_version") (result i32) i32.const 1)
  (func (export "fab_alloc") (param i32) (result i32) i32.const 4096)
  (func (export "fab_init") (param i32 i32) (result i32) i32.const 0)
  (func (export "fab_process") (param i32 i32) (result i64) i64.const 0x0000040000000002)
"""


def module(decls: str, memory: str = '(memory (export "memory") 2)', imports: str = "") -> bytes:
    return wasmtime.wat2wasm(f"(module {imports} {memory} {decls} {EXPORTS})")


# ---- memory and table bombs: refused at load, RSS stays put ----


def test_multi_memory_bomb_is_refused_at_load_and_rss_stays_bounded() -> None:
    """24 memories of 16 MiB each (multimem.wat) once took RSS from 25 to 420 MiB with
    the instance alive and nothing counted."""
    before = rss()
    with pytest.raises(ActivatorError, match=r"multimem\.wasm: declares 24 memories; an "
                                             r"activator has exactly 1"):
        host = ActivatorHost(HOSTILE / "multimem.wasm", {})
        inst = host.instance(1)
        for _ in range(24):
            inst.process(TRIGGER)
    assert rss() - before < 16 * MiB


def test_table_bomb_is_refused_at_load_and_rss_stays_bounded() -> None:
    """tablebomb.c grows a table of its own by 8M elements per packet (64 MiB each)."""
    before = rss()
    with pytest.raises(ActivatorError, match=r"tablebomb\.wasm: declares 2 tables; an "
                                             r"activator may have at most 1"):
        host = ActivatorHost(HOSTILE / "tablebomb.wasm", {})
        inst = host.instance(1)
        for _ in range(4):
            inst.process(TRIGGER)
    assert rss() - before < 16 * MiB


@pytest.mark.parametrize("wasm,problem", [
    (module("(memory 1)"), "declares 2 memories; an activator has exactly 1"),
    (module("(table 1 1 funcref) (table 1 1 funcref)"), "declares 2 tables"),
    (module("(table 1 funcref)"), "table without a maximum size; an activator's table must "
                                  f"declare a maximum of at most {MAX_TABLE_ELEMENTS}"),
    (module("(table 1 8000000 funcref)"), f"may grow to 8000000 elements; at most "
                                          f"{MAX_TABLE_ELEMENTS}"),
    (module("(table 20000 20000 funcref)"), f"table of 20000 elements; at most "
                                            f"{MAX_TABLE_ELEMENTS}"),
    (module("", '(memory (export "memory") 300)'), "memory of 300 pages (18.75 MiB) is over "
                                                   "the 16 MiB memory limit"),
    (module("", '(memory (export "memory") 1 1 shared)'), "shared, 64-bit or has custom"),
    (module("", imports='(import "env" "f" (func))'), "imports env.f (1 imports); activators are "
                                          "offered no imports"),
    (b"\0asm\x0d\0\x01\0", "a component"),
    (b"\0asm\x02\0\0\0", "unsupported WebAssembly version"),
    (b"\x7fELF\x02\x01\x01\0", "not a WebAssembly module"),
    (b"\0asm\x01\0\0\0\x05\x80\x80", "truncated or malformed"),
])
def test_declarations_beyond_the_limits_are_refused_at_load(wasm: bytes, problem: str) -> None:
    with pytest.raises(ActivatorError) as e:
        ActivatorHost(wasm, {}, label="mod.wasm")
    assert str(e.value).startswith("mod.wasm: ") and problem in str(e.value), e.value


def test_modules_within_the_limits_load() -> None:
    check_module(TCP.read_bytes(), "tcp.wasm", memory_limit=16 * MiB)
    for decls in ("", f"(table 3 {MAX_TABLE_ELEMENTS} funcref)",
                  '(table 0 0 externref) (@custom "x" "y")'):
        with ActivatorHost(module(decls), {}) as host:
            assert host.process(1, [A.Tick(1)]) == []


def test_a_module_that_does_not_compile_is_one_clear_line() -> None:
    with pytest.raises(ActivatorError) as e:
        ActivatorHost(b"\0asm\x01\0\0\0\x01\x01\x00\x0a", {}, label="bad.wasm")
    msg = str(e.value)
    assert msg.startswith("bad.wasm: does not compile: ") and "\n" not in msg, msg


def test_engine_has_multi_memory_64_bit_memory_and_gc_off() -> None:
    engine = runtime.shared_engine()
    for wat in ("(module (memory 1) (memory 1))", "(module (memory i64 1))",
                "(module (type (array i8)))"):
        with pytest.raises(wasmtime.WasmtimeError):
            wasmtime.Module(engine, wasmtime.wat2wasm(wat))


def test_store_limits_are_the_backstop() -> None:
    """What the loader would refuse, on an engine that accepts it: the store limits hold."""
    engine = wasmtime.Engine()  # multi-memory on, as in wasmtime's defaults
    two = wasmtime.Module(engine, wasmtime.wat2wasm("(module (memory 1) (memory 1))"))
    with pytest.raises(wasmtime.WasmtimeError, match="memor"):
        wasmtime.Instance(runtime.new_store(engine, 16 * MiB, MAX_TABLE_ELEMENTS), two, [])
    grow = wasmtime.Module(engine, wasmtime.wat2wasm("""(module (table $t 1 funcref)
        (memory 1)
        (func (export "table") (param i32) (result i32)
          (table.grow $t (ref.null func) (local.get 0)))
        (func (export "memory") (param i32) (result i32) (memory.grow (local.get 0))))"""))
    store = runtime.new_store(engine, 16 * MiB, MAX_TABLE_ELEMENTS)
    ex = wasmtime.Instance(store, grow, []).exports(store)
    assert ex["table"](store, 8_000_000) == -1
    assert ex["table"](store, MAX_TABLE_ELEMENTS - 1) == 1
    assert ex["table"](store, 1) == -1
    assert ex["memory"](store, 256) == -1 and ex["memory"](store, 255) == 1


# ---- module files ----


def _in_thread(fn, timeout: float) -> tuple[bool, BaseException | None, float]:
    """Run fn in a daemon thread: (finished within timeout, its exception, seconds)."""
    out: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out[0] = e
    t0 = time.monotonic()
    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(timeout)
    return not th.is_alive(), out[0], time.monotonic() - t0


def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "x.wasm"
    os.mkfifo(fifo)
    try:
        done, err, took = _in_thread(lambda: ActivatorHost(fifo, {}), 1.0)
    finally:  # unblock a reader stuck on the FIFO (as the host was, before)
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    assert done, "reading a FIFO blocked"
    assert isinstance(err, ActivatorError) and took < 0.1, (err, took)
    assert str(err) == f"{fifo}: not a regular file"


def test_an_oversize_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    big = tmp_path / "big.wasm"
    with open(big, "wb") as f:  # sparse: costs nothing, reading it would
        f.truncate(MAX_MODULE_BYTES + 1)
    t0 = time.monotonic()
    with pytest.raises(ActivatorError) as e:
        ActivatorHost(big, {})
    assert time.monotonic() - t0 < 0.1
    assert str(e.value) == f"{big}: {MAX_MODULE_BYTES + 1} bytes, over the 8 MiB module limit"
    with pytest.raises(ActivatorError, match="over the 1024 byte module limit"):
        ActivatorHost(TCP.read_bytes(), {}, max_module_bytes=1024, label="tcp")


def test_missing_files_and_directories_are_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ActivatorError, match=r"nope\.wasm: cannot read: No such file"):
        ActivatorHost(tmp_path / "nope.wasm", {})
    with pytest.raises(ActivatorError, match="not a regular file"):
        ActivatorHost(tmp_path, {})


def test_a_symlink_to_a_module_is_followed(tmp_path: Path) -> None:
    """Config maps and package managers link files; the target is what is checked."""
    link = tmp_path / "tcp.wasm"
    link.symlink_to(TCP)
    with ActivatorHost(link, {}) as host:
        assert host.module is ActivatorHost(TCP, {}).module


# ---- actions per call ----


def test_action_flood_is_cut_cheap_and_counted() -> None:
    """flood.c answers every packet with 65535 log actions in 1 MiB: decoding them all
    took ~155 ms (up to ~550 ms on a busy machine) per call, outside fuel."""
    with ActivatorHost(HOSTILE / "flood.wasm", {}) as host:
        inst = host.instance(1)
        assert inst.process([A.Tick(1)]) == [A.Log(A.LOG_DEBUG, "alive")]
        allowed = ACTIONS_PER_EVENT + ACTION_SLACK + 1  # and one for the packet it may hold
        calls, worst_cpu, wall = 100, 0.0, []
        for i in range(calls):
            t0, c0 = time.perf_counter(), time.thread_time()
            out = inst.process([A.Packet(i, 0, b"x")])
            worst_cpu = max(worst_cpu, time.thread_time() - c0)
            wall.append(time.perf_counter() - t0)
            assert out == [A.Log(A.LOG_DEBUG, f"#{n:06d}") for n in range(allowed)]
        wall.sort()
        print(f"\naction flood: per call median {wall[calls // 2] * 1e3:.2f} ms, "
              f"worst CPU {worst_cpu * 1e3:.2f} ms")
        assert worst_cpu < 0.005 and wall[calls // 2] < 0.005
        st = inst.stats
        assert st.actions_over_limit == calls * (65535 - allowed)
        assert st.fallbacks == st.recreated == st.malformed == 0
        assert st.actions == 1 + calls * allowed


def tcp_seg(sport: int) -> bytes:
    return P.tcp_packet(P.ip_bytes("10.0.0.7"), P.ip_bytes("10.96.0.10"), sport, 80, 1000, 0,
                        P.TCP_SYN)


def test_held_packets_earn_their_replays() -> None:
    """The TCP activator replays every packet it holds on backend_available: one action
    per packet given earlier, within the credit; past max_held they are cut and counted."""
    for max_held, held, read in ((1024, 300, 300), (10, 40, 30)):
        with ActivatorHost(TCP, {}, max_held=max_held) as host:
            inst = host.instance(80)
            for i in range(held):
                assert inst.process([A.Packet(i + 1, i, tcp_seg(1000 + i))]) is not None
            out = inst.process([A.BackendAvailable()])
            assert out == [A.ReplayPacket(i + 1) for i in range(read)]
            assert inst.stats.actions_over_limit == held - read
            assert inst.stats.fallbacks == 0


def test_decode_reads_at_most_the_limit_and_leaves_the_rest_unread() -> None:
    batch = A.encode_batch([A.ReplayPacket(i) for i in range(10)])
    tail = bytearray(batch)
    tail[2 + 12 * 5] = 200  # an unknown kind in record 5: never looked at with limit 5
    assert A.decode_actions(bytes(tail), 5) == [A.ReplayPacket(i) for i in range(5)]
    with pytest.raises(A.MalformedBatch):
        A.decode_actions(bytes(tail))
    assert A.batch_count(batch) == 10
    with pytest.raises(A.MalformedBatch, match="trailing"):  # all read: still exact
        A.decode_actions(batch + b"\0", 10)


def test_maximal_batch_decode_is_bounded_by_the_limit() -> None:
    """The review's reproducer: 65535 empty logs (~155 ms to decode); cut at the limit."""
    batch = A.encode_batch([A.Log(0, "") for _ in range(65535)])
    t0 = time.thread_time()
    out = A.decode_actions(batch, ACTIONS_PER_EVENT + ACTION_SLACK)
    assert time.thread_time() - t0 < 0.005 and len(out) == ACTIONS_PER_EVENT + ACTION_SLACK


# ---- the compiled-module cache ----


def test_module_cache_is_a_bounded_lru() -> None:
    cache = runtime.ModuleCache(capacity=2)
    engine = runtime.shared_engine()
    a, b, c = (wasmtime.wat2wasm(f"(module (func (export \"f{i}\")))") for i in range(3))
    ma = cache.compile(engine, a)
    cache.compile(engine, b)
    assert cache.compile(engine, a) is ma  # a hit makes a the most recent
    cache.compile(engine, c)               # evicts b, the least recently used
    assert len(cache) == 2 and a in cache and c in cache and b not in cache
    assert cache.evictions == 1


def test_shared_cache_never_holds_more_than_its_size() -> None:
    for i in range(runtime.MODULE_CACHE_SIZE + 8):
        runtime.compile_module(module(f"(global i32 (i32.const {i}))"))
        assert len(runtime.module_cache) <= runtime.MODULE_CACHE_SIZE
    assert runtime.module_cache.evictions >= 8
    with ActivatorHost(TCP, {}) as host:  # evicted or not, a live host keeps its module
        assert host.process(80, [A.Tick(1)]) == []


# ---- compiling never on the event loop ----


def _manager(events: list[tuple[str, dict]]):
    from fabric.services.dispatch import SignalQueue
    from fabric.services.manager import ServiceManager

    class DataPlane:
        def post(self, fn, *args):
            pass

        async def acall(self, fn, *args, timeout=30.0):
            return fn(*args)

    class Dispatch:
        def add(self, svc, activators):
            pass

    return ServiceManager("ns", DataPlane(), Dispatch(), object(), SignalQueue(),
                          lambda kind, ns, pod, **kw: events.append((kind, kw)),
                          lambda name: None)


def _spec(activator: str):
    from fabric.config.specs import PortSpec, ServiceSpec

    return ServiceSpec(name="web", ip=ipaddress.IPv4Address("10.96.0.10"),
                       ports=(PortSpec(80, 8080, activator=activator),))


def test_the_event_loop_keeps_ticking_while_a_module_compiles(monkeypatch) -> None:
    threads: list[threading.Thread] = []
    real = hostmod.compile_module

    def slow_compile(wasm: bytes) -> wasmtime.Module:
        threads.append(threading.current_thread())
        time.sleep(0.3)
        return real(wasm)
    monkeypatch.setattr(hostmod, "compile_module", slow_compile)

    async def main() -> int:
        mgr = _manager([])
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1
        ticker = asyncio.create_task(tick())
        await mgr.add(_spec(str(TCP)))
        ticker.cancel()
        assert list(mgr.hosts["web"]) == [(80, 6)]
        mgr.hosts["web"][(80, 6)].close()
        mgr.close()
        return ticks

    ticks = asyncio.run(main())
    assert threads and threads[0] is not threading.main_thread()
    assert ticks >= 10, ticks


def test_an_unusable_module_file_never_blocks_the_loop(tmp_path: Path) -> None:
    fifo = tmp_path / "x.wasm"
    os.mkfifo(fifo)
    events: list[tuple[str, dict]] = []

    async def main() -> None:
        mgr = _manager(events)
        try:
            await asyncio.wait_for(mgr.add(_spec(str(fifo))), 1.0)
        finally:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        assert mgr.hosts["web"] == {}  # the port holds and activates without it
        mgr.close()

    asyncio.run(main())
    assert events == [("activator_failed", {"service": "web", "port": 80,
                                            "error": f"{fifo}: not a regular file"})]


def test_a_ports_activator_memory_is_the_instances_cap_and_told_to_the_module() -> None:
    """activator_memory_mib reaches the store limit and the module's config (memory_limit),
    which a config of its own may still override."""
    from dataclasses import replace

    async def main() -> None:
        mgr = _manager([])
        spec = _spec(str(TCP))
        spec = replace(spec, ports=(replace(spec.ports[0], activator_memory=64 << 20),))
        await mgr.add(spec)
        host = mgr.hosts["web"][(80, 6)]
        try:
            assert host.memory_limit == 64 << 20
            assert b'"memory_limit": 67108864' in host.config_bytes
        finally:
            host.close()
            mgr.close()

    asyncio.run(main())
    with ActivatorHost(TCP, {"memory_limit": 5}) as h:
        assert h.memory_limit == 16 << 20 and b'"memory_limit": 5' in h.config_bytes
