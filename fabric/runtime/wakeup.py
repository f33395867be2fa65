"""Waking an event-loop reader from the data-plane thread, at most once per wakeup.

A data-plane push that called `call_soon_threadsafe` for every frame would write the
loop's self-pipe per frame. `Wakeup.notify()` schedules one wake and then stays quiet
until the loop has run it; the reader `await wait()`s with its queue empty.
"""

from __future__ import annotations

import asyncio


class Wakeup:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()
        self._signalled = False

    def notify(self) -> None:
        """From any thread."""
        if not self._signalled:
            self._signalled = True
            try:
                self._loop.call_soon_threadsafe(self._signal)
            except RuntimeError:  # the loop is closed: nobody is reading any more
                pass

    def set(self) -> None:
        """On the loop (a close): wake the reader now."""
        self._event.set()

    def _signal(self) -> None:
        self._signalled = False
        self._event.set()

    async def wait(self) -> None:
        self._event.clear()
        await self._event.wait()
