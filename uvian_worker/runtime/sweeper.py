"""The reply sweep: every reply that started streaming reaches a final state.

A reply stays `generating` only while some run of its job may still finish it.
When its job is gone from BullMQ (Redis flushed, the job removed) or ended
without ending the reply, nothing else ever will: the sweep marks such a reply
`interrupted` and publishes its final event. Every worker sweeps; the update is
conditional on the row being unchanged since it was read, so exactly one
worker ends each reply, and a run that writes in the meantime keeps it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Protocol

from uvian_worker.errors import WorkerError
from uvian_worker.events import Publisher
from uvian_worker.executors.reply import publish_final
from uvian_worker.store.records import StaleReply

logger = logging.getLogger(__name__)

# BullMQ states in which a job will still run (or is running) and may end its reply.
_LIVE_STATES = frozenset({"active", "waiting", "wait", "delayed", "prioritized", "paused"})
_BATCH = 100

JobStateReader = Callable[[str], Awaitable[str]]


class SweepStore(Protocol):
    async def stale_replies(
        self, queue: str, stale_after_s: float, limit: int
    ) -> list[StaleReply]: ...

    async def interrupt(self, reply: StaleReply) -> bool: ...


class ReplySweeper:
    def __init__(
        self,
        store: SweepStore,
        job_state: JobStateReader,
        publisher: Publisher,
        *,
        queue: str,
        interval_s: float,
        stale_after_s: float,
    ) -> None:
        self._store = store
        self._job_state = job_state
        self._publisher = publisher
        self._queue = queue
        self._interval_s = interval_s
        self._stale_after_s = stale_after_s

    async def run_forever(self) -> None:
        # Workers started together should not all sweep at the same instant.
        await asyncio.sleep(random.uniform(0, self._interval_s))
        while True:
            try:
                await self.sweep_once()
            except WorkerError as exc:
                logger.warning("Reply sweep skipped: %s", exc)
            except Exception:
                logger.exception("Reply sweep failed")
            await asyncio.sleep(self._interval_s)

    async def sweep_once(self) -> int:
        """End every abandoned reply found now; returns how many were ended."""
        ended = 0
        stale = await self._store.stale_replies(self._queue, self._stale_after_s, _BATCH)
        for reply in stale:
            state = await self._job_state(str(reply.job_id))
            if state in _LIVE_STATES:
                continue
            if await self._store.interrupt(reply):
                ended += 1
                logger.warning(
                    "Reply of job %s interrupted: its job is %s", reply.job_id, state or "gone"
                )
                await publish_final(self._publisher, reply, "interrupted")
        return ended
