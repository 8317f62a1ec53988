"""A `bullmq.Worker` that fails the jobs it cannot even read, instead of losing its loop to them.

The package decodes a job after its Lua script has already made it active and
locked it. A job whose stored data or options do not decode (not JSON, JSON
nested past the parser's limit, an options field of the wrong type) raised out
of that step, only as a warning: its lock lapsed, the stalled check put it back
at the front of the queue, and it came back forever. A flood of them starved
every good job. Here such a job fails at once, with the reason, not retried.
"""

from __future__ import annotations

import logging
from typing import Any

from bullmq import Job, UnrecoverableError

from uvian_worker.observability.logs import LogThrottle
from uvian_worker.runtime.fast_worker import FastWorker

logger = logging.getLogger(__name__)

_throttle = LogThrottle()

# What decoding a job hash can raise: broken JSON, nesting past the parser's
# depth, an option of the wrong type, a number too large to be an int.
_UNREADABLE = (ValueError, TypeError, RecursionError, OverflowError, AttributeError, KeyError)


class GuardedWorker(FastWorker):
    async def nextJobFromJobData(
        self,
        job_data: dict[str, Any] | None = None,
        job_id: str | None = None,
        limit_until: int = 0,
        delay_until: int = 0,
        token: str | None = None,
    ) -> Job | None:
        try:
            return await super().nextJobFromJobData(
                job_data, job_id, limit_until, delay_until, token
            )
        except _UNREADABLE as exc:
            if job_id is None or token is None:
                raise
            await self._fail_unreadable(job_id, token, exc)
            return None

    async def _fail_unreadable(self, job_id: str, token: str, exc: BaseException) -> None:
        reason = f"the job could not be read: {type(exc).__name__}"
        if _throttle.allow("unreadable") is not None:
            logger.error("Job %s failed: %s", str(job_id)[:100], reason)
        job = Job(self, "unreadable", {}, {"attempts": 1}, job_id)
        job.token = token
        try:
            await job.moveToFailed(UnrecoverableError(reason), token)
        except Exception as failure:  # noqa: BLE001 - the stalled check remains the fallback
            logger.warning("Could not fail an unreadable job: %s", type(failure).__name__)
