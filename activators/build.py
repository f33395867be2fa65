"""Build the activators' .wasm files from C and Zig, reproducibly, with ziglang from PyPI.

Why a script rather than a Makefile rule: CI runs ``python activators/build.py --check``,
which rebuilds everything into a temporary directory and compares bytes with the committed
.wasm files, so a source change without a rebuild (or a toolchain drift) fails loudly.
The flags are fixed (fabric/activator/toolchain.py, shared with ``fabricd activator
build``) and the output stripped (no debug info, no producers section), so the bytes
depend only on the sources and the pinned ``ziglang`` version. A ``.zig`` target is a root
file importing the Zig SDK (``sdk/zig/fabricd.zig``) as the module ``fabricd``. A hostile
test module that C cannot express (more than one memory) is written in the text format
and assembled with the pinned ``wasmtime``'s ``wat2wasm``, equally deterministic.

Usage: ``python activators/build.py`` (write) or ``python activators/build.py --check``.
``python activators/build.py --debug SRC -o OUT`` builds one module with debug info, so
its traps name the file:line (see ``debug_cflags``); never committed, never checked.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))  # fabric.activator.toolchain, also from a bare checkout
from fabric.activator import toolchain  # noqa: E402

#: source -> output, both relative to activators/
TARGETS: dict[str, str] = {
    "tcp/tcp.c": "tcp/tcp.wasm",
    "postgres/postgres.c": "postgres/postgres.wasm",
    "stream/stream.c": "stream/stream.wasm",
    "http2/http2.c": "http2/http2.wasm",
    "http1/http1.c": "http1/http1.wasm",
    "testing/loop.c": "testing/loop.wasm",
    "testing/membomb.c": "testing/membomb.wasm",
    "testing/trap.c": "testing/trap.wasm",
    "testing/garbage.c": "testing/garbage.wasm",
    "testing/noexport.c": "testing/noexport.wasm",
    "testing/flood.c": "testing/flood.wasm",
    "testing/tablebomb.c": "testing/tablebomb.wasm",
    "testing/multimem.wat": "testing/multimem.wasm",
    "testing/streamtrap.c": "testing/streamtrap.wasm",
    "testing/tcp_raw.c": "testing/tcp_raw.wasm",
    "testing/sdkcheck.c": "testing/sdkcheck.wasm",
    "testing/http2_raw.c": "testing/http2_raw.wasm",
    "sdk/c/examples/h2ping.c": "sdk/c/examples/h2ping.wasm",
    "testing/postgres_raw.c": "testing/postgres_raw.wasm",
    "sdk/c/examples/pgping.c": "sdk/c/examples/pgping.wasm",
    "sdk/zig/examples/stream_hold.zig": "sdk/zig/examples/stream_hold.wasm",
    "sdk/zig/examples/tcp_hold.zig": "sdk/zig/examples/tcp_hold.wasm",
}

#: source -> flags added to CFLAGS for it alone
EXTRA_CFLAGS: dict[str, tuple[str, ...]] = {
    "tcp/tcp.c": ("-mbulk-memory",),  # the SDK's fab_copy: memory.copy
    "stream/stream.c": ("-mbulk-memory",),
    "testing/tablebomb.c": ("-mreference-types",),  # a C table of externrefs needs them
    "postgres/postgres.c": ("-mbulk-memory",),  # memory.copy for relayed bytes
    "http2/http2.c": ("-mbulk-memory",),  # memory.copy: one instruction per copy, not a loop
    "testing/http2_raw.c": ("-mbulk-memory",),
    "sdk/c/examples/h2ping.c": ("-mbulk-memory",),
    "testing/postgres_raw.c": ("-mbulk-memory",),  # as postgres.c was built
    "sdk/c/examples/pgping.c": ("-mbulk-memory",),  # the SDK's fab_copy
    "http1/http1.c": ("-mbulk-memory",),  # the SDK's fab_copy: memory.copy
}

CFLAGS: tuple[str, ...] = toolchain.CFLAGS


RELEASE_ONLY = toolchain.RELEASE_ONLY


def debug_cflags(flags: tuple[str, ...] = CFLAGS) -> tuple[str, ...]:
    """The flags of a debug build (fabric.activator.toolchain.debug_flags)."""
    return toolchain.debug_flags(flags)


def compile_one(src: Path, out: Path, cache: Path, *, debug: bool = False) -> None:
    """Compile one activator; the zig caches live in ``cache`` so builds are hermetic.
    ``debug``: with DWARF and unstripped (``debug_cflags``); a source outside this tree
    is compiled from its own directory (its DWARF then names files relative to it)."""
    inside = src.resolve().is_relative_to(ROOT)
    cwd = ROOT if inside else src.resolve().parent
    rel = str(src.resolve().relative_to(cwd))
    if src.suffix == ".wat":
        import wasmtime  # only here: the C builds need nothing but ziglang

        out.write_bytes(wasmtime.wat2wasm(src.read_text()))
        return
    env = dict(os.environ, ZIG_GLOBAL_CACHE_DIR=str(cache / "global"),
               ZIG_LOCAL_CACHE_DIR=str(cache / "local"))
    # Run from ROOT with relative paths, so no absolute path can leak into the output.
    if src.suffix == ".zig":
        cmd = toolchain.zig_command(rel, str(out.resolve()), "sdk/zig/fabricd.zig",
                                    debug=debug)
    else:
        flags = debug_cflags() if debug else CFLAGS
        cmd = [sys.executable, "-m", "ziglang", "cc", *flags, *EXTRA_CFLAGS.get(rel, ()),
               "-o", str(out.resolve()), rel]
    subprocess.run(cmd, cwd=cwd, env=env, check=True)


def build_all(outdir: Path) -> dict[str, Path]:
    """Build every target under ``outdir`` (mirroring the relative layout)."""
    built: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="fab-zig-cache-") as cache:
        for src, out in TARGETS.items():
            dest = outdir / out
            dest.parent.mkdir(parents=True, exist_ok=True)
            compile_one(ROOT / src, dest, Path(cache))
            built[out] = dest
    return built


def check() -> list[str]:
    """Rebuild into a temp dir; return the outputs whose bytes differ from the committed."""
    with tempfile.TemporaryDirectory(prefix="fab-activators-") as tmp:
        built = build_all(Path(tmp))
        return [out for out, path in built.items()
                if not (ROOT / out).is_file() or (ROOT / out).read_bytes() != path.read_bytes()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="rebuild into a temp dir and compare with the committed .wasm")
    ap.add_argument("--debug", metavar="SRC", type=Path,
                    help="build one C source with debug info (file:line in traps)")
    ap.add_argument("-o", "--output", metavar="OUT", type=Path,
                    help="with --debug: the module to write (default: SRC.debug.wasm)")
    args = ap.parse_args(argv)
    if args.debug is not None:
        out = args.output or args.debug.with_suffix(".debug.wasm")
        if not args.debug.is_file():
            print(f"{args.debug}: no such file", file=sys.stderr)
            return 2
        try:
            with tempfile.TemporaryDirectory(prefix="fab-zig-cache-") as cache:
                compile_one(args.debug, out, Path(cache), debug=True)
        except subprocess.CalledProcessError as e:
            print(f"build failed: {e}", file=sys.stderr)
            return 2
        print(f"{out}: {out.stat().st_size} bytes, with debug info")
        return 0
    if args.check:
        try:
            bad = check()
        except subprocess.CalledProcessError as e:
            print(f"build failed: {e}", file=sys.stderr)
            return 1
        for out in bad:
            print(f"activators/{out}: differs from a fresh build; run activators/build.py",
                  file=sys.stderr)
        if not bad:
            print(f"{len(TARGETS)} activators match their sources")
        return 1 if bad else 0
    try:
        build_all(ROOT)
    except subprocess.CalledProcessError as e:
        print(f"build failed: {e}", file=sys.stderr)
        return 2
    for out in TARGETS.values():
        print(f"activators/{out}: {(ROOT / out).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
