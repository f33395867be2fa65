"""sd_notify by hand: the environment systemd sets, the message format, real datagrams to
a path and to an abstract (@) socket, and the watchdog core driven with explicit time
(pings every half of the timeout, none while the event loop is silent)."""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
from collections.abc import Iterator

import pytest

from fabric.control.sdnotify import (
    Notifier,
    NotifyEnv,
    Watchdog,
    message,
    monotonic_usec,
    parse_address,
    parse_watchdog,
)


def test_parse_address_paths_and_abstract_names() -> None:
    assert parse_address("/run/systemd/notify") == "/run/systemd/notify"
    assert parse_address("@/org/freedesktop/systemd1/notify/42") == \
        "\0/org/freedesktop/systemd1/notify/42"
    for unusable in ("", "@", "relative/path", "vsock:2:1234"):
        assert parse_address(unusable) is None


@pytest.mark.parametrize("env, pid, expected", [
    ({"WATCHDOG_USEC": "30000000"}, 7, 30.0),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "7"}, 7, 0.5),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "8"}, 7, None),  # another process's
    ({"WATCHDOG_USEC": "0"}, 7, None),
    ({"WATCHDOG_USEC": "-5"}, 7, None),
    ({"WATCHDOG_USEC": "1e6"}, 7, None),
    ({"WATCHDOG_USEC": ""}, 7, None),
    ({}, 7, None),
])
def test_parse_watchdog(env: dict[str, str], pid: int, expected: float | None) -> None:
    assert parse_watchdog(env, pid) == expected


def test_take_reads_and_unsets_so_children_do_not_inherit() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "9",
           "PATH": "/bin"}
    got = NotifyEnv.take(env, 9)
    assert got == NotifyEnv(address="\0x", watchdog=2.0)
    assert env == {"PATH": "/bin"}
    # No socket: no watchdog either (nobody to ping).
    assert NotifyEnv.take({"WATCHDOG_USEC": "2000000"}, 9) == NotifyEnv()
    env = {"NOTIFY_SOCKET": "vsock:2:99", "WATCHDOG_USEC": "2000000"}
    assert NotifyEnv.take(env, 9) == NotifyEnv() and env == {}


def test_message_is_key_value_lines_and_one_line_values() -> None:
    assert message({"READY": 1, "STATUS": "ready: 2 namespaces"}) == \
        b"READY=1\nSTATUS=ready: 2 namespaces\n"
    # A value from elsewhere (a file name, an error) cannot add a line of its own.
    forged = message({"STATUS": "reloading /etc/x\nREADY=1"})
    assert forged.count(b"\n") == 1 and b"\\n" in forged
    for bad in ("", "ready", "A=B", "X-Y"):
        with pytest.raises(ValueError):
            message({bad: 1})


def test_monotonic_usec_is_clock_monotonic() -> None:
    import time

    a = time.monotonic_ns() // 1000
    b = monotonic_usec()
    c = time.monotonic_ns() // 1000
    assert a <= b <= c


@pytest.fixture
def path_listener() -> Iterator[tuple[socket.socket, str]]:
    d = tempfile.mkdtemp()
    path = os.path.join(d, "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    try:
        yield s, path
    finally:
        s.close()
        os.unlink(path)
        os.rmdir(d)


def test_notifier_sends_datagrams_to_a_path(path_listener: tuple[socket.socket, str]) -> None:
    sock, path = path_listener
    n = Notifier(parse_address(path))
    assert n.enabled
    assert n.notify(READY=1, STATUS="ready")
    assert sock.recv(4096) == b"READY=1\nSTATUS=ready\n"
    n.close()
    assert not n.notify(WATCHDOG=1)  # closed: nothing sent, nothing raised


def test_notifier_sends_to_an_abstract_socket() -> None:
    name = f"fabricd-test-{secrets.token_hex(6)}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(5)
    try:
        n = Notifier(parse_address("@" + name))
        assert n.notify(STOPPING=1)
        assert s.recv(4096) == b"STOPPING=1\n"
        n.close()
    finally:
        s.close()


def test_notifier_without_a_listener_fails_quietly(caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier("\0fabricd-nobody-" + secrets.token_hex(6))
    assert not n.notify(READY=1)
    assert not n.notify(READY=1)
    assert n.failed == 2 and n.sent == 0
    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1  # once, then counted
    n.close()
    assert not Notifier(None).enabled and not Notifier(None).notify(READY=1)


def test_watchdog_pings_every_half_timeout_while_the_loop_beats() -> None:
    pings: list[float] = []
    now = 100.0
    wd = Watchdog(2.0, lambda: pings.append(now), now)
    assert wd.period == 1.0 and wd.next_timer() == 100.0
    for step in range(6):  # the data plane runs the timer when it is due
        now = 100.0 + step
        assert wd.next_timer() == now
        wd.loop_beat(now - 0.5)
        wd.handle_timer(now)
    assert pings == [100.0, 101.0, 102.0, 103.0, 104.0, 105.0]
    wd.handle_timer(105.5)  # early (a stale heap entry): nothing, deadline kept
    assert wd.pings == 6 and wd.next_timer() == 106.0


def test_watchdog_withholds_pings_while_the_event_loop_is_silent(
        caplog: pytest.LogCaptureFixture) -> None:
    sent: list[float] = []
    wd = Watchdog(2.0, lambda: sent.append(0), 0.0)
    wd.handle_timer(0.0)
    wd.handle_timer(1.0)
    wd.handle_timer(2.0)  # the loop's last beat (0.0) is exactly one timeout old: ping
    assert len(sent) == 3
    wd.handle_timer(3.0)
    wd.handle_timer(4.0)
    assert len(sent) == 3 and wd.withheld == 2
    assert sum("event loop has not run" in r.getMessage() for r in caplog.records) == 1
    wd.loop_beat(4.2)  # it runs again: pings resume at the next due time
    wd.handle_timer(5.0)
    assert len(sent) == 4


def test_watchdog_is_silent_when_its_timer_is_not_run() -> None:
    """What a stalled data plane looks like to the core: no handle_timer, so no ping,
    however often the event loop beats."""
    sent: list[int] = []
    wd = Watchdog(1.0, lambda: sent.append(1), 0.0)
    wd.handle_timer(0.0)
    for t in range(1, 50):
        wd.loop_beat(t / 10)
    assert sent == [1] and wd.next_timer() == 0.5
    with pytest.raises(ValueError):
        Watchdog(0, lambda: None, 0.0)
