"""The simulated backend: a captured server's side, replayed to one upstream connection.

A replay cannot run the real server, and the guest's upstream traffic need not be the
client's bytes (a stream activator answers some requests itself, or rewrites them), so
the backend is the capture's server side paced by what the guest sends it:

- Each server chunk was sent, in the capture, after the client had sent ``client_before``
  bytes. It is released once the backend has *received* that many client bytes, after
  the delay it had in the capture (the time from the client's byte that completed that
  count to the chunk; a greeting sent before any client byte, from the connection's start).
- What the guest sends upstream is located in the client's byte stream: bytes that are
  the client's next bytes, or the client's bytes further on (the ones in between were
  answered locally and never reached the backend), advance a *verbatim* position;
  anything else (a rewritten protocol such as re-encoded HTTP/2) counts as a *turn*: the
  position moves to the client bytes the guest has been given so far (it may stand for
  any of them, and it cannot have forwarded what it has not received), at most once per
  reply released, so a rewriting guest gets one reply per message it sends.
- Replies go in the order the server sent them: one never overtakes an earlier one.
- A server reply caused only by client bytes the guest never forwarded is dropped: the
  server would never have sent it (a keep-alive answered locally has no backend answer).

Limits: the server's bytes are what it sent to the captured client; requests of the
guest's own (a statement it prepares on the backend) get no answer; a rewriting guest
is paced by byte counts only.
"""

from __future__ import annotations

from collections import deque

from fabric.activator.harness.tcpflows import Conversation, ServerChunk

SEARCH_WINDOW = 1 << 20  # how far ahead forwarded bytes are looked for
MIN_SEARCH = 4  # shorter sends are matched only in place


class SimBackend:
    """One upstream connection's server, replaying one captured conversation."""

    def __init__(self, conv: Conversation | None) -> None:
        self.conv = conv
        events = conv.client_events if conv is not None else []
        self.client = b"".join(e.data for e in events)
        # when each client byte count was reached, for the replies' delays
        marks: list[tuple[int, float]] = [(0, conv.opened if conv is not None else 0.0)]
        n = 0
        for e in events:
            if e.data:
                n += len(e.data)
                marks.append((n, e.ts))
        self._marks = marks
        self.chunks: deque[ServerChunk] = deque(conv.server_chunks if conv else ())
        self.verbatim = 0  # end of the last client bytes matched as forwarded
        self.progress = 0  # client bytes the backend counts as received
        self.skipped: list[tuple[int, int]] = []  # client bytes never forwarded
        self.received = 0  # bytes the guest sent
        self.rewritten = 0  # of which did not match the client's
        self._prev_before = 0
        self._prev_released = True
        self.dropped = 0  # replies dropped: their cause never reached the backend
        self._last = 0.0  # when the latest released chunk goes
        self._turn = True  # a rewritten send may stand for the client's bytes so far

    def receive(self, data: bytes, given: int) -> None:
        """The guest sent `data` upstream, having been given `given` client bytes."""
        n = len(data)
        if not n:
            return
        self.received += n
        v, c = self.verbatim, self.client
        if c[v:v + n] == data:
            self.verbatim = v + n
        else:
            idx = c.find(data, v, v + SEARCH_WINDOW + n) if n >= MIN_SEARCH else -1
            if idx > v:
                self.skipped.append((v, idx))
                self.verbatim = idx + n
            else:
                self.rewritten += n
                if self._turn:
                    self._turn = False
                    self.progress = max(self.progress, given)
        self.progress = max(self.progress, self.verbatim)

    def due(self, now: float) -> list[tuple[float, ServerChunk]]:
        """Chunks that may go now, each with the time it goes."""
        out: list[tuple[float, ServerChunk]] = []
        chunks = self.chunks
        while chunks and chunks[0].client_before <= self.progress:
            ch = chunks.popleft()
            before = ch.client_before
            if before != self._prev_before:
                self._prev_released = not self._unasked(self._prev_before, before)
                self._prev_before = before
            if not self._prev_released and ch.data:
                self.dropped += 1
                continue
            at = max(self._last, now + max(0.0, ch.ts - self._reached(before)))
            self._last = at
            out.append((at, ch))
            self._turn = True
        return out

    def _unasked(self, a: int, b: int) -> bool:
        """Whether client bytes [a, b) all lie in what the guest never forwarded."""
        return any(s <= a and b <= e for s, e in self.skipped)

    def _reached(self, count: int) -> float:
        for n, ts in self._marks:
            if n >= count:
                return ts
        return self._marks[-1][1]
