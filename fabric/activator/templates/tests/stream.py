"""{{name}} through fabricd's real activator host (the wasmtime sandbox the daemon runs)."""

from __future__ import annotations

from pathlib import Path

from fabric.activator import abi as A
from fabric.activator.streamguest import StreamGuest


def test_a_connection_is_held_then_spliced(wasm: Path) -> None:
    g = StreamGuest(wasm, {"hold_timeout_ms": 30000})
    try:
        assert g.open(1) == [A.Pause(1), A.SetBackendNeed(A.NEED_ACTIVE)]
        assert g.available() == [A.UpstreamConnect(1, 0)]
        assert g.connected(1) == [A.Resume(1), A.Splice(1)]
        assert g.client_close(1) == [A.SetBackendNeed(A.NEED_NONE)]
        assert g.failed == 0
    finally:
        g.close()


def test_a_held_connection_times_out(wasm: Path) -> None:
    g = StreamGuest(wasm, {"hold_timeout_ms": 1000})
    try:
        g.open(1)
        assert g.tick(500) == []
        assert g.tick(1500)[:3] == [A.Log(A.LOG_INFO, "{{name}}: held connection timed out"),
                                    A.Count(1, "timeouts"), A.DownstreamClose(1)]
        assert g.need == A.NEED_NONE
    finally:
        g.close()
