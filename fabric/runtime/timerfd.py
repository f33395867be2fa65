"""A Linux timerfd armed at absolute CLOCK_MONOTONIC times: exact deadlines for an epoll
loop.

epoll's own timeout counts whole milliseconds (CPython rounds up), so a deadline 0.2 ms
away would be met 1 ms late, and every wake-up would need the timeout recomputed. A
timerfd is one more fd in the epoll set that becomes readable at the deadline, to the
microsecond, and is re-armed only when the earliest deadline changes. Python 3.11 has no
os.timerfd_*, so this calls libc through ctypes; where that fails the data plane falls
back to epoll timeouts (and says so in its log).

``time.monotonic()`` is CLOCK_MONOTONIC on Linux, so deadlines are the same numbers the
cores use.
"""

from __future__ import annotations

import ctypes
import os

CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC
TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class TimerFd:
    """One timerfd; ``arm(t)`` for an absolute monotonic time, ``arm(None)`` to disarm."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._create = libc.timerfd_create
        self._settime = libc.timerfd_settime
        self._settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec),
                                  ctypes.c_void_p]
        fd = self._create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.fd = fd
        self._spec = _Itimerspec()
        self._ref = ctypes.byref(self._spec)
        self.armed: float | None = None

    def arm(self, when: float | None) -> None:
        if when == self.armed:
            return
        spec = self._spec
        if when is None:
            spec.it_value.tv_sec = 0
            spec.it_value.tv_nsec = 0  # all zero: disarmed
        else:
            sec = int(when)
            nsec = int((when - sec) * 1e9)
            if sec <= 0 and nsec <= 0:
                nsec = 1  # zero would disarm; a time in the past fires at once
            spec.it_value.tv_sec = sec
            spec.it_value.tv_nsec = nsec
        if self._settime(self.fd, TFD_TIMER_ABSTIME, self._ref, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")
        self.armed = when

    def clear(self) -> None:
        """Consume an expiry (the fd stays readable until read)."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass
        self.armed = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
