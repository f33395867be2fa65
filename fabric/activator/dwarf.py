"""Source locations for wasm trap frames, from a debug build's DWARF and name section.

Why here and not wasmtime: wasmtime-py does not symbolize (WASMTIME_BACKTRACE_DETAILS has
no effect through its C API), so a trap says ``fab_process+0xca`` and no more. A module
built with ``-g`` (activators/build.py ``--debug``) carries DWARF in custom sections
(``.debug_line``, ``.debug_info``, ``.debug_abbrev``, ``.debug_str``, ...); pyelftools
decodes their line programs. In wasm DWARF a code address is an offset from the start of
the Code section's payload (the byte after its size), so a frame's ``module_offset`` (its
offset in the module file) minus that start is the address to look up; ``func_offset`` is
relative to the function's body and is not what the line table holds.

When: only on a trap. ``SourceIndex.probe`` at load walks the section headers (a few
microseconds, nothing kept for a stripped module); the DWARF is parsed on the first
lookup, once per module (cached by sha256, ``CACHE_SIZE`` modules), and bounded (a line
program over ``MAX_LINE_PROGRAM`` bytes, or past ``MAX_ROWS`` rows, is not decoded). A
malformed section never raises: the frame is reported without file:line.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import logging
import posixpath
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: Parsed modules kept (least recently used evicted).
CACHE_SIZE = 8
#: Largest line program (one compile unit's, bytes) decoded. pyelftools decodes a whole
#: program at once, keeping a state per row: a debug build of the http2 activator has 30 KB
#: of line program, decoded in ~0.14 s, ~5 MB at peak; the bound keeps a first trap's
#: parse (on the thread that called the guest) near a second at worst.
MAX_LINE_PROGRAM = 256 << 10
#: Rows kept per module, compile units, files per line program: bounds on what is stored.
MAX_ROWS = 500_000
MAX_UNITS = 4096
MAX_FILES = 65536

_CODE = 10
_NAME_FUNCTIONS = 1
#: wasm-ld leaves the line sequences of functions it dropped at -1 (or -2); address 0 is
#: the Code payload's function count, never an instruction.
_TOMBSTONE = 0xFFFFFFFE


@dataclass(frozen=True)
class Location:
    """A source position; ``str()`` is ``file:line`` or ``file:line:column``."""

    file: str
    line: int
    column: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" + (f":{self.column}" if self.column else "")


def _leb(buf: bytes | memoryview, off: int, end: int) -> tuple[int, int]:
    value = shift = 0
    for _ in range(10):
        if off >= end:
            raise ValueError("truncated")
        b = buf[off]
        off += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, off
        shift += 7
    raise ValueError("LEB128 too long")


def _string(buf: bytes | memoryview, off: int, end: int) -> tuple[str, int]:
    n, off = _leb(buf, off, end)
    if off + n > end:
        raise ValueError("truncated")
    return bytes(buf[off:off + n]).decode("utf-8", "replace"), off + n


def sections(wasm: bytes) -> tuple[int | None, dict[str, tuple[int, int]]]:
    """(file offset of the Code section's payload or None, custom section name ->
    (start, end) of its contents, first of each name); stops at the first bad header."""
    code: int | None = None
    custom: dict[str, tuple[int, int]] = {}
    off, end = 8, len(wasm)
    try:
        while off < end:
            sid = wasm[off]
            size, body = _leb(wasm, off + 1, end)
            stop = body + size
            if stop > end:
                break
            if sid == _CODE and code is None:
                code = body
            elif sid == 0:
                name, p = _string(wasm, body, stop)
                custom.setdefault(name, (p, stop))
            off = stop
    except ValueError:
        pass
    return code, custom


def function_names(wasm: bytes, span: tuple[int, int] | None) -> dict[int, str]:
    """Function index -> name from the name section's function subsection; {} if none."""
    names: dict[int, str] = {}
    if span is None:
        return names
    p, end = span
    try:
        while p < end:
            sub = wasm[p]
            size, p = _leb(wasm, p + 1, end)
            stop = min(p + size, end)
            if sub == _NAME_FUNCTIONS:
                count, q = _leb(wasm, p, stop)
                for _ in range(min(count, MAX_ROWS)):
                    idx, q = _leb(wasm, q, stop)
                    names[idx], q = _string(wasm, q, stop)
                break
            p = stop
    except (ValueError, IndexError):
        pass
    return names


