"""The stream host of one service port, sans-IO: client connections in, a stream
activator's actions out (activators/ABI.md, "Streams").

The shell (fabric.streams.front) owns the sockets. It tells the core what happened on
them (a connection accepted, bytes, an end, an upstream connected) with the time, and
carries out the commands the core returns: send, close, connect, read or not, splice.
Everything that is decided lives here, so the unit tests and the pcap harness drive it
with bytes and a clock of their own:

- stream ids, the streams' life (client side, upstream side, spliced or not);
- the guest calls, and what its actions mean for each stream (wrong ids, sends on a
  closed side and the like are dropped and counted, never an exception);
- which backend an upstream connection goes to (a hash of the client's address over
  the ready backends, as the L3 path picks);
- the port's need, from the guest's ``set_backend_need`` and the host's own fallback;
- the fallback when the guest fails (ABI.md): streams whose bytes it only relayed go on
  as plain byte proxies, the others are closed after their output is flushed;
- the pace of a wake's upstream connects (the service's ``hold.release_burst`` and
  ``hold.release_interval``, as the packet path releases held flows): streams held
  while no backend was ready connect at most `release_burst` per backend per
  `release_interval`, in arrival order, so a wake storm does not overflow the backend's
  listen backlog. A connect waiting its turn looks to the guest like a slow connect:
  what it sends upstream meanwhile is kept and follows the CONNECT. Connections that
  arrive with a backend up connect at once, unless that backend's burst is in progress
  (then they queue behind it, and nothing overtakes a held stream).

Byte limits on the queues toward the client and the backend are the shell's (it knows
what the kernel took); the core bounds what it keeps itself (the unforwarded client
bytes of a transparent stream) and the number of streams.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fabric.activator import abi
from fabric.histogram import WAKE_BUCKETS, Histogram

# --- commands for the shell: (kind, stream id, argument) -----------------------------------
SEND_CLIENT = 1  # arg: bytes
SEND_UPSTREAM = 2  # arg: bytes
CLOSE_CLIENT = 3  # arg: None; after flushing what is queued
CLOSE_UPSTREAM = 4  # arg: None; after flushing
CONNECT = 5  # arg: (backend ip, port)
READ_CLIENT = 6  # arg: bool (the guest's pause/resume)
SPLICE = 7  # arg: None; relay client <-> upstream in the kernel from now on
FORGET = 8  # arg: None; the core is done with the stream (the shell closes what is left)

Command = tuple[int, int, object]

# stream modes
GUEST = 0  # the guest sees its bytes
WAITING = 1  # fallback: a transparent stream waits for a backend to become a proxy
SPLICED = 2  # the shell relays it (the guest asked, or the fallback)

# upstream states
UP_NONE, UP_CONNECTING, UP_OPEN, UP_CLOSED = 0, 1, 2, 3

TICK_INTERVAL = 0.1
# The pace of a wake's connects when the shell gives none: the defaults of a service's
# hold.release_burst and hold.release_interval (fabric.config.specs; this layer does not
# read the config, the manager passes the service's own).
RELEASE_BURST = 128
RELEASE_INTERVAL = 0.001
MAX_STREAMS = 4096
STREAM_BUFFER = 256 << 10
MAX_CHUNK = 64 << 10  # bytes per stream_data event
# Stream bytes one deferred batch hands a guest in one call: what a single read gave it
# before reads were batched. A relaying guest answers with about as many bytes as it
# got, and its answer is bounded (the SDK's 256 KiB by default): a batch of a stream
# buffer's worth made guests that relay bulk run out of room in one call.
DEFER_MAX = MAX_CHUNK
# Client bytes one guest call is handed, all streams together (a read larger than this is
# handed over in pieces, one call each). A call's fuel is fixed (ActivatorHost: 20 M by
# default), and what a guest spends per byte depends on what the client chose to send:
# the http2 guest spent up to 490 units a byte on 13-byte frames that each open a stream
# past its limit, so 64 KiB of them ran it out of fuel in one call, and the fallback
# closed every connection of the port for one client's read. At 16 KiB a call the worst
# input measured takes under half the budget (tests/unit/test_stream_fuel.py). Backend
# bytes keep DEFER_MAX: the backend is the service's own, and bulk answers come that way.
CLIENT_CALL_MAX = 16 << 10
MAX_GUEST_COUNTERS = 32
# A wake as a stream port sees it: a connection held with no ready backend -> the need
# raised (activate sent) -> the first upstream connection accepted -> the first byte
# from the backend relayed to a client.
WAKE_PHASES = ("activate", "connect", "first_byte")
_COUNTER_NAME = re.compile(r"[a-z0-9_]{1,32}\Z")

COUNTERS = (
    "streams_opened", "streams_refused", "streams_closed", "bytes_from_clients",
    "bytes_to_clients", "bytes_from_backends", "bytes_to_backends", "upstream_connects",
    "upstream_failed", "upstream_no_backend", "spliced", "splice_refused",
    "fallback_proxied", "fallback_closed", "fallback_timeouts", "guest_failures",
    "bad_actions", "late_actions", "sends_dropped", "count_refused", "ticks",
    "release_paced", "client_limit",
)

# Stream.paced: its connect is not waiting, waits its turn, waits and was counted.
PACE_NONE, PACE_QUEUED, PACE_COUNTED = 0, 1, 2


class Guest(Protocol):
    """What the core needs of an activator host (fabric.activator.host.ActivatorHost)."""

    def process(self, port: int, events: Sequence[abi.Event], streams: int = 0
                ) -> list[abi.Action] | None: ...


class Generation:
    """One module of the port (a reload adds one): new streams go to the newest, a
    stream stays with the one it opened on until it ends."""

    __slots__ = ("guest", "number", "events", "need", "told_ready", "hello", "nstreams",
                 "tail_tick", "ticked_at")

    def __init__(self, guest: Guest, number: int) -> None:
        self.guest = guest
        self.number = number
        self.events: list[abi.Event] = []
        self.need = abi.NEED_NONE
        self.told_ready: bool | None = None
        self.hello = False  # a recreated instance is yet to hear of the backends
        self.nstreams = 0
        # One tick is still owed after its last stream ended: a guest that reports
        # `none` only at a tick (a debounce) would otherwise pin the backend for ever.
        self.tail_tick = False
        self.ticked_at: float | None = None  # when its guest was last told the time


@dataclass(slots=True)
class Stream:
    sid: int
    peer: tuple[str, int]
    opened: float
    gen: Generation | None = None
    mode: int = GUEST
    client_open: bool = True  # the client may still send
    client_reset: bool = False  # sends to the client are pointless
    up: int = UP_NONE
    backend: str | None = None
    # Transparency (ABI.md, fallback): client bytes the guest has not yet sent upstream
    # and backend bytes it has not yet sent to the client, while it relayed them as is.
    guest_splice: bool = False  # the guest spliced it: it hears of the end
    transparent: bool = True
    pending_up: bytearray = field(default_factory=bytearray)
    pending_down: bytearray = field(default_factory=bytearray)
    # Held while no backend was ready: its next connect is part of a wake's burst.
    held: bool = False
    paced: int = PACE_NONE
    port: int = 0  # the port of the connect waiting its turn
    # What the guest sent upstream while the connect waits (None: an upstream close).
    paced_sends: list[bytes | None] = field(default_factory=list)
    paced_bytes: int = 0
    # Its client's reads stopped because paced_sends outgrew the stream buffer (resumed
    # with the connect unless the guest itself asked for a pause meanwhile).
    pace_paused: bool = False
    guest_paused: bool = False


class _Burst:
    """One backend's wake: connects started in the current window, and those waiting."""

    __slots__ = ("until", "used", "queue")

    def __init__(self, until: float) -> None:
        self.until = until  # the end of the current window
        self.used = 0  # connects started in it
        self.queue: list[Stream] = []  # waiting, in arrival order


