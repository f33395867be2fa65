"""Host for protocol-aware activators: sandboxed WebAssembly that decides what to hold.

While no backend of a service is ready the fabric holds packets for its VIP; an activator
(a core wasm module, ABI v1 in activators/ABI.md) sees those packets as events and answers
with actions: hold/drop/pass, wake a backend, replay held packets. The activator is
untrusted code, so every call runs with a fuel budget, an epoch deadline and a memory cap,
and any misbehaviour (trap, exhaustion, malformed answer, missing export) makes
``process`` return ``None``: the caller then falls back to plain hold-and-activate for
those events, and the instance is thrown away and recreated.

Why a core module and not the component model: wasmtime-py lowers ``list<u8>`` byte by
byte (~1 ms per 1.4 KB packet). Here the host writes event batches straight into guest
memory and reads the action batch back with one copy each way, and calls the export
through wasmtime's raw C entry point (about 15x cheaper than ``Func.__call__``), with the
public API as fallback.

Threading: an ``ActivatorInstance`` is not thread safe; call it from one thread (the
dataplane's). Hosts may live in different threads; they share one engine and one epoch
ticker thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import wasmtime

from fabric.activator.abi import (
    ABI_VERSION,
    MAX_RECORDS,
    PAGE,
    RECORD,
    Action,
    Event,
    MalformedBatch,
    decode_actions,
    encode_batch,
    payload_len,
)
from fabric.activator.runtime import (
    EXPORTS,
    compile_module,
    epoch_ticker,
    guest_access,
    shared_engine,
)

log = logging.getLogger(__name__)


class _Failure(Exception):
    """Internal: the guest misbehaved; ``reason`` names the counter to bump."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class ActivatorStats:
    """Counters; a host's are the sum of its instances'."""

    calls: int = 0
    events: int = 0
    actions: int = 0
    traps: int = 0
    out_of_fuel: int = 0
    deadline: int = 0
    malformed: int = 0
    memory_cap: int = 0
    bad_module: int = 0
    failed_init: int = 0
    recreated: int = 0
    fallbacks: int = 0
    fuel_used: int = 0

    def add(self, other: ActivatorStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class ActivatorInstance:
    """One activator instance (one wasm Store) serving one service port."""

    def __init__(self, host: ActivatorHost, name: str) -> None:
        self.host = host
        self.name = name
        self.stats = ActivatorStats()
        self.raw_path = False
        self._store: wasmtime.Store | None = None
        self._failures = 0
        self._instantiate()

    # -- lifecycle --

    def _instantiate(self) -> bool:
        """Create store + instance, check exports, run fab_init; False on failure."""
        h = self.host
        try:
            store = wasmtime.Store(h.engine)
            store.set_limits(memory_size=h.memory_limit)
            self._store = store
            inst = wasmtime.Instance(store, h.module, [])
            exports = inst.exports(store)
            mem = exports.get("memory")
            if not isinstance(mem, wasmtime.Memory):
                raise _Failure("bad_module", "no exported memory 'memory'")
            self._acc = acc = guest_access(store, mem)
            self.raw_path = acc.raw
            funcs: dict[str, Callable[..., int]] = {}
            for name, (params, results) in EXPORTS.items():
                f = exports.get(name)
                if not isinstance(f, wasmtime.Func):
                    raise _Failure("bad_module", f"no exported function {name!r}")
                ty = f.type(store)
                got = (tuple(str(p) for p in ty.params), tuple(str(r) for r in ty.results))
                if got != (params, results):
                    raise _Failure("bad_module", f"{name} has type {got}")
                funcs[name] = acc.caller(f, len(params))
            self._alloc = funcs["fab_alloc"]
            self._process = funcs["fab_process"]
            version = self._guest(funcs["fab_abi_version"])
            if version != ABI_VERSION:
                raise _Failure("bad_module", f"ABI version {version}, want {ABI_VERSION}")
            cfg = h.config_bytes
            self._buf_ptr, self._buf_cap = 0, 0
            self._ensure_buffer(max(len(cfg), h.initial_buffer))
            self._write(cfg)
            rc = self._guest(funcs["fab_init"], self._buf_ptr, len(cfg))
            if rc != 0:
                raise _Failure("failed_init", f"fab_init returned {rc}")
            return True
        except Exception as e:  # noqa: BLE001 - any failure: the instance is down
            self._fail(e, "instantiate")
            return False

    def _teardown(self) -> None:
        self._store = None  # dropping the Store frees the instance and its memory

    def _fail(self, e: BaseException, where: str) -> None:
        """Classify a failure, count it, log it, drop the instance."""
        reason = "traps"
        if isinstance(e, _Failure):
            reason = e.reason
        elif isinstance(e, wasmtime.Trap):
            code = e.trap_code
            if code == wasmtime.TrapCode.OUT_OF_FUEL:
                reason = "out_of_fuel"
            elif code == wasmtime.TrapCode.INTERRUPT:
                reason = "deadline"
        elif isinstance(e, wasmtime.WasmtimeError) and where == "instantiate":
            reason = "bad_module"  # unresolvable imports, bad memory, etc.
        setattr(self.stats, reason, getattr(self.stats, reason) + 1)
        if reason in ("out_of_fuel", "deadline"):
            self.stats.traps += 1
        self._failures += 1
        level = logging.WARNING if self._failures <= 3 else logging.DEBUG
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.log(level, "activator %s (%s): %s during %s; instance dropped",
                self.name, self.host.label, reason, where)
        log.debug("activator %s: %s", self.name, msg)
        self._teardown()

    # -- guest calls --

    def _guest(self, fn: Callable[..., int], *args: int) -> int:
        """Call a guest export with a fresh fuel budget and epoch deadline."""
        h, acc = self.host, self._acc
        acc.begin(h.fuel_per_call, h.deadline_ticks)
        try:
            return fn(*args)
        finally:
            self.stats.fuel_used += h.fuel_per_call - acc.fuel_left()
            self._refresh_memory()

    def _refresh_memory(self) -> None:
        """Memory may move or grow during any guest call: re-read base and size."""
        self._base, self._size = self._acc.memory()
        if self._size + PAGE > self.host.memory_limit:
            raise _Failure("memory_cap", f"guest memory reached {self._size} bytes")

    def _ensure_buffer(self, need: int) -> None:
        if need <= self._buf_cap:
            return
        cap = max(need, 2 * self._buf_cap)
        ptr = self._guest(self._alloc, cap) & 0xFFFFFFFF
        if ptr == 0 or ptr + cap > self._size:
            raise _Failure("malformed", f"fab_alloc({cap}) returned {ptr:#x}")
        self._buf_ptr, self._buf_cap = ptr, cap

    def _write(self, data: bytes) -> None:
        ctypes.memmove(self._base + self._buf_ptr, data, len(data))

    def _run(self, batch: bytes) -> list[Action]:
        """One fab_process call: the hot path, so _guest and friends are inlined here."""
        n = len(batch)
        if n > self._buf_cap:
            self._ensure_buffer(n)
        ctypes.memmove(self._base + self._buf_ptr, batch, n)
        h, acc = self.host, self._acc
        acc.begin(h.fuel_per_call, h.deadline_ticks)
        try:
            res = self._process(self._buf_ptr, n) & 0xFFFFFFFFFFFFFFFF
        finally:
            self.stats.fuel_used += h.fuel_per_call - acc.fuel_left()
            self._refresh_memory()
        ptr, length = res >> 32, res & 0xFFFFFFFF
        if length < 2 or length > h.max_action_bytes or ptr + length > self._size:
            raise _Failure("malformed", f"action batch at {ptr:#x}+{length}")
        if length == 2 and ctypes.string_at(self._base + ptr, 2) == b"\0\0":
            return []
        return decode_actions(ctypes.string_at(self._base + ptr, length))

    # -- the API --

    def process(self, events: Sequence[Event]) -> list[Action] | None:
        """Feed events, return the actions; None means "fall back, keep these events"."""
        st = self.stats
        st.calls += 1
        st.events += len(events)
        if self._store is None:
            if not self._instantiate():
                st.fallbacks += 1
                return None
            st.recreated += 1
        h = self.host
        try:
            batch = encode_batch(events) if len(events) <= h.max_batch_events else b""
            if batch and len(batch) <= h.max_batch_bytes:
                actions = self._run(batch)
            else:
                actions = []
                for chunk in h._chunks(events):
                    actions += self._run(encode_batch(chunk))
        except MalformedBatch as e:
            self._fail(_Failure("malformed", str(e)), "process")
        except Exception as e:  # noqa: BLE001 - traps, exhaustion, host-side surprises
            self._fail(e, "process")
        else:
            st.actions += len(actions)
            return actions
        st.fallbacks += 1
        if self._instantiate():  # eagerly, so the next packet finds a fresh instance
            st.recreated += 1
        return None


class ActivatorHost:
    """Runs one activator module for many service ports, one sandboxed instance each."""

    def __init__(self, wasm: bytes | str | Path, config: dict[str, Any] | None = None, *,
                 fuel_per_call: int = 20_000_000, memory_limit: int = 16 << 20,
                 deadline_ms: int = 50, max_batch_events: int = 1024,
                 max_batch_bytes: int = 256 << 10, max_action_bytes: int = 1 << 20,
                 label: str | None = None) -> None:
        if isinstance(wasm, str | Path):
            label = label or Path(wasm).name
            wasm = Path(wasm).read_bytes()
        self.label = label or hashlib.sha256(wasm).hexdigest()[:12]
        self.engine = shared_engine()
        self.module = compile_module(wasm)
        self.config_bytes = json.dumps(config or {}, sort_keys=True).encode()
        self.fuel_per_call = fuel_per_call
        self.memory_limit = memory_limit
        self.deadline_ticks = max(1, deadline_ms)
        self.max_batch_events = min(max_batch_events, MAX_RECORDS)
        self.max_batch_bytes = max_batch_bytes
        self.max_action_bytes = max_action_bytes
        self.initial_buffer = min(64 << 10, max_batch_bytes)
        self.instances: dict[int, ActivatorInstance] = {}
        self._closed = False
        epoch_ticker.acquire(self.engine)

    def instance(self, port: int) -> ActivatorInstance:
        """The instance for a service port, created on first use."""
        inst = self.instances.get(port)
        if inst is None:
            inst = self.instances[port] = ActivatorInstance(self, f"{self.label}:{port}")
        return inst

    def process(self, port: int, events: Sequence[Event]) -> list[Action] | None:
        return self.instance(port).process(events)

    @property
    def stats(self) -> ActivatorStats:
        total = ActivatorStats()
        for inst in self.instances.values():
            total.add(inst.stats)
        return total

    def _chunks(self, events: Sequence[Event]) -> Iterable[Sequence[Event]]:
        """Split so no batch exceeds the count or byte limits (one call per chunk)."""
        if len(events) <= self.max_batch_events:
            size = 2 + sum(RECORD.size + payload_len(e) for e in events)
            if size <= self.max_batch_bytes:
                yield events
                return
        chunk: list[Event] = []
        size = 2
        for e in events:
            n = RECORD.size + payload_len(e)
            if 2 + n > self.max_batch_bytes:
                raise ValueError(f"event of {n} bytes exceeds max_batch_bytes")
            if chunk and (len(chunk) >= self.max_batch_events
                          or size + n > self.max_batch_bytes):
                yield chunk
                chunk, size = [], 2
            chunk.append(e)
            size += n
        if chunk:
            yield chunk

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.instances.clear()
            epoch_ticker.release()

    def __enter__(self) -> ActivatorHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

