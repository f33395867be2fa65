"""The daemon's log: one line per event, as text or JSON, repeats counted not repeated.

Why: a person reads the text lines (under journald without a second timestamp, with the
priority journald understands), a log shipper reads ``--log-format json`` (one object a
line: ``ts``, ``level``, ``logger``, ``msg``, then the record's structured fields), and
neither should drown when one thing goes wrong ten thousand times: `RepeatLimiter`
lets the first `burst` copies of a line through per `window` and then one line that
says how many more there were. An exception is part of its line (its type, message and
the frames it passed through), never a multi-line traceback in the text format.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

from fabric.errors import one_line

FORMATS = ("text", "json")
FORMAT_ENV = "FABRICD_LOG_FORMAT"  # the default of `fabricd run --log-format`
BURST = 5  # copies of one line let through per window
KIND_BURST = 50  # lines of one format string (differing in their arguments) per window
WINDOW = 30.0  # seconds
MAX_KEYS = 1024  # distinct lines tracked at once; beyond, the oldest are settled early

# Attributes every LogRecord has: anything else on a record came from `extra=` and is
# a structured field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}
# journald's priority prefix (sd-daemon(3)), read when stderr is the journal.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a record (what `extra=` put on it), JSON-ready."""
    out: dict[str, Any] = {}
    for key, value in vars(record).items():
        if key in _STANDARD or key.startswith("_"):
            continue
        if not isinstance(value, (str, int, float, bool, type(None), list, dict)):
            value = str(value)
        out[key] = value
    return out


def exception_text(exc_info: Any) -> str:
    """An exception on one line: type, message, then the frames innermost first."""
    _, exc, tb = exc_info
    if exc is None:
        return ""
    frames = traceback.extract_tb(tb)
    where = " < ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                       for f in reversed(frames[-8:]))
    text = f"{type(exc).__name__}: {exc}"
    return f"{text} at {where}" if where else text


