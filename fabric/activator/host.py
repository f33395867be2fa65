"""Host for protocol-aware activators: sandboxed WebAssembly that decides what to hold.

While no backend of a service is ready the fabric holds packets for its VIP; an activator
(a core wasm module, ABI v1 in activators/ABI.md) sees those packets as events and answers
with actions: hold/drop/pass, wake a backend, replay held packets. The activator is
untrusted code, so every call runs with a fuel budget, an epoch deadline and a memory cap,
and any misbehaviour (trap, exhaustion, malformed answer, missing export) makes
``process`` return ``None``: the caller then falls back to plain hold-and-activate for
those events, and the instance is thrown away and recreated. What the host does outside
fuel is bounded too: the module file is size-checked and its declarations refused before
compiling (loader.py), a store has one memory, one table and one instance, and only so
many actions of an answer are decoded (the rest are dropped and counted).

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
import sys
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
    Packet,
    batch_count,
    decode_actions,
    encode_batch,
    payload_len,
)
from fabric.activator.dwarf import SourceIndex
from fabric.activator.loader import (
    MAX_MODULE_BYTES,
    MAX_TABLE_ELEMENTS,
    ActivatorError,
    check_module,
    read_module,
)
from fabric.activator.runtime import (
    EXPORTS,
    compile_module,
    deadline_ticks,
    epoch_ticker,
    guest_access,
    new_store,
    shared_engine,
)

log = logging.getLogger(__name__)

#: How many actions of one answer the host reads: ACTIONS_PER_EVENT per event (a decision,
#: a need, a log, one more), plus ACTION_SLACK, plus one per packet the instance was given
#: and may still name again (a replay, a late decision): a credit of at most ``max_held``,
#: by default the service hold's own default (config.specs.DEFAULT_HOLD_PACKETS).
ACTIONS_PER_EVENT = 4
ACTION_SLACK = 16
#: ...and, for a stream activator, this many per live stream (a backend_available may
#: connect, send to, resume and splice every stream held).
ACTIONS_PER_STREAM = 8
DEFAULT_MAX_HELD = 1024


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
    actions_over_limit: int = 0
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
        self.live_streams = 0
        self.last_fuel = 0
        # The last failure, for people: reason, message, wasm frames, fuel, events.
        self.last_failure: dict[str, Any] | None = None
        self._store: wasmtime.Store | None = None
        self._view: memoryview | None = None
        self._base = self._size = 0
        self._failures = 0
        self._overs = 0
        self._credit = 0  # actions beyond the per-call allowance it may still use
        self._instantiate()

    # -- lifecycle --

    def _instantiate(self) -> bool:
        """Create store + instance, check exports, run fab_init; False on failure."""
        h = self.host
        try:
            store = new_store(h.engine, h.memory_limit, h.table_elements)
            self._store = store
            self._credit = 0  # a fresh guest holds nothing
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
        self._view = None  # never touch the freed memory
        self._base = self._size = 0

    def _fail(self, e: BaseException, where: str, events: Sequence[Event] = ()) -> None:
        """Classify a failure, count it, log it (what trapped where, the fuel the call
        used, the events that caused it), drop the instance."""
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
        msg = _trap_message(e)
        frames = trap_frames(e, self.host.source)
        fuel = (self.host.fuel_per_call if reason == "out_of_fuel" else
                self.last_fuel if where == "process" else 0)
        batch = describe_events(events)
        self.last_failure = {"reason": reason, "during": where, "message": msg,
                             "frames": frames, "fuel_used": fuel, "events": batch}
        self.host.last_failure = {"instance": self.name, **self.last_failure}
        log.log(level, "activator %s (%s): %s during %s (%s%s; fuel used %d of %d; "
                "events: %s); instance dropped", self.name, self.host.label, reason, where,
                msg, f" at {' <- '.join(frames)}" if frames else "", fuel,
                self.host.fuel_per_call, batch or "none")
        self._teardown()

    # -- guest calls --

    def _guest(self, fn: Callable[..., int], *args: int) -> int:
        """Call a guest export with a fresh fuel budget and epoch deadline."""
        h, acc = self.host, self._acc
        epoch_ticker.enter()
        acc.begin(h.fuel_per_call, h.deadline_ticks)
        try:
            return fn(*args)
        finally:
            self.stats.fuel_used += h.fuel_per_call - acc.fuel_left()
            self._refresh_memory()

    def _refresh_memory(self) -> None:
        """Memory may move or grow during any guest call: re-read base and size, and
        remake the view of it (a memoryview over the guest's bytes: slicing it copies
        without a ctypes call, and so without dropping the GIL) when either changed."""
        base, size = self._acc.memory()
        if base != self._base or size != self._size or self._view is None:
            self._base, self._size = base, size
            self._view = (memoryview((ctypes.c_char * size).from_address(base)).cast("B")
                          if base and size else memoryview(bytearray(0)))
        if size + PAGE > self.host.memory_limit:
            raise _Failure("memory_cap", f"guest memory reached {size} bytes")

    def _ensure_buffer(self, need: int) -> None:
        if need <= self._buf_cap:
            return
        cap = max(need, 2 * self._buf_cap)
        ptr = self._guest(self._alloc, cap) & 0xFFFFFFFF
        if ptr == 0 or ptr + cap > self._size:
            raise _Failure("malformed", f"fab_alloc({cap}) returned {ptr:#x}")
        self._buf_ptr, self._buf_cap = ptr, cap

    def _write(self, data: bytes) -> None:
        p = self._buf_ptr
        self._view[p:p + len(data)] = data

    def _run(self, batch: bytes, nevents: int, npackets: int) -> list[Action]:
        """One fab_process call: the hot path, so _guest and friends are inlined here.

        Decoding is outside fuel, so at most ``ACTIONS_PER_EVENT * nevents + ACTION_SLACK``
        actions are decoded, plus one per packet given (in this call or earlier ones) that
        the guest may still name again: a replay or a late decision. That credit is at
        most ``max_held`` and spent by what is decoded past the per-call allowance, so over
        time a guest gets about one extra action per packet. The rest of an answer is not
        read: counted as ``actions_over_limit``.
        """
        n = len(batch)
        if n > self._buf_cap:
            self._ensure_buffer(n)
        p = self._buf_ptr
        self._view[p:p + n] = batch
        h, acc = self.host, self._acc
        epoch_ticker.enter()
        acc.begin(h.fuel_per_call, h.deadline_ticks)
        try:
            res = self._process(self._buf_ptr, n) & 0xFFFFFFFFFFFFFFFF
        finally:
            self.last_fuel = used = h.fuel_per_call - acc.fuel_left()
            self.stats.fuel_used += used
            self._refresh_memory()
        ptr, length = res >> 32, res & 0xFFFFFFFF
        if length < 2 or length > h.max_action_bytes or ptr + length > self._size:
            raise _Failure("malformed", f"action batch at {ptr:#x}+{length}")
        base = (ACTIONS_PER_EVENT * nevents + ACTION_SLACK
                + ACTIONS_PER_STREAM * self.live_streams)
        credit = min(self._credit + npackets, h.max_held)
        view = self._view
        if length == 2 and view[ptr] == 0 and view[ptr + 1] == 0:
            actions: list[Action] = []
        else:
            data = view[ptr:ptr + length].tobytes()
            count, allowed = batch_count(data), base + credit
            if count > allowed:
                actions = decode_actions(data, allowed)
                self._over_limit(count, allowed)
            else:
                actions = decode_actions(data)
            if len(actions) > base:
                credit -= len(actions) - base
        self._credit = credit
        return actions

    def _over_limit(self, count: int, allowed: int) -> None:
        """An answer with more actions than may be read: the first ``allowed`` are carried
        out, the rest dropped and counted (not a failure: what was read was well-formed)."""
        self.stats.actions_over_limit += count - allowed
        self._overs += 1
        level = logging.WARNING if self._overs <= 3 else logging.DEBUG
        log.log(level, "activator %s (%s): answered %d actions, read the first %d (%d per "
                "event + %d + packets it may hold); %d dropped (actions_over_limit)",
                self.name, self.host.label, count, allowed, ACTIONS_PER_EVENT, ACTION_SLACK,
                count - allowed)

    # -- the API --

    def process(self, events: Sequence[Event], streams: int = 0) -> list[Action] | None:
        """Feed events, return the actions; None means "fall back, keep these events".
        `streams`: how many live streams the guest may act on (stream activators)."""
        self.live_streams = streams
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
                actions = self._run(batch, len(events), _packets(events))
            else:
                actions = []
                for chunk in h._chunks(events):
                    actions += self._run(encode_batch(chunk), len(chunk), _packets(chunk))
        except MalformedBatch as e:
            self._fail(_Failure("malformed", str(e)), "process", events)
        except Exception as e:  # noqa: BLE001 - traps, exhaustion, host-side surprises
            self._fail(e, "process", events)
        else:
            st.actions += len(actions)
            return actions
        st.fallbacks += 1
        if self._instantiate():  # eagerly, so the next packet finds a fresh instance
            st.recreated += 1
        return None


def _trap_message(e: BaseException) -> str:
    """What went wrong in one line: a trap's cause (wasmtime puts it after the
    backtrace), else the error's first line."""
    text = str(e)
    if not text:
        return type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if isinstance(e, wasmtime.Trap) and "Caused by:" in lines:
        rest = lines[lines.index("Caused by:") + 1:]
        if rest:
            return rest[0]
    return lines[0]


