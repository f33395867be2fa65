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
import operator
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import wasmtime

log = logging.getLogger(__name__)

ABI_VERSION = 1

# ---- event kinds (ABI.md, "Events") ----
EV_BACKEND_AVAILABLE = 1
EV_BACKEND_UNAVAILABLE = 2
EV_TICK = 3
EV_PACKET = 4
EV_STREAM_OPEN = 16
EV_STREAM_DATA = 17
EV_STREAM_CLOSE = 18
EV_UPSTREAM_CONNECT_RESULT = 32
EV_UPSTREAM_DATA = 33
EV_UPSTREAM_CLOSE = 34

# ---- action kinds (ABI.md, "Actions") ----
ACT_SET_BACKEND_NEED = 1
ACT_LOG = 2
ACT_PACKET_DECISION = 3
ACT_REPLAY_PACKET = 4
ACT_DOWNSTREAM_SEND = 16
ACT_DOWNSTREAM_CLOSE = 17
ACT_UPSTREAM_CONNECT = 32
ACT_UPSTREAM_SEND = 33
ACT_UPSTREAM_CLOSE = 34
ACT_PAUSE = 48
ACT_RESUME = 49
ACT_SPLICE = 50

NEED_NONE, NEED_TRAFFIC, NEED_ACTIVE = 0, 1, 2
HOLD, DROP, PASS = 0, 1, 2
LOG_DEBUG, LOG_INFO, LOG_WARNING, LOG_ERROR = 0, 1, 2, 3

RECORD = struct.Struct("<BBHI")  # kind, flags, reserved, payload length
COUNT = struct.Struct("<H")
MAX_RECORDS = 0xFFFF
PAGE = 65536


class MalformedBatch(ValueError):
    """A batch that violates the ABI's encoding (lengths, kinds, values)."""


# ---------------------------------------------------------------------------------------
# Typed records. Each class states its kind, the struct of its fixed fields (in field
# order) and optionally one trailing variable-length field (bytes, or str for log text).
# ---------------------------------------------------------------------------------------


class _Record:
    """Shared encode/decode for event and action records."""

    __slots__ = ()

    KIND: ClassVar[int]
    FIXED: ClassVar[struct.Struct] = struct.Struct("<")
    TAIL: ClassVar[str | None] = None  # name of the trailing bytes/str field
    _get_fixed: ClassVar[Callable[[Any], Any]]
    _nfixed: ClassVar[int]
    #: per fixed field: exclusive upper bound on the value accepted when decoding, or None
    LIMITS: ClassVar[tuple[int | None, ...]] = ()

    def __init_subclass__(cls) -> None:
        names = [f for f in cls.__annotations__ if f not in ("KIND", "FIXED", "TAIL",
                                                             "LIMITS")]
        fixed = [n for n in names if n != cls.TAIL]
        cls._nfixed = len(fixed)
        if len(fixed) == 0:
            cls._get_fixed = staticmethod(lambda _obj: ())
        elif len(fixed) == 1:
            one = operator.attrgetter(fixed[0])
            cls._get_fixed = staticmethod(lambda obj: (one(obj),))
        else:
            cls._get_fixed = staticmethod(operator.attrgetter(*fixed))

    def payload(self) -> bytes:
        """The record's payload bytes (without the 8-byte record header)."""
        head = self.FIXED.pack(*self._get_fixed(self))
        if self.TAIL is None:
            return head
        tail = getattr(self, self.TAIL)
        return head + (tail.encode() if isinstance(tail, str) else bytes(tail))

    @classmethod
    def from_payload(cls, buf: bytes, off: int, length: int) -> _Record:
        """Decode one payload; raises MalformedBatch on a wrong length or value."""
        size = cls.FIXED.size
        if length < size or (cls.TAIL is None and length != size):
            raise MalformedBatch(f"{cls.__name__}: payload of {length} bytes")
        vals = cls.FIXED.unpack_from(buf, off)
        for v, lim in zip(vals, cls.LIMITS, strict=False):
            if lim is not None and v >= lim:
                raise MalformedBatch(f"{cls.__name__}: value {v} out of range")
        if cls.TAIL is None:
            return cls(*vals)
        tail = bytes(buf[off + size:off + length])
        if cls is Log:
            return cls(*vals, tail.decode("utf-8", "replace"))
        return cls(*vals, tail)


# ---- events ----


@dataclass(frozen=True, slots=True)
class BackendAvailable(_Record):
    """A backend became ready: replay what is held."""

    KIND: ClassVar[int] = EV_BACKEND_AVAILABLE


@dataclass(frozen=True, slots=True)
class BackendUnavailable(_Record):
    """The last backend went away (scaled to zero): start holding again."""

    KIND: ClassVar[int] = EV_BACKEND_UNAVAILABLE


