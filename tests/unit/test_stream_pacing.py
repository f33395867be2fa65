"""Paced upstream connects of held streams (fabric.streams.core, hold.release_burst and
hold.release_interval): the sans-IO stream core with explicit time, through the shipped
plain stream activator and through a scripted guest that asks in an odd order."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from fabric.activator import abi
from fabric.activator.host import ActivatorHost
from fabric.streams import core as sc
from fabric.streams.core import StreamCore

ROOT = Path(__file__).resolve().parents[2] / "activators"
B1, B2 = "10.0.0.3", "10.0.0.4"


def connects(cmds: list[sc.Command]) -> list[int]:
    return [sid for kind, sid, _ in cmds if kind == sc.CONNECT]


def plain(burst: int = 2, interval: float = 0.01) -> StreamCore:
    host = ActivatorHost(ROOT / "stream" / "stream.wasm", {"hold_timeout_ms": 30000})
    return StreamCore(host, 80, 8080, hold_timeout=30.0, release_burst=burst,
                      release_interval=interval)


def test_held_streams_connect_at_most_a_burst_per_interval_in_arrival_order() -> None:
    core = plain(burst=2, interval=0.01)
    sids = [core.accepted(("10.0.0.2", 40000 + i), 1.0 + i * 0.001) for i in range(5)]
    core.handle_timer(1.95)  # the port's tick: next at 2.05
    core.commands()
    core.backends([B1], 2.0)
    assert connects(core.commands()) == sids[:2]
    assert core.counters["release_paced"] == 3
    assert core.status()["connects_paced"] == 3
    assert core.next_timer() == pytest.approx(2.01)
    core.handle_timer(2.005)  # not yet
    assert connects(core.commands()) == []
    core.handle_timer(2.01)
    assert connects(core.commands()) == sids[2:4]
    core.handle_timer(2.02)
    assert connects(core.commands()) == sids[4:]
    assert core.counters["release_paced"] == 3  # each counted once
    assert core.counters["upstream_connects"] == 5
    for sid in sids:  # the connects went where the guest asked (the target port)
        assert core.streams[sid].up == sc.UP_CONNECTING


def test_a_connection_arriving_during_a_burst_queues_behind_it_and_later_ones_do_not() -> None:
    core = plain(burst=2, interval=0.01)
    held = [core.accepted(("10.0.0.2", 40000 + i), 1.0) for i in range(3)]
    core.backends([B1], 2.0)
    assert connects(core.commands()) == held[:2]
    late = core.accepted(("10.0.0.9", 5000), 2.001)  # the backend is up, its burst is not over
    assert connects(core.commands()) == []
    core.handle_timer(2.01)
    assert connects(core.commands()) == [held[2], late]
    # The burst is over one interval after its last connect: no delay any more.
    core.handle_timer(2.02)
    later = [core.accepted(("10.0.0.9", 6000 + i), 2.03) for i in range(5)]
    assert connects(core.commands()) == later
    assert core.counters["release_paced"] == 2  # held[2] and late


def test_a_connection_after_the_backend_is_up_with_budget_left_is_not_delayed() -> None:
    core = plain(burst=4, interval=0.01)
    held = core.accepted(("10.0.0.2", 40000), 1.0)
    core.backends([B1], 2.0)
    assert connects(core.commands()) == [held]
    late = core.accepted(("10.0.0.9", 5000), 2.001)  # the burst has room: at once
    assert connects(core.commands()) == [late]
    assert core.counters["release_paced"] == 0


def test_budget_is_per_ready_backend() -> None:
    core = plain(burst=1, interval=0.01)
    for i in range(40):
        core.accepted(("10.0.0.2", 40000 + i), 1.0)
    core.backends([B1, B2], 2.0)
    first = [arg for kind, _, arg in core.commands() if kind == sc.CONNECT]
    assert sorted(a[0] for a in first) == [B1, B2]  # type: ignore[index]


class OddGuest:
    """Connects every held stream at BackendAvailable in reverse order and sends a
    preamble right after each connect, before its result (as a relaying guest may)."""

    def __init__(self) -> None:
        self.open: list[int] = []
        self.seen: list[abi.Event] = []

    def process(self, port: int, events: Sequence[abi.Event], streams: int = 0
                ) -> list[abi.Action]:
        out: list[abi.Action] = []
        self.seen.extend(events)
        for e in events:
            if isinstance(e, abi.StreamOpen):
                self.open.append(e.stream_id)
            elif isinstance(e, abi.BackendAvailable):
                for sid in reversed(self.open):
                    out.append(abi.UpstreamConnect(sid, 0))
                    out.append(abi.UpstreamSend(sid, b"hello %d" % sid))
        return out


def test_arrival_order_whatever_the_guest_asks_and_sends_follow_their_connect() -> None:
    core = StreamCore(OddGuest(), 80, 8080, release_burst=2, release_interval=0.01)
    sids = [core.accepted(("10.0.0.2", 40000 + i), 1.0 + i * 0.001) for i in range(4)]
    core.backends([B1], 2.0)
    cmds = core.commands()
    assert cmds == [(sc.CONNECT, sids[0], (B1, 8080)), (sc.SEND_UPSTREAM, sids[0], b"hello 1"),
                    (sc.CONNECT, sids[1], (B1, 8080)), (sc.SEND_UPSTREAM, sids[1], b"hello 2")]
    core.handle_timer(2.01)
    assert core.commands() == [
        (sc.CONNECT, sids[2], (B1, 8080)), (sc.SEND_UPSTREAM, sids[2], b"hello 3"),
        (sc.CONNECT, sids[3], (B1, 8080)), (sc.SEND_UPSTREAM, sids[3], b"hello 4")]


def test_a_stream_that_ends_while_its_connect_waits_never_connects() -> None:
    core = StreamCore(OddGuest(), 80, 8080, release_burst=1, release_interval=0.01)
    a = core.accepted(("10.0.0.2", 40000), 1.0)
    b = core.accepted(("10.0.0.2", 40001), 1.0)
    c = core.accepted(("10.0.0.2", 40002), 1.0)
    core.backends([B1], 2.0)
    assert connects(core.commands()) == [a]
    core.client_closed(b, 2.001, reset=True)
    core.commands()
    core.handle_timer(2.01)
    assert connects(core.commands()) == [c]
    assert core.next_timer() is None or core.next_timer() >= 2.1  # only the tick is left


def test_a_waiting_connect_whose_backend_goes_away_moves_or_fails() -> None:
    guest = OddGuest()
    core = StreamCore(guest, 80, 8080, release_burst=1, release_interval=0.01)
    a = core.accepted(("10.0.0.2", 40000), 1.0)
    b = core.accepted(("10.0.0.2", 40001), 1.0)
    core.backends([B1], 2.0)
    assert connects(core.commands()) == [a]
    core.backends([B2], 2.001)  # B1 is gone: b waits in B2's burst and goes there
    cmds = core.commands()
    assert cmds[:2] == [(sc.CONNECT, b, (B2, 8080)), (sc.SEND_UPSTREAM, b, b"hello 2")]
    core2 = StreamCore(OddGuest(), 80, 8080, release_burst=1, release_interval=0.01)
    a = core2.accepted(("10.0.0.2", 40000), 1.0)
    b = core2.accepted(("10.0.0.2", 40001), 1.0)
    core2.backends([B1], 2.0)
    core2.commands()
    core2.backends([], 2.001)  # no backend at all: the guest hears its connect failed
    core2.handle_timer(2.01)
    assert connects(core2.commands()) == []
    assert abi.UpstreamConnectResult(b, 0) in core2.guest.seen  # type: ignore[attr-defined]
    assert core2.streams[b].up == sc.UP_NONE


class BigSendGuest(OddGuest):
    """As OddGuest, with a preamble larger than the stream buffer."""

    def process(self, port: int, events: Sequence[abi.Event], streams: int = 0
                ) -> list[abi.Action]:
        out = super().process(port, events, streams)
        return [abi.UpstreamSend(a.stream_id, b"x" * 40_000)
                if isinstance(a, abi.UpstreamSend) else a for a in out]


def test_bytes_kept_for_a_waiting_connect_are_bounded_by_pausing_its_client() -> None:
    """What a guest sends while the connect waits is kept, not lost; past the stream
    buffer the client's reads stop until the connect goes, then resume."""
    core = StreamCore(BigSendGuest(), 80, 8080, release_burst=1, release_interval=0.01,
                      stream_buffer=32_000)
    a = core.accepted(("10.0.0.2", 40000), 1.0)
    b = core.accepted(("10.0.0.2", 40001), 1.0)
    core.backends([B1], 2.0)
    cmds = core.commands()
    assert (sc.CONNECT, a, (B1, 8080)) in cmds
    assert (sc.READ_CLIENT, b, False) in cmds  # 40,000 bytes wait for b: paused
    reads_a = [arg for kind, sid, arg in cmds if kind == sc.READ_CLIENT and sid == a]
    assert reads_a in ([], [False, True])  # a connected in this same pass: reading again
    core.handle_timer(2.01)
    cmds = core.commands()
    assert cmds == [(sc.CONNECT, b, (B1, 8080)), (sc.SEND_UPSTREAM, b, b"x" * 40_000),
                    (sc.READ_CLIENT, b, True)]