def trap_frames(e: BaseException, source: SourceIndex | None = None,
                limit: int = 8) -> list[str]:
    """The wasm frames of a trap, innermost first: the function's name where the
    module has a name section (debug builds), else its index, with the code offset,
    and where the module has DWARF line info (``source``), the file:line:column
    (``fab_process+0xca (testing/trap.c:6:5)``). The first trap of a module parses its
    debug info (dwarf.py), once: never on the hot path."""
    if not isinstance(e, wasmtime.Trap):
        return []
    out = []
    try:
        for f in (e.frames or [])[:limit]:
            name = f.func_name or (source.function(f.func_index) if source else None)
            name = name or f"func[{f.func_index}]"
            frame = f"{name}+{f.func_offset:#x}"
            loc = source.locate(f.module_offset) if source is not None else None
            out.append(f"{frame} ({loc})" if loc is not None else frame)
    except Exception:  # noqa: BLE001 - a diagnostic must never fail the host
        return out
    return out


def describe_events(events: Sequence[Event], limit: int = 6) -> str:
    """A one-line summary of an event batch: kinds with counts, the first few in
    order with their ids and sizes."""
    if not events:
        return ""
    parts = []
    for e in events[:limit]:
        name = _EVENT_NAMES.get(type(e).__name__, type(e).__name__)
        ident = getattr(e, "stream_id", getattr(e, "packet_id", None))
        data = getattr(e, "data", None)
        extra = [f"#{ident}"] if ident is not None else []
        if data is not None:
            extra.append(f"{len(data)} B")
        parts.append(name + (f"({', '.join(extra)})" if extra else ""))
    more = f", +{len(events) - limit} more" if len(events) > limit else ""
    return f"{len(events)}: " + ", ".join(parts) + more


