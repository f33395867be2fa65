"""The stream host's sans-IO core (fabric.streams.core), driven with bytes and explicit
time: with the shipped plain stream activator and a hostile one through the real wasm
host, and with a scripted guest where a test needs a guest to do one odd thing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from fabric.activator import abi
from fabric.activator.host import ActivatorHost
from fabric.streams import core as sc
from fabric.streams.core import StreamCore

ROOT = Path(__file__).resolve().parents[2] / "activators"
PEER = ("10.0.0.2", 40000)


def kinds(cmds: list[sc.Command]) -> list[int]:
    return [c[0] for c in cmds]


@pytest.fixture
def plain() -> StreamCore:
    host = ActivatorHost(ROOT / "stream" / "stream.wasm", {"hold_timeout_ms": 2000})
    assert host.streams
    return StreamCore(host, 80, 8080, hold_timeout=2.0)


def test_plain_activator_holds_until_a_backend_then_splices(plain: StreamCore) -> None:
    """The connection is paused at once (its bytes wait in the kernel), connected once
    a backend is ready, then resumed and spliced: the guest never copies a byte."""
    sid = plain.accepted(PEER, 1.0)
    assert sid is not None and plain.need == abi.NEED_ACTIVE
    assert plain.commands() == [(sc.READ_CLIENT, sid, False)]
    plain.backends(["10.0.0.3"], 1.5)
    assert plain.commands() == [(sc.CONNECT, sid, ("10.0.0.3", 8080))]
    plain.upstream_result(sid, True, 1.6)
    assert plain.commands() == [(sc.READ_CLIENT, sid, True), (sc.SPLICE, sid, None)]
    assert plain.streams[sid].mode == sc.SPLICED
    plain.splice_ended(sid, 9.0)
    assert sid not in plain.streams and plain.need == abi.NEED_NONE
    assert plain.counters["spliced"] == 1 and plain.counters["streams_closed"] == 1


def test_plain_activator_closes_a_stream_held_past_the_timeout(plain: StreamCore) -> None:
    sid = plain.accepted(PEER, 1.0)
    assert sid is not None
    plain.handle_timer(1.2)
    assert plain.commands() == [(sc.READ_CLIENT, sid, False)]
    plain.handle_timer(3.5)
    assert kinds(plain.commands()) == [sc.CLOSE_CLIENT, sc.FORGET]
    assert not plain.streams and plain.need == abi.NEED_NONE
    plain.handle_timer(plain.next_timer() or 0.0)  # the one tick owed after the last stream
    assert plain.next_timer() is None and not plain.commands()


def test_ticks_only_while_streams_live(plain: StreamCore) -> None:
    assert plain.next_timer() is None
    sid = plain.accepted(PEER, 5.0)
    assert plain.next_timer() == pytest.approx(5.0 + sc.TICK_INTERVAL)
    plain.client_closed(sid, 5.05, reset=True)
    plain.commands()
    plain.handle_timer(5.2)
    assert plain.next_timer() is None


def test_one_tick_after_the_last_stream_lets_a_debounced_guest_lower_its_need() -> None:
    """The PostgreSQL activator reports `none` only at a tick (need_debounce): without the
    tick owed after the last stream, a direct-TLS connection that came and went would
    leave the port `active`, pinning the backend for ever."""
    host = ActivatorHost(ROOT / "postgres" / "postgres.wasm", {})
    core = StreamCore(host, 5432, 5432)
    sid = core.accepted(PEER, 1.0)
    assert sid is not None
    core.client_data(sid, b"\x16\x03\x01\x00\x05hello", 1.01)  # a TLS ClientHello's start
    assert core.need == abi.NEED_ACTIVE
    core.backends(["10.0.0.3"], 1.02)
    core.upstream_result(sid, True, 1.03)
    core.upstream_data(sid, b"\x16\x03\x03\x00\x02sh", 1.04)  # spliced at the ServerHello
    core.flush(1.04)
    assert core.streams[sid].mode == sc.SPLICED
    core.splice_ended(sid, 2.0)
    assert not core.streams and core.need == abi.NEED_ACTIVE  # debounced: not yet
    t = core.next_timer()
    assert t is not None
    core.handle_timer(t)
    assert core.need == abi.NEED_NONE and core.next_timer() is None


def test_a_ports_first_stream_is_told_the_time_before_it_opens() -> None:
    """Without it a guest stamping the open with fab_now() saw 0 and timed the
    connection out at its first tick (the tutorial's scaffold did)."""
    core = StreamCore(Scripted(lambda ev: []), 80, 8080)
    sid = core.accepted(PEER, 12.5)
    seen = core.guest.seen  # type: ignore[attr-defined]
    assert seen[:2] == [abi.Tick(12500), abi.StreamOpen(sid, 80)]
    core.accepted(("10.0.0.9", 4000), 12.55)  # ticks are running now: no extra one
    assert seen[2:] == [abi.StreamOpen(2, 80)]
    fresh = Scripted(lambda ev: [])
    core.replace_guest(fresh, 12.6)  # a new generation has no clock yet, though ticks run
    core.accepted(("10.0.0.9", 4001), 12.6)
    assert fresh.seen[:2] == [abi.Tick(12600), abi.StreamOpen(3, 80)]  # type: ignore[attr-defined]


def test_connections_past_max_streams_are_refused() -> None:
    host = ActivatorHost(ROOT / "stream" / "stream.wasm", {})
    core = StreamCore(host, 80, 8080, max_streams=3)
    sids = [core.accepted(("10.0.0.2", 1000 + i), 0.0) for i in range(4)]
    assert sids[:3] == [1, 2, 3] and sids[3] is None
    assert core.counters["streams_refused"] == 1


def test_guest_failing_on_a_transparent_stream_becomes_a_proxy() -> None:
    """streamtrap relays bytes itself and traps on TRAP: the chunk of the failed call and
    nothing else goes upstream, then the host splices the pair."""
    host = ActivatorHost(ROOT / "testing" / "streamtrap.wasm", {})
    core = StreamCore(host, 7000, 7000)
    core.backends(["10.0.0.3"], 0.0)
    sid = core.accepted(PEER, 0.0)
    assert sid is not None
    assert core.commands() == [(sc.CONNECT, sid, ("10.0.0.3", 7000))]
    core.upstream_result(sid, True, 0.1)
    core.client_data(sid, b"one ", 0.2)
    assert core.commands() == [(sc.SEND_UPSTREAM, sid, b"one ")]
    core.upstream_data(sid, b"one ", 0.3)
    assert core.commands() == [(sc.SEND_CLIENT, sid, b"one ")]
    assert core.streams[sid].transparent
    core.client_data(sid, b"TRAP two", 0.4)
    assert core.commands() == [(sc.SEND_UPSTREAM, sid, b"TRAP two"), (sc.SPLICE, sid, None)]
    c = core.counters
    assert c["guest_failures"] == 1 and c["fallback_proxied"] == 1 and c["spliced"] == 1
    # A new connection goes to a fresh instance.
    sid2 = core.accepted(("10.0.0.2", 40001), 0.5)
    assert core.commands() == [(sc.CONNECT, sid2, ("10.0.0.3", 7000))]
    # The host's own proxy ending is not told to the guest (no event for a dead instance).
    core.splice_ended(sid, 1.0)
    assert sid not in core.streams


class Scripted:
    """A guest whose answers a test writes: `answer(events) -> actions | None`."""

    def __init__(self, answer: Callable[[Sequence[abi.Event]], list[abi.Action] | None]
                 ) -> None:
        self.answer = answer
        self.seen: list[abi.Event] = []

    def process(self, port: int, events: Sequence[abi.Event], streams: int = 0
                ) -> list[abi.Action] | None:
        self.seen.extend(events)
        return self.answer(events)


def test_guest_failing_on_a_stream_it_answered_closes_it() -> None:
    state = {"fail": False}

    def answer(events: Sequence[abi.Event]) -> list[abi.Action] | None:
        if state["fail"]:
            return None
        out: list[abi.Action] = []
        for e in events:
            if isinstance(e, abi.StreamData):
                out.append(abi.DownstreamSend(e.stream_id, b"pong"))  # answered itself
        return out

    core = StreamCore(Scripted(answer), 5432, 5432)
    sid = core.accepted(PEER, 0.0)
    core.client_data(sid, b"ping", 0.1)
    assert core.commands() == [(sc.SEND_CLIENT, sid, b"pong")]
    assert not core.streams[sid].transparent
    state["fail"] = True
    core.client_data(sid, b"ping", 0.2)
    assert kinds(core.commands()) == [sc.CLOSE_CLIENT, sc.FORGET]
    assert core.counters["fallback_closed"] == 1 and not core.streams


def test_transparent_stream_without_backend_waits_then_proxies() -> None:
    state = {"fail": False}

    def answer(events: Sequence[abi.Event]) -> list[abi.Action] | None:
        if state["fail"]:
            return None
        return [abi.SetBackendNeed(abi.NEED_ACTIVE)]

    core = StreamCore(Scripted(answer), 80, 8080, hold_timeout=5.0)
    sid = core.accepted(PEER, 0.0)
    core.client_data(sid, b"hello", 0.1)
    state["fail"] = True
    core.client_data(sid, b" world", 0.2)
    assert core.commands() == [] and core.need == abi.NEED_ACTIVE
    assert core.streams[sid].mode == sc.WAITING
    core.backends(["10.0.0.9"], 1.0)
    assert core.commands() == [(sc.CONNECT, sid, ("10.0.0.9", 8080))]
    core.upstream_result(sid, True, 1.1)
    assert core.commands() == [(sc.SEND_UPSTREAM, sid, b"hello world"), (sc.SPLICE, sid, None)]
    assert core.need == abi.NEED_NONE


def test_waiting_stream_closes_at_the_hold_timeout() -> None:
    core = StreamCore(Scripted(lambda ev: None), 80, 8080, hold_timeout=1.0)
    sid = core.accepted(PEER, 0.0)
    assert core.streams[sid].mode == sc.WAITING
    core.handle_timer(1.2)
    assert kinds(core.commands()) == [sc.CLOSE_CLIENT, sc.FORGET]
    assert core.counters["fallback_timeouts"] == 1


def test_odd_actions_are_dropped_and_counted() -> None:
    queue: list[list[abi.Action]] = []

    def answer(events: Sequence[abi.Event]) -> list[abi.Action] | None:
        return queue.pop(0) if queue else []

    core = StreamCore(Scripted(answer), 80, 8080)
    sid = core.accepted(PEER, 0.0)
    queue.append([abi.DownstreamSend(999, b"x"), abi.UpstreamSend(sid, b"x"),
                  abi.Splice(sid), abi.PacketDecision(1, 0), abi.UpstreamConnect(sid, 0),
                  abi.Count(2, "keepalives_answered"), abi.Count(1, "Bad Name"),
                  abi.Log(abi.LOG_INFO, "hi")])
    core.client_data(sid, b"x", 0.1)
    c = core.counters
    assert c["bad_actions"] == 2 and c["sends_dropped"] == 1 and c["splice_refused"] == 1
    assert c["upstream_no_backend"] == 1 and c["count_refused"] == 1
    assert core.guest_counters == {"keepalives_answered": 2}
    assert core.logs == [(abi.LOG_INFO, "hi")]
    # the refused connect is answered at once
    assert abi.UpstreamConnectResult(sid, 0) in core.guest.seen  # type: ignore[attr-defined]


def test_client_reset_ends_the_stream_and_drops_later_sends() -> None:
    core = StreamCore(Scripted(lambda ev: [abi.DownstreamSend(1, b"late")]), 80, 8080)
    sid = core.accepted(PEER, 0.0)
    core.commands()
    core.client_closed(sid, 0.1, reset=True)
    assert sid not in core.streams
    assert kinds(core.commands()) == [sc.FORGET]
    # the guest's answer to the stream_close of a reset stream is moot, not bad
    assert core.counters["late_actions"] == 1 and core.counters["bad_actions"] == 0


def test_actions_for_a_stream_that_never_was_are_bad() -> None:
    core = StreamCore(Scripted(lambda ev: [abi.DownstreamClose(99)]), 80, 8080)
    core.accepted(PEER, 0.0)
    assert core.counters["bad_actions"] == 1 and core.counters["late_actions"] == 0


def test_backend_choice_is_per_client_and_stable() -> None:
    core = StreamCore(Scripted(lambda ev: [abi.UpstreamConnect(e.stream_id, 0) for e in ev
                                           if isinstance(e, abi.StreamOpen)]), 80, 8080)
    core.backends(["10.0.0.3", "10.0.0.4"], 0.0)
    chosen = set()
    for i in range(64):
        sid = core.accepted(("10.0.0.2", 30000 + i), 0.0)
        (cmd,) = core.commands()
        assert cmd[0] == sc.CONNECT and cmd[1] == sid
        chosen.add(cmd[2][0])  # type: ignore[index]
    assert chosen == {"10.0.0.3", "10.0.0.4"}


def test_wake_on_data_holds_the_first_read_and_a_half_close_keeps_it() -> None:
    """With wake_on_data a connect alone wakes nothing; the first bytes do, are held
    (the client paused), and go upstream before the splice, also when the client shut
    its side after them (the splice carries the end on)."""
    host = ActivatorHost(ROOT / "stream" / "stream.wasm", {"wake_on_data": 1})
    core = StreamCore(host, 80, 8080)
    sid = core.accepted(PEER, 1.0)
    assert core.commands() == [] and core.need == abi.NEED_NONE
    core.client_data(sid, b"QUERY", 1.1)
    assert core.commands() == [(sc.READ_CLIENT, sid, False)]
    assert core.need == abi.NEED_ACTIVE
    core.client_closed(sid, 1.2)
    assert core.commands() == [] and sid in core.streams
    core.backends(["10.0.0.3"], 1.5)
    assert core.commands() == [(sc.CONNECT, sid, ("10.0.0.3", 8080))]
    core.upstream_result(sid, True, 1.6)
    assert core.commands() == [(sc.SEND_UPSTREAM, sid, b"QUERY"), (sc.READ_CLIENT, sid, True),
                               (sc.SPLICE, sid, None)]


def test_a_first_read_of_64_kib_is_held_whole() -> None:
    """The host reads up to 64 KiB at once before a pause takes effect: all of it is
    held and sent (a bigger first chunk than a small buffer once closed the stream)."""
    host = ActivatorHost(ROOT / "stream" / "stream.wasm", {"wake_on_data": 1})
    core = StreamCore(host, 80, 8080)
    core.backends(["10.0.0.3"], 0.0)
    sid = core.accepted(PEER, 1.0)
    blob = bytes(range(256)) * 256
    core.client_data(sid, blob, 1.1)
    assert core.commands() == [(sc.READ_CLIENT, sid, False), (sc.CONNECT, sid, ("10.0.0.3",
                                                                                8080))]
    core.upstream_result(sid, True, 1.2)
    assert core.commands()[0] == (sc.SEND_UPSTREAM, sid, blob)


def test_a_reload_sends_new_streams_to_the_new_module_and_keeps_live_ones() -> None:
    """Generations: after replace_guest, a new connection opens on the new module; the
    live one stays with the old (its actions are still carried out, the new module
    cannot act on it), and the old module is retired once its last stream ends."""
    def echo(tag: bytes) -> Callable[[Sequence[abi.Event]], list[abi.Action]]:
        def answer(events: Sequence[abi.Event]) -> list[abi.Action]:
            out: list[abi.Action] = []
            for e in events:
                if isinstance(e, abi.StreamData):
                    out.append(abi.DownstreamSend(e.stream_id, tag + e.data))
                    out.append(abi.DownstreamSend(1, b"meddling"))  # stream 1 is not new's
            return out
        return answer

    old, new = Scripted(echo(b"old:")), Scripted(echo(b"new:"))
    core = StreamCore(old, 80, 8080)
    s1 = core.accepted(PEER, 0.0)
    assert core.replace_guest(new, 1.0) == 2
    s2 = core.accepted(("10.0.0.2", 40001), 1.0)
    core.commands()
    core.client_data(s1, b"a", 1.1)
    assert (sc.SEND_CLIENT, s1, b"old:a") in core.commands()
    core.client_data(s2, b"b", 1.2)
    cmds = core.commands()
    assert (sc.SEND_CLIENT, s2, b"new:b") in cmds and (sc.SEND_CLIENT, 1, b"meddling") \
        not in cmds
    assert core.counters["bad_actions"] >= 1
    assert core.status()["generations_live"] == 2 and not core.retired
    core.client_closed(s1, 2.0, reset=True)
    assert core.retired == [old] and core.status()["generations_live"] == 1
    assert any(isinstance(e, abi.StreamOpen) for e in new.seen)
    assert not any(isinstance(e, abi.StreamOpen) and e.stream_id == s1 for e in new.seen)


class StalledBackend:
    """The shell's side of one stream whose backend never reads (fabric.streams.front):
    what the core sends upstream stays queued, and the client is read (one read of at
    most 64 KiB at a time, as the front reads) only while the guest has not paused it
    and the upstream queue is within the stream buffer."""

    def __init__(self, core: StreamCore, sid: int) -> None:
        self.core, self.sid = core, sid
        self.paused = False
        self.upstream = bytearray()  # every byte handed to the backend's queue, in order
        self.closed = False

    def run(self) -> None:
        for kind, sid, arg in self.core.commands():
            assert sid == self.sid
            if kind == sc.SEND_UPSTREAM:
                self.upstream += arg  # type: ignore[operator]
            elif kind == sc.READ_CLIENT:
                self.paused = not arg
            elif kind in (sc.CLOSE_CLIENT, sc.FORGET):
                self.closed = True

    @property
    def reading(self) -> bool:
        return not (self.paused or self.closed
                    or len(self.upstream) > self.core.stream_buffer)


def _pattern(start: int, n: int) -> bytes:
    """Bytes that say where in the upload they are (a lost or reordered read shows)."""
    return bytes((start + i) * 7 % 251 for i in range(n))


def test_a_relaying_guest_loses_no_byte_and_back_pressure_stops_the_client() -> None:
    """streamtrap relays through the host's queues. The client starts pushing while the
    service still sleeps, and the backend, once up, never reads: every byte the host took
    from the client must reach the backend's queue, in order, and the client must be
    stopped (by the guest's pause while it cannot relay, then by the host's bound on the
    upstream queue), never read on while its bytes are dropped."""
    host = ActivatorHost(ROOT / "testing" / "streamtrap.wasm", {})
    core = StreamCore(host, 7000, 7000)
    sid = core.accepted(PEER, 0.0)
    assert sid is not None
    shell = StalledBackend(core, sid)
    shell.run()
    taken = bytearray()
    now = 0.0
    limit = 8 << 20  # far past any bound: without back-pressure the loop ends here

    def push(reads: int) -> None:
        nonlocal now
        for _ in range(reads):
            if not shell.reading or len(taken) >= limit:
                return
            chunk = _pattern(len(taken), sc.MAX_CHUNK)
            taken.extend(chunk)
            now += 0.001
            core.client_data(sid, chunk, now)
            shell.run()
            t = core.next_timer()
            if t is not None and t <= now:
                core.handle_timer(now)
                shell.run()

    push(400)  # the service is waking: nothing can go upstream yet
    held = len(taken)
    assert held <= 2 * sc.MAX_CHUNK, held  # paused, not read on and dropped
    now += 0.05
    core.backends(["10.0.0.3"], now)
    shell.run()
    core.upstream_result(sid, True, now + 0.01)
    shell.run()
    assert shell.upstream == taken  # what was held went up first, whole
    push(limit // sc.MAX_CHUNK)
    assert not shell.reading and not shell.closed
    assert len(taken) <= core.stream_buffer + 2 * sc.MAX_CHUNK, len(taken)
    for _ in range(3):  # ticks while the client is stopped: nothing more, nothing lost
        now += sc.TICK_INTERVAL
        core.handle_timer(now)
        shell.run()
    assert bytes(shell.upstream) == bytes(taken)
    c = core.counters
    assert c["bytes_from_clients"] == c["bytes_to_backends"] == len(taken), c
    assert c["guest_failures"] == 0 and c["bad_actions"] == 0 and c["sends_dropped"] == 0


def test_a_client_that_ends_while_its_bytes_are_held_has_them_relayed_first() -> None:
    """A request and a FIN sent before the backend is up: streamtrap holds the bytes
    (and pauses), and the close comes only after all of them went upstream."""
    host = ActivatorHost(ROOT / "testing" / "streamtrap.wasm", {})
    core = StreamCore(host, 7000, 7000)
    sid = core.accepted(PEER, 0.0)
    assert sid is not None
    core.commands()
    body = _pattern(0, 70_000)  # two reads' worth
    core.client_data(sid, body[:sc.MAX_CHUNK], 0.01)
    assert core.commands() == [(sc.READ_CLIENT, sid, False)]
    core.client_data(sid, body[sc.MAX_CHUNK:], 0.02)  # the read past the pause
    core.client_closed(sid, 0.03)
    assert core.commands() == [] and sid in core.streams
    core.backends(["10.0.0.3"], 0.5)
    assert core.commands() == [(sc.CONNECT, sid, ("10.0.0.3", 7000))]
    core.upstream_result(sid, True, 0.6)
    cmds = core.commands()
    assert cmds[0] == (sc.SEND_UPSTREAM, sid, body)
    assert kinds(cmds[1:]) == [sc.CLOSE_CLIENT, sc.CLOSE_UPSTREAM, sc.FORGET]
    assert core.counters["bytes_to_backends"] == len(body)
