"""upstream_connect_like (activators/ABI.md): a stream connects to the backend another
live stream is on, while that backend is ready, whatever its own client's address.

Why: the host picks a backend per connection by a hash of the client's address and
port, and a PostgreSQL CancelRequest comes on a connection of its own; the guest knows
which session it names, the host which backend that session is on. The PostgreSQL
activator's use of it: tests/unit/test_cancel_routing.py.
"""

from __future__ import annotations

from collections.abc import Sequence

from fabric.activator import abi
from fabric.streams import core as sc
from fabric.streams.core import StreamCore

BACKENDS = ["10.0.0.3", "10.0.0.4"]


class Scripted:
    """Stream 1 connects as usual; every later stream connects like stream 1."""

    def __init__(self, like: int = 1) -> None:
        self.like = like

    def process(self, port: int, events: Sequence[abi.Event], streams: int = 0
                ) -> list[abi.Action]:
        out: list[abi.Action] = []
        for e in events:
            if isinstance(e, abi.StreamOpen):
                out.append(abi.UpstreamConnect(e.stream_id, 0) if e.stream_id == 1
                           else abi.UpstreamConnectLike(e.stream_id, 0, self.like))
        return out


def connect_of(core: StreamCore, sid: int) -> str:
    (cmd,) = [c for c in core.commands() if c[0] == sc.CONNECT and c[1] == sid]
    return cmd[2][0]  # type: ignore[index]


def test_connect_like_goes_to_the_other_streams_backend_whatever_the_client() -> None:
    core = StreamCore(Scripted(), 5432, 5432)
    core.backends(BACKENDS, 0.0)
    first = core.accepted(("10.0.0.2", 30000), 0.0)
    assert first == 1
    backend = connect_of(core, first)
    for i in range(1, 40):  # the hash alone would pick the other replica for about half
        sid = core.accepted(("10.0.0.2", 30000 + i), 0.0)
        assert sid is not None and connect_of(core, sid) == backend


def test_connect_like_falls_back_to_the_hash_when_that_backend_is_gone() -> None:
    core = StreamCore(Scripted(), 5432, 5432)
    core.backends(BACKENDS, 0.0)
    first = core.accepted(("10.0.0.2", 30000), 0.0)
    assert first is not None
    gone = connect_of(core, first)
    core.backends([b for b in BACKENDS if b != gone], 0.1)
    core.commands()
    sid = core.accepted(("10.0.0.2", 30001), 0.2)
    assert sid is not None and connect_of(core, sid) != gone


def test_connect_like_an_unknown_stream_is_a_plain_connect() -> None:
    core = StreamCore(Scripted(like=999), 5432, 5432)
    core.backends(BACKENDS, 0.0)
    chosen = set()
    for i in range(40):
        sid = core.accepted(("10.0.0.2", 31000 + i), 0.0)
        assert sid is not None
        chosen.add(connect_of(core, sid))
    assert chosen == set(BACKENDS) and core.counters["bad_actions"] == 0


def test_the_action_round_trips_through_the_codec() -> None:
    a = abi.UpstreamConnectLike(7, 5433, 3)
    assert abi.decode_actions(abi.encode_batch([a])) == [a]


