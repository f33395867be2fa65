"""The layers of the code, checked on its imports (every import: top level, in functions,
under TYPE_CHECKING): each unit may use only the units listed for it, so imports go one
way, there is no cycle between packages, and no module imports another's private names.
docs/architecture.md draws the same table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fabric", "gateway", "tunnels", "activators")

# Unit -> the units it may import (besides itself). Bottom first.
ALLOWED: dict[str, set[str]] = {
    "fabric.errors": set(),
    "fabric.config.specs": set(),
    "fabric.histogram": set(),
    "fabric.net": set(),
    "fabric.flows": {"fabric.net"},
    "fabric.config": {"fabric.config.specs", "fabric.errors"},
    "fabric.router": {"fabric.net", "fabric.flows", "fabric.config.specs"},
    "fabric.activator": set(),
    # the scaffolds' templates (fabricd activator new): an author's project, a client
    "fabric.activator.templates": {"fabric.activator", "fabric.net"},
    "fabric.streams": {"fabric.activator", "fabric.histogram", "fabric.net"},
    # the capture replay harness (`fabricd activator test`): the host and the stream core
    "fabric.activator.harness": {"fabric.activator", "fabric.streams"},
    "fabric.services": {"fabric.net", "fabric.flows", "fabric.config.specs", "fabric.router",
                        "fabric.activator", "fabric.histogram", "fabric.streams",
                        "fabric.errors"},
    "fabric.ports": {"fabric.errors", "fabric.config.specs", "fabric.net"},
    # gateway/ and tunnels/ use the bottom layers of fabric/ only.
    "gateway": {"fabric.net", "fabric.flows", "fabric.errors", "fabric.config.specs",
                "fabric.ports", "fabric.router.model", "fabric.histogram"},
    "tunnels": {"fabric.net", "fabric.errors", "fabric.histogram"},
    # The runtime wires everything below (the only part of fabric/ that imports gateway/
    # and tunnels/).
    "fabric.runtime": {"fabric.errors", "fabric.config.specs", "fabric.histogram",
                       "fabric.config", "fabric.net",
                       "fabric.flows", "fabric.router", "fabric.activator", "fabric.services",
                       "fabric.streams",
                       "fabric.ports", "gateway", "tunnels"},
    "fabric.control": {"fabric.errors", "fabric.config.specs", "fabric.config", "fabric.net",
                       "fabric.runtime"},
    # microVMs (QEMU, QMP, the guest's initramfs): stand-alone, used by the demo and tests
    "fabric.microvm": set(),
    "fabric.tools": {"fabric.config.specs", "fabric.control", "fabric.microvm"},
    "fabric.cli": {"fabric.errors", "fabric.net", "fabric.control", "fabric.tools",
                   "fabric.runtime", "fabric.activator"},
    # the CNI plugin: a client of the daemon, like the CLI
    "fabric.cni": {"fabric.errors", "fabric.control"},
    "fabric": {"fabric.runtime", "fabric.cli"},  # fabric/__init__ (Fabric) and __main__
    # build.py compiles with the toolchain's fixed flags (fabric.activator.toolchain)
    "activators": {"fabric.activator"},
}


def unit_of(module: str) -> str:
    """The layer a module belongs to: the longest key of ALLOWED that prefixes it."""
    best = ""
    for u in ALLOWED:
        if (module == u or module.startswith(u + ".")) and len(u) > len(best):
            best = u
    return best or module


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = modules()


def imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [a.name for a in node.names]
            # "from fabric.net import checksum": the submodule is what is imported.
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            if subs:
                out += [(s, [], node.lineno) for s in subs]
                rest = [n for n in names if f"{base}.{n}" not in MODULES]
                if rest:
                    out.append((base, rest, node.lineno))
            else:
                out.append((base, names, node.lineno))
    return [(m, n, line) for m, n, line in out if m.split(".")[0] in PACKAGES]


EDGES = [(mod, imp, names, line) for mod, path in MODULES.items()
         for imp, names, line in imports(mod, path)]


def test_the_modules_are_found() -> None:
    for m in ("fabric.net.packets", "fabric.flows.table", "fabric.router.router",
              "fabric.services.dispatch", "fabric.runtime.dataplane", "gateway.egress",
              "tunnels.core"):
        assert m in MODULES


@pytest.mark.parametrize("unit", sorted(ALLOWED))
def test_imports_go_one_way(unit: str) -> None:
    bad = []
    for mod, imp, _names, line in EDGES:
        if unit_of(mod) != unit:
            continue
        target = unit_of(imp)
        if target == unit or target in ALLOWED[unit]:
            continue
        # A narrower allowance (gateway -> fabric.router.model) names a module.
        if any(imp == a or imp.startswith(a + ".") for a in ALLOWED[unit]):
            continue
        bad.append(f"{MODULES[mod].relative_to(ROOT)}:{line}: {mod} imports {imp}")
    assert not bad, "\n".join(bad)


def test_no_cycle_between_units() -> None:
    graph: dict[str, set[str]] = {}
    for mod, imp, _names, _line in EDGES:
        a, b = unit_of(mod), unit_of(imp)
        if a != b:
            graph.setdefault(a, set()).add(b)
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> None:
        seen[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if seen.get(v) == 1:
                raise AssertionError("cycle: " + " -> ".join(stack[stack.index(v):] + [v]))
            if v not in seen:
                visit(v)
        stack.pop()
        seen[u] = 2

    for u in sorted(graph):
        if u not in seen:
            visit(u)


def test_nothing_in_fabric_but_the_runtime_imports_gateway_or_tunnels() -> None:
    bad = [f"{mod} imports {imp}" for mod, imp, _n, _l in EDGES
           if mod.startswith("fabric.") and not mod.startswith("fabric.runtime")
           and imp.split(".")[0] in ("gateway", "tunnels")]
    assert not bad


def test_no_private_names_imported_across_modules() -> None:
    bad = [f"{MODULES[mod].relative_to(ROOT)}:{line}: {n} from {imp}"
           for mod, imp, names, line in EDGES for n in names
           if n.startswith("_") and not n.startswith("__") and imp != mod]
    assert not bad, "\n".join(bad)


def test_no_private_attributes_of_imported_modules() -> None:
    """`module._name` through an imported module is a private name across modules too."""
    bad = []
    for path in MODULES.values():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in PACKAGES:
                        aliases[a.asname or a.name.split(".")[0]] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if full in MODULES:
                        aliases[a.asname or a.name] = full
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: "
                           f"{node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)
