"""Jobs BullMQ fails on its own, outside any run: those that stalled too often.

When a job's worker dies (or loses its lock) more than `maxStalledCount` times,
BullMQ's stalled check fails it in Redis; no processor runs, so nothing would
record it in the `jobs` row or publish its status. Each worker follows its
queues' event streams for such failures; the first worker to record one (the
update only changes a row still open) publishes its status event.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol
from uuid import UUID

import redis.asyncio as redis
from redis.exceptions import RedisError

from uvian_worker import events
from uvian_worker.errors import WorkerError
from uvian_worker.events import Publisher

logger = logging.getLogger(__name__)

STALLED_REASON = "job stalled more than allowable limit"  # BullMQ's own words
_BLOCK_MS = 5_000
_RETRY_S = 1.0


class StalledStore(Protocol):
    async def fail_stalled(self, job_id: UUID, reason: str) -> int | None:
        """Mark the row failed unless it already ended; its attempts when it changed."""


class StallWatch:
    def __init__(
        self, client: redis.Redis, store: StalledStore, publisher: Publisher, stream_keys: list[str]
    ) -> None:
        self._client = client
        self._store = store
        self._publisher = publisher
        self._last_ids: dict[Any, Any] = dict.fromkeys(stream_keys, "$")

    async def run_forever(self) -> None:
        while True:
            try:
                batch: Any = await self._client.xread(self._last_ids, block=_BLOCK_MS, count=500)
            except (RedisError, OSError):
                await asyncio.sleep(_RETRY_S)  # the queue workers report the outage
                continue
            for key, entries in batch:
                for entry_id, fields in entries:
                    self._last_ids[_text(key)] = _text(entry_id)
                    await self._on_event(fields)

    async def _on_event(self, fields: dict[Any, Any]) -> None:
        if _text(fields.get("event", "")) != "failed":
            return
        reason = _text(fields.get("failedReason", ""))
        if STALLED_REASON not in reason:
            return
        try:
            job_id = UUID(_text(fields.get("jobId", "")))
            attempts = await self._store.fail_stalled(job_id, reason)
        except (ValueError, WorkerError) as exc:
            logger.warning("Could not record a stalled job's failure: %s", exc)
            return
        if attempts is None:
            return  # already ended, or another worker recorded it first
        logger.error("Job %s failed: it stalled too often (its workers kept dying)", job_id)
        event = events.job_status_event(
            job_id,
            "failed",
            attempt=attempts,
            max_attempts=attempts,
            error=reason,
            error_kind="stalled",
        )
        try:
            await self._publisher.publish(events.job_status_channel(job_id), event)
        except WorkerError as exc:
            logger.warning("Could not publish a stalled job's status: %s", exc)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
