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


class BuildError(Exception):
    """The compiler refused the sources; the message is its output."""


def sdk_dir() -> Path:
    """Where the installed SDKs are: ``<activators package>/sdk`` (``c/``, ``zig/``)."""
    return Path(str(resources.files("activators") / "sdk"))


def c_command(src: str, out: str, extra: tuple[str, ...] = (),
              include: tuple[str, ...] = ()) -> list[str]:
    """The compiler command for one C translation unit (paths as given: keep them
    relative to the working directory)."""
    inc = [f"-I{d}" for d in include]
    return [sys.executable, "-m", "ziglang", "cc", *CFLAGS, *extra, *inc, "-o", out, src]


def zig_command(src: str, out: str, sdk: str) -> list[str]:
    """The compiler command for a Zig root file importing ``fabricd`` (the SDK module
    at ``sdk``)."""
    return [sys.executable, "-m", "ziglang", "build-exe", *ZIGFLAGS,
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
