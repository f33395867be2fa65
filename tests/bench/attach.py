"""Attaching pods one by one through the API, as a runtime does: the rate as the
namespace grows, the daemon's RSS, and what the per-attach bookkeeping costs in-process.

`python -m tests.bench.attach [--pods N]` (root): a daemon in a sandbox namespace, N
network namespaces made up front (not timed), then one PUT per pod with its `netns`,
printing the rate of each 250 and the RSS. Then, without a daemon, the in-process cost
of one attach's bookkeeping in a namespace of 5,000 pods (validation against the
namespace, the cross-namespace check, the DNS records).
"""

from __future__ import annotations

import argparse
import subprocess
import time

from fabric.config.parse import Taken, parse_config, parse_pod
from fabric.control.client import ControlClient
from fabric.tools.sandbox import Daemon, Sandbox
from gateway.records import Records


def pod_ip(i: int) -> str:
    return f"10.64.{(i + 2) // 256}.{(i + 2) % 256}"


def through_the_api(n: int) -> None:
    with Sandbox("fbb") as sb:
        worker = sb.netns("worker")
        d = Daemon(sb, worker, {"namespaces": [
            {"name": "big", "id": 9, "cidr": "10.64.0.0/16", "pods": []}]}).start()
        c = ControlClient(d.control)
        names = [sb.name(f"p{i}") for i in range(n)]
        subprocess.run(["ip", "-batch", "-"], input="\n".join(f"netns add {x}" for x in names),
                       text=True, check=True)
        sb.namespaces.extend(names)
        last = time.monotonic()
        for i, netns in enumerate(names):
            c.put(f"/v1/namespaces/big/pods/p{i}",
                  {"name": f"p{i}", "ip": pod_ip(i), "netns": netns})
            if (i + 1) % 250 == 0 or i + 1 == n:
                now = time.monotonic()
                with open(f"/proc/{d.proc.pid}/status") as f:
                    rss = int(f.read().split("VmRSS:")[1].split()[0]) // 1024
                k = (i % 250) + 1
                print(f"{i + 1} pods: the last {k} at {k / (now - last):.0f}/s; "
                      f"RSS {rss} MB", flush=True)
                last = now


def in_process(n: int = 5000, rounds: int = 20) -> None:
    pods = [{"name": f"p{i}", "ip": pod_ip(i), "netns": f"/run/netns/x{i}"} for i in range(n)]
    ns = parse_config({"namespaces": [{"name": "big", "id": 9, "cidr": "10.64.0.0/16",
                                       "pods": pods}]}, "bench").namespaces[0]
    new = {"name": "new", "ip": "10.64.200.1", "netns": "/run/netns/new"}

    def timed(fn: object) -> float:
        t = time.perf_counter()
        for _ in range(rounds):
            fn()  # type: ignore[operator]
        return (time.perf_counter() - t) / rounds * 1e3

    taken = Taken(ns)
    print(f"in-process, one attach into {n} pods: validation "
          f"{timed(lambda: parse_pod(new, 's', ns, 'w')):.2f} ms re-indexing, "
          f"{timed(lambda: parse_pod(new, 's', ns, 'w', taken=taken)):.3f} ms with the kept "
          "index", flush=True)
    names = {p.name: p.ip for p in ns.pods}
    full, inc = Records("big", "fabric.internal", ns.cidr), Records("big", "fabric.internal",
                                                                    ns.cidr)
    inc.sync(names)
    counter = iter(range(10**9))

    def one_more() -> None:
        names[f"q{next(counter)}"] = ns.pods[0].ip
        inc.sync(names)

    print(f"DNS records: {timed(lambda: full.replace_all(names)):.1f} ms rebuilt, "
          f"{timed(one_more):.2f} ms synced by difference", flush=True)


def fabric_bookkeeping(n: int = 10000, k: int = 200, chosen: bool = False) -> None:
    """Fabric.attach_pod and detach_pod with no port to make (pods on another worker):
    what the bookkeeping costs with few pods and with n, unprivileged. `chosen`: the
    pods come without an address (as a CNI ADD does), so the fabric picks and books one
    in its state directory."""
    import asyncio
    import tempfile

    from fabric.runtime.worker import Fabric

    def spec(i: int) -> dict[str, str]:
        if chosen:
            return {"name": f"p{i}", "worker": "w2"}
        return {"name": f"p{i}", "ip": pod_ip(i), "worker": "w2"}

    async def go() -> None:
        with tempfile.TemporaryDirectory(prefix="fabricd-bench-") as tmp:
            await run(tmp if chosen else None)

    async def run(state: str | None) -> None:
        async with Fabric(worker_id="w1", local_stack=False, state_dir=state) as fab:
            await fab.apply_namespace({"name": "big", "id": 4, "cidr": "10.64.0.0/16"})
            t0 = time.perf_counter()
            for i in range(k):
                await fab.attach_pod("big", spec(i))
            first = (time.perf_counter() - t0) / k * 1e3
            for i in range(k, n):
                await fab.attach_pod("big", spec(i))
            t0 = time.perf_counter()
            for i in range(n - k, n):
                await fab.detach_pod("big", f"p{i}")
            await fab.dataplane.acall(int)  # the data plane has done the detaches too
            t1 = time.perf_counter()
            for i in range(n - k, n):
                await fab.attach_pod("big", spec(i))
            await fab.dataplane.acall(int)
            t2 = time.perf_counter()
            what = "addresses chosen and booked" if chosen else "addresses given"
            print(f"Fabric bookkeeping ({what}): attach {first:.2f} ms each with < {k} pods, "
                  f"{(t2 - t1) / k * 1e3:.2f} ms at {n - k} (after detaching {k}: "
                  f"{(t1 - t0) / k * 1e3:.2f} ms each)", flush=True)

    asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.attach")
    ap.add_argument("--pods", type=int, default=2000)
    ap.add_argument("--in-process-only", action="store_true")
    a = ap.parse_args()
    in_process()
    fabric_bookkeeping()
    fabric_bookkeeping(chosen=True)
    if not a.in_process_only:
        through_the_api(a.pods)


if __name__ == "__main__":
    main()
