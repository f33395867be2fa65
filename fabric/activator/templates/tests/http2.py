"""{{name}} through fabricd's real activator host (the wasmtime sandbox the daemon runs)."""

from __future__ import annotations

import struct
from pathlib import Path

from fabric.activator import abi as A
from fabric.activator.streamguest import StreamGuest

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, payload: bytes = b"", flags: int = 0, stream: int = 0) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + \
        struct.pack(">I", stream) + payload


SETTINGS, PING = frame(4), frame(6, bytes(8))
HEADERS = frame(1, b"\x82\x86\x84", flags=0x5, stream=1)  # GET / (HPACK static table)


def test_settings_and_pings_wake_nothing_a_request_wakes(wasm: Path) -> None:
    g = StreamGuest(wasm)
    try:
        assert g.open(1) == [A.SetBackendNeed(A.NEED_NONE)]
        assert g.client(1, PREFACE + SETTINGS) == []
        assert g.client(1, PING) == []
        assert g.client(1, HEADERS) == [A.Count(1, "requests_woke"), A.Pause(1),
                                        A.SetBackendNeed(A.NEED_ACTIVE)]
        assert g.available() == [A.UpstreamConnect(1, 0)]
        g.connected(1)
        assert g.to_backend(1) == PREFACE + SETTINGS + PING + HEADERS  # every byte, in order
        assert g.streams[1].spliced and not g.streams[1].paused
    finally:
        g.close()


def test_a_connection_that_never_asks_is_closed_when_it_ends(wasm: Path) -> None:
    g = StreamGuest(wasm)
    try:
        g.open(1)
        g.client(1, PREFACE + SETTINGS)
        assert g.client_close(1) == [A.DownstreamClose(1)]
        assert g.failed == 0
    finally:
        g.close()
