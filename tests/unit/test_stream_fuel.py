"""A client cannot run a stream guest out of fuel with one read (found by the hostile
campaign, tests/e2e/test_hostile_streams.py): 64 KiB of HTTP/2 frames that each open a
stream past the limit cost the http2 guest ~32 M fuel units in one call, the budget is
20 M, and the fallback closed every connection of the port. The host now hands a guest
at most CLIENT_CALL_MAX client bytes per call (fabric.streams.core); here the real
http2 guest behind a StreamCore takes each flood of a 64 KiB read (and several clients'
reads in one batch) with every call under half the budget and no guest failure."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import pytest

from fabric.activator import abi
from fabric.activator.host import ActivatorHost
from fabric.streams import core as sc
from fabric.streams.core import StreamCore
from tests.support.hostile_streams import H2_PREFACE, h2_frame, h2_headers, h2_settings

WASM = Path(__file__).resolve().parents[2] / "activators" / "http2" / "http2.wasm"
READ = 64 << 10


def _rapid_reset(n: int) -> bytes:
    return b"".join(h2_headers(2 * i + 1, end_stream=True)
                    + h2_frame(3, 0, 2 * i + 1, struct.pack("!I", 8)) for i in range(n))


FLOODS = {
    "rapid_reset": _rapid_reset(2500),
    "headers_past_the_limit": b"".join(h2_headers(2 * i + 1, end_stream=True)
                                       for i in range(5100)),
    "trailers": b"".join(h2_headers(2 * i + 1) + h2_frame(1, 5, 2 * i + 1, b"\x40\x01a\x01b")
                         for i in range(2500)),
    "settings_of_60_entries": h2_settings([(4, 65535)] * 60) * 200,
    "pings": h2_frame(6, 0, 0, b"pingpong") * 4000,
}


class Metered:
    """The real host, with the fuel of each call kept."""

    def __init__(self) -> None:
        self.host = ActivatorHost(str(WASM), {})
        self.fuel: list[int] = []

    def process(self, port: int, events: Sequence[abi.Event], streams: int = 0
                ) -> list[abi.Action] | None:
        out = self.host.process(port, events, streams)
        self.fuel.append(self.host.instance(port).last_fuel)
        return out


@pytest.mark.parametrize("flood", sorted(FLOODS))
def test_a_64_KiB_read_of_a_flood_stays_within_the_fuel(flood: str) -> None:
    guest = Metered()
    try:
        core = StreamCore(guest, 80, 8080)
        core.backends(["10.0.0.3"], 0.0)
        sid = core.accepted(("10.0.0.2", 40000), 0.0)
        assert sid is not None
        core.client_data(sid, H2_PREFACE + h2_settings(), 0.0)
        data = FLOODS[flood][:READ]
        assert len(data) == READ
        core.client_data(sid, data, 0.01)
        assert core.counters["guest_failures"] == 0, guest.host.instance(80).last_failure
        assert max(guest.fuel) <= guest.host.fuel_per_call // 2, (flood, guest.fuel)
    finally:
        guest.host.close()


def test_several_clients_flooding_in_one_batch_stay_within_the_fuel() -> None:
    """A wakeup's reads of four clients, 16 KiB of refused streams each, batched."""
    guest = Metered()
    try:
        core = StreamCore(guest, 80, 8080)
        core.backends(["10.0.0.3"], 0.0)
        sids = [core.accepted(("10.0.0.2", 40000 + i), 0.0) for i in range(4)]
        for sid in sids:
            assert sid is not None
            core.client_data(sid, H2_PREFACE + h2_settings(), 0.0)
        flood = FLOODS["headers_past_the_limit"]
        core.defer = True
        for sid in sids:
            assert sid is not None
            core.client_data(sid, flood[:READ // 4], 0.01)
        core.flush(0.01)
        assert core.counters["guest_failures"] == 0
        assert max(guest.fuel) <= guest.host.fuel_per_call // 2, guest.fuel
        assert sc.CLIENT_CALL_MAX <= READ // 4
    finally:
        guest.host.close()
