"""Compiling activators (C or Zig) to wasm with the pinned ``ziglang``, reproducibly.

Why one module: the shipped activators (``activators/build.py``, checked byte for byte in
CI) and an author's project (``fabricd activator build``) must be built with the same
fixed flags, so an author's module behaves as the shipped ones do. The SDKs ship inside
the ``activators`` package (``activators/sdk/c/*.h``, ``activators/sdk/zig/fabricd.zig``,
package data of the wheel), so a project builds against the installed fabricd, without
the source tree. Output is stripped (no debug info, no producers section) and every path
given to the compiler is relative to its working directory, so the bytes depend only on
the sources and the ``ziglang`` version pinned in requirements.lock.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

CFLAGS: tuple[str, ...] = (
    "--target=wasm32-freestanding",
    "-O2",
    "-std=c11",
    "-nostdlib",
    "-g0",
    "-s",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-fno-builtin",
    "-Wl,--no-entry",
    "-Wl,--export-memory",
    "-Wl,--strip-all",
    "-Wl,-z,stack-size=65536",
)

#: what an SDK activator adds: fab_copy and friends are memory.copy / memory.fill
SDK_CFLAGS: tuple[str, ...] = ("-mbulk-memory",)

#: ReleaseFast: the SDK's event loop and tables cost about what the C ones do in fuel
#: (ReleaseSmall spends ~2x per event to save 2 KB). -rdynamic keeps the `export`ed ABI
#: functions; -fno-entry: a wasm library, no _start.
ZIGFLAGS: tuple[str, ...] = (
    "-target", "wasm32-freestanding",
    "-fno-entry",
    "-rdynamic",
    "-O", "ReleaseFast",
    "-fstrip",
    "--stack", "65536",
)


#: What a release build has and a debug build drops: no debug info, stripped output.
RELEASE_ONLY: frozenset[str] = frozenset(("-g0", "-s", "-Wl,--strip-all", "-fstrip"))


def debug_flags(flags: tuple[str, ...]) -> tuple[str, ...]:
    """The flags of a debug build: the release ``flags`` (C, or Zig's with ``-fstrip``)
    with DWARF (``-g``, for C) and nothing stripped, so a trap names the file:line of the
    instruction (fabric/activator/dwarf.py reads it) and frames have the functions' own
    names (the name section). The code is the same as the release build's (same -O2);
    the module is ~4x bigger (a debug http2.wasm is ~140 KB), far under the daemon's
    8 MiB module limit, and the daemon accepts it as any other module. Zig:
    ``-O ReleaseFast`` without ``-fstrip`` keeps DWARF."""
    out = [f for f in flags if f not in RELEASE_ONLY]
    if "-g0" in flags:
        out.insert(flags.index("-g0"), "-g")
    return tuple(out)


class BuildError(Exception):
    """The compiler refused the sources; the message is its output."""


def sdk_dir() -> Path:
    """Where the installed SDKs are: ``<activators package>/sdk`` (``c/``, ``zig/``)."""
    return Path(str(resources.files("activators") / "sdk"))


def c_command(src: str, out: str, extra: tuple[str, ...] = (),
              include: tuple[str, ...] = (), *, debug: bool = False) -> list[str]:
    """The compiler command for one C translation unit (paths as given: keep them
    relative to the working directory); ``debug``: see ``debug_flags``."""
    inc = [f"-I{d}" for d in include]
    flags = debug_flags(CFLAGS) if debug else CFLAGS
    return [sys.executable, "-m", "ziglang", "cc", *flags, *extra, *inc, "-o", out, src]


def zig_command(src: str, out: str, sdk: str, *, debug: bool = False) -> list[str]:
    """The compiler command for a Zig root file importing ``fabricd`` (the SDK module
    at ``sdk``); ``debug``: see ``debug_flags``."""
    flags = debug_flags(ZIGFLAGS) if debug else ZIGFLAGS
    return [sys.executable, "-m", "ziglang", "build-exe", *flags,
            "--dep", "fabricd", f"-Mroot={src}", f"-Mfabricd={sdk}",
            f"-femit-bin={out}", "--name", Path(out).stem]


def run(cmd: list[str], cwd: Path, cache: Path) -> None:
    """Run one compile with its zig caches under ``cache`` (hermetic; reusable across
    builds of one session); BuildError with the compiler's output on failure."""
    if importlib.util.find_spec("ziglang") is None:
        raise BuildError("the zig toolchain is not installed here: pip install -c "
                         "requirements.lock 'fabricd[sdk]' (the pinned ziglang)")
    env = dict(os.environ, ZIG_GLOBAL_CACHE_DIR=str(cache / "global"),
               ZIG_LOCAL_CACHE_DIR=str(cache / "local"))
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=600)
    except FileNotFoundError as e:  # pragma: no cover - the interpreter itself is missing
        raise BuildError(str(e)) from None
    if p.returncode != 0:
        raise BuildError((p.stderr or p.stdout).strip() or f"exit status {p.returncode}")


def default_cache() -> Path:
    """A per-user zig cache for builds of projects (``$XDG_CACHE_HOME/fabricd/zig``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fabricd" / "zig"
