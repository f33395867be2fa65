"""Sliding-window replay filter for data counters (RFC 6479 idea, bitmap as a Python int).

The window is the ``WINDOW`` counters ending at the greatest counter accepted so far.
``check`` is the cheap pre-filter run before decryption; ``update`` is the commit run
only after the AEAD tag verified, so forged packets can never move the window.
"""

from __future__ import annotations

WINDOW = 2048
# Counters at or past this are refused: the sender must rekey long before (WireGuard's
# REJECT_AFTER_MESSAGES bound, 2^64 - 2^13).
COUNTER_LIMIT = (1 << 64) - (1 << 13)
WINDOW_MASK = (1 << WINDOW) - 1


class ReplayFilter:
    """Which counters in the window have been seen; bit i is counter ``top - i``."""

    __slots__ = ("top", "bits")

    def __init__(self) -> None:
        self.top = -1
        self.bits = 0

    def check(self, counter: int) -> bool:
        """False when ``counter`` is too old, a duplicate, or near wrap-around."""
        if counter >= COUNTER_LIMIT:
            return False
        top = self.top
        if counter > top:
            return True
        age = top - counter
        return age < WINDOW and not (self.bits >> age) & 1

    def update(self, counter: int) -> bool:
        """Record ``counter`` as seen; False (and no change) if ``check`` would refuse it."""
        if counter >= COUNTER_LIMIT:
            return False
        top = self.top
        if counter > top:
            shift = counter - top
            self.bits = ((self.bits << shift) | 1) & WINDOW_MASK if shift < WINDOW else 1
            self.top = counter
            return True
        age = top - counter
        if age >= WINDOW:
            return False
        bit = 1 << age
        if self.bits & bit:
            return False
        self.bits |= bit
        return True
