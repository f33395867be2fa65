"""The daemon under a stand-in for systemd: the test binds the `$NOTIFY_SOCKET` datagram
socket itself (systemd is not PID 1 here) and reads what the real daemon says: READY=1
once the namespaces are applied and the control socket listens, RELOADING=1/READY=1
around SIGHUP, STOPPING=1 on SIGTERM, and WATCHDOG=1 pings that stop while the
data-plane thread is stalled. (`systemd-analyze verify` of the shipped unit is in
tests/unit/test_systemd_unit.py.)"""

from __future__ import annotations

import os
import signal
import socket
import time

from fabric.control.client import ControlClient
from fabric.tools.sandbox import Daemon, Sandbox

STALL = 2.0  # seconds the test hook blocks the data-plane thread
WATCHDOG_USEC = 400_000  # a ping every 0.2 s


class Listener:
    """systemd's end of $NOTIFY_SOCKET: every datagram, parsed, kept in order."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages: list[dict[str, str]] = []

    def next(self, timeout: float = 20.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096)
        msg = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        self.messages.append(msg)
        return msg

    def until(self, key: str, value: str | None = None,
              timeout: float = 20.0) -> list[dict[str, str]]:
        """Messages up to and including the first with `key` (= `value`)."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next(max(0.01, deadline - time.monotonic()))
            seen.append(msg)
            if key in msg and (value is None or msg[key] == value):
                return seen

    def close(self) -> None:
        self.sock.close()


def start(sandbox: Sandbox, listener: Listener, services: list[dict[str, object]] | None = None,
          late: str | None = None, **env: str) -> tuple[Daemon, str, str]:
    """The daemon with pods a and b (and `late`, whose namespace does not exist yet)."""
    worker = sandbox.netns("worker")
    a, b = sandbox.netns("a"), sandbox.netns("b")
    pods = [{"name": "a", "ip": "10.40.0.2", "netns": a},
            {"name": "b", "ip": "10.40.0.3", "netns": b}]
    if late is not None:
        pods.append({"name": "late", "ip": "10.40.0.9", "netns": late})
    ns = {"name": "shop", "id": 7, "cidr": "10.40.0.0/24", "pods": pods,
          "services": services or []}
    full = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
    full |= {"NOTIFY_SOCKET": listener.path, **env}
    d = Daemon(sandbox, worker, {"namespaces": [ns]}, env=full)
    d.start()
    return d, a, b


