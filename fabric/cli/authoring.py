"""`fabricd activator new` and `fabricd activator build`: the author's side of activators.

A thin shell over fabric.activator.project (layout, build) and the daemon's reload call
(the same path as `fabricd activator reload`). `--watch` polls the sources' mtimes (no
dependency on inotify bindings): a rebuild per change, and with `--reload` a swap into the
running daemon after each good build; a failed build or a refused reload is reported and
the watch goes on, the daemon keeps the module it has.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fabric.activator import project as proj
from fabric.activator.toolchain import BuildError

POLL_S = 0.5


def _usage(message: str) -> Exception:
    from fabric.cli.main import UsageError

    return UsageError(message)


def cmd_new(args: argparse.Namespace) -> int:
    try:
        root = proj.scaffold(args.name, args.lang, args.proto, Path(args.dir))
    except proj.ProjectError as e:
        raise _usage(str(e)) from None
    print(f"{root}: a {proj.LANG_NAMES[args.lang]} {args.proto} activator; next: "
          f"cd {root} && fabricd activator build && python -m pytest -q")
    return 0


def _build_once(project: Path, out: Path | None, debug: bool = False) -> proj.Built | None:
    """One build, reported; None (after printing the compiler's output) when it failed."""
    t = time.monotonic()
    try:
        b = proj.build_project(project, out, debug=debug)
    except BuildError as e:
        print(f"fabricd: build failed:\n{e}", file=sys.stderr)
        return None
    ms = (time.monotonic() - t) * 1000
    print(f"{b.path}: {b.size} bytes, sha256 {b.sha256} ({proj.LANG_NAMES[b.lang]}, "
          f"{ms:.0f} ms)", flush=True)
    return b


def _reload(args: argparse.Namespace, built: proj.Built) -> bool:
    from fabric.cli.main import cmd_activator
    from fabric.errors import FabricError

    ns = argparse.Namespace(**vars(args))
    ns.target, ns.module = args.reload, str(built.path)
    try:
        cmd_activator(ns)
    except FabricError as e:
        print(f"fabricd: reload refused: {e.message}", file=sys.stderr, flush=True)
        return False
    except OSError as e:  # no daemon listening
        print(f"fabricd: reload failed: {e}", file=sys.stderr, flush=True)
        return False
    return True


def _mtimes(project: Path) -> dict[Path, float]:
    out: dict[Path, float] = {}
    for p in proj.watched_files(project):
        try:
            out[p] = p.stat().st_mtime_ns
        except OSError:
            continue
    return out


def cmd_build(args: argparse.Namespace) -> int:
    project = Path(args.dir)
    out = Path(args.output) if args.output else None
    if args.reload:
        from fabric.cli.main import parse_reload_target

        parse_reload_target(args.reload)  # a bad target is refused before any build
    try:
        proj.find_source(project)
        if out is not None and not out.resolve().parent.is_dir():
            raise proj.ProjectError(f"{out.parent}: no such directory for the output")
    except proj.ProjectError as e:
        raise _usage(str(e)) from None
    seen = _mtimes(project)  # before building: a change during the build is seen too
    built = _build_once(project, out, args.debug)
    ok = built is not None and (not args.reload or _reload(args, built))
    if not args.watch:
        return 0 if ok else 1
    print(f"watching {project.resolve()}/src (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(POLL_S)
            now = _mtimes(project)
            if now == seen:
                continue
            seen = now
            try:
                built = _build_once(project, out, args.debug)
            except proj.ProjectError as e:  # the source was renamed away meanwhile
                print(f"fabricd: {e}", file=sys.stderr, flush=True)
                continue
            if built is not None and args.reload:
                _reload(args, built)
    except KeyboardInterrupt:
        return 0
