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
    the batch never gives it more than DEFER_MAX of backend bytes in one call (a read's
    worth, what it got before reads were batched), whatever the stream buffer."""
    core, guest, (a, b, c) = _core(3)
    for sid in (a, b, c):
        core.streams[sid].up = sc.UP_OPEN
    core.defer = True
    half = sc.DEFER_MAX // 2
    core.upstream_data(a, bytes(half), 1.0)
    core.upstream_data(b, bytes(half), 1.0)  # exactly DEFER_MAX: still deferred
    assert guest.calls == []
    core.upstream_data(c, bytes(10), 1.0)  # would go past: the batch goes first, alone
    assert len(guest.calls) == 1
    assert [e.stream_id for e in guest.calls[0]] == [a, b]
    core.upstream_data(a, bytes(sc.DEFER_MAX), 1.0)  # c's 10 bytes go, then a's on its own
    core.flush(1.0)
    sizes = [sum(len(e.data) for e in call) for call in guest.calls]
    assert sizes == [sc.DEFER_MAX, 10, sc.DEFER_MAX] and max(sizes) <= sc.DEFER_MAX


def test_client_bytes_reach_a_guest_at_most_client_call_max_per_call() -> None:
    """A guest's fuel per call is fixed and what it spends per byte is the client's
    choice: a 64 KiB read is handed over in CLIENT_CALL_MAX pieces, one call each, in
    order, and a batch of several clients' reads holds at most that much of them."""
    core, guest, (a, b, c) = _core(3)
    step = sc.CLIENT_CALL_MAX
    data = bytes(range(256)) * (4 * step // 256) + b"tail"
    core.client_data(a, data, 1.0)
    sizes = [sum(len(e.data) for e in call) for call in guest.calls]
    assert sizes == [step, step, step, step, 4], sizes
    assert b"".join(e.data for call in guest.calls for e in call) == data
    guest.calls.clear()
    core.defer = True
    core.client_data(b, bytes(step // 2), 1.0)
    core.client_data(c, bytes(step // 2), 1.0)  # exactly CLIENT_CALL_MAX: still deferred
    assert guest.calls == []
    core.client_data(a, bytes(1), 1.0)  # past it: the batch goes first
    core.flush(1.0)
    sizes = [sum(len(e.data) for e in call) for call in guest.calls]
    assert sizes == [step, 1], sizes
    out = [arg for k, sid, arg in core.commands() if k == sc.SEND_CLIENT and sid == a]
    assert b"".join(out) == data + bytes(1)  # every byte echoed, in order


class SpliceAtFirst:
    """Relays client bytes upstream and splices the stream in its first data call."""

    def __init__(self) -> None:
        self.calls = 0

    def process(self, port: int, events: Sequence[abi.Event], streams: int = 0
                ) -> list[abi.Action] | None:
        self.calls += 1
        out: list[abi.Action] = []
        for e in events:
            if isinstance(e, abi.StreamData):
                out += [abi.UpstreamSend(e.stream_id, e.data), abi.Splice(e.stream_id)]
        return out


def test_the_rest_of_a_read_split_for_the_guest_follows_a_splice_upstream() -> None:
    """The guest splices the stream in the call for the first piece of a large read: the
    other pieces were taken from the client, so they go upstream after the first and
    ahead of the splice, with no further guest call."""
    guest = SpliceAtFirst()
    core = StreamCore(guest, 80, 8080)
    core.backends(["10.0.0.3"], 0.0)
    sid = core.accepted(("10.0.0.2", 1000), 0.0)
    assert sid is not None
    core.streams[sid].up = sc.UP_OPEN
    core.commands()
    guest.calls = 0
    data = bytes(range(256)) * (3 * sc.CLIENT_CALL_MAX // 256)
    core.client_data(sid, data, 1.0)
    assert guest.calls == 1
    cmds = core.commands()
    assert [k for k, _, _ in cmds] == [sc.SEND_UPSTREAM, sc.SEND_UPSTREAM, sc.SPLICE]
    assert cmds[0][2] + cmds[1][2] == data
    assert core.counters["bytes_to_backends"] == len(data)


class SpliceOnAnswer:
    """Relays client bytes upstream and splices a stream at the first backend bytes."""

    def process(self, port: int, events: Sequence[abi.Event], streams: int = 0
                ) -> list[abi.Action] | None:
        out: list[abi.Action] = []
        for e in events:
            if isinstance(e, abi.StreamOpen):
                out.append(abi.UpstreamConnect(e.stream_id, 0))
            elif isinstance(e, abi.StreamData):
                out.append(abi.UpstreamSend(e.stream_id, e.data))
            elif isinstance(e, abi.UpstreamData):
                out += [abi.DownstreamSend(e.stream_id, e.data), abi.Splice(e.stream_id)]
        return out


def test_bytes_read_before_the_shell_carried_out_a_splice_go_on_before_it() -> None:
    """The guest splices A in a call made in the middle of a wakeup (the batch had filled
    up); the shell carries out the splice only after the wakeup's reads, and reads A's
    client once more before it does. Those bytes were taken from the client: they go
    upstream, ahead of the splice (so ahead of what the kernel relays later), not lost."""
    core = StreamCore(SpliceOnAnswer(), 80, 8080)
    core.backends(["10.0.0.3"], 0.0)
    a, b = (core.accepted(("10.0.0.2", 1000 + i), 0.0) for i in range(2))
    assert a is not None and b is not None
    for sid in (a, b):
        core.upstream_result(sid, True, 0.0)
    core.commands()
    core.defer = True
    core.upstream_data(a, b"HTTP/1.1 101 Switching Protocols\r\n\r\n", 1.0)
    core.client_data(b, bytes(sc.DEFER_MAX), 1.0)  # past the batch: A's answer comes now
    assert core.streams[a].mode == sc.SPLICED
    core.client_data(a, b"late", 1.0)  # read in the same wakeup, before the shell splices
    core.upstream_data(a, b"tail", 1.0)
    core.flush(1.0)
    cmds = [(k, s, arg) for k, s, arg in core.commands() if s == a]
    assert cmds == [(sc.SEND_CLIENT, a, b"HTTP/1.1 101 Switching Protocols\r\n\r\n"),
                    (sc.SEND_UPSTREAM, a, b"late"), (sc.SEND_CLIENT, a, b"tail"),
                    (sc.SPLICE, a, None)]
    c = core.counters
    assert c["bytes_from_clients"] == sc.DEFER_MAX + 4 and c["sends_dropped"] == 0
