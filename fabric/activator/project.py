"""Activator projects: what ``fabricd activator new`` lays out and ``build`` compiles.

Why in the package: a project must build and pass its own tests against the installed
fabricd alone (no source tree): the SDKs ship as package data of ``activators``
(``activators/sdk/c``, ``activators/sdk/zig``), the templates as package data here
(``templates/``), and the build passes the SDK's path to the pinned zig with the fixed
flags of fabric/activator/toolchain.py.

A project is a directory with its source in ``src/``: one ``.c`` (C, one translation
unit including ``fabricd.h``) or one ``.zig`` (Zig, importing ``fabricd``) there, or
``src/main.c`` / ``src/main.zig`` when there are several. The language is read from that
file's suffix; the output is ``<project>/<source stem>.wasm`` unless told otherwise.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fabric.activator import toolchain

LANGS: dict[str, str] = {"c": ".c", "zig": ".zig"}
LANG_NAMES = {"c": "C", "zig": "Zig"}
PROTOS = ("tcp", "stream", "http2", "postgres")
NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")

# proto -> (service port, target port, activator_config shown in the config example)
_EXAMPLE: dict[str, tuple[int, int, str]] = {
    "tcp": (80, 8080, "{max_held: 1024}"),
    "stream": (80, 8080, "{}"),
    "http2": (80, 8080, "{}"),
    "postgres": (5432, 5432, "{}"),
}


class ProjectError(Exception):
    """A project that cannot be built or made: one line, for people."""


@dataclass(frozen=True)
class Built:
    """One build's result."""

    path: Path
    source: Path
    lang: str
    size: int
    sha256: str


def find_source(project: Path) -> Path:
    """The project's root source file (see the module docstring)."""
    src = project / "src"
    if not project.is_dir():
        raise ProjectError(f"{project}: not a directory")
    if not src.is_dir():
        raise ProjectError(f"{project}: no src/ directory (make one with "
                           "'fabricd activator new NAME')")
    found = sorted(p for p in src.iterdir() if p.suffix in LANGS.values() and p.is_file())
    if len(found) == 1:
        return found[0]
    for suffix in LANGS.values():
        if (src / f"main{suffix}").is_file():
            return src / f"main{suffix}"
    if not found:
        raise ProjectError(f"{project}: no src/*.c or src/*.zig to build")
    raise ProjectError(f"{project}: several sources in src/ ({', '.join(p.name for p in found)});"
                       " name the root one src/main.c or src/main.zig")


def lang_of(source: Path) -> str:
    return next(lang for lang, suffix in LANGS.items() if source.suffix == suffix)


def watched_files(project: Path) -> list[Path]:
    """What a rebuild depends on: every source under src/ (C headers included)."""
    src = project / "src"
    if not src.is_dir():
        return []
    return sorted(p for p in src.rglob("*") if p.suffix in (".c", ".h", ".zig") and p.is_file())


def cache_dir() -> Path:
    """The zig cache: $FABRICD_ZIG_CACHE, else the per-user one, else a temp dir (a
    read-only home must not stop a build)."""
    for d in (os.environ.get("FABRICD_ZIG_CACHE"), str(toolchain.default_cache())):
        if not d:
            continue
        try:
            Path(d).mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(d, os.W_OK):
            return Path(d)
    return Path(tempfile.mkdtemp(prefix="fabricd-zig-"))


def build_project(project: Path, out: Path | None = None, cache: Path | None = None, *,
                  debug: bool = False) -> Built:
    """Compile the project; the output is replaced atomically (a daemon reloading it never
    reads half a file). BuildError carries the compiler's messages. ``debug``: with DWARF
    and unstripped, so a trap's report names file:line (toolchain.debug_flags)."""
    project = project.resolve()
    source = find_source(project)
    lang = lang_of(source)
    out = (out or project / f"{source.stem}.wasm").resolve()
    if not out.parent.is_dir():
        raise ProjectError(f"{out.parent}: no such directory for the output")
    sdk = toolchain.sdk_dir()
    rel = str(source.relative_to(project))
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=".wasm", dir=out.parent)
    os.close(fd)
    try:
        if lang == "zig":
            cmd = toolchain.zig_command(rel, tmp, str(sdk / "zig" / "fabricd.zig"), debug=debug)
        else:
            cmd = toolchain.c_command(rel, tmp, toolchain.SDK_CFLAGS, (str(sdk / "c"),),
                                      debug=debug)
        toolchain.run(cmd, project, cache or cache_dir())
        data = Path(tmp).read_bytes()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return Built(out, source, lang, len(data), hashlib.sha256(data).hexdigest())


def _template(rel: str) -> str:
    return (resources.files("fabric.activator") / "templates" / rel).read_text()


def scaffold(name: str, lang: str = "c", proto: str = "stream", parent: Path = Path(".")
             ) -> Path:
    """Lay out a new project ``parent/name`` that builds and passes its own tests."""
    if not NAME_RE.fullmatch(name):
        raise ProjectError(f"{name!r}: a name is 1-32 of [a-z0-9_], starting with a letter")
    if lang not in LANGS:
        raise ProjectError(f"{lang!r}: the language is one of {', '.join(LANGS)}")
    if proto not in PROTOS:
        raise ProjectError(f"{proto!r}: the protocol is one of {', '.join(PROTOS)}")
    if not parent.is_dir():
        raise ProjectError(f"{parent}: no such directory")
    root = parent / name
    if root.exists():
        raise ProjectError(f"{root}: exists already")
    suffix = LANGS[lang]
    source = f"src/{name}{suffix}"
    port, target, config = _EXAMPLE[proto]
    sdk_files = ("fabricd.h, fab_tcp.h" if proto == "tcp" else "fabricd.h") if lang == "c" \
        else "fabricd.zig"
    subst = {"name": name, "proto": proto, "lang_name": LANG_NAMES[lang], "source": source,
             "sdk_files": sdk_files, "port": str(port), "target_port": str(target),
             "config": config}

    def fill(text: str) -> str:
        return re.sub(r"\{\{(\w+)\}\}", lambda m: subst[m.group(1)], text)

    files = {
        source: fill(_template(f"{lang}/{proto}{suffix}")),
        "README.md": fill(_template("README.md")),
        "config.example.yaml": fill(_template("config.example.yaml")),
        f"tests/test_{name}.py": fill(_template(f"tests/{proto}.py")),
        "tests/conftest.py": fill(_template("tests/conftest.py")),
        "pytest.ini": "[pytest]\ntestpaths = tests\n",
        ".gitignore": "*.wasm\n__pycache__/\n",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root
