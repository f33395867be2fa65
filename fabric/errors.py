"""Errors shared by the library, the daemon and the control API.

Every error carries an HTTP-ish status and a short code so the control API can
map it without a table, and the CLI can print one clear line.
"""

from __future__ import annotations

import re

# Control characters (a newline above all) would break the one-line promise of every
# error, and let a caller's input forge lines in the daemon's log.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """`text` with control characters escaped as repr() would (\\n, \\t, \\x1b)."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class FabricError(Exception):
    """Base class: a message a person can act on, plus a machine-readable code."""

    status = 500
    code = "internal"

    def __init__(self, message: str) -> None:
        message = one_line(str(message))
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class ConfigError(FabricError):
    """A bad config value: names the source (file or API), the key path and the problem."""

    status = 400
    code = "invalid"

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


class NotFound(FabricError):
    status = 404
    code = "not_found"


class Conflict(FabricError):
    status = 409
    code = "conflict"


class PortError(FabricError):
    """Creating or opening a pod's port failed (missing netns, interface, permissions)."""

    status = 422
    code = "port_failed"
