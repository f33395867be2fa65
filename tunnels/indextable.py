"""Local index -> session or pending handshake, the first lookup for every message to us.

Indices are random 32-bit values (so they reveal nothing and are hard to guess); the
table is bounded, and a full table refuses new handshakes rather than evicting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class IndexTable:
    """A bounded dict of random 32-bit indices."""

    ATTEMPTS = 16

    def __init__(self, rng: Callable[[int], bytes], max_entries: int) -> None:
        self._rng = rng
        self.max_entries = max_entries
        self.entries: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def allocate(self, value: Any) -> int | None:
        """A fresh index now mapping to ``value``, or None when full (or the rng repeats)."""
        if len(self.entries) >= self.max_entries:
            return None
        entries = self.entries
        for _ in range(self.ATTEMPTS):
            index = int.from_bytes(self._rng(4), "little")
            if index not in entries:
                entries[index] = value
                return index
        return None

    def replace(self, index: int, value: Any) -> None:
        """Point an index we own at a new value (a handshake becoming its session)."""
        self.entries[index] = value

    def free(self, index: int, value: Any) -> None:
        """Forget ``index`` if it still maps to ``value``."""
        if self.entries.get(index) is value:
            del self.entries[index]