def test_the_cores_own_pace_defaults_are_the_configs() -> None:
    from fabric.config.specs import DEFAULT_RELEASE_BURST, DEFAULT_RELEASE_INTERVAL
    assert (sc.RELEASE_BURST, sc.RELEASE_INTERVAL) == (DEFAULT_RELEASE_BURST,
                                                       DEFAULT_RELEASE_INTERVAL)


def test_a_port_caps_live_connections_per_client_address() -> None:
    """max_connections_per_client: one address cannot take every slot of the port (1,024
    idle sockets from one pod locked every other client out); other addresses are
    served, and a closed connection frees its slot."""
    core = StreamCore(OddGuest(), 80, 8080, max_per_client=3)
    a = [core.accepted(("10.0.0.2", 40000 + i), 1.0) for i in range(5)]
    assert all(sid is not None for sid in a[:3]) and a[3:] == [None, None]
    assert core.counters["client_limit"] == 2
    assert any("max_connections_per_client" in text for _lvl, text in core.logs)
    assert core.accepted(("10.0.0.9", 5000), 1.0) is not None  # another client
    core.client_closed(a[0], 1.1, reset=True)  # type: ignore[arg-type]
    core.commands()
    assert core.accepted(("10.0.0.2", 41000), 1.2) is not None
    assert core.accepted(("10.0.0.2", 41001), 1.2) is None
    uncapped = StreamCore(OddGuest(), 80, 8080)
    assert all(uncapped.accepted(("10.0.0.2", 40000 + i), 1.0) for i in range(50))
