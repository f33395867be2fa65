"""The daemon's log: one line per event in text and JSON, structured fields, exceptions
on their line, and the repeat limiter driven with explicit time."""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator

import pytest

from fabric.control import logs


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sink(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def limited() -> Iterator[tuple[logging.Logger, logs.RepeatLimiter, Sink, Clock]]:
    clock = Clock()
    sink = Sink()
    limiter = logs.RepeatLimiter(sink, burst=3, window=10.0, clock=clock)
    logger = logging.getLogger(f"fabricd.test.{id(limiter)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(limiter)
    try:
        yield logger, limiter, sink, clock
    finally:
        logger.removeHandler(limiter)


def record(msg: str, *args: object, level: int = logging.WARNING, name: str = "fabricd.x",
           **extra: object) -> logging.LogRecord:
    r = logging.LogRecord(name, level, "f.py", 1, msg, args, None)
    for k, v in extra.items():
        setattr(r, k, v)
    return r


def test_repeats_beyond_the_burst_are_counted_then_reported(
        limited: tuple[logging.Logger, logs.RepeatLimiter, Sink, Clock]) -> None:
    logger, limiter, sink, clock = limited
    for _ in range(60):
        logger.warning("tunnel send to %s: %s", "192.0.2.2:51820", "Network is unreachable")
        clock.now += 0.1
    assert len(sink.lines) == 3 and limiter.suppressed == 57
    clock.now = 1010.0  # the window is over; the next line (any) settles it
    logger.info("something else")
    assert sink.lines[3] == ("tunnel send to 192.0.2.2:51820: Network is unreachable "
                             "(repeated 57 more times in 10 s)")
    assert sink.lines[4] == "something else"
    # A new window: the line is let through again.
    logger.warning("tunnel send to %s: %s", "192.0.2.2:51820", "Network is unreachable")
    assert len(sink.lines) == 6 and sink.lines[5].startswith("tunnel send to")


def test_distinct_lines_and_levels_are_limited_separately(
        limited: tuple[logging.Logger, logs.RepeatLimiter, Sink, Clock]) -> None:
    logger, limiter, sink, _ = limited
    for pod in ("a", "b", "c", "d"):
        for _ in range(5):
            logger.warning("pod %s not attached yet", pod)
    for _ in range(5):
        logger.error("pod %s not attached yet", "a")
    assert len(sink.lines) == 5 * 3 and limiter.suppressed == 5 * 2


def test_flush_reports_a_finished_window_without_a_next_line(
        limited: tuple[logging.Logger, logs.RepeatLimiter, Sink, Clock]) -> None:
    logger, limiter, sink, clock = limited
    for _ in range(10):
        logger.warning("flood")
    limiter.flush()  # window not over: nothing yet
    assert sink.lines == ["flood"] * 3
    clock.now += 10.0
    limiter.flush()
    assert sink.lines[-1] == "flood (repeated 7 more times in 10 s)"
    limiter.flush()
    assert len(sink.lines) == 4  # reported once


def test_close_reports_what_is_still_counted(
        limited: tuple[logging.Logger, logs.RepeatLimiter, Sink, Clock]) -> None:
    logger, limiter, sink, clock = limited
    for _ in range(5):
        logger.warning("flood")
    clock.now += 2.5
    limiter.close()
    assert sink.lines[-1] == "flood (repeated 2 more times in 2 s)"


def test_a_summary_carries_the_count_as_a_field() -> None:
    clock = Clock()
    out = io.StringIO()
    target = logging.StreamHandler(out)
    target.setFormatter(logs.JsonFormatter())
    limiter = logs.RepeatLimiter(target, burst=1, window=5.0, clock=clock)
    for _ in range(4):
        limiter.handle(record("drop from %s", "10.0.0.9", namespace="shop"))
    clock.now += 5
    limiter.flush()
    first, summary = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["msg"] == "drop from 10.0.0.9" and first["namespace"] == "shop"
    assert summary["repeated"] == 3 and summary["namespace"] == "shop"
    assert summary["msg"] == "drop from 10.0.0.9 (repeated 3 more times in 5 s)"


def test_distinct_lines_are_bounded() -> None:
    clock = Clock()
    sink = Sink()
    limiter = logs.RepeatLimiter(sink, burst=1, window=60.0, clock=clock, max_keys=4,
                                 kind_burst=1000)
    for i in range(100):
        limiter.handle(record("line %d", i))
        limiter.handle(record("line %d", i))  # suppressed
    assert len(limiter._lines) <= 4
    # Every suppressed copy was reported, early, as its line was let go.
    assert sum("repeated 1 more time in" in line for line in sink.lines) >= 96


def test_a_flood_of_lines_differing_in_their_arguments_is_limited_too() -> None:
    """A thousand senders each logged once still make a flood: the format string has a
    window of its own (kind_burst), and the count follows with the last line's text."""
    clock = Clock()
    sink = Sink()
    limiter = logs.RepeatLimiter(sink, burst=3, window=10.0, clock=clock, kind_burst=20)
    for i in range(1000):
        limiter.handle(record("tunnel: handshake from 198.51.%d.%d refused", i // 256, i % 256))
    limiter.handle(record("pod %s not attached yet", "a"))  # another kind: not held back
    assert len(sink.lines) == 21 and limiter.suppressed == 980
    assert sink.lines[-1] == "pod a not attached yet"
    clock.now += 10
    limiter.flush()
    assert sink.lines[-1] == ("tunnel: handshake from 198.51.3.231 refused "
                              "(and 980 more like it in 10 s)")


def test_one_line_repeating_does_not_use_up_its_kind() -> None:
    """Copies held back as repeats do not count against the format string, so one pod's
    flood does not hide another pod's first warning."""
    clock = Clock()
    sink = Sink()
    limiter = logs.RepeatLimiter(sink, burst=2, window=10.0, clock=clock, kind_burst=5)
    for _ in range(100):
        limiter.handle(record("pod %s not attached yet", "a"))
    limiter.handle(record("pod %s not attached yet", "b"))
    assert sink.lines == ["pod a not attached yet"] * 2 + ["pod b not attached yet"]


def test_text_is_one_line_with_its_exception() -> None:
    fmt = logs.TextFormatter()
    r = record("hook said %s", "two\nlines", namespace="shop", pod="web-1")
    line = fmt.format(r)
    assert "\n" not in line
    assert line.endswith("WARNING fabricd.x: hook said two\\nlines")  # fields: JSON only
    assert " fabricd WARNING " in line
    try:
        raise ValueError("bad\nframe")
    except ValueError:
        import sys

        r = record("frame dropped")
        r.exc_info = sys.exc_info()
    line = fmt.format(r)
    assert "\n" not in line
    assert "(ValueError: bad\\nframe at test_logs.py:" in line


def test_text_under_journald_has_priority_and_no_timestamp() -> None:
    fmt = logs.TextFormatter(journal=True)
    assert fmt.format(record("x", level=logging.ERROR)) == "<3>ERROR fabricd.x: x"
    assert fmt.format(record("y", level=logging.INFO)) == "<6>INFO fabricd.x: y"


def test_stderr_is_journal_compares_device_and_inode(monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryFile("w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logs.stderr_is_journal(f)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not logs.stderr_is_journal(f)
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not logs.stderr_is_journal(f)


def test_json_is_one_object_per_line() -> None:
    fmt = logs.JsonFormatter()
    r = record("namespace %s: pod %s not attached yet", "shop", "a", namespace="shop",
               pod="a", port=object())
    r.created = 1764748800.25  # 2025-12-03 08:00:00.250 UTC
    line = fmt.format(r)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["ts"] == "2025-12-03T08:00:00.250Z"
    assert obj["level"] == "warning" and obj["logger"] == "fabricd.x"
    assert obj["msg"] == "namespace shop: pod a not attached yet"
    assert obj["namespace"] == "shop" and obj["pod"] == "a" and isinstance(obj["port"], str)
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        import sys

        r.exc_info = sys.exc_info()
    obj = json.loads(fmt.format(r))
    assert obj["exc"].startswith("Traceback") and "ZeroDivisionError" in obj["exc"]


def test_setup_puts_a_limiter_on_the_root_logger() -> None:
    import threading

    root = logging.getLogger()
    saved, level, hook = list(root.handlers), root.level, threading.excepthook
    try:
        out = io.StringIO()
        limiter = logs.setup("json", stream=out)
        assert root.handlers == [limiter]
        for _ in range(logs.BURST + 3):
            logging.getLogger("fabricd.t").warning("again")
        lines = out.getvalue().splitlines()
        assert len(lines) == logs.BURST and json.loads(lines[0])["msg"] == "again"
        with pytest.raises(ValueError):
            logs.setup("xml")
        # A thread that dies is one line too, not a traceback on stderr.
        out.truncate(0)
        out.seek(0)

        def boom() -> None:
            raise RuntimeError("the data plane broke")

        t = threading.Thread(target=boom, name="fabric-dataplane")
        t.start()
        t.join()
        (line,) = out.getvalue().splitlines()
        obj = json.loads(line)
        assert obj["msg"] == "thread fabric-dataplane died" and obj["level"] == "critical"
        assert "RuntimeError: the data plane broke" in obj["exc"]
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
        threading.excepthook = hook
