"""A wakeup's reads of several streams reach the guest in one call (StreamCore.defer)."""

from __future__ import annotations

from collections.abc import Sequence

from fabric.activator import abi
from fabric.streams import core as sc
from fabric.streams.core import StreamCore


class Echo:
    """Answers every client chunk with the same bytes back; counts its calls."""

    def __init__(self) -> None:
        self.calls: list[list[abi.Event]] = []

    def process(self, port: int, events: Sequence[abi.Event], streams: int = 0
                ) -> list[abi.Action] | None:
        self.calls.append(list(events))
        return [abi.DownstreamSend(e.stream_id, e.data) for e in events
                if isinstance(e, abi.StreamData)]


def _core(n: int, buffer: int = sc.STREAM_BUFFER) -> tuple[StreamCore, Echo, list[int]]:
    guest = Echo()
    core = StreamCore(guest, 80, 8080, stream_buffer=buffer)
    sids = [core.accepted(("10.0.0.2", 1000 + i), 0.0) for i in range(n)]
    core.commands()
    guest.calls.clear()
    return core, guest, [s for s in sids if s is not None]


def test_deferred_reads_of_three_streams_are_one_call_in_order() -> None:
    core, guest, (a, b) = _core(2)
    core.defer = True
    core.client_data(a, b"one", 1.0)
    core.client_data(b, b"two", 1.0)
    core.client_data(a, b"three", 1.0)
    assert guest.calls == [] and core.commands() == []
    core.flush(1.0)
    assert len(guest.calls) == 1
    assert [(type(e).__name__, e.stream_id) for e in guest.calls[0]] == [
        ("StreamData", a), ("StreamData", b), ("StreamData", a)]
    assert core.commands() == [(sc.SEND_CLIENT, a, b"one"), (sc.SEND_CLIENT, b, b"two"),
                               (sc.SEND_CLIENT, a, b"three")]
    assert not core.defer


def test_without_defer_every_read_is_a_call() -> None:
    core, guest, (a, b) = _core(2)
    core.client_data(a, b"one", 1.0)
    core.client_data(b, b"two", 1.0)
    assert len(guest.calls) == 2


def test_a_close_delivers_what_was_deferred_first() -> None:
    core, guest, (a, b) = _core(2)
    core.defer = True
    core.client_data(a, b"one", 1.0)
    core.client_closed(b, 1.0)
    assert len(guest.calls) == 1
    assert [type(e).__name__ for e in guest.calls[0]] == ["StreamData", "StreamClose"]
    core.flush(1.0)
    assert len(guest.calls) == 1  # nothing left to hand over


def test_a_deferred_batch_hands_a_guest_at_most_one_reads_worth_per_call() -> None:
    """A relaying guest answers with as many bytes as it got, into a bounded answer:
    the batch never gives it more than DEFER_MAX in one call (a read's worth, what it
    got before reads were batched), whatever the stream buffer."""
    core, guest, (a, b, c) = _core(3)
    core.defer = True
    half = sc.DEFER_MAX // 2
    core.client_data(a, bytes(half), 1.0)
    core.client_data(b, bytes(half), 1.0)  # exactly DEFER_MAX: still deferred
    assert guest.calls == []
    core.client_data(c, bytes(10), 1.0)  # would go past: the batch goes first, alone
    assert len(guest.calls) == 1
    assert [e.stream_id for e in guest.calls[0]] == [a, b]
    core.client_data(a, bytes(sc.DEFER_MAX), 1.0)  # c's 10 bytes go, then a's on its own
    core.flush(1.0)
    sizes = [sum(len(e.data) for e in call) for call in guest.calls]
    assert sizes == [sc.DEFER_MAX, 10, sc.DEFER_MAX] and max(sizes) <= sc.DEFER_MAX
    assert [cmd[1] for cmd in core.commands()] == [a, b, c, a]  # every byte, in order
