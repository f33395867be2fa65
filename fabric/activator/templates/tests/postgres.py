"""{{name}} through fabricd's real activator host (the wasmtime sandbox the daemon runs)."""

from __future__ import annotations

import struct
from pathlib import Path

from fabric.activator import abi as A
from fabric.activator.streamguest import StreamGuest

SSL_REQUEST = struct.pack(">II", 8, 80877103)
STARTUP = (lambda body: struct.pack(">I", len(body) + 4) + body)(
    struct.pack(">I", 196608) + b"user\0app\0database\0app\0\0")


def test_ssl_is_refused_locally_then_startup_wakes_and_goes_upstream(wasm: Path) -> None:
    g = StreamGuest(wasm)
    try:
        g.open(1)
        g.client(1, SSL_REQUEST)
        assert g.to_client(1) == b"N" and g.need == A.NEED_NONE  # answered, nothing woken
        assert g.client(1, STARTUP) == [A.Count(1, "startups_woke"), A.Pause(1),
                                        A.SetBackendNeed(A.NEED_ACTIVE)]
        assert g.available() == [A.UpstreamConnect(1, 0)]
        g.connected(1)
        assert g.to_backend(1) == STARTUP and g.streams[1].spliced
    finally:
        g.close()


def test_a_silent_connection_wakes_nothing(wasm: Path) -> None:
    g = StreamGuest(wasm)
    try:
        assert g.open(1) == [A.SetBackendNeed(A.NEED_NONE)]
        assert g.client_close(1) == [A.DownstreamClose(1)]
        assert g.failed == 0
    finally:
        g.close()