class SourceMap:
    """What a module's debug info says: code address -> Location, index -> name."""

    def __init__(self, code_start: int | None, names: dict[int, str],
                 starts: list[int], rows: list[tuple[int, int, int, int, int]],
                 files: list[str], problem: str = "") -> None:
        self.code_start = code_start
        self.names = names
        self._starts = starts  # sorted row start addresses
        self._rows = rows  # (start, end, file index, line, column), same order
        self._files = files
        self.problem = problem  # why there is less than there might be ("" if nothing)

    @property
    def rows(self) -> int:
        return len(self._rows)

    def function(self, index: int) -> str | None:
        return self.names.get(index)

    def locate(self, module_offset: int) -> Location | None:
        """The source position of the instruction at ``module_offset`` in the file."""
        if self.code_start is None or module_offset < self.code_start:
            return None
        return self.at(module_offset - self.code_start)

    def at(self, address: int) -> Location | None:
        """The source position of a code address (offset in the Code payload)."""
        i = bisect.bisect_right(self._starts, address) - 1
        if i < 0:
            return None
        start, end, file, line, column = self._rows[i]
        if not start <= address < end or line <= 0 or not 0 <= file < len(self._files):
            return None
        return Location(self._files[file], line, column)


def parse(wasm: bytes) -> SourceMap:
    """Everything ``SourceMap`` needs, from the module bytes. Never raises: what cannot
    be read is left out and named in ``problem``."""
    code, custom = sections(wasm)
    names = function_names(wasm, custom.get("name"))
    starts: list[int] = []
    rows: list[tuple[int, int, int, int, int]] = []
    files: list[str] = []
    problem = ""
    if ".debug_line" in custom and ".debug_info" in custom:
        try:
            problem = _line_rows(wasm, custom, rows, files)
        except RecursionError:
            problem = "debug info nested too deeply"
        except ImportError:
            problem = "pyelftools is not installed: no file:line in traps"
        except Exception as e:  # noqa: BLE001 - malformed DWARF: report without file:line
            problem = f"unreadable debug info ({type(e).__name__}: {str(e)[:120]})"
        rows.sort()
        starts = [r[0] for r in rows]
    elif code is not None:
        problem = "no debug line info (a stripped or -g0 build)"
    return SourceMap(code, names, starts, rows, files, problem)


def _line_rows(wasm: bytes, custom: dict[str, tuple[int, int]],
               rows: list[tuple[int, int, int, int, int]], files: list[str]) -> str:
    """Fill rows/files from every compile unit's line program; returns a problem or ""."""
    from elftools.dwarf.dwarfinfo import DebugSectionDescriptor, DwarfConfig, DWARFInfo

    def sec(name: str) -> DebugSectionDescriptor | None:
        span = custom.get(name)
        if span is None:
            return None
        data = wasm[span[0]:span[1]]
        return DebugSectionDescriptor(io.BytesIO(data), name, 0, len(data), 0)

    di = DWARFInfo(
        config=DwarfConfig(little_endian=True, machine_arch="wasm", default_address_size=4),
        debug_info_sec=sec(".debug_info"), debug_aranges_sec=sec(".debug_aranges"),
        debug_abbrev_sec=sec(".debug_abbrev"), debug_frame_sec=None, eh_frame_sec=None,
        debug_str_sec=sec(".debug_str"), debug_loc_sec=sec(".debug_loc"),
        debug_ranges_sec=sec(".debug_ranges"), debug_line_sec=sec(".debug_line"),
        debug_pubtypes_sec=None, debug_pubnames_sec=None, debug_addr_sec=sec(".debug_addr"),
        debug_str_offsets_sec=sec(".debug_str_offsets"),
        debug_line_str_sec=sec(".debug_line_str"), debug_loclists_sec=sec(".debug_loclists"),
        debug_rnglists_sec=sec(".debug_rnglists"), debug_sup_sec=None,
        gnu_debugaltlink_sec=None, debug_types_sec=None)
    file_ids: dict[str, int] = {}
    problems: list[str] = []
    for n, cu in enumerate(di.iter_CUs()):
        if n >= MAX_UNITS:
            problems.append(f"more than {MAX_UNITS} compile units")
            break
        lp = di.line_program_for_CU(cu)
        if lp is None:
            continue
        size = lp.program_end_offset - lp.program_start_offset
        if size > MAX_LINE_PROGRAM:
            problems.append(f"a line program of {size} bytes (over {MAX_LINE_PROGRAM})")
            continue
        table = _file_table(lp, _comp_dir(cu))
        local = [file_ids.setdefault(path, len(file_ids)) for path in table]
        version = lp.header.get("version", 4)
        base = 0 if version >= 5 else 1  # DWARF 5 numbers files from 0, earlier from 1
        for start, end, file, line, column in _sequences(lp.get_entries()):
            if len(rows) >= MAX_ROWS:
                problems.append(f"more than {MAX_ROWS} line rows")
                break
            k = file - base
            fid = local[k] if 0 <= k < len(local) else -1
            rows.append((start, end, fid, line, column))
        if len(rows) >= MAX_ROWS:
            break
    files.extend(sorted(file_ids, key=file_ids.__getitem__))
    return "; ".join(problems)


