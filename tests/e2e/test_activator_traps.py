"""A debug build's trap in the running daemon: its log line and the services API name the
file:line of the trapping instruction, and the service still wakes and serves."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

from fabric.tools.sandbox import Daemon, Sandbox

ROOT = Path(__file__).resolve().parents[2]
ACT = ROOT / "activators"
VIP = "10.42.0.100"


def test_a_debug_modules_trap_names_its_line_in_the_log_and_the_api(sandbox: Sandbox) -> None:
    sys.path.insert(0, str(ACT))
    import build

    wasm = Path(sandbox.tmp) / "trap.debug.wasm"
    build.compile_one(ACT / "testing" / "trap.c", wasm, Path(sandbox.tmp) / "zig",
                      debug=True)
    line = next(i for i, t in enumerate((ACT / "testing" / "trap.c").read_text()
                                        .splitlines(), 1) if "__builtin_trap()" in t)
    where = rf"fab_process\+0x[0-9a-f]+ \(testing/trap\.c:{line}(:\d+)?\)"
    worker = sandbox.netns("worker")
    client, web = sandbox.netns("client"), sandbox.netns("web")
    start = (f"sh -c '(sleep 0.3; exec ip netns exec {sandbox.name('web')} {sys.executable} "
             "-m fabric.tools.sandbox http 8080) >/dev/null 2>&1 &'")
    ns = {"name": "shop", "id": 9, "cidr": "10.42.0.0/24",
          "pods": [{"name": "client", "ip": "10.42.0.2", "netns": client},
                   {"name": "web-1", "ip": "10.42.0.3", "netns": web}],
          "services": [{"name": "web", "ip": VIP, "backends": ["web-1"],
                        "ports": [{"port": 80, "target_port": 8080,
                                   "activator": os.fspath(wasm)}],
                        "on_activate": start}]}
    d = Daemon(sandbox, worker, {"namespaces": [ns]}).start()
    d.wait_attached(2)
    r = sandbox.run(client, "curl", "-sS", "--max-time", "20", f"http://{VIP}/",
                    check=False, timeout=30)
    assert r.returncode == 0 and "hello from" in r.stdout, (r.stderr, d.log()[-3000:])
    st = d.get("/v1/services")[0]["activators"]["80"]
    f = st["last_failure"]
    assert st["traps"] >= 1 and f and re.fullmatch(where, f["frames"][0]), st
    deadline = time.monotonic() + 5
    while not re.search(r"unreachable.* at " + where, d.log()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert re.search(r"unreachable.* at " + where, d.log()), d.log()[-3000:]
