"""`fabricd check -c FILE`: is this config one the daemon would take? (like `nginx -t`)

Nothing is run or opened but the file and the key files it names: no namespaces, no
devices, no root. Every problem is one line naming the file, the key and the problem.
"""

from __future__ import annotations

import sys
from typing import TextIO

from fabric.config.load import check_config, load_config


def check(path: str, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Print every problem (stderr) and return 1, or one "ok" line (stdout) and 0."""
    out = out or sys.stdout
    err = err or sys.stderr
    problems = check_config(path)
    if problems:
        for p in problems:
            print(f"fabricd: {p.message}", file=err)
        print(f"fabricd: {path}: {_count(len(problems), 'problem')}", file=err)
        return 1
    config = load_config(path)  # what the daemon would load; cannot fail after the check
    pods = sum(len(ns.pods) for ns in config.namespaces)
    services = sum(len(ns.services) for ns in config.namespaces)
    peers = len(config.worker.tunnel.peers) if config.worker.tunnel else 0
    print(f"fabricd: {path}: ok (worker {config.worker.id}: "
          f"{_count(len(config.namespaces), 'namespace')}, {_count(pods, 'pod')}, "
          f"{_count(services, 'service')}, {_count(peers, 'peer')})", file=out)
    return 0


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"