def _sequences(entries: list[Any]) -> Iterator[tuple[int, int, int, int, int]]:
    """(start, end, file, line, column) per row, over sequences that hold real code
    (wasm-ld leaves the sequences of dropped functions at a tombstone address)."""
    seq: list[Any] = []
    for e in entries:
        st = e.state
        if st is None:
            continue
        seq.append(st)
        if not st.end_sequence:
            continue
        first = seq[0].address
        if 0 < first < _TOMBSTONE:
            for a, b in zip(seq, seq[1:], strict=False):
                if a.address < b.address <= 0xFFFFFFFF:
                    yield a.address, b.address, a.file, a.line, a.column
        seq = []


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v if isinstance(v, str) else ""


def _comp_dir(cu: Any) -> str:
    try:
        return _text(cu.get_top_DIE().attributes["DW_AT_comp_dir"].value)
    except Exception:  # noqa: BLE001 - no comp dir: paths stay as recorded
        return ""


def _file_table(lp: Any, comp_dir: str) -> list[str]:
    """The line program's file names, as people read them: relative to the compile's
    directory where they are under it (``testing/trap.c``), else as recorded."""
    version = lp.header.get("version", 4)
    dirs = [_text(d) for d in (lp["include_directory"] or [])][:MAX_FILES]
    out = []
    for fe in list(lp["file_entry"] or [])[:MAX_FILES]:
        name = _text(fe.name)
        di = getattr(fe, "dir_index", 0) or 0
        # DWARF 5: directory 0 is the compile's; earlier: 0 is it, 1.. the table's.
        d = dirs[di] if version >= 5 and di < len(dirs) else (
            dirs[di - 1] if version < 5 and 0 < di <= len(dirs) else comp_dir)
        path = posixpath.normpath(posixpath.join(d, name)) if d else name
        if comp_dir and path.startswith(comp_dir.rstrip("/") + "/"):
            path = path[len(comp_dir.rstrip("/")) + 1:]
        out.append(path or "?")
    return out


class _Cache:
    """Parsed modules by sha256, least recently used evicted; one parse per module."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.parses = 0
        self._lock = threading.Lock()
        self._maps: OrderedDict[str, SourceMap] = OrderedDict()

    def get(self, wasm: bytes) -> SourceMap:
        key = hashlib.sha256(wasm).hexdigest()
        with self._lock:
            sm = self._maps.get(key)
            if sm is not None:
                self._maps.move_to_end(key)
                return sm
            self.parses += 1
            sm = parse(wasm)
            if sm.problem:
                log.info("activator module %s: %s", key[:12], sm.problem)
            self._maps[key] = sm
            while len(self._maps) > self.capacity:
                self._maps.popitem(last=False)
            return sm

    def clear(self) -> None:
        with self._lock:
            self._maps.clear()


cache = _Cache(CACHE_SIZE)


class SourceIndex:
    """A module's debug info, parsed on first use: what a host keeps for its traps."""

    def __init__(self, wasm: bytes) -> None:
        self._wasm: bytes | None = wasm
        self._map: SourceMap | None = None

    @classmethod
    def probe(cls, wasm: bytes) -> SourceIndex | None:
        """An index when the module has a name section or DWARF lines, else None
        (a stripped module: nothing to keep). Costs a walk over the section headers."""
        try:
            _, custom = sections(wasm)
        except Exception:  # noqa: BLE001 - never stand in the way of loading
            return None
        if "name" in custom or ".debug_line" in custom:
            return cls(wasm)
        return None

    def map(self) -> SourceMap | None:
        if self._map is None and self._wasm is not None:
            try:
                self._map = cache.get(self._wasm)
            except Exception:  # noqa: BLE001 - a diagnostic must never fail the host
                log.debug("activator debug info unreadable", exc_info=True)
            self._wasm = None  # parsed (or failed) once: the bytes are not needed again
        return self._map

    def locate(self, module_offset: int) -> Location | None:
        sm = self.map()
        return sm.locate(module_offset) if sm is not None else None

    def function(self, index: int) -> str | None:
        sm = self.map()
        return sm.function(index) if sm is not None else None
