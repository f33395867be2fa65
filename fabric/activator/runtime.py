"""The wasmtime side of activators: one shared engine, limited stores, a bounded module
cache, the epoch ticker and the two ways of calling into a guest (wasmtime's raw C entry
point, with the public API as fallback).

Why the raw path: ``Func.__call__`` re-reads the function type on every call (~27 us);
the C entry point with a preallocated value array costs ~1.7 us. It is private API, so
it sits behind ``guest_access()``, which falls back to the public path whenever
wasmtime-py's internals do not look as expected.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import wasmtime

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# Engine, stores, module cache, epoch ticker
# ---------------------------------------------------------------------------------------

_lock = threading.Lock()
_engine: wasmtime.Engine | None = None

#: Compiled modules kept for reuse (distinct modules; least recently used evicted).
MODULE_CACHE_SIZE = 32


def shared_engine() -> wasmtime.Engine:
    """One engine for all activators: fuel metering and epoch interruption on, and the
    proposals the ABI has no use for off: more memories, 64-bit memories and the GC heap
    would each be memory outside the one the host watches (``memory``)."""
    global _engine
    with _lock:
        if _engine is None:
            cfg = wasmtime.Config()
            cfg.consume_fuel = True
            cfg.epoch_interruption = True
            cfg.cranelift_opt_level = "speed"
            cfg.wasm_multi_memory = False
            cfg.wasm_memory64 = False
            cfg.wasm_gc = False
            _engine = wasmtime.Engine(cfg)
        return _engine


def new_store(engine: wasmtime.Engine, memory_size: int, table_elements: int) -> wasmtime.Store:
    """A store for one instance: one memory of at most ``memory_size`` bytes, one table of
    at most ``table_elements`` elements, one instance. ``memory.grow`` and ``table.grow``
    past them return -1 in the guest; a module declaring more fails to instantiate (the
    loader refuses such modules first; this is the backstop)."""
    store = wasmtime.Store(engine)
    store.set_limits(memory_size=memory_size, table_elements=table_elements, instances=1,
                     tables=1, memories=1)
    return store


class ModuleCache:
    """Compiled modules by the sha256 of their bytes, at most ``capacity``, least recently
    used evicted. A host keeps its own reference, so eviction never unloads a live one."""

    def __init__(self, capacity: int = MODULE_CACHE_SIZE) -> None:
        self.capacity = capacity
        self.evictions = 0
        self._lock = threading.Lock()
        self._modules: OrderedDict[str, wasmtime.Module] = OrderedDict()

    def __len__(self) -> int:
        return len(self._modules)

    def __contains__(self, wasm: object) -> bool:
        return isinstance(wasm, bytes | bytearray) and self.key(wasm) in self._modules

    @staticmethod
    def key(wasm: bytes | bytearray) -> str:
        return hashlib.sha256(wasm).hexdigest()

    def compile(self, engine: wasmtime.Engine, wasm: bytes) -> wasmtime.Module:
        """The compiled module, compiled now (outside the lock) unless cached."""
        key = self.key(wasm)
        with self._lock:
            mod = self._modules.get(key)
            if mod is not None:
                self._modules.move_to_end(key)
                return mod
        mod = wasmtime.Module(engine, wasm)
        with self._lock:
            mod = self._modules.setdefault(key, mod)
            self._modules.move_to_end(key)
            while len(self._modules) > self.capacity:
                self._modules.popitem(last=False)
                self.evictions += 1
        return mod


module_cache = ModuleCache()


def compile_module(wasm: bytes) -> wasmtime.Module:
    """Compile once per distinct module (see ModuleCache); compiling costs milliseconds
    to seconds, so callers run this off the event loop."""
    return module_cache.compile(shared_engine(), wasm)


#: The epoch ticker's period. Every tick takes the GIL from whichever thread holds it
#: (the data plane's or the event loop's), so it is a cost on every busy port: at 1 ms
#: it was 4 % of a core and a third of a context switch per PostgreSQL transaction
#: (docs/performance.md, "Stream ports"). A deadline is a wall-clock backstop behind
#: fuel, so 5 ms of resolution is plenty.
TICK_SECONDS = 0.005


def deadline_ticks(deadline_ms: int) -> int:
    """Epoch ticks for a deadline of ``deadline_ms``: a lower bound (a call may begin
    just before a tick, hence the one added; sleeps oversleep, never undersleep)."""
    per = TICK_SECONDS * 1000
    return max(1, -(-max(1, deadline_ms) // int(per))) + 1


class EpochTicker:
    """Advances the shared engine's epoch every ``TICK_SECONDS`` while guest code runs.

    Deadlines are counted in ticks (``deadline_ticks``), so ``deadline_ms`` is a lower
    bound. Every guest call first calls ``enter()``, which only
    counts (two attribute operations: it runs per packet). The thread parks when no host
    is open, or when the count has not moved for ``idle_after`` seconds (at least twice
    the longest deadline of any host, so no call can still be running), and the next
    ``enter()`` wakes it. So services with activators cost no CPU while nothing calls
    them (a ticker that ticked for ever cost a few per cent of a core). Parking sets the
    flag, then reads the count once more, while ``enter()`` bumps the count, then reads
    the flag: one of the two always sees the other, so a call never runs untimed.
    """

    IDLE_AFTER = 1.0

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._users = 0
        self._thread: threading.Thread | None = None
        self.calls = 0  # guest calls so far (its changes are what the thread watches)
        self.idle_after = self.IDLE_AFTER
        self.parked = True
        self.wakeups = 0  # times enter() woke the thread (for tests and the curious)

    def acquire(self, engine: wasmtime.Engine, deadline_ms: int = 50) -> None:
        """A host starts using the ticker (``deadline_ms``: its longest deadline)."""
        with self._cond:
            self._users += 1
            self.idle_after = max(self.idle_after, 2 * deadline_ms / 1000)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, args=(engine,),
                                                name="activator-epoch", daemon=True)
                self._thread.start()
            self._cond.notify()

    def release(self) -> None:
        with self._cond:
            self._users = max(0, self._users - 1)

    def enter(self) -> None:
        self.calls += 1
        if self.parked:
            self._wake()

    def _wake(self) -> None:
        with self._cond:
            if self.parked:
                self.parked = False
                self.wakeups += 1
                self._cond.notify()

    def _run(self, engine: wasmtime.Engine) -> None:
        cond = self._cond
        seen, moved = -1, time.monotonic()
        while True:
            with cond:
                while self._users == 0 or self.parked:
                    cond.wait()
            time.sleep(TICK_SECONDS)  # first: a call that woke the thread gets full ticks
            engine.increment_epoch()
            now = time.monotonic()
            n = self.calls
            if n != seen:
                seen, moved = n, now
            elif now - moved > self.idle_after:
                with cond:
                    self.parked = True
                    if self.calls != n:  # a call began meanwhile: keep ticking
                        self.parked = False
                moved = now


epoch_ticker = EpochTicker()


# ---------------------------------------------------------------------------------------
# Calling into the guest
# ---------------------------------------------------------------------------------------


class PublicAccess:
    """Guest calls, budgets and memory through wasmtime-py's public API (the fallback)."""

    raw = False

    def __init__(self, store: wasmtime.Store, mem: wasmtime.Memory) -> None:
        self.store = store
        self.mem = mem

    def caller(self, func: wasmtime.Func, nparams: int) -> Callable[..., int]:
        store = self.store

        def call(*args: int) -> int:
            return func(store, *args)
        return call

    def begin(self, fuel: int, ticks: int) -> None:
        self.store.set_fuel(fuel)
        self.store.set_epoch_deadline(ticks)

    def fuel_left(self) -> int:
        return self.store.get_fuel()

    def memory(self) -> tuple[int, int]:
        base = ctypes.cast(self.mem.data_ptr(self.store), ctypes.c_void_p).value or 0
        return base, self.mem.data_len(self.store)