_EVENT_NAMES = {"BackendAvailable": "backend_available",
                "BackendUnavailable": "backend_unavailable", "Tick": "tick",
                "Packet": "packet", "StreamOpen": "stream_open", "StreamData": "stream_data",
                "StreamClose": "stream_close",
                "UpstreamConnectResult": "upstream_connect_result",
                "UpstreamData": "upstream_data", "UpstreamClosed": "upstream_close"}


def _packets(events: Sequence[Event]) -> int:
    n = 0
    for e in events:
        if type(e) is Packet:
            n += 1
    return n


def _one_line(e: BaseException) -> str:
    """wasmtime's multi-line errors as one line."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    return "; ".join(ln for ln in lines if ln and ln != "Caused by:")[:300] or type(e).__name__


class ActivatorHost:
    """Runs one activator module for many service ports, one sandboxed instance each.

    Construction reads (a path: a regular file of at most ``max_module_bytes``), checks
    and compiles the module, which may take seconds: call it off the event loop. A module
    that cannot be used raises ActivatorError naming it and the problem.
    """

    def __init__(self, wasm: bytes | str | Path, config: dict[str, Any] | None = None, *,
                 fuel_per_call: int = 20_000_000, memory_limit: int = 16 << 20,
                 deadline_ms: int = 50, max_batch_events: int = 1024,
                 max_batch_bytes: int = 256 << 10, max_action_bytes: int = 1 << 20,
                 max_held: int = DEFAULT_MAX_HELD, table_elements: int = MAX_TABLE_ELEMENTS,
                 max_module_bytes: int = MAX_MODULE_BYTES, label: str | None = None) -> None:
        self._closed = True  # until the epoch ticker is acquired
        if isinstance(wasm, str | Path):
            name = str(wasm)
            label = label or Path(wasm).name
            wasm = read_module(wasm, max_module_bytes)
        else:
            name = label or f"module {hashlib.sha256(wasm).hexdigest()[:12]}"
            if len(wasm) > max_module_bytes:
                raise ActivatorError(name, f"{len(wasm)} bytes, over the "
                                           f"{max_module_bytes} byte module limit")
        check_module(wasm, name, memory_limit=memory_limit, table_elements=table_elements)
        # Debug builds: their DWARF names the file:line of a trap (parsed on the first).
        self.source = SourceIndex.probe(wasm)
        self.label = label or hashlib.sha256(wasm).hexdigest()[:12]
        self.engine = shared_engine()
        try:
            self.module = compile_module(wasm)
        except wasmtime.WasmtimeError as e:
            raise ActivatorError(name, f"does not compile: {_one_line(e)}") from None
        # A stream activator (ABI.md, "Streams") says so with an export of its own.
        self.streams = any(e.name == "fab_streams" for e in self.module.exports)
        # The module is told its memory cap (ABI.md, "Config"): a guest that pools buffers
        # can size the pool to it instead of growing into the cap and being recycled.
        cfg = dict(config or {})
        cfg.setdefault("memory_limit", memory_limit)
        self.config_bytes = json.dumps(cfg, sort_keys=True).encode()
        self.fuel_per_call = fuel_per_call
        self.memory_limit = memory_limit
        self.deadline_ms = max(1, deadline_ms)
        self.deadline_ticks = deadline_ticks(deadline_ms)
        self.max_batch_events = min(max_batch_events, MAX_RECORDS)
        self.max_batch_bytes = max_batch_bytes
        self.max_action_bytes = max_action_bytes
        self.max_held = max(0, min(max_held, MAX_RECORDS))
        self.table_elements = table_elements
        self.initial_buffer = min(64 << 10, max_batch_bytes)
        self.instances: dict[int, ActivatorInstance] = {}
        self.last_failure: dict[str, Any] | None = None  # of any instance, the latest
        self._closed = False
        epoch_ticker.acquire(self.engine, self.deadline_ms)

    def instance(self, port: int) -> ActivatorInstance:
        """The instance for a service port, created on first use."""
        inst = self.instances.get(port)
        if inst is None:
            inst = self.instances[port] = ActivatorInstance(self, f"{self.label}:{port}")
        return inst

    def process(self, port: int, events: Sequence[Event], streams: int = 0
                ) -> list[Action] | None:
        return self.instance(port).process(events, streams)

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
        # At interpreter exit the epoch thread may have been frozen holding the ticker's
        # lock: taking it here would hang the exit. Nothing needs releasing then.
        if sys.is_finalizing():
            return
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

