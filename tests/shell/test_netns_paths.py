"""A pod's `netns` path is checked without being opened: a FIFO, a device, a directory, a
symlink or an ordinary file is refused at once with one line naming the path and why,
and so is the daemon's own namespace. Runs unprivileged (no namespace is made)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric.errors import PortError
from fabric.ports import netlink

LIMIT = 0.1  # seconds: a refusal must never wait for anything


def refusal(netns: str) -> tuple[str, float]:
    """resolve_netns(netns) in a thread (a blocking open must fail the test, not hang
    it): the PortError's message and how long it took."""
    out: list[BaseException | str] = []

    def body() -> None:
        try:
            out.append(netlink.resolve_netns(netns))
        except BaseException as exc:
            out.append(exc)

    t0 = time.monotonic()
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(2.0)
    took = time.monotonic() - t0
    assert not thread.is_alive(), f"resolve_netns({netns!r}) still blocked after 2 s"
    (result,) = out
    assert isinstance(result, PortError), f"{netns!r} was accepted: {result!r}"
    message = result.message
    assert "\n" not in message and netns in message, message
    return message, took


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "file").write_text("not a namespace\n")
    (tmp_path / "dir").mkdir()
    os.symlink(tmp_path / "fifo", tmp_path / "to-fifo")
    os.symlink(tmp_path / "file", tmp_path / "to-file")
    os.symlink("/proc/self/ns/net", tmp_path / "to-netns")
    yield tmp_path


@pytest.mark.parametrize("name, why", [
    ("fifo", "is a FIFO, not a namespace file"),
    ("/dev/null", "is a character device, not a namespace file"),
    ("dir", "is a directory, not a namespace file"),
    ("file", "is a regular file, not a namespace file"),
    ("to-fifo", "is a symbolic link"),
    ("to-file", "is a symbolic link"),
    ("to-netns", "is a symbolic link"),
    ("missing", "does not exist"),
])
def test_what_is_not_a_namespace_file_is_refused_at_once(tree: Path, name: str,
                                                         why: str) -> None:
    path = name if name.startswith("/") else str(tree / name)
    before = netlink.counters.snapshot()
    message, took = refusal(path)
    assert why in message, message
    assert took < LIMIT, f"{path}: {took * 1000:.1f} ms"
    after = netlink.counters.snapshot()
    assert sum(after.values()) == sum(before.values()) + 1


def test_a_fifo_is_never_opened(tree: Path) -> None:
    """Not even for an instant: a writer waiting on the FIFO never sees a reader."""
    fifo = str(tree / "fifo")
    refusal(fifo)
    with pytest.raises(OSError):  # ENXIO: no reader has it open
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)


def test_the_daemons_own_namespace_is_refused() -> None:
    for path in ("/proc/self/ns/net", "/proc/thread-self/ns/net", f"/proc/{os.getpid()}/ns/net"):
        message, took = refusal(path)
        assert "own network namespace" in message or "host's" in message, message
        assert took < LIMIT


def test_another_kind_of_namespace_is_refused() -> None:
    message, _ = refusal("/proc/self/ns/uts")
    assert "not a network namespace" in message


def test_names_and_paths_are_checked_before_anything() -> None:
    for bad in ("", "../x", "a/b", "a\0b", "/run/netns/a\0b"):
        with pytest.raises(PortError):
            netlink.resolve_netns(bad)


def test_no_file_descriptor_is_left_open(tree: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for name in ("fifo", "dir", "file", "to-netns"):
        refusal(str(tree / name))
    refusal("/dev/null")
    refusal("/proc/self/ns/net")
    assert len(os.listdir("/proc/self/fd")) == before
