"""`fabricd run`: the daemon shell over `Fabric` — config, control socket, signals.

SIGTERM/SIGINT: clean shutdown, everything created is removed. SIGHUP: reload the file
and apply only what changed in it since the last load (so what the API created stays);
a bad file is reported and the running state kept.

Under systemd (``Type=notify``, packaging/systemd/fabricd.service) it says ``READY=1``
once every namespace of the file is applied and the control socket listens,
``RELOADING=1``/``READY=1`` around a reload, ``STOPPING=1`` on shutdown, a ``STATUS=``
line a person can read, and watchdog pings from the data-plane thread (sdnotify.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import resource
import signal
import sys
import time

from fabric.config.load import default_config, load_config
from fabric.config.parse import parse_namespace
from fabric.config.render import namespace_to_dict
from fabric.config.specs import Config, NamespaceSpec
from fabric.control import logs
from fabric.control.sdnotify import Notifier, NotifyEnv, Watchdog, monotonic_usec
from fabric.control.server import ControlServer
from fabric.errors import FabricError
from fabric.runtime.reconcile import plan_peer_reload, plan_reload
from fabric.runtime.worker import Fabric

log = logging.getLogger("fabricd")


# A test-only hook, off unless the daemon starts with this variable: SIGUSR2 then makes
# the data-plane thread sleep that many seconds, as a stuck data plane would, SIGUSR1 the
# event loop, so the watchdog tests can see the pings stop. Nothing else triggers it.
STALL_ENV = "FABRICD_TEST_STALL_SECONDS"
FLUSH_EVERY = 5.0  # seconds between the status refresh and repeat reports, at most
START_PROGRESS_USEC = 60_000_000  # each namespace applied may take this long


def load(path: str | None) -> Config:
    return load_config(path) if path else default_config()


def raise_fd_limit() -> None:
    """Every pod port, probe and forwarded DNS query is a descriptor: take all we may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def run(config_path: str | None, log_format: str = "text") -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code."""
    logs.setup(log_format)
    raise_fd_limit()

    def fatal(text: str) -> int:
        """The one line that ends the daemon: plain text, or a log object for shippers."""
        if log_format == "json":
            log.critical("%s", text)
        else:
            print(f"fabricd: {text}", file=sys.stderr)
        return 1

    try:
        config = load(config_path)
    except FabricError as e:
        return fatal(e.message)
    try:
        return asyncio.run(Daemon(config, config_path).main())
    except FabricError as e:
        return fatal(e.message)
    except Exception as e:  # a bug: still one line for the operator, the trace for us
        log.debug("fatal", exc_info=True)
        fatal(f"internal error: {type(e).__name__}: {e} (run with FABRICD_DEBUG=1 for the "
              "traceback)")
        if os.environ.get("FABRICD_DEBUG"):
            raise
        return 1


class Daemon:
    def __init__(self, config: Config, path: str | None,
                 notify_env: NotifyEnv | None = None) -> None:
        self.config = config
        self.path = path
        self.fabric = Fabric(worker_id=config.worker.id, egress=config.worker.egress,
                             tunnel=config.worker.tunnel, state_dir=config.worker.state_path,
                             busy_poll=config.worker.busy_poll,
                             busy_poll_adaptive=config.worker.busy_poll_adaptive,
                             service_hold_bytes=config.worker.service_hold_bytes)
        self.stop = asyncio.Event()
        self._reloading: asyncio.Task[None] | None = None
        env = notify_env if notify_env is not None else NotifyEnv.take(os.environ, os.getpid())
        self.notify_env = env
        self.notifier = Notifier(env.address)
        self.watchdog: Watchdog | None = None
        self._beat: asyncio.Task[None] | None = None
        self._status = ""
        self._note = ""  # what the status line adds about the last reload

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        control = ControlServer(self.fabric, self.config.worker.control,
                                self.config.worker.control_mode)
        n = len(self.config.namespaces)
        self.status(f"starting: {n} namespace{'' if n == 1 else 's'} to apply")
        await self.fabric.start()
        try:
            await self._start_watchdog()
            self._beat = asyncio.create_task(self._housekeeping())
            await control.start()
            if self.config.worker.control_mode & 0o020:
                log.warning("control socket %s is group-writable (mode %04o): members of "
                            "its group can set hooks that run as this daemon's user and "
                            "attach host interfaces", self.config.worker.control,
                            self.config.worker.control_mode)
            self.fabric.starting = True  # /v1/health says so until the file is applied
            for i, ns in enumerate(self.config.namespaces):
                # Progress extends systemd's start timeout (a minute from each namespace
                # begun): a file of a thousand namespaces may outlast TimeoutStartSec.
                self._status = (f"starting: applying namespace {ns.name} "
                                f"({i + 1}/{len(self.config.namespaces)})")
                self.notifier.notify(STATUS=self._status,
                                     EXTEND_TIMEOUT_USEC=START_PROGRESS_USEC)
                await self.fabric.apply_namespace(ns, self.config.source)
            await self.fabric.restore_pods()  # a CNI runtime's containers, from state_dir
            self.fabric.starting = False
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop.set)
            loop.add_signal_handler(signal.SIGHUP, self._on_hup)
            self._debug_stall_hook(loop)
            n = len(self.fabric.namespaces)
            log.info("worker %s ready: %d namespace%s, control socket %s",
                     self.fabric.worker_id, n, "" if n == 1 else "s",
                     self.config.worker.control)
            self._status = self.summary()
            self.notifier.notify(READY=1, STATUS=self._status)
            self.fabric.bus.emit("daemon_ready", worker=self.fabric.worker_id)
            await self.stop.wait()
            log.info("shutting down")
            self.notifier.notify(STOPPING=1, STATUS="shutting down: removing every "
                                 "interface the fabric made")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                        signal.SIGUSR2):
                loop.remove_signal_handler(sig)
            await control.close()
            await self.fabric.close()
            if self._beat is not None:
                self._beat.cancel()
            self.notifier.close()
        return 0

    # --- systemd ---------------------------------------------------------------------------

    def status(self, text: str) -> None:
        """A STATUS= line for `systemctl status` (sent only when it changed)."""
        if text != self._status:
            self._status = text
            self.notifier.notify(STATUS=text)

    def summary(self) -> str:
        """What `systemctl status` shows while running: namespaces, pods attached."""
        nss = list(self.fabric.namespaces.values())
        pods = sum(len(ns.pods) for ns in nss)
        attached = sum(1 for ns in nss for p in ns.pods.values() if p.port is not None)
        return (f"ready: {len(nss)} namespace{'' if len(nss) == 1 else 's'}, "
                f"{attached}/{pods} pods attached, "
                f"control socket {self.config.worker.control}{self._note}")

    async def _start_watchdog(self) -> None:
        """Pings from the data-plane thread's timer, while the event loop beats too."""
        timeout = self.notify_env.watchdog
        if timeout is None or not self.notifier.enabled:
            return
        notifier = self.notifier
        self.watchdog = wd = Watchdog(timeout, lambda: notifier.notify(WATCHDOG=1),
                                      time.monotonic())
        dp = self.fabric.dataplane
        await dp.acall(dp.add_owner, wd)
        log.info("systemd watchdog: pinged every %.3g s from the data-plane thread",
                 wd.period)

    async def _housekeeping(self) -> None:
        """The event loop's half of the watchdog (it beats every WatchdogSec/4), the
        status line kept current, and repeat counts reported soon after their window
        ends rather than only when the line comes again (every 5 s)."""
        wd = self.watchdog
        every = min(FLUSH_EVERY, wd.period / 2) if wd is not None else FLUSH_EVERY
        flushed = time.monotonic()
        while True:
            now = time.monotonic()
            if wd is not None:
                wd.loop_beat(now)
            if (self.notifier.enabled and not self.fabric.starting
                    and self._status.startswith("ready")):
                self.status(self.summary())
            if now - flushed >= FLUSH_EVERY:
                flushed = now
                logs.flush_repeats()
            await asyncio.sleep(every)

    def _debug_stall_hook(self, loop: asyncio.AbstractEventLoop) -> None:
        raw = os.environ.get(STALL_ENV)
        if not raw:
            return
        try:
            seconds = float(raw)
        except ValueError:
            log.error("%s=%r is not a number of seconds; the stall hook is off", STALL_ENV, raw)
            return
        log.warning("%s is set: SIGUSR2 stalls the data plane, SIGUSR1 the event loop, "
                    "for %g s (a test hook)", STALL_ENV, seconds)
        dp = self.fabric.dataplane
        loop.add_signal_handler(signal.SIGUSR2, lambda: dp.post(self._stall, "data plane",
                                                                seconds))
        loop.add_signal_handler(signal.SIGUSR1, self._stall, "event loop", seconds)

    def _stall(self, what: str, seconds: float) -> None:
        """Block the thread it runs on (the data plane's, or the event loop's), as a stuck
        frame or callback would. The markers go through the same socket as the pings;
        from the data-plane thread, their order with the pings is exact."""
        log.warning("test hook: stalling the %s for %g s", what, seconds)
        self.notifier.notify(X_FABRICD_STALL=f"begin {what}")
        time.sleep(seconds)
        self.notifier.notify(X_FABRICD_STALL=f"end {what}")
        log.warning("test hook: the %s runs again", what)

    # --- reload ----------------------------------------------------------------------------

    def _on_hup(self) -> None:
        if self._reloading is not None and not self._reloading.done():
            log.warning("reload already in progress; SIGHUP ignored")
            return
        self._reloading = asyncio.create_task(self.reload())

    async def reload(self) -> None:
        """Apply the difference between the file as last applied and the file now.

        What the API created or changed is kept unless the file changes that same
        object; every removal is logged. Any failure is one log line and an event.
        systemd hears RELOADING=1 before and READY=1 after, whatever the outcome.
        """
        self.notifier.notify(RELOADING=1, MONOTONIC_USEC=monotonic_usec(),
                             STATUS=f"reloading {self.path or 'the default config'}")
        self._status = "reloading"
        self._note = ""
        try:
            await self._reload()
        except FabricError as e:
            log.error("reload failed, keeping the running config: %s", e.message)
            self.fabric.bus.emit("config_reload_failed", error=e.message)
            self._note = f" (last reload failed: {e.message})"
        except Exception as e:  # a bug: the running state stays, and someone hears of it
            log.exception("reload failed with an internal error")
            self.fabric.bus.emit("config_reload_failed", error=f"internal error: {e}")
            self._note = " (last reload failed: internal error, see the log)"
        finally:
            self._status = self.summary()
            self.notifier.notify(READY=1, STATUS=self._status)

    async def _reload(self) -> None:
        new = load(self.path)
        old_w, new_w = self.config.worker, new.worker
        if old_w.tunnel is not None and new_w.tunnel is not None:
            plan = plan_peer_reload(old_w.tunnel.peers, new_w.tunnel.peers,
                                    self.fabric.peer_specs)
            try:
                for pid in plan.remove:
                    log.warning("reload: peer %s removed: it is no longer in %s", pid,
                                new.source)
                    await self.fabric.remove_peer(pid)
                for peer in plan.set:
                    await self.fabric.set_peer(peer)
            except FabricError as e:
                log.error("reload: tunnel peers not applied: %s", e.message)
            old_w = dataclasses.replace(old_w, tunnel=dataclasses.replace(
                old_w.tunnel, peers=new_w.tunnel.peers))
        if (new_w.busy_poll, new_w.busy_poll_adaptive) != \
                (old_w.busy_poll, old_w.busy_poll_adaptive):
            self.fabric.set_busy_poll(new_w.busy_poll, new_w.busy_poll_adaptive)
            log.info("reload: the data plane's busy_poll is now %s%g ms",
                     "adaptive up to " if new_w.busy_poll_adaptive else "",
                     new_w.busy_poll * 1000)
            old_w = dataclasses.replace(old_w, busy_poll=new_w.busy_poll,
                                        busy_poll_adaptive=new_w.busy_poll_adaptive)
        if new_w.service_hold_bytes != old_w.service_hold_bytes:
            self.fabric.set_service_hold_bytes(new_w.service_hold_bytes)
            log.info("reload: the services' hold budget is now %d bytes",
                     new_w.service_hold_bytes)
            old_w = dataclasses.replace(old_w, service_hold_bytes=new_w.service_hold_bytes)
        if new_w != old_w:
            log.warning("reload: changes to `worker` other than tunnel peers, busy_poll and "
                        "service_hold_bytes need a restart; they are not applied")
        running = {name: ns.spec for name, ns in self.fabric.namespaces.items()}
        wid = self.fabric.worker_id

        def check(spec: NamespaceSpec) -> NamespaceSpec:
            return parse_namespace(namespace_to_dict(spec), new.source, wid)

        plan = plan_reload(self.config.namespaces, new.namespaces, running, new.source, check)
        for note in plan.notes:
            log.warning("reload: %s", note)
        try:
            for name in plan.remove:
                await self.fabric.remove_namespace(name)
            for ns in plan.apply:
                await self.fabric.apply_namespace(ns, new.source)
        except FabricError as e:
            log.error("reload partly applied: %s", e.message)
            self.fabric.bus.emit("config_reload_failed", error=e.message)
            self._note = f" (last reload partly applied: {e.message})"
            return
        self.config = new
        log.info("reloaded %s", new.source)
        self.fabric.bus.emit("config_reloaded", source=new.source)