@dataclass(frozen=True, slots=True)
class Tick(_Record):
    """Time passes; activators have no clock of their own."""

    KIND: ClassVar[int] = EV_TICK
    FIXED: ClassVar[struct.Struct] = struct.Struct("<Q")
    now_ms: int


@dataclass(frozen=True, slots=True)
class Packet(_Record):
    """An IPv4 packet to the service VIP; the host keeps the bytes under packet_id."""

    KIND: ClassVar[int] = EV_PACKET
    FIXED: ClassVar[struct.Struct] = struct.Struct("<II")
    TAIL: ClassVar[str | None] = "data"
    packet_id: int
    flow_hash: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamOpen(_Record):
    """A client connection accepted by an L7 front (port is the service port)."""

    KIND: ClassVar[int] = EV_STREAM_OPEN
    FIXED: ClassVar[struct.Struct] = struct.Struct("<IH")
    stream_id: int
    port: int


@dataclass(frozen=True, slots=True)
class StreamData(_Record):
    KIND: ClassVar[int] = EV_STREAM_DATA
    FIXED: ClassVar[struct.Struct] = struct.Struct("<I")
    TAIL: ClassVar[str | None] = "data"
    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamClose(_Record):
    KIND: ClassVar[int] = EV_STREAM_CLOSE
    FIXED: ClassVar[struct.Struct] = struct.Struct("<I")
    stream_id: int


@dataclass(frozen=True, slots=True)
class UpstreamConnectResult(_Record):
    """Answer to upstream_connect: ok is 1 when connected, 0 when refused/failed."""

    KIND: ClassVar[int] = EV_UPSTREAM_CONNECT_RESULT
    FIXED: ClassVar[struct.Struct] = struct.Struct("<IB")
    LIMITS: ClassVar[tuple[int | None, ...]] = (None, 2)
    stream_id: int
    ok: int


@dataclass(frozen=True, slots=True)
class UpstreamData(_Record):
    KIND: ClassVar[int] = EV_UPSTREAM_DATA
    FIXED: ClassVar[struct.Struct] = struct.Struct("<I")
    TAIL: ClassVar[str | None] = "data"
    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class UpstreamClosed(_Record):
    KIND: ClassVar[int] = EV_UPSTREAM_CLOSE
    FIXED: ClassVar[struct.Struct] = struct.Struct("<I")
    stream_id: int


Event = (BackendAvailable | BackendUnavailable | Tick | Packet | StreamOpen | StreamData
         | StreamClose | UpstreamConnectResult | UpstreamData | UpstreamClosed)

# ---- actions ----


@dataclass(frozen=True, slots=True)
class SetBackendNeed(_Record):
    """none: may scale to zero; traffic: keep while traffic flows; active: wake one now."""

    KIND: ClassVar[int] = ACT_SET_BACKEND_NEED
    FIXED: ClassVar[struct.Struct] = struct.Struct("<B")
    LIMITS: ClassVar[tuple[int | None, ...]] = (3,)
    need: int


@dataclass(frozen=True, slots=True)
class Log(_Record):
    KIND: ClassVar[int] = ACT_LOG
    FIXED: ClassVar[struct.Struct] = struct.Struct("<B")
    TAIL: ClassVar[str | None] = "message"
    LIMITS: ClassVar[tuple[int | None, ...]] = (4,)
    level: int
    message: str


@dataclass(frozen=True, slots=True)
class PacketDecision(_Record):
    """hold/drop/pass for a packet of this batch or one held earlier."""

    KIND: ClassVar[int] = ACT_PACKET_DECISION
    FIXED: ClassVar[struct.Struct] = struct.Struct("<IB")
    LIMITS: ClassVar[tuple[int | None, ...]] = (None, 3)
    packet_id: int
    verdict: int


@dataclass(frozen=True, slots=True)
class ReplayPacket(_Record):
    """Send a held packet on to the (now available) backend."""

    KIND: ClassVar[int] = ACT_REPLAY_PACKET
    FIXED: ClassVar[struct.Struct] = struct.Struct("<I")
    packet_id: int


@dataclass(frozen=True, slots=True)
class DownstreamSend(_Record):
    KIND: ClassVar[int] = ACT_DOWNSTREAM_SEND
    FIXED: ClassVar[struct.Struct] = struct.Struct("<I")
    TAIL: ClassVar[str | None] = "data"
    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class DownstreamClose(_Record):
    KIND: ClassVar[int] = ACT_DOWNSTREAM_CLOSE
    FIXED: ClassVar[struct.Struct] = struct.Struct("<I")
    stream_id: int


@dataclass(frozen=True, slots=True)
class UpstreamConnect(_Record):
    KIND: ClassVar[int] = ACT_UPSTREAM_CONNECT
    FIXED: ClassVar[struct.Struct] = struct.Struct("<IH")
    stream_id: int
    port: int