class StreamCore:
    """One service port's streams and its guest (see module docstring)."""

    def __init__(self, guest: Guest, port: int, target_port: int, *,
                 hold_timeout: float = 30.0, max_streams: int = MAX_STREAMS,
                 stream_buffer: int = STREAM_BUFFER, label: str = "",
                 release_burst: int = RELEASE_BURST,
                 release_interval: float = RELEASE_INTERVAL,
                 max_per_client: int = 0) -> None:
        self.gen = Generation(guest, 1)
        self.gens = [self.gen]
        self.retired: list[Guest] = []  # generations done with: the shell closes them
        self.port = port
        self.target_port = target_port
        self.hold_timeout = hold_timeout
        self.max_streams = max_streams
        self.stream_buffer = stream_buffer
        self.release_burst = max(1, release_burst)
        self.release_interval = release_interval
        self._bursts: dict[str, _Burst] = {}  # by backend address
        self.label = label or str(port)
        self.streams: dict[int, Stream] = {}
        # Live streams by client address, when a port caps them (max_per_client > 0): one
        # client cannot take every slot of max_streams.
        self.max_per_client = max_per_client
        self._per_client: dict[str, int] = {}
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.guest_counters: dict[str, int] = {}
        self.logs: list[tuple[int, str]] = []  # (level, text) for the shell to log
        self.ready: list[str] = []  # ready backends' addresses
        self.need = abi.NEED_NONE
        self._next_sid = 1
        self._out: list[Command] = []
        self._next_tick: float | None = None
        # Streams ended at a client's reset while the guest still had them: its answers
        # to their stream_close are expected, not bad (bounded; oldest forgotten first).
        self._reset_ended: dict[int, None] = {}
        self._waiting = 0  # streams in WAITING
        # While the shell reads every ready socket of a wakeup it sets `defer`: stream
        # bytes wait in the generations' event lists (at most DEFER_MAX)
        # and `flush` hands them over in one guest call, not one call per read.
        self.defer = False
        self._deferred = 0
        self._deferred_client = 0  # of which client bytes (at most CLIENT_CALL_MAX)
        self.wake_seconds = Histogram(WAKE_BUCKETS)
        self.wake_phase_seconds = {p: Histogram(WAKE_BUCKETS) for p in WAKE_PHASES}
        self._wake_t0: float | None = None
        self._wake_mark = 0.0
        self._wake_stage = 0  # phases done
        self._now = 0.0

    @property
    def guest(self) -> Guest:
        """The module new streams go to."""
        return self.gen.guest

    @property
    def guest_need(self) -> int:
        gens = self.gens
        if len(gens) == 1:  # no reload in progress: the common case, per guest call
            return gens[0].need
        return max(g.need for g in gens)

    def replace_guest(self, guest: Guest, now: float) -> int:
        """A reload: new streams go to `guest`; live ones stay with their module until
        they end (then it is retired). Returns the new generation's number."""
        old = self.gen
        self.gen = Generation(guest, old.number + 1)
        self.gen.hello = True  # it hears where the backends stand with its first call
        self.gens.append(self.gen)
        if old.nstreams == 0:
            self._retire(old)
        self._update_need()
        return self.gen.number

    def _retire(self, g: Generation) -> None:
        if g is not self.gen and g in self.gens:
            self.gens.remove(g)
            self.retired.append(g.guest)

    # --- what the shell reports --------------------------------------------------------

    def accepted(self, peer: tuple[str, int], now: float) -> int | None:
        """A client connection arrived: its stream id, or None to close it at once."""
        live = self.streams
        if len(live) >= self.max_streams:
            self.counters["streams_refused"] += 1
            return None
        cap = self.max_per_client
        if cap:
            n = self._per_client.get(peer[0], 0)
            if n >= cap:
                k = self.counters["client_limit"] = self.counters["client_limit"] + 1
                if k == 1 or k % 1000 == 0:
                    self.logs.append((2, f"client {peer[0]} has {n} connections open, the "
                                         f"port's max_connections_per_client: refused "
                                         f"({k} so far)"))
                return None
            self._per_client[peer[0]] = n + 1
        sid = self._next_sid
        while sid in live or sid == 0:
            sid = (sid + 1) & 0xFFFFFFFF
        self._next_sid = (sid + 1) & 0xFFFFFFFF
        gen = self.gen
        self._reset_ended.pop(sid, None)
        live[sid] = Stream(sid, peer, now, gen, held=not self.ready)
        gen.nstreams += 1
        if not self.ready and self._wake_t0 is None:
            self._wake_t0 = self._wake_mark = now
            self._wake_stage = 0
        self.counters["streams_opened"] += 1
        if self._next_tick is None:
            self._next_tick = now + TICK_INTERVAL
        t = gen.ticked_at
        if t is None or now - t >= TICK_INTERVAL:
            # The guest's clock is stale or was never set (no ticks while the port had
            # no stream; a fresh generation after a reload or a recreated instance): it
            # is told the time before the open it will stamp.
            gen.ticked_at = now
            self.counters["ticks"] += 1
            gen.events.append(abi.Tick(int(now * 1000)))
        self._guest(gen, now, abi.StreamOpen(sid, self.port))
        return sid

    def client_data(self, sid: int, data: bytes, now: float) -> None:
        s = self.streams.get(sid)
        if s is None:
            return
        self.counters["bytes_from_clients"] += len(data)
        if s.mode == SPLICED:
            self._before_splice(s, SEND_UPSTREAM, data)
            return
        if s.transparent:
            s.pending_up += data
            if len(s.pending_up) > self.stream_buffer:
                if s.mode == WAITING:
                    self._out.append((READ_CLIENT, sid, False))
                else:  # the guest holds more than the host keeps a copy of
                    s.transparent = False
                    s.pending_up.clear()
                    s.pending_down.clear()
        if s.mode == GUEST:
            self._client_to_guest(s, data, now)

    def _client_to_guest(self, s: Stream, data: bytes, now: float) -> None:
        """Hand client bytes to the guest, at most CLIENT_CALL_MAX per call (see there).
        A piece's call may end the stream or splice it: the rest then goes where the
        stream went (upstream ahead of the splice, or nowhere once it ended; a stream
        the fallback made a proxy has the rest in its copy already)."""
        sid = s.sid
        step = CLIENT_CALL_MAX
        for i in range(0, len(data), step):
            piece = data if len(data) <= step else data[i:i + step]
            if i:
                s = self.streams.get(sid)  # type: ignore[assignment]
                if s is None:
                    return
                if s.mode == SPLICED:
                    self._before_splice(s, SEND_UPSTREAM, data[i:])
                    return
                if s.mode != GUEST:
                    return
            n = len(piece)
            if self._deferred and (self._deferred + n > DEFER_MAX
                                   or self._deferred_client + n > step):
                self._flush(now)
            s.gen.events.append(abi.StreamData(sid, piece))  # type: ignore[union-attr]
            self._deferred_client += n
            self._data_in(n, now)

    def _before_splice(self, s: Stream, kind: int, data: bytes) -> None:
        """Bytes the shell read from a stream spliced in a call made in the middle of its
        batch of reads (it carries the splice out after the batch, and reads each socket
        once per batch): they were taken from the peer, so they go on, ahead of the
        splice command and so ahead of what the kernel relays after it."""
        out = self._out
        sid = s.sid
        for i in range(len(out) - 1, -1, -1):
            if out[i][0] == SPLICE and out[i][1] == sid:
                out.insert(i, (kind, sid, data))
                self.counters["bytes_to_backends" if kind == SEND_UPSTREAM
                              else "bytes_to_clients"] += len(data)
                return
        # The splice was carried out: the shell reads none of its sockets any more.
        self.counters["sends_dropped"] += 1

    def _make_room(self, n: int, now: float) -> None:
        """Before `n` more bytes join a deferred batch: hand over what it holds if they
        would take it past ``DEFER_MAX``."""
        if self.defer and self._deferred and self._deferred + n > DEFER_MAX:
            self._flush(now)

    def _data_in(self, n: int, now: float) -> None:
        """Bytes for a guest: handed over now, or with the shell's batch (``defer``)
        while that batch holds at most ``DEFER_MAX``."""
        if self.defer:
            self._deferred += n
            if self._deferred <= DEFER_MAX:
                self._now = now
                return
        self._flush(now)

    def flush(self, now: float) -> None:
        """The shell's batch of reads is over: one guest call for all it deferred."""
        self.defer = False
        if self._deferred:
            self._flush(now)

    def client_closed(self, sid: int, now: float, reset: bool = False) -> None:
        self._now = now
        s = self.streams.get(sid)
        if s is None:
            return
        s.client_open = False
        s.client_reset = s.client_reset or reset
        if s.mode == GUEST:
            if reset:
                self._end(s)
                ended = self._reset_ended
                ended[sid] = None
                if len(ended) > self.max_streams:
                    del ended[next(iter(ended))]
            self._guest(s.gen, now, abi.StreamClose(sid))
        elif s.mode == WAITING:
            self._end(s)
            self._update_need()

    def upstream_result(self, sid: int, ok: bool, now: float) -> None:
        self._now = now
        s = self.streams.get(sid)
        if s is None or s.up != UP_CONNECTING:
            return
        s.up = UP_OPEN if ok else UP_NONE
        if not ok:
            self.counters["upstream_failed"] += 1
        elif self._wake_t0 is not None and self._wake_stage == 1:
            self._wake_step(now)
        if s.mode == GUEST:
            self._guest(s.gen, now, abi.UpstreamConnectResult(sid, 1 if ok else 0))
        elif s.mode == WAITING:
            if ok:
                self._proxy(s)
            # else: tried again on the next tick (a refusing backend is not hammered),
            # until the hold timeout
            self._update_need()

    def upstream_data(self, sid: int, data: bytes, now: float) -> None:
        s = self.streams.get(sid)
        if s is None:
            return
        self.counters["bytes_from_backends"] += len(data)
        if s.mode == SPLICED:
            self._before_splice(s, SEND_CLIENT, data)
            return
        if self._wake_stage == 2:
            self.first_byte(now)
        if s.transparent:
            s.pending_down += data
        if s.mode == GUEST:
            self._make_room(len(data), now)
            ev = abi.UpstreamData
            q = s.gen.events  # type: ignore[union-attr]
            for i in range(0, len(data), MAX_CHUNK):
                q.append(ev(sid, data[i:i + MAX_CHUNK]))
            self._data_in(len(data), now)

    def upstream_closed(self, sid: int, now: float) -> None:
        self._now = now
        s = self.streams.get(sid)
        if s is None or s.up in (UP_NONE, UP_CLOSED):
            return
        s.up = UP_CLOSED
        if s.mode == GUEST:
            self._guest(s.gen, now, abi.UpstreamClosed(sid))
        elif s.mode == WAITING:
            self._end(s, close=True)
            self._update_need()

    def first_byte(self, now: float) -> None:
        """A backend's byte reached a client (the shell reports it for spliced pairs):
        the end of a wake in progress."""
        if self._wake_t0 is not None and self._wake_stage == 2:
            self._wake_step(now)
            self.wake_seconds.observe(max(0.0, now - self._wake_t0))
            self._wake_t0 = None

    @property
    def waking(self) -> bool:
        """A wake waits for its first byte (the shell reports it for spliced pairs)."""
        return self._wake_t0 is not None and self._wake_stage == 2

    def _wake_step(self, now: float) -> None:
        phase = WAKE_PHASES[self._wake_stage]
        self.wake_phase_seconds[phase].observe(max(0.0, now - self._wake_mark))
        self._wake_mark = now
        self._wake_stage += 1

    def splice_ended(self, sid: int, now: float) -> None:
        """A spliced pair has ended on both sides (the shell closed it)."""
        s = self.streams.get(sid)
        if s is None or s.mode != SPLICED:
            return
        self._remove(s)
        self.counters["streams_closed"] += 1
        if s.guest_splice:
            self._guest(s.gen, now, abi.StreamClose(sid))

    def backends(self, ready: list[str], now: float) -> None:
        """The service's ready backends (addresses) changed."""
        self._now = now
        if ready and not self.ready:
            # Streams with no upstream wait for this backend like held ones.
            for s in self.streams.values():
                if s.up == UP_NONE:
                    s.held = True
        self.ready = list(ready)
        has = bool(self.ready)
        for g in self.gens:
            if has != g.told_ready:
                g.told_ready = has
                g.events.append(abi.BackendAvailable() if has else abi.BackendUnavailable())
        self._flush(now)
        if has:
            for s in list(self.streams.values()):
                if s.mode == WAITING and s.up == UP_NONE:
                    self._connect(s, self.target_port)
        if self._bursts and self._pump(now):
            self._flush(now)
        self._update_need()

    # --- timers -------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        t = self._next_tick if self.streams or self.gen.tail_tick else None
        for b in self._bursts.values():
            if b.queue and (t is None or b.until < t):
                t = b.until
        return t

    def handle_timer(self, now: float) -> None:
        if self._bursts:
            self._now = now
            if self._pump(now):
                self._flush(now)
        if not self.streams and not self.gen.tail_tick:
            self._next_tick = None
            return
        t = self._next_tick
        if t is not None and now < t:
            return
        self._next_tick = now + TICK_INTERVAL
        self._now = now
        for s in list(self.streams.values()):
            if s.mode == WAITING:
                if now - s.opened >= self.hold_timeout:
                    self.counters["fallback_timeouts"] += 1
                    self._end(s, close=True)
                elif s.up == UP_NONE and self.ready:
                    self._connect(s, self.target_port)
        tick = abi.Tick(int(now * 1000))
        for g in self.gens:
            if g.nstreams or g.tail_tick:
                g.tail_tick = False
                g.ticked_at = now
                self.counters["ticks"] += 1
                g.events.append(tick)
        self._flush(now)

    # --- output -------------------------------------------------------------------------

    def commands(self) -> list[Command]:
        out = self._out
        self._out = []
        return out

    # --- the guest ----------------------------------------------------------------------

    def _guest(self, g: Generation | None, now: float, ev: abi.Event) -> None:
        if g is not None:
            g.events.append(ev)
        self._flush(now)

    def _flush(self, now: float) -> None:
        self._now = now
        self._deferred = self._deferred_client = 0
        busy = True
        while busy:
            busy = False
            gens = self.gens
            for g in (gens if len(gens) == 1 else list(gens)):
                if not g.events:
                    continue
                busy = True
                if g.hello:
                    g.hello = False
                    has = bool(self.ready)
                    g.told_ready = has
                    if has:
                        g.events.insert(0, abi.BackendAvailable())
                events = g.events
                g.events = []
                actions = g.guest.process(self.port, events, g.nstreams)
                if actions is None:
                    self._fallback(g)
                    continue
                for a in actions:
                    self._apply(a, g)
            if self._bursts and self._pump(now):
                busy = True
        self._update_need()

    def _apply(self, a: abi.Action, g: Generation) -> None:
        counters = self.counters
        k = a.KIND
        if k == abi.ACT_SET_BACKEND_NEED:
            g.need = a.need  # type: ignore[union-attr]
            return
        if k == abi.ACT_LOG:
            self.logs.append((a.level, a.message))  # type: ignore[union-attr]
            return
        if k == abi.ACT_COUNT:
            name, n = a.name, a.n  # type: ignore[union-attr]
            gc = self.guest_counters
            if name in gc:
                gc[name] += n
            elif len(gc) < MAX_GUEST_COUNTERS and _COUNTER_NAME.match(name):
                gc[name] = n
            else:
                counters["count_refused"] += 1
            return
        sid = getattr(a, "stream_id", None)
        s = self.streams.get(sid) if sid is not None else None
        if s is None and sid in self._reset_ended:
            counters["late_actions"] += 1  # for a stream the client reset: moot
            if k == abi.ACT_DOWNSTREAM_CLOSE:
                del self._reset_ended[sid]
            return
        if s is None or s.mode != GUEST or s.gen is not g:
            counters["bad_actions"] += 1
            return
        if k == abi.ACT_DOWNSTREAM_SEND:
            data = a.data  # type: ignore[union-attr]
            if s.client_reset:
                counters["sends_dropped"] += 1
                return
            if s.transparent:
                self._match(s, s.pending_down, data)
            counters["bytes_to_clients"] += len(data)
            self._out.append((SEND_CLIENT, s.sid, data))
        elif k == abi.ACT_UPSTREAM_SEND:
            data = a.data  # type: ignore[union-attr]
            if s.up not in (UP_CONNECTING, UP_OPEN):
                counters["sends_dropped"] += 1
                return
            if s.transparent:
                self._match(s, s.pending_up, data)
            counters["bytes_to_backends"] += len(data)
            if s.paced:
                s.paced_sends.append(data)  # after its CONNECT
                s.paced_bytes += len(data)
                if s.paced_bytes > self.stream_buffer and not s.pace_paused:
                    s.pace_paused = True  # bounded: the client waits with its connect
                    self._out.append((READ_CLIENT, s.sid, False))
            else:
                self._out.append((SEND_UPSTREAM, s.sid, data))
        elif k == abi.ACT_UPSTREAM_CONNECT or k == abi.ACT_UPSTREAM_CONNECT_LIKE:
            port = a.port or self.target_port  # type: ignore[union-attr]
            like = self.streams.get(a.like) if k == abi.ACT_UPSTREAM_CONNECT_LIKE else None  # type: ignore[union-attr]
            if s.up in (UP_CONNECTING, UP_OPEN) or not self._connect(
                    s, port, like.backend if like is not None else None):
                g.events.append(abi.UpstreamConnectResult(s.sid, 0))
        elif k == abi.ACT_DOWNSTREAM_CLOSE:
            self._end(s, close=True)
        elif k == abi.ACT_UPSTREAM_CLOSE:
            if s.up in (UP_CONNECTING, UP_OPEN):
                s.up = UP_CLOSED
                if not s.paced:
                    self._out.append((CLOSE_UPSTREAM, s.sid, None))
                elif s.paced_sends:
                    s.paced_sends.append(None)  # connect, send, then close
                else:
                    s.paced = PACE_NONE  # nothing to send: no connect at all
        elif k == abi.ACT_PAUSE:
            s.guest_paused = True
            self._out.append((READ_CLIENT, s.sid, False))
        elif k == abi.ACT_RESUME:
            s.guest_paused = False
            self._out.append((READ_CLIENT, s.sid, True))
        elif k == abi.ACT_SPLICE:
            if s.up != UP_OPEN:
                counters["splice_refused"] += 1
                return
            s.mode = SPLICED
            s.guest_splice = True
            s.pending_up.clear()
            s.pending_down.clear()
            counters["spliced"] += 1
            self._out.append((SPLICE, s.sid, None))
        else:
            counters["bad_actions"] += 1  # a packet action on a stream port

    @staticmethod
    def _match(s: Stream, pending: bytearray, data: bytes) -> None:
        """Keep `s` transparent only while `data` is exactly the next pending bytes."""
        n = len(data)
        if pending[:n] == data:
            del pending[:n]
        else:
            s.transparent = False
            s.pending_up.clear()
            s.pending_down.clear()

    def _connect(self, s: Stream, port: int, prefer: str | None = None) -> bool:
        """Connect `s` to a ready backend: `prefer` while it is one (upstream_connect_like:
        another stream's backend), else the hash of the client's address and port."""
        backend = self._pick(s, prefer)
        if backend is None:
            self.counters["upstream_no_backend"] += 1
            return False
        s.up = UP_CONNECTING
        s.backend = backend
        if (s.held or self._bursts) and self._pace(s, backend, port):
            return True
        s.held = False
        self.counters["upstream_connects"] += 1
        self._out.append((CONNECT, s.sid, (backend, port)))
        return True

    def _pick(self, s: Stream, prefer: str | None) -> str | None:
        ready = self.ready
        if not ready:
            return None
        if prefer is not None and prefer in ready:
            return prefer
        ip, cport = s.peer
        try:
            key = int(ipaddress.IPv4Address(ip)) * 65537 + cport
        except ValueError:
            key = s.sid
        return ready[(key * 0x9E3779B1 >> 7) % len(ready)]

    # --- pacing a wake's connects -------------------------------------------------------

    def _pace(self, s: Stream, backend: str, port: int) -> bool:
        """Whether `s`'s connect to `backend` waits its turn (the next ``_pump`` starts
        it, maybe at once): a held stream's always does, another's only while that
        backend's burst is in progress."""
        b = self._bursts.get(backend)
        now = self._now
        if b is not None and not b.queue and now >= b.until:
            del self._bursts[backend]  # that burst is over
            b = None
        if b is None:
            if not s.held:
                return False
            b = self._bursts[backend] = _Burst(now)
        s.paced = PACE_QUEUED
        s.port = port
        # in arrival order, whatever order the guest asked in
        bisect.insort(b.queue, s, key=_arrival)
        return True

    def _pump(self, now: float) -> bool:
        """Start the waiting connects whose turn it is; True when a guest has events to
        hear (a connect whose backend went away with no other ready)."""
        told = False
        burst, interval = self.release_burst, self.release_interval
        moved: list[Stream] = []
        out = self._out
        for backend, b in list(self._bursts.items()):
            if not b.queue:
                if now >= b.until:
                    del self._bursts[backend]
                continue
            if now >= b.until:
                b.until = now + interval
                b.used = 0
            gone = backend not in self.ready
            keep: list[Stream] = []
            for s in b.queue:
                if not s.paced or self.streams.get(s.sid) is not s:
                    continue  # it ended, or its connect was called off
                if gone:
                    moved.append(s)
                    continue
                if b.used >= burst:
                    keep.append(s)
                    if s.paced == PACE_QUEUED:
                        s.paced = PACE_COUNTED
                        self.counters["release_paced"] += 1
                    continue
                b.used += 1
                s.paced = PACE_NONE
                s.held = False
                self.counters["upstream_connects"] += 1
                out.append((CONNECT, s.sid, (backend, s.port)))
                for data in s.paced_sends:
                    out.append((SEND_UPSTREAM, s.sid, data) if data is not None
                               else (CLOSE_UPSTREAM, s.sid, None))
                s.paced_sends.clear()
                s.paced_bytes = 0
                if s.pace_paused:
                    s.pace_paused = False
                    if not s.guest_paused:
                        out.append((READ_CLIENT, s.sid, True))
            b.queue = keep
            if gone:
                del self._bursts[backend]
        for s in moved:  # its backend went away: another one's burst, or a failure
            s.paced = PACE_NONE
            backend = self._pick(s, None) if s.up == UP_CONNECTING else None
            if backend is not None:
                s.backend = backend
                s.held = True  # it keeps its place in a wake
                self._pace(s, backend, s.port)
                continue
            s.paced_sends.clear()
            s.paced_bytes = 0
            s.held = False
            if s.up != UP_CONNECTING:
                continue  # the guest closed it meanwhile: nothing to tell
            s.up = UP_NONE
            self.counters["upstream_no_backend"] += 1
            if s.mode == GUEST and s.gen is not None:
                s.gen.events.append(abi.UpstreamConnectResult(s.sid, 0))
                told = True
        if moved and any(b.queue for b in self._bursts.values()):
            told = self._pump(now) or told
        return told

    def _end(self, s: Stream, close: bool = False) -> None:
        """The core is done with `s`: close what is open (after flushing) and forget it."""
        if not self._remove(s):
            return
        self.counters["streams_closed"] += 1
        out = self._out
        if close and not s.client_reset:
            out.append((CLOSE_CLIENT, s.sid, None))
        if s.up in (UP_CONNECTING, UP_OPEN):
            out.append((CLOSE_UPSTREAM, s.sid, None))
        out.append((FORGET, s.sid, None))

    def _remove(self, s: Stream) -> bool:
        """Forget `s`; a generation left with no stream (and replaced) is retired."""
        if self.streams.pop(s.sid, None) is None:
            return False
        if self.max_per_client:
            ip = s.peer[0]
            n = self._per_client.get(ip, 0) - 1
            if n > 0:
                self._per_client[ip] = n
            else:
                self._per_client.pop(ip, None)
        s.paced = PACE_NONE  # a connect still waiting its turn is called off
        if s.mode == WAITING:
            self._waiting -= 1
        g = s.gen
        if g is not None:
            g.nstreams -= 1
            if g.nstreams == 0:
                if g is not self.gen:
                    self._retire(g)
                else:
                    g.tail_tick = True
        return True

    # --- the fallback -------------------------------------------------------------------

    def _fallback(self, g: Generation) -> None:
        """The guest failed (ABI.md): its events are not lost; its streams go on without
        it as proxies when it only relayed their bytes, and close otherwise."""
        self.counters["guest_failures"] += 1
        g.need = abi.NEED_NONE
        for s in list(self.streams.values()):
            if s.mode != GUEST or s.gen is not g:
                continue
            if not s.transparent or s.client_reset:
                self.counters["fallback_closed"] += 1
                self._end(s, close=True)
                continue
            self.counters["fallback_proxied"] += 1
            s.mode = WAITING
            self._waiting += 1
            if s.up == UP_OPEN:
                self._proxy(s)
            elif s.up == UP_NONE or s.up == UP_CLOSED:
                if s.up == UP_CLOSED:
                    self.counters["fallback_closed"] += 1
                    self._end(s, close=True)
                else:
                    self._connect(s, self.target_port)
        # The new instance hears where the backends stand with the next call (not in
        # this one: a guest failing on every call must not keep this loop going).
        g.hello = True
        g.ticked_at = None  # the recreated instance has no clock yet

    def _proxy(self, s: Stream) -> None:
        """A waiting transparent stream has its upstream: what the guest had not passed on
        goes first, then the shell relays the pair."""
        out = self._out
        if s.pending_up:
            out.append((SEND_UPSTREAM, s.sid, bytes(s.pending_up)))
        if s.pending_down and not s.client_reset:
            out.append((SEND_CLIENT, s.sid, bytes(s.pending_down)))
        s.pending_up.clear()
        s.pending_down.clear()
        s.mode = SPLICED  # the host's own: the guest is not told when it ends
        self._waiting -= 1
        self.counters["spliced"] += 1
        out.append((SPLICE, s.sid, None))

    def _update_need(self) -> None:
        self.need = need = abi.NEED_ACTIVE if self._waiting else self.guest_need
        if need == abi.NEED_ACTIVE and self._wake_t0 is not None and self._wake_stage == 0:
            self._wake_step(self._now)

    # --- status -------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        modes = [0, 0, 0]
        for s in self.streams.values():
            modes[s.mode] += 1
        return {"streams": len(self.streams), "generation": self.gen.number,
                "generations_live": len(self.gens), "relayed_by_guest": modes[GUEST],
                "waiting": modes[WAITING], "spliced": modes[SPLICED],
                "need": ("none", "traffic", "active")[self.need],
                "connects_paced": sum(len(b.queue) for b in self._bursts.values()),
                "counters": dict(self.counters), "guest_counters": dict(self.guest_counters),
                "wake": _summary(self.wake_seconds),
                "phases": {p: _summary(h) for p, h in self.wake_phase_seconds.items()}}


def _arrival(s: Stream) -> tuple[float, int]:
    return s.opened, s.sid


def _summary(h: Histogram) -> dict[str, float]:
    """A histogram for people (the metrics export the buckets)."""
    snap = h.snapshot()
    n = snap.count
    return {"count": n, "mean_ms": round(snap.sum / n * 1000, 3) if n else 0.0}