def test_notify_ready_reload_stopping_and_watchdog_through_a_stall(sandbox: Sandbox) -> None:
    listener = Listener(os.path.join(sandbox.tmp, "notify.sock"))
    try:
        late = sandbox.name("late")
        d, a, _ = start(sandbox, listener, late=late, WATCHDOG_USEC=str(WATCHDOG_USEC),
                        FABRICD_TEST_STALL_SECONDS=str(STALL))
        before = listener.until("READY", "1")
        assert before[0]["STATUS"].startswith("starting"), before
        applying = [m for m in before if "applying namespace shop" in m.get("STATUS", "")]
        assert applying and applying[0]["EXTEND_TIMEOUT_USEC"] == "60000000", before
        # READY=1 means ready: the namespace is applied, the pods that can be attached
        # are, the API answers.
        api = ControlClient(d.control)
        pods = api.get("/v1/pods")
        assert [p["attached"] for p in pods] == [True, True, False], pods
        assert "1 received" in sandbox.run(a, "ping", "-c", "1", "-W", "2",
                                           "10.40.0.3").stdout
        assert before[-1]["STATUS"].startswith("ready: 1 namespace, 2/3 pods attached")
        listener.until("WATCHDOG", "1")
        listener.until("WATCHDOG", "1")
        # The late pod's namespace appears: it is attached, and the status line says so.
        assert sandbox.netns("late") == late
        attached = listener.until("STATUS", None, timeout=20)
        while "3/3 pods attached" not in attached[-1]["STATUS"]:
            attached = listener.until("STATUS", None, timeout=20)
        assert not any("READY" in m for m in attached)

        d.signal(signal.SIGHUP)
        reload = listener.until("RELOADING", "1")[-1]
        assert int(reload["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
        assert "reloading" in reload["STATUS"]
        after = listener.until("READY", "1")
        assert not any("STOPPING" in m for m in after)
        assert after[-1]["STATUS"].startswith("ready:")
        # A reload that fails still ends in READY=1 (the running config stays), and the
        # status line says what went wrong.
        with open(d.config_path, "a") as f:
            f.write("bogus: 1\n")
        d.signal(signal.SIGHUP)
        listener.until("RELOADING", "1")
        failed = listener.until("READY", "1")[-1]
        assert "(last reload failed: " in failed["STATUS"], failed
        assert "bogus" in failed["STATUS"]

        # A stalled data plane sends no ping: the stall's markers travel on the same
        # thread and socket as the pings, so nothing can slip between them.
        d.signal(signal.SIGUSR2)
        listener.until("X_FABRICD_STALL", "begin data plane")
        stalled = listener.until("X_FABRICD_STALL", "end data plane", timeout=STALL + 20)
        assert not any("WATCHDOG" in m for m in stalled), stalled
        listener.until("WATCHDOG", "1")  # the pings come back, and so does traffic
        assert "1 received" in sandbox.run(a, "ping", "-c", "1", "-W", "2",
                                           "10.40.0.3").stdout

        # A stalled event loop: the data plane pings only while the loop's last beat is
        # at most WATCHDOG_USEC old, so at most three pings (0.2 s apart, within 0.4 s of
        # the stall's start) of the ten the stall would have held.
        d.signal(signal.SIGUSR1)
        listener.until("X_FABRICD_STALL", "begin event loop")
        stalled = listener.until("X_FABRICD_STALL", "end event loop", timeout=STALL + 20)
        pings = sum(1 for m in stalled if "WATCHDOG" in m)
        assert pings <= 3, stalled
        listener.until("WATCHDOG", "1")

        d.signal(signal.SIGTERM)
        stopping = listener.until("STOPPING", "1")[-1]
        assert stopping["STATUS"].startswith("shutting down")
        assert d.proc is not None and d.proc.wait(20) == 0
        assert "test hook: stalling the data plane for" in d.log()
        assert "watchdog: the event loop has not run for" in d.log()
    finally:
        listener.close()


def test_no_pings_for_another_pid_and_no_hook_without_its_variable(sandbox: Sandbox) -> None:
    """$WATCHDOG_PID naming another process: that process pings, not this one. A hook
    never sees systemd's variables (hooks get a minimal environment, and the daemon
    unsets them once read), so it cannot speak for the daemon. Without
    FABRICD_TEST_STALL_SECONDS the stall hook does not exist."""
    listener = Listener(os.path.join(sandbox.tmp, "notify.sock"))
    env_file = os.path.join(sandbox.tmp, "hook-env")
    try:
        web = {"name": "web", "ip": "10.40.0.100", "ports": [{"port": 80}],
               "backends": ["b"], "readiness": "external", "hold": {"timeout": "1s"},
               "on_activate": f"sh -c 'env > {env_file}.tmp && mv {env_file}.tmp {env_file}'"}
        d, a, _ = start(sandbox, listener, [web], WATCHDOG_USEC=str(WATCHDOG_USEC),
                        WATCHDOG_PID="1")
        listener.until("READY", "1")
        d.cli("ready", "shop/b", "--unready")
        sandbox.run(a, "curl", "-sS", "--max-time", "3", "http://10.40.0.100/", check=False)
        deadline = time.monotonic() + 10
        while not os.path.exists(env_file) and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(env_file) as f:
            hook_env = dict(line.split("=", 1) for line in f.read().splitlines() if "=" in line)
        assert hook_env["FABRIC_SERVICE"] == "web"
        assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & hook_env.keys()
        time.sleep(1.0)  # five pings' worth
        d.signal(signal.SIGTERM)
        rest = listener.until("STOPPING", "1")
        assert not any("WATCHDOG" in m for m in listener.messages), listener.messages
        assert rest[-1]["STOPPING"] == "1"
        assert d.proc is not None and d.proc.wait(20) == 0
        assert "FABRICD_TEST_STALL_SECONDS" not in d.log()
    finally:
        listener.close()