@dataclass(frozen=True, slots=True)
class UpstreamSend(_Record):
    KIND: ClassVar[int] = ACT_UPSTREAM_SEND
    FIXED: ClassVar[struct.Struct] = struct.Struct("<I")
    TAIL: ClassVar[str | None] = "data"
    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class UpstreamClose(_Record):
    """Close the upstream side (UpstreamClosed is the event that it was closed)."""

    KIND: ClassVar[int] = ACT_UPSTREAM_CLOSE
    FIXED: ClassVar[struct.Struct] = struct.Struct("<I")
    stream_id: int


@dataclass(frozen=True, slots=True)
class Pause(_Record):
    KIND: ClassVar[int] = ACT_PAUSE
    FIXED: ClassVar[struct.Struct] = struct.Struct("<I")
    stream_id: int


@dataclass(frozen=True, slots=True)
class Resume(_Record):
    KIND: ClassVar[int] = ACT_RESUME
    FIXED: ClassVar[struct.Struct] = struct.Struct("<I")
    stream_id: int


@dataclass(frozen=True, slots=True)
class Splice(_Record):
    """Hand the stream to the fabric: bytes flow client<->upstream without the activator."""

    KIND: ClassVar[int] = ACT_SPLICE
    FIXED: ClassVar[struct.Struct] = struct.Struct("<I")
    stream_id: int


Action = (SetBackendNeed | Log | PacketDecision | ReplayPacket | DownstreamSend
          | DownstreamClose | UpstreamConnect | UpstreamSend | UpstreamClose | Pause | Resume
          | Splice)

EVENT_TYPES: dict[int, type[_Record]] = {c.KIND: c for c in (
    BackendAvailable, BackendUnavailable, Tick, Packet, StreamOpen, StreamData, StreamClose,
    UpstreamConnectResult, UpstreamData, UpstreamClosed)}
ACTION_TYPES: dict[int, type[_Record]] = {c.KIND: c for c in (
    SetBackendNeed, Log, PacketDecision, ReplayPacket, DownstreamSend, DownstreamClose,
    UpstreamConnect, UpstreamSend, UpstreamClose, Pause, Resume, Splice)}

for _cls in (*EVENT_TYPES.values(), *ACTION_TYPES.values()):
    # dataclass(slots=True) builds a new class, so check the annotations agree with FIXED.
    assert len(fields(_cls)) == _cls._nfixed + (_cls.TAIL is not None), _cls  # type: ignore


def encode_batch(records: Iterable[_Record]) -> bytes:
    """Encode events (or actions) as one batch: u16 count, then records."""
    parts = [b""]
    n = 0
    pack = RECORD.pack
    for r in records:
        p = r.payload()
        parts.append(pack(r.KIND, 0, 0, len(p)))
        parts.append(p)
        n += 1
    if n > MAX_RECORDS:
        raise ValueError(f"{n} records exceed the batch limit of {MAX_RECORDS}")
    parts[0] = COUNT.pack(n)
    return b"".join(parts)


def decode_batch(buf: bytes, types: dict[int, type[_Record]]) -> list[Any]:
    """Decode a batch strictly: known kinds, zero flags/reserved, exact total length."""
    if len(buf) < 2:
        raise MalformedBatch(f"batch of {len(buf)} bytes has no count")
    (count,) = COUNT.unpack_from(buf, 0)
    off, end = 2, len(buf)
    out: list[Any] = []
    unpack = RECORD.unpack_from
    for _ in range(count):
        if end - off < RECORD.size:
            raise MalformedBatch(f"record header past the end at offset {off}")
        kind, flags, reserved, length = unpack(buf, off)
        off += RECORD.size
        cls = types.get(kind)
        if cls is None:
            raise MalformedBatch(f"unknown kind {kind} at offset {off - RECORD.size}")
        if flags or reserved:
            raise MalformedBatch(f"non-zero flags/reserved in kind {kind}")
        if length > end - off:
            raise MalformedBatch(f"record of {length} bytes past the end at offset {off}")
        out.append(cls.from_payload(buf, off, length))
        off += length
    if off != end:
        raise MalformedBatch(f"{end - off} trailing bytes after {count} records")
    return out


def decode_actions(buf: bytes) -> list[Action]:
    return decode_batch(buf, ACTION_TYPES)


def decode_events(buf: bytes) -> list[Event]:
    return decode_batch(buf, EVENT_TYPES)


# ---------------------------------------------------------------------------------------
# Engine, module cache, epoch ticker
# ---------------------------------------------------------------------------------------

_lock = threading.Lock()
_engine: wasmtime.Engine | None = None
_modules: dict[str, wasmtime.Module] = {}


