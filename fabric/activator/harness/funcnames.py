"""Names for a module's functions, so a trap in a stripped build still says where.

wasmtime names a frame only from the module's name section (debug builds); shipped
activators are stripped, so their frames read ``func[3]+0xca``. The export section
survives stripping: a frame in an exported function (``fab_process``, ``fab_init``) is
named by its export here, and by the name section where one exists.
"""

from __future__ import annotations

import re

_FRAME = re.compile(r"func\[(\d+)\]")


def _leb(buf: bytes, off: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[off]
        off += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, off
        shift += 7


def _name(buf: bytes, off: int) -> tuple[str, int]:
    n, off = _leb(buf, off)
    return buf[off:off + n].decode("utf-8", "replace"), off + n


def function_names(wasm: bytes) -> dict[int, str]:
    """Function index -> name (name section first, then exports); {} if unreadable."""
    names: dict[int, str] = {}
    exports: dict[int, str] = {}
    try:
        off = 8
        while off < len(wasm):
            sid = wasm[off]
            size, off = _leb(wasm, off + 1)
            end = off + size
            if sid == 7:
                count, p = _leb(wasm, off)
                for _ in range(count):
                    name, p = _name(wasm, p)
                    kind = wasm[p]
                    idx, p = _leb(wasm, p + 1)
                    if kind == 0:
                        exports.setdefault(idx, name)
            elif sid == 0:
                title, p = _name(wasm, off)
                while title == "name" and p < end:
                    sub = wasm[p]
                    ssize, p = _leb(wasm, p + 1)
                    if sub == 1:
                        count, q = _leb(wasm, p)
                        for _ in range(count):
                            idx, q = _leb(wasm, q)
                            name, q = _name(wasm, q)
                            names[idx] = name
                    p += ssize
            off = end
    except (IndexError, UnicodeDecodeError):
        pass
    for idx, name in exports.items():
        names.setdefault(idx, name)
    return names


def name_frames(frames: list[str], names: dict[int, str]) -> list[str]:
    """``func[3]+0xca`` -> ``fab_process (func[3])+0xca`` where the index has a name."""
    def one(m: re.Match[str]) -> str:
        name = names.get(int(m.group(1)))
        return f"{name} ({m.group(0)})" if name else m.group(0)

    return [_FRAME.sub(one, f) for f in frames]
