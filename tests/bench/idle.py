"""What dormant services cost while nothing happens: the daemon's CPU with N services
scaled to zero and no traffic at all.

`python -m tests.bench.idle [--services N] [--activator NAME]` (root): a daemon in a
sandbox namespace with N services (every port with activator NAME if given, e.g. tcp),
each with one backend pod on another worker (in the table, nothing to attach), left
alone for 12 s, then its CPU (user + system, all threads) over three 5 s windows. The
target: a dormant service costs nothing until a packet arrives.
"""

from __future__ import annotations

import argparse
import os
import time

from fabric.tools.sandbox import Daemon, Sandbox


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.idle")
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--activator", default="none", help="activator of every port (none)")
    args = ap.parse_args()
    n = args.services
    ip = lambda i: f"10.70.{i // 256}.{i % 256}"  # noqa: E731
    pods = [{"name": f"b{i}", "ip": ip(i + 10), "worker": "other"} for i in range(n)]
    svcs = [{"name": f"s{i}", "ip": ip(i + 10 + n), "ports": [{"port": 80, "target_port": 8080,
                                                    "activator": args.activator}],
             "backends": [f"b{i}"]} for i in range(n)]
    with Sandbox("fbb") as sb:
        d = Daemon(sb, sb.netns("worker"), {"worker": {"id": "me"}, "namespaces": [
            {"name": "big", "id": 9, "cidr": "10.70.0.0/16", "pods": pods,
             "services": svcs}]}).start(timeout=120)
        time.sleep(12)
        for _ in range(3):
            c0 = cpu_seconds(d.proc.pid)
            time.sleep(5)
            used = cpu_seconds(d.proc.pid) - c0
            print(f"{n} dormant services, no traffic: daemon CPU {100 * used / 5:.1f} % of a "
                  "core", flush=True)


if __name__ == "__main__":
    main()
