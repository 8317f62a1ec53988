"""The worker's one clock, so tests can replace it."""

from __future__ import annotations

import time


def now_s() -> float:
    """Wall-clock seconds since the epoch (for records and events)."""
    return time.time()


def monotonic_s() -> float:
    """Seconds on a clock that never goes back (for durations and deadlines)."""
    return time.monotonic()