class TextFormatter(logging.Formatter):
    """``2026-12-03 08:00:00,123 fabricd WARNING fabricd.x: message``; under journald
    ``<4>WARNING fabricd.x: message`` (the journal has the time)."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        msg = one_line(record.getMessage())  # the fields are for machines: the text says it
        if record.exc_info:
            msg += f" ({one_line(exception_text(record.exc_info))})"
        head = f"{record.levelname} {record.name}: {msg}"
        if self.journal:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{head}"
        return f"{self.formatTime(record)} fabricd {head}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339, UTC), level, logger, msg, the structured
    fields, and ``exc`` (the whole traceback, as one string) for an exception."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC)
        out: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in fields(record).items():
            out.setdefault(key, value)
        if record.exc_info and record.exc_info[1] is not None:
            out["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(out, default=str, ensure_ascii=False)


@dataclass
class _Seen:
    start: float
    count: int = 0
    suppressed: int = 0
    last: logging.LogRecord | None = field(default=None, repr=False)


_Key = tuple[str, int, str]  # logger, level, the line's text (or its format string)


class RepeatLimiter(logging.Handler):
    """In front of `target`: the same line (logger, level and text) is let through
    `burst` times per `window` seconds; the rest are counted, and when the window is
    over one line says "... (repeated N more times in W s)" with ``repeated=N``.

    Lines that differ only in their arguments (the same format string: a flood from many
    addresses) are let through `kind_burst` times per window, then counted the same way:
    "... (and N more like it in W s)".

    Windows are settled when the same line comes again, on any later record once due,
    on `flush()` (the daemon calls it every few seconds) and on close. `clock` is
    injectable so tests pass explicit time.
    """

    def __init__(self, target: logging.Handler, burst: int = BURST, window: float = WINDOW,
                 clock: Callable[[], float] = time.monotonic,
                 max_keys: int = MAX_KEYS, kind_burst: int = KIND_BURST) -> None:
        super().__init__()
        self.target = target
        self.burst = burst
        self.kind_burst = kind_burst
        self.window = window
        self.clock = clock
        self.max_keys = max_keys
        self.suppressed = 0  # in all, for tests and curiosity
        self._lines: dict[_Key, _Seen] = {}
        self._kinds: dict[_Key, _Seen] = {}
        self._next_sweep = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        now = self.clock()
        try:
            text = record.getMessage()
        except Exception:
            self.target.handle(record)  # a bad format string: let the target say so
            return
        if (now >= self._next_sweep or len(self._lines) >= self.max_keys
                or len(self._kinds) >= self.max_keys):
            self._sweep(now)
        line = self._current(self._lines, (record.name, record.levelno, text), now)
        line.count += 1
        if line.count > self.burst:
            self._hold(line, record)
            return
        kind = self._current(self._kinds, (record.name, record.levelno, str(record.msg)), now)
        kind.count += 1
        if kind.count > self.kind_burst:
            self._hold(kind, record)
            return
        self.target.handle(record)

    def flush(self) -> None:
        """Report the windows that are over (and flush the target)."""
        with self.lock:  # type: ignore[union-attr]  # Handler.createLock made it
            self._sweep(self.clock())
        self.target.flush()

    def close(self) -> None:
        """Nothing counted is lost: every open window with suppressed lines is reported."""
        with self.lock:  # type: ignore[union-attr]
            now = self.clock()
            for table in (self._lines, self._kinds):
                for key in list(table):
                    self._settle(table, key, now)
        self.target.flush()
        super().close()

    def _current(self, table: dict[_Key, _Seen], key: _Key, now: float) -> _Seen:
        """The key's window, a new one if it had none or its window is over."""
        seen = table.get(key)
        if seen is not None and now - seen.start >= self.window:
            self._settle(table, key, now)
            seen = None
        if seen is None:
            seen = table[key] = _Seen(start=now)
        return seen

    def _hold(self, seen: _Seen, record: logging.LogRecord) -> None:
        seen.suppressed += 1
        seen.last = record
        self.suppressed += 1

    def _sweep(self, now: float) -> None:
        for table in (self._lines, self._kinds):
            for key, seen in list(table.items()):
                if now - seen.start >= self.window:
                    self._settle(table, key, now)
            while len(table) >= self.max_keys:  # too many distinct lines: oldest first
                self._settle(table, next(iter(table)), now)
        self._next_sweep = now + min(1.0, self.window)

    def _settle(self, table: dict[_Key, _Seen], key: _Key, now: float) -> None:
        seen = table.pop(key)
        last = seen.last
        if not seen.suppressed or last is None:
            return
        n = seen.suppressed
        span = max(0.0, min(now, seen.start + self.window) - seen.start)
        summary = logging.makeLogRecord(vars(last))
        if table is self._lines:
            summary.msg = "%s (repeated %d more %s in %.0f s)"
            summary.args = (key[2], n, "time" if n == 1 else "times", span)
        else:
            summary.msg = "%s (and %d more like it in %.0f s)"
            summary.args = (last.getMessage(), n, span)
        summary.repeated = n
        summary.exc_info = None
        summary.exc_text = None
        self.target.handle(summary)


def stderr_is_journal(stream: IO[str] | None = None) -> bool:
    """Whether `stream` (stderr) is connected to journald ($JOURNAL_STREAM says which)."""
    raw = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = raw.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def formatter(fmt: str, stream: IO[str] | None = None) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return TextFormatter(journal=stderr_is_journal(stream))
    raise ValueError(f"unknown log format {fmt!r} (expected one of: {', '.join(FORMATS)})")


def setup(fmt: str = "text", level: int = logging.INFO,
          stream: IO[str] | None = None) -> RepeatLimiter:
    """The root logger writes to `stream` (stderr) in `fmt`, through a RepeatLimiter."""
    out = logging.StreamHandler(stream or sys.stderr)
    out.setFormatter(formatter(fmt, stream))
    limiter = RepeatLimiter(out)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(limiter)
    root.setLevel(level)
    threading.excepthook = _thread_died
    return limiter


def _thread_died(args: threading.ExceptHookArgs) -> None:
    """A thread's uncaught exception as one log line, not a traceback on stderr."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("fabricd").critical(
        "thread %s died", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def flush_repeats() -> None:
    """Report finished windows of every RepeatLimiter on the root logger."""
    for h in logging.getLogger().handlers:
        if isinstance(h, RepeatLimiter):
            h.flush()
