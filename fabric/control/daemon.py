"""`fabricd run`: the daemon shell over `Fabric` — config, control socket, signals.

SIGTERM/SIGINT: clean shutdown, everything created is removed. SIGHUP: reload the file
and apply only what changed in it since the last load (so what the API created stays);
a bad file is reported and the running state kept.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import resource
import signal
import sys

from fabric.config.load import default_config, load_config
from fabric.config.parse import parse_namespace
from fabric.config.render import namespace_to_dict
from fabric.config.specs import Config, NamespaceSpec
from fabric.control.server import ControlServer
from fabric.errors import FabricError
from fabric.runtime.reconcile import plan_peer_reload, plan_reload
from fabric.runtime.worker import Fabric

log = logging.getLogger("fabricd")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s fabricd %(levelname)s %(name)s: %(message)s")


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


def run(config_path: str | None) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code."""
    setup_logging()
    raise_fd_limit()
    try:
        config = load(config_path)
    except FabricError as e:
        print(f"fabricd: {e.message}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(Daemon(config, config_path).main())
    except FabricError as e:
        print(f"fabricd: {e.message}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line for the operator, the trace for us
        log.debug("fatal", exc_info=True)
        print(f"fabricd: internal error: {type(e).__name__}: {e} (run with "
              "FABRICD_DEBUG=1 for the traceback)", file=sys.stderr)
        if os.environ.get("FABRICD_DEBUG"):
            raise
        return 1


class Daemon:
    def __init__(self, config: Config, path: str | None) -> None:
        self.config = config
        self.path = path
        self.fabric = Fabric(worker_id=config.worker.id, egress=config.worker.egress,
                             tunnel=config.worker.tunnel, state_dir=config.worker.state_path)
        self.stop = asyncio.Event()
        self._reloading: asyncio.Task[None] | None = None

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        control = ControlServer(self.fabric, self.config.worker.control,
                                self.config.worker.control_mode)
        await self.fabric.start()
        try:
            await control.start()
            if self.config.worker.control_mode & 0o020:
                log.warning("control socket %s is group-writable (mode %04o): members of "
                            "its group can set hooks that run as this daemon's user and "
                            "attach host interfaces", self.config.worker.control,
                            self.config.worker.control_mode)
            self.fabric.starting = True  # /v1/health says so until the file is applied
            for ns in self.config.namespaces:
                await self.fabric.apply_namespace(ns, self.config.source)
            await self.fabric.restore_pods()  # a CNI runtime's containers, from state_dir
            self.fabric.starting = False
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop.set)
            loop.add_signal_handler(signal.SIGHUP, self._on_hup)
            log.info("worker %s ready: %d namespaces, control socket %s",
                     self.fabric.worker_id, len(self.fabric.namespaces),
                     self.config.worker.control)
            self.fabric.bus.emit("daemon_ready", worker=self.fabric.worker_id)
            await self.stop.wait()
            log.info("shutting down")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await control.close()
            await self.fabric.close()
        return 0

    def _on_hup(self) -> None:
        if self._reloading is not None and not self._reloading.done():
            log.warning("reload already in progress; SIGHUP ignored")
            return
        self._reloading = asyncio.create_task(self.reload())

    async def reload(self) -> None:
        """Apply the difference between the file as last applied and the file now.

        What the API created or changed is kept unless the file changes that same
        object; every removal is logged. Any failure is one log line and an event.
        """
        try:
            await self._reload()
        except FabricError as e:
            log.error("reload failed, keeping the running config: %s", e.message)
            self.fabric.bus.emit("config_reload_failed", error=e.message)
        except Exception as e:  # a bug: the running state stays, and someone hears of it
            log.exception("reload failed with an internal error")
            self.fabric.bus.emit("config_reload_failed", error=f"internal error: {e}")

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
        if new_w != old_w:
            log.warning("reload: changes to `worker` other than tunnel peers need a restart; "
                        "they are not applied")
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
            return
        self.config = new
        log.info("reloaded %s", new.source)
        self.fabric.bus.emit("config_reloaded", source=new.source)
