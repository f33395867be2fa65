"""sd_notify(3) by hand, and the watchdog that proves the data plane alive.

Why by hand: the protocol is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket
named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace); a library
would be a dependency for twenty lines. The pure parts (reading the environment,
formatting a message, deciding when to ping) are separate from the one socket, so unit
tests drive them with explicit values and times.

The watchdog ping (``WATCHDOG=1``) is sent by the data-plane thread from its own timer
(the data plane keeps `Watchdog` among its timed owners), every half of
``$WATCHDOG_USEC``, and only while the event loop has also beaten within the last
``$WATCHDOG_USEC``: a data plane stuck in a frame, a call or a crash sends nothing,
so systemd restarts the daemon (``Restart=on-watchdog`` / ``on-failure``).
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass

from fabric.errors import one_line

log = logging.getLogger("fabricd.sdnotify")

# What systemd hands the main process; unset once read so hooks (on_activate commands)
# and other children never talk to systemd in the daemon's name.
ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
MAX_WATCHDOG_USEC = 10 * 24 * 3600 * 1_000_000  # anything larger is no watchdog at all


def parse_address(value: str) -> str | None:
    """The socket address of ``$NOTIFY_SOCKET``: a path, or ``@name`` for the abstract
    namespace (a leading NUL); None for what this module cannot use (empty, relative,
    ``vsock:``), which disables notifications rather than failing the daemon."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def parse_watchdog(env: Mapping[str, str], pid: int) -> float | None:
    """The watchdog timeout in seconds, or None when there is none for this process:
    ``$WATCHDOG_USEC`` missing, not a positive integer, or ``$WATCHDOG_PID`` naming
    another process (a wrapper's child must not ping for its parent)."""
    raw = env.get("WATCHDOG_USEC", "")
    if not raw.isdigit():  # also refuses signs, spaces, empty
        return None
    usec = int(raw)
    if not 0 < usec <= MAX_WATCHDOG_USEC:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner is not None and owner.strip() != str(pid):
        return None
    return usec / 1_000_000


def message(fields: Mapping[str, str | int]) -> bytes:
    """One notification: ``KEY=VALUE`` lines in the given order. A value is one line
    (control characters escaped), so text from elsewhere cannot forge a ``READY=1``."""
    lines = []
    for key, value in fields.items():
        if not key or not key.replace("_", "").isalnum() or not key.isupper():
            raise ValueError(f"bad notification key {key!r}")
        lines.append(f"{key}={one_line(str(value))}")
    return ("\n".join(lines) + "\n").encode()


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as ``RELOADING=1`` wants it (systemd >= 253)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@dataclass(frozen=True)
class NotifyEnv:
    """What systemd told this process through its environment."""

    address: str | None = None
    watchdog: float | None = None  # seconds; ping every half of it

    @classmethod
    def take(cls, env: MutableMapping[str, str], pid: int) -> NotifyEnv:
        """Read the variables and remove them from `env` (see ENV_KEYS)."""
        raw = env.get("NOTIFY_SOCKET", "")
        address = parse_address(raw) if raw else None
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%s is not a path or @abstract name; systemd will "
                        "not hear from this daemon", raw)
        watchdog = parse_watchdog(env, pid) if address is not None else None
        for key in ENV_KEYS:
            env.pop(key, None)
        return cls(address=address, watchdog=watchdog)


class Notifier:
    """The socket to systemd. Sends never block (the data-plane thread pings through it)
    and never raise: a notification systemd misses is logged once, not fatal."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self.sent = 0
        self.failed = 0
        self._warned = False
        self._sock: socket.socket | None = None
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                       | socket.SOCK_NONBLOCK)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one notification; True if the kernel took it."""
        sock = self._sock
        if sock is None or self.address is None:
            return False
        try:
            sock.sendto(message(fields), self.address)
        except OSError as e:
            self.failed += 1
            if not self._warned:
                self._warned = True
                why = "its queue is full" if e.errno == errno.EAGAIN else (e.strerror or e)
                log.warning("cannot notify systemd at %s: %s (further failures are counted "
                            "only)", self.address.replace("\0", "@"), why)
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Watchdog:
    """A timed owner of the data plane: its timer fires on the data-plane thread every
    `timeout`/2 and pings, if the event loop beat (`loop_beat`) within `timeout`.

    Sans-IO but for `send`, the callable that pings; time is passed in.
    """

    name = "watchdog"

    def __init__(self, timeout: float, send: Callable[[], object], now: float) -> None:
        if timeout <= 0:
            raise ValueError("watchdog timeout must be positive")
        self.timeout = timeout
        self.period = timeout / 2
        self._send = send
        self._loop_at = now
        self._due = now  # the first ping as soon as the data plane runs it
        self.pings = 0
        self.withheld = 0  # timer fires without a ping: the event loop was silent
        self._silent = False

    def loop_beat(self, now: float) -> None:
        """The event loop is alive (called from it, every `period`/2)."""
        self._loop_at = now

    def next_timer(self) -> float | None:
        return self._due

    def handle_timer(self, now: float) -> None:
        if now < self._due:
            return
        if now - self._loop_at <= self.timeout:
            self._send()
            self.pings += 1
            self._silent = False
        else:
            self.withheld += 1
            if not self._silent:
                self._silent = True
                log.error("watchdog: the event loop has not run for %.1f s; systemd's "
                          "watchdog is no longer pinged", now - self._loop_at)
        self._due = now + self.period
