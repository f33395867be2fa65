"""`fabricd run`: the daemon shell over `Fabric` — config, control socket, signals.

SIGTERM/SIGINT: clean shutdown, everything created is removed. SIGHUP: reload the file
and apply only the difference; a bad file is reported and the running state kept.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys

from fabric.config.load import default_config, load_config
from fabric.config.specs import Config
from fabric.control.server import ControlServer
from fabric.errors import FabricError
from fabric.runtime.worker import Fabric

log = logging.getLogger("fabricd")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s fabricd %(levelname)s %(name)s: %(message)s")


def load(path: str | None) -> Config:
    return load_config(path) if path else default_config()


def run(config_path: str | None) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code."""
    setup_logging()
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


class Daemon:
    def __init__(self, config: Config, path: str | None) -> None:
        self.config = config
        self.path = path
        self.fabric = Fabric(worker_id=config.worker.id, egress=config.worker.egress,
                             tunnel=config.worker.tunnel)
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
            for ns in self.config.namespaces:
                await self.fabric.apply_namespace(ns, self.config.source)
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
        """Apply the difference between the running config and the file."""
        try:
            new = load(self.path)
        except FabricError as e:
            log.error("reload failed, keeping the running config: %s", e.message)
            self.fabric.bus.emit("config_reload_failed", error=e.message)
            return
        old_w, new_w = self.config.worker, new.worker
        if old_w.tunnel is not None and new_w.tunnel is not None:
            try:
                await self.fabric.sync_peers(new_w.tunnel.peers)
            except FabricError as e:
                log.error("reload: tunnel peers not applied: %s", e.message)
            old_w = dataclasses.replace(old_w, tunnel=dataclasses.replace(
                old_w.tunnel, peers=new_w.tunnel.peers))
        if new_w != old_w:
            log.warning("reload: changes to `worker` other than tunnel peers need a restart; "
                        "they are not applied")
        wanted = {ns.name for ns in new.namespaces}
        try:
            for name in list(self.fabric.namespaces):
                if name not in wanted:
                    await self.fabric.remove_namespace(name)
            for ns in new.namespaces:
                await self.fabric.apply_namespace(ns, new.source)
        except FabricError as e:
            log.error("reload partly applied: %s", e.message)
            self.fabric.bus.emit("config_reload_failed", error=e.message)
            return
        self.config = new
        log.info("reloaded %s", new.source)
        self.fabric.bus.emit("config_reloaded", source=new.source)
