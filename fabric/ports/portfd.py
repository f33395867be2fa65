"""What every pod port's I/O object has in common: an fd the data plane reads and
writes, and a close that is safe to call twice (ports are closed on error paths too)."""

from __future__ import annotations

from typing import Self


class PortFd:
    fd: int
    _closed: bool = False

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
