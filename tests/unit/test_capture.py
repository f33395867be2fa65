"""Capture queues: bounded in frames and bytes for a reader that does not keep up."""

from __future__ import annotations

import asyncio

from fabric.router.model import Port
from fabric.runtime.capture import QUEUE_BYTES, CaptureHub


def test_a_slow_capture_reader_costs_at_most_queue_bytes() -> None:
    async def main() -> None:
        port = Port(vnet=True, mtu=1500)
        hub = CaptureHub(port, 0.0)
        sub = hub.add(None)
        frame = bytes(65000)  # a TSO super-frame
        for i in range(8192):
            hub.feed(float(i), frame, False)
        assert sub.queued_bytes <= QUEUE_BYTES
        assert sub.dropped == 8192 - QUEUE_BYTES // len(frame)
        ts, got = await sub.__anext__()
        assert ts == 0.0 and got == frame
        assert sub.queued_bytes == (QUEUE_BYTES // len(frame) - 1) * len(frame)
        hub.feed(9999.0, frame, False)  # room again for one
        assert sub.dropped == 8192 - QUEUE_BYTES // len(frame)
        sub.close()
        assert port.capture is None

    asyncio.run(main())