class RawAccess(PublicAccess):
    """The same through wasmtime's C API directly: ~1.7 µs a call instead of ~27 µs.

    Uses wasmtime-py internals (``_bindings``, ``Store._context``, ``Func._func``,
    ``Memory._memory``); the constructor raises on any mismatch and the instance then uses
    ``PublicAccess``. Calls go through ``wasmtime_func_call_unchecked``, which trusts
    the argument types: only used after each export's type was checked against the ABI.
    """

    raw = True

    def __init__(self, store: wasmtime.Store, mem: wasmtime.Memory) -> None:
        super().__init__(store, mem)
        from wasmtime import _bindings as ffi

        self.ffi = ffi
        self.ctx = store._context()
        self.memref = ctypes.byref(mem._memory)
        # The bookkeeping calls (fuel, deadline, memory) go through a PyDLL view of the
        # same library: they keep the GIL. Through wasmtime-py's CDLL each would drop and
        # retake it, and under load (the data-plane thread waiting for it) every retake
        # is a futex wait and a context switch: five per guest call for sub-microsecond
        # work. Only the guest call itself (which may run for its whole deadline) still
        # releases the GIL, so the data plane and the epoch ticker run meanwhile.
        lib = ctypes.PyDLL(ffi.dll._name, handle=ffi.dll._handle)
        ctx_t, mem_t = ctypes.POINTER(ffi.wasmtime_context_t), ctypes.POINTER(
            ffi.wasmtime_memory_t)
        err_t = ctypes.POINTER(ffi.wasmtime_error_t)
        self._mem_data = _pyfunc(lib, "wasmtime_memory_data", ctypes.c_void_p,
                                 ctx_t, mem_t)
        self._mem_size = _pyfunc(lib, "wasmtime_memory_data_size", ctypes.c_size_t,
                                 ctx_t, mem_t)
        self._set_fuel = _pyfunc(lib, "wasmtime_context_set_fuel", err_t, ctx_t,
                                 ctypes.c_uint64)
        self._get_fuel = _pyfunc(lib, "wasmtime_context_get_fuel", err_t, ctx_t,
                                 ctypes.POINTER(ctypes.c_uint64))
        self._set_deadline = _pyfunc(lib, "wasmtime_context_set_epoch_deadline", None,
                                     ctx_t, ctypes.c_uint64)
        self._fuel = ctypes.c_uint64(0)
        self._fuelref = ctypes.byref(self._fuel)
        self._call = ffi._wasmtime_func_call_unchecked
        self._trap_t = ctypes.POINTER(ffi.wasm_trap_t)
        self.base, self.size = 0, 0

    def caller(self, func: wasmtime.Func, nparams: int) -> Callable[..., int]:
        call, ctx, fref = self._call, self.ctx, ctypes.byref(func._func)
        nslots = max(nparams, 1)  # the array holds the params, then the one result
        vals = (self.ffi.wasmtime_val_raw_t * nslots)()
        trap_t = self._trap_t
        state = [trap_t()]
        state.append(ctypes.byref(state[0]))
        Trap, Error = wasmtime.Trap, wasmtime.WasmtimeError

        def check(err: Any) -> None:
            if err:
                raise Error._from_ptr(err)
            trap = state[0]
            if trap:  # the Trap object takes ownership; start over with a null pointer
                state[0] = trap_t()
                state[1] = ctypes.byref(state[0])
                raise Trap._from_ptr(trap)

        if nparams == 2:  # the per-batch path (fab_process, fab_init): no loop
            def raw2(a: int, b: int) -> int:
                vals[0].i32 = a
                vals[1].i32 = b
                err = call(ctx, fref, vals, 2, state[1])
                if err or state[0]:
                    check(err)
                return vals[0].i64
            return raw2

        def raw(*args: int) -> int:
            for i, a in enumerate(args):
                vals[i].i32 = a
            err = call(ctx, fref, vals, nslots, state[1])
            if err or state[0]:
                check(err)
            return vals[0].i64
        return raw

    def begin(self, fuel: int, ticks: int) -> None:
        err = self._set_fuel(self.ctx, fuel)
        if err:
            raise wasmtime.WasmtimeError._from_ptr(err)
        self._set_deadline(self.ctx, ticks)

    def fuel_left(self) -> int:
        err = self._get_fuel(self.ctx, self._fuelref)
        if err:
            raise wasmtime.WasmtimeError._from_ptr(err)
        return self._fuel.value

    def memory(self) -> tuple[int, int]:
        """Base and size; the base is re-read only when the size moved (a linear memory
        never shrinks, and wasmtime moves one only to grow it)."""
        size = self._mem_size(self.ctx, self.memref)
        if size != self.size or not self.base:
            self.base = self._mem_data(self.ctx, self.memref) or 0
            self.size = size
        return self.base, size


def _pyfunc(lib: ctypes.PyDLL, name: str, restype: Any, *argtypes: Any) -> Any:
    """`name` from `lib` as a function that keeps the GIL (see RawAccess)."""
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


#: Tests set this to exercise the public fallback path.
FORCE_PUBLIC_API = False


def guest_access(store: wasmtime.Store, mem: wasmtime.Memory) -> PublicAccess:
    """The fast path if this wasmtime-py's internals look as expected, else the public one."""
    if not FORCE_PUBLIC_API:
        try:
            return RawAccess(store, mem)
        except Exception as e:  # noqa: BLE001 - any mismatch means "use the public path"
            log.info("activator: raw wasmtime path unavailable (%s); using the public API", e)
    return PublicAccess(store, mem)


# Export name -> (param kinds, result kinds), as wasmtime ValType strings.
EXPORTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fab_abi_version": ((), ("i32",)),
    "fab_alloc": (("i32",), ("i32",)),
    "fab_init": (("i32", "i32"), ("i32",)),
    "fab_process": (("i32", "i32"), ("i64",)),
}

