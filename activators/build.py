"""Build the activators' .wasm files from C, reproducibly, with the zig toolchain from PyPI.

Why a script rather than a Makefile rule: CI runs ``python activators/build.py --check``,
which rebuilds everything into a temporary directory and compares bytes with the committed
.wasm files, so a source change without a rebuild (or a toolchain drift) fails loudly.
The flags are fixed and the output stripped (no debug info, no producers section), so the
bytes depend only on the sources and the pinned ``ziglang`` version. A hostile test module
that C cannot express (more than one memory) is written in the text format and assembled
with the pinned ``wasmtime``'s ``wat2wasm``, equally deterministic.

Usage: ``python activators/build.py`` (write) or ``python activators/build.py --check``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent

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
}

#: source -> flags added to CFLAGS for it alone
EXTRA_CFLAGS: dict[str, tuple[str, ...]] = {
    "tcp/tcp.c": ("-mbulk-memory",),  # the SDK's fab_copy: memory.copy
    "testing/tablebomb.c": ("-mreference-types",),  # a C table of externrefs needs them
    "postgres/postgres.c": ("-mbulk-memory",),  # memory.copy for relayed bytes
    "http2/http2.c": ("-mbulk-memory",),  # memory.copy: one instruction per copy, not a loop
    "http1/http1.c": ("-mbulk-memory",),  # the SDK's fab_copy: memory.copy
}

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


def compile_one(src: Path, out: Path, cache: Path) -> None:
    """Compile one activator; the zig caches live in ``cache`` so builds are hermetic."""
    rel = str(src.relative_to(ROOT))
    if src.suffix == ".wat":
        import wasmtime  # only here: the C builds need nothing but ziglang

        out.write_bytes(wasmtime.wat2wasm(src.read_text()))
        return
    env = dict(os.environ, ZIG_GLOBAL_CACHE_DIR=str(cache / "global"),
               ZIG_LOCAL_CACHE_DIR=str(cache / "local"))
    # Run from ROOT with relative paths, so no absolute path can leak into the output.
    cmd = [sys.executable, "-m", "ziglang", "cc", *CFLAGS, *EXTRA_CFLAGS.get(rel, ()),
           "-o", str(out), rel]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


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
    args = ap.parse_args(argv)
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
