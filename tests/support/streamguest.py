"""The stream test helper lives in the package now (fabric/activator/streamguest.py), so
activator projects can use it; re-exported for the suite's imports."""

from fabric.activator.streamguest import StreamGuest, StreamView

__all__ = ["StreamGuest", "StreamView", "fuzz_step"]


def fuzz_step(g: StreamGuest, op: int, sid: int, pieces: list[bytes], ok: bool,
              now: int) -> int:
    """One host event of a fuzzed sequence, chosen by `op` (0-9): open, client bytes (1, 2),
    backend bytes, a connect result, a tick 150 ms later, backends available/unavailable,
    client or backend close. Bytes go in as `pieces`, one event each. Returns the clock."""
    if op == 0:
        g.open(sid)
    elif op in (1, 2):
        for p in pieces:
            g.client(sid, p)
    elif op == 3:
        for p in pieces:
            g.backend(sid, p)
    elif op == 4:
        g.connected(sid, ok=ok)
    elif op == 5:
        now += 150
        g.tick(now)
    elif op == 6:
        g.available()
    elif op == 7:
        g.unavailable()
    elif op == 8:
        g.client_close(sid)
    else:
        g.backend_close(sid)
    return now