def shared_engine() -> wasmtime.Engine:
    """One engine for all activators: fuel metering and epoch interruption on."""
    global _engine
    with _lock:
        if _engine is None:
            cfg = wasmtime.Config()
            cfg.consume_fuel = True
            cfg.epoch_interruption = True
            cfg.cranelift_opt_level = "speed"
            _engine = wasmtime.Engine(cfg)
        return _engine


def compile_module(wasm: bytes) -> wasmtime.Module:
    """Compile once per distinct module (keyed by sha256); compiling costs milliseconds."""
    key = hashlib.sha256(wasm).hexdigest()
    engine = shared_engine()
    with _lock:
        mod = _modules.get(key)
    if mod is None:
        mod = wasmtime.Module(engine, wasm)
        with _lock:
            mod = _modules.setdefault(key, mod)
    return mod


class _Ticker:
    """Advances the shared engine's epoch about once a millisecond while any host lives.

    Deadlines are counted in ticks, so ``deadline_ms`` is a lower bound: sleep(0.001)
    oversleeps, never undersleeps. The thread parks when no host is open.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._users = 0
        self._thread: threading.Thread | None = None

    def acquire(self, engine: wasmtime.Engine) -> None:
        with self._cond:
            self._users += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, args=(engine,),
                                                name="activator-epoch", daemon=True)
                self._thread.start()
            self._cond.notify()

    def release(self) -> None:
        with self._cond:
            self._users = max(0, self._users - 1)

    def _run(self, engine: wasmtime.Engine) -> None:
        while True:
            with self._cond:
                while self._users == 0:
                    self._cond.wait()
            engine.increment_epoch()
            time.sleep(0.001)


_ticker = _Ticker()


# ---------------------------------------------------------------------------------------
# Calling into the guest
# ---------------------------------------------------------------------------------------


class _PublicAccess:
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


class _RawAccess(_PublicAccess):
    """The same through wasmtime's C API directly: ~1.7 µs a call instead of ~27 µs.

    Uses wasmtime-py internals (``_bindings``, ``Store._context``, ``Func._func``,
    ``Memory._memory``); the constructor raises on any mismatch and the instance then uses
    ``_PublicAccess``. Calls go through ``wasmtime_func_call_unchecked``, which trusts
    the argument types: only used after each export's type was checked against the ABI.
    """

    raw = True

    def __init__(self, store: wasmtime.Store, mem: wasmtime.Memory) -> None:
        super().__init__(store, mem)
        from wasmtime import _bindings as ffi

        self.ffi = ffi
        self.ctx = store._context()
        self.memref = ctypes.byref(mem._memory)
        # Own function objects (dll[...] is not cached), so changing restype is private.
        self._mem_data = ffi.dll["wasmtime_memory_data"]
        self._mem_data.restype = ctypes.c_void_p
        self._mem_data.argtypes = ffi._wasmtime_memory_data.argtypes
        self._mem_size = ffi._wasmtime_memory_data_size
        self._set_fuel = ffi._wasmtime_context_set_fuel
        self._get_fuel = ffi._wasmtime_context_get_fuel
        self._set_deadline = ffi._wasmtime_context_set_epoch_deadline
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
        return self._mem_data(self.ctx, self.memref) or 0, self._mem_size(self.ctx, self.memref)


#: Tests set this to exercise the public fallback path.
FORCE_PUBLIC_API = False


def _access(store: wasmtime.Store, mem: wasmtime.Memory) -> _PublicAccess:
    """The fast path if this wasmtime-py's internals look as expected, else the public one."""
    if not FORCE_PUBLIC_API:
        try:
            return _RawAccess(store, mem)
        except Exception as e:  # noqa: BLE001 - any mismatch means "use the public path"
            log.info("activator: raw wasmtime path unavailable (%s); using the public API", e)
    return _PublicAccess(store, mem)


# Export name -> (param kinds, result kinds), as wasmtime ValType strings.
_EXPORTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fab_abi_version": ((), ("i32",)),
    "fab_alloc": (("i32",), ("i32",)),
    "fab_init": (("i32", "i32"), ("i32",)),
    "fab_process": (("i32", "i32"), ("i64",)),
}


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
            self._acc = acc = _access(store, mem)
            self.raw_path = acc.raw
            funcs: dict[str, Callable[..., int]] = {}
            for name, (params, results) in _EXPORTS.items():
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
        _ticker.acquire(self.engine)

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
            size = 2 + sum(RECORD.size + _payload_len(e) for e in events)
            if size <= self.max_batch_bytes:
                yield events
                return
        chunk: list[Event] = []
        size = 2
        for e in events:
            n = RECORD.size + _payload_len(e)
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
            _ticker.release()

    def __enter__(self) -> ActivatorHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _payload_len(e: _Record) -> int:
    tail = getattr(e, e.TAIL) if e.TAIL else b""
    return e.FIXED.size + (len(tail.encode()) if isinstance(tail, str) else len(tail))
