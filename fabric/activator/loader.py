"""Reading an activator module from disk and checking what it declares, before compiling.

Why before: compiling costs time proportional to the module (seconds for a few MB), and
what a module declares (memories, tables, imports) is only refused by wasmtime at
instantiation, one service port at a time on the data-plane thread. Here the file is
refused at once, with one line naming it and the limit: not a regular file (a FIFO named
``x.wasm`` must not block the reader), over the size cap, more than one memory or table,
a table that may grow past the element bound, any import (none is offered).

The check walks only the section headers and the first few sections (type, import,
function, table, memory), so it costs microseconds whatever the module's size. It is
conservative: an encoding it does not know is refused. The store limits (runtime.py)
stay as the backstop.
"""

from __future__ import annotations

import os
import stat

#: Largest module file accepted (bytes); compiling a few MB already takes seconds.
MAX_MODULE_BYTES = 8 << 20
#: Elements a table may have (its declared maximum must be at most this).
MAX_TABLE_ELEMENTS = 10_000
#: Linear memories and tables an instance may have (the ABI needs one memory).
MAX_MEMORIES = 1
MAX_TABLES = 1
WASM_PAGE = 65536

_MAGIC = b"\0asm"
_CORE = b"\x01\0\0\0"
_COMPONENT = b"\x0d\0\x01\0"
_IMPORT, _TABLE, _MEMORY = 2, 4, 5
_EARLY = frozenset((0, 1, 2, 3, 4, 5))  # custom, type, import, function, table, memory


class ActivatorError(ValueError):
    """An activator module that cannot be used: one line naming it and the problem."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def read_module(path: str | os.PathLike[str], max_bytes: int = MAX_MODULE_BYTES) -> bytes:
    """The bytes of a module file: refused unless a regular file of at most ``max_bytes``.

    stat, then open non-blocking, then fstat (the path may change in between): neither a
    FIFO nor a device is ever read, and nothing larger than the cap is read.
    """
    name = str(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise ActivatorError(name, f"cannot read: {e.strerror or e}") from None
    _check_file(name, st, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise ActivatorError(name, f"cannot open: {e.strerror or e}") from None
    try:
        _check_file(name, os.fstat(fd), max_bytes)
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # it grew while we read it
                raise ActivatorError(name, f"larger than the {_mib(max_bytes)} module limit")
    except OSError as e:
        raise ActivatorError(name, f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def _check_file(name: str, st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ActivatorError(name, "not a regular file")
    if st.st_size > max_bytes:
        raise ActivatorError(name, f"{st.st_size} bytes, over the {_mib(max_bytes)} "
                                   "module limit")


class _Truncated(Exception):
    pass


def _leb(buf: bytes, off: int, end: int) -> tuple[int, int]:
    """An unsigned LEB128 at ``off`` (at most 10 bytes): (value, next offset)."""
    value = shift = 0
    for _ in range(10):
        if off >= end:
            raise _Truncated
        b = buf[off]
        off += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, off
        shift += 7
    raise _Truncated


def _byte(buf: bytes, off: int, end: int) -> int:
    if off >= end:
        raise _Truncated
    return buf[off]


def _limits(buf: bytes, off: int, end: int, known: int) -> tuple[int, int | None, int]:
    """A limits field: (min, max or None, flags); flags outside ``known`` are refused."""
    flags = _byte(buf, off, end)
    if flags & ~known:
        raise ValueError(f"limits flags {flags:#x}")
    lo, off = _leb(buf, off + 1, end)
    hi = None
    if flags & 1:
        hi, off = _leb(buf, off, end)
    return lo, hi, flags


def check_module(wasm: bytes, name: str, *, memory_limit: int,
                 table_elements: int = MAX_TABLE_ELEMENTS) -> None:
    """Refuse (ActivatorError) a module that could never run as an activator here."""
    if len(wasm) < 8 or wasm[:4] != _MAGIC:
        raise ActivatorError(name, "not a WebAssembly module")
    if wasm[4:8] == _COMPONENT:
        raise ActivatorError(name, "a component; activators are core modules (ABI v1)")
    if wasm[4:8] != _CORE:
        raise ActivatorError(name, f"unsupported WebAssembly version {wasm[4:8].hex()}")
    off, end = 8, len(wasm)
    try:
        while off < end:
            sid = wasm[off]
            if sid not in _EARLY:
                return  # every section that declares memories, tables, imports is behind us
            size, body = _leb(wasm, off + 1, end)
            off = body + size
            if off > end:
                raise _Truncated
            if sid == _IMPORT:
                _check_imports(wasm, body, off, name)
            elif sid == _TABLE:
                _check_tables(wasm, body, off, name, table_elements)
            elif sid == _MEMORY:
                _check_memories(wasm, body, off, name, memory_limit)
    except _Truncated:
        raise ActivatorError(name, "truncated or malformed module") from None
    except ValueError as e:
        if isinstance(e, ActivatorError):
            raise
        raise ActivatorError(name, f"unsupported encoding ({e})") from None


def _check_imports(buf: bytes, off: int, end: int, name: str) -> None:
    count, off = _leb(buf, off, end)
    if count == 0:
        return
    n, off = _leb(buf, off, end)
    module = buf[off:off + n].decode("utf-8", "replace")
    n, off = _leb(buf, off + n, end)
    field = buf[off:off + n].decode("utf-8", "replace")
    raise ActivatorError(name, f"imports {module}.{field} ({count} imports); activators "
                               "are offered no imports")


def _check_tables(buf: bytes, off: int, end: int, name: str, bound: int) -> None:
    count, off = _leb(buf, off, end)
    if count > MAX_TABLES:
        raise ActivatorError(name, f"declares {count} tables; an activator may have at most "
                                   f"{MAX_TABLES}")
    for _ in range(count):
        if _byte(buf, off, end) == 0x40:  # a table with an initializer expression
            off += 2
        ref = _byte(buf, off, end)
        off += 1
        if ref in (0x63, 0x64):  # (ref null? heaptype): skip the heap type
            _, off = _leb(buf, off, end)
        lo, hi, _ = _limits(buf, off, end, known=0x01)
        if lo > bound:
            raise ActivatorError(name, f"table of {lo} elements; at most {bound} allowed")
        if hi is None:
            raise ActivatorError(name, f"table without a maximum size; an activator's table "
                                       f"must declare a maximum of at most {bound} elements")
        if hi > bound:
            raise ActivatorError(name, f"table may grow to {hi} elements; at most {bound} "
                                       "allowed")
        return  # count <= 1: nothing follows that matters


def _check_memories(buf: bytes, off: int, end: int, name: str, limit: int) -> None:
    count, off = _leb(buf, off, end)
    if count > MAX_MEMORIES:
        raise ActivatorError(name, f"declares {count} memories; an activator has exactly "
                                   f"{MAX_MEMORIES} (its exported 'memory')")
    if count:
        try:
            lo, _, _ = _limits(buf, off, end, known=0x01)
        except ValueError:
            raise ActivatorError(name, "memory is shared, 64-bit or has custom pages; an "
                                       "activator's memory is a plain 32-bit one") from None
        if lo * WASM_PAGE > limit:
            raise ActivatorError(name, f"memory of {lo} pages ({_mib(lo * WASM_PAGE)}) is "
                                       f"over the {_mib(limit)} memory limit")

