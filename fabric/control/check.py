"""`fabricd check -c FILE`: is this config one the daemon would take? (like `nginx -t`)

Nothing is run or opened but the file and the files it names: no namespaces, no
devices, no root. Every problem is one line naming the file, the key and the problem;
so is every warning: what the daemon would take but not act on as written (an activator
that is not shipped, a module file that is not there: the service would run without it).
"""

from __future__ import annotations

import os
import stat
import sys
from typing import TextIO

from fabric.config.activator_keys import known, unknown_keys
from fabric.config.load import check_config
from fabric.config.specs import SHIPPED_ACTIVATORS, Config


def check(path: str, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Print every problem (stderr) and return 1, or one "ok" line (stdout) and 0;
    warnings (stderr) do not fail the check."""
    out = out or sys.stdout
    err = err or sys.stderr
    config, problems = check_config(path)
    if config is None or problems:
        for p in problems:
            print(f"fabricd: {p.message}", file=err)
        print(f"fabricd: {path}: {_count(len(problems), 'problem')}", file=err)
        return 1
    notes = warnings(config)
    for key, text in notes:
        print(f"fabricd: {path}: {key}: warning: {text}", file=err)
    pods = sum(len(ns.pods) for ns in config.namespaces)
    services = sum(len(ns.services) for ns in config.namespaces)
    peers = len(config.worker.tunnel.peers) if config.worker.tunnel else 0
    also = f"; {_count(len(notes), 'warning')}" if notes else ""
    print(f"fabricd: {path}: ok (worker {config.worker.id}: "
          f"{_count(len(config.namespaces), 'namespace')}, {_count(pods, 'pod')}, "
          f"{_count(services, 'service')}, {_count(peers, 'peer')}{also})", file=out)
    return 0


def warnings(config: Config) -> list[tuple[str, str]]:
    """(key, text) for what the daemon accepts but would run without: activators, and
    activator_config keys a shipped activator does not read."""
    out: list[tuple[str, str]] = []
    without = "the service would hold and activate without it"
    for i, ns in enumerate(config.namespaces):
        for j, svc in enumerate(ns.services):
            for k, port in enumerate(svc.ports):
                key = f"namespaces[{i}].services[{j}].ports[{k}].activator"
                name = port.activator
                unread = unknown_keys(name, port.activator_config)
                if unread:
                    out.append((f"{key}_config", f"the {name} activator does not read "
                                f"{', '.join(unread)} (it reads {', '.join(known(name))}): "
                                "ignored"))
                if name == "none" or name in SHIPPED_ACTIVATORS:
                    continue
                if not name.endswith(".wasm"):
                    out.append((key, f"{name!r} is not shipped in this version (shipped: "
                                f"{', '.join(SHIPPED_ACTIVATORS)}); {without}"))
                    continue
                if not os.path.isabs(name):
                    out.append((key, f"{name} is relative: the daemon reads it from its "
                                "working directory (/ under systemd), not this file's"))
                try:
                    st = os.stat(name)
                except OSError as e:
                    out.append((key, f"cannot read {name}: {e.strerror or e}; {without}"))
                    continue
                if not stat.S_ISREG(st.st_mode):
                    out.append((key, f"{name} is not a regular file; {without}"))
    return out


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"
