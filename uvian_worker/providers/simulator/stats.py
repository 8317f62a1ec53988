"""What a simulator has seen, with waits a test can await instead of sleeping."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

_COUNTERS = ("streams_started", "streams_completed", "closed_early", "runpod_cancelled")


@dataclass
class SimulatorStats:
    """What the simulator has seen. A stream is one generated reply (an SSE
    response or a RunPod job); `requests` counts by route name."""

    requests: dict[str, int] = field(default_factory=dict)
    streams_started: int = 0
    streams_completed: int = 0
    closed_early: int = 0  # SSE streams whose client left (or the server stopped)
    runpod_cancelled: int = 0
    last_disconnect_at: float | None = None  # time.monotonic() of the last leave or cancel
    # The prompts of the most recent chat requests, newest last (for tests to read).
    prompts: deque[object] = field(default_factory=lambda: deque(maxlen=100))
    _waiters: list[tuple[str, int, asyncio.Future[None]]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )

    def count(self, name: str) -> int:
        return int(getattr(self, name)) if name in _COUNTERS else self.requests.get(name, 0)

    def record(self, name: str) -> None:
        if name in _COUNTERS:
            setattr(self, name, self.count(name) + 1)
        else:
            self.requests[name] = self.requests.get(name, 0) + 1
        if self._waiters:
            self._wake_waiters()

    def client_left(self, counter: str) -> None:
        self.last_disconnect_at = time.monotonic()
        self.record(counter)

    async def wait_for(self, name: str, at_least: int = 1) -> None:
        """Return once the counter or route `name` has reached `at_least`."""
        if self.count(name) >= at_least:
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((name, at_least, future))
        await future

    def as_json(self) -> dict[str, Any]:
        counters = {name: self.count(name) for name in _COUNTERS}
        last = {"last_disconnect_at": self.last_disconnect_at}
        return {"requests": dict(self.requests), **counters, **last}

    def _wake_waiters(self) -> None:
        still_waiting = []
        for name, at_least, future in self._waiters:
            if future.done():
                continue  # its waiter gave up
            if self.count(name) >= at_least:
                future.set_result(None)
            else:
                still_waiting.append((name, at_least, future))
        self._waiters = still_waiting


SIMULATOR_STATS = web.AppKey("simulator_stats", SimulatorStats)
