"""fabricd: a userspace L3 network fabric for microVM and container pods.

`from fabric import Fabric` gives the embedding API; it is imported lazily so the
command-line tools start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fabric.runtime.worker import Fabric

__all__ = ["Fabric"]


def __getattr__(name: str) -> Any:
    if name == "Fabric":
        from fabric.runtime.worker import Fabric

        return Fabric
    raise AttributeError(f"module 'fabric' has no attribute {name!r}")
