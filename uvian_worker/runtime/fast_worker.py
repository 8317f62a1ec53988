"""A `bullmq.Worker` that takes its next job in the same Redis call that finishes the last one.

The Python `bullmq` worker finishes a job with one script call (`moveToFinished`)
and takes the next with another (`moveToActive`), each a round trip plus a Lua
run, and its main loop wakes for every job, waiting on all the slots at once.
The Node worker asks `moveToFinished` to fetch the next job as it finishes the
current one; the package ships the same script and passes it `fetch_next=False`.
`FastWorker` passes true when the worker may take more work, and runs the job
that comes back in the same slot, so each slot is one task that goes from job to
job without the main loop.

What stays as it was:
- the slot count: a slot holds one job at a time, and the main loop still opens
  at most `concurrency` slots, so jobs in flight never exceed the limit;
- locks: the script locks the fetched job with this slot's token for
  `lockDuration`, as `moveToActive` does, and the lock manager tracks each job
  while it runs, so renewals and stalled checks see no difference;
- close and pause: a slot asks for more only while the worker is neither
  closing nor paused; a job fetched in the instant `close()` or `pause()` began
  still runs in its slot, which they wait for, so no job is left locked in
  `active` with nobody working on it;
- failures: a failed attempt goes through `Job.moveToFailed` as before (retry
  with backoff, or failed), and its slot then ends; the main loop opens the
  next one with `moveToActive`. Only completions fetch the next job;
- fetching: the package's main loop opens a fetch for every free slot at once
  (it starts them all before any of them sees the queue empty), so every job
  that reached a worker with N free slots cost about N `moveToActive` calls.
  Here those fetches take turns, and one that waited its turn while another
  found the queue empty returns empty-handed without asking Redis; the
  blocking wait for the next job is the package's, unchanged;
- a forced close cancels the slots as it cancels the stock worker's tasks: a
  job fetched by a finishing call that was cut off is in `active` under a lock
  nobody renews, and the stalled check puts it back in the queue once the lock
  lapses, as it does for a stock worker cancelled inside `moveToActive`.

The method names `processJob` and the events (`active`, `completed`, `failed`,
`error`) are the package's own; the runtime builds this class where it built
`bullmq.Worker`, with the same options.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from bullmq import Job, UnrecoverableError, Worker
from bullmq.custom_errors import DelayedError, WaitingChildrenError

logger = logging.getLogger(__name__)

_RECANCEL_EVERY_S = 0.5


class FastWorker(Worker):  # type: ignore[misc]  # bullmq ships without type information
    _fetch_turn: asyncio.Lock | None = None
    _empty_answers = 0  # how many fetches found the queue empty so far

    async def moveToActive(self, token: str) -> Job | None:
        """The package's fetch, in turns: skipped when the queue was found empty meanwhile,
        or the worker began to pause or close.

        The fetch that follows the blocking wait (a job was signalled) never waits.
        """
        waiter = self.waiting
        if waiter is not None and waiter.done():
            return await super().moveToActive(token)
        if self._fetch_turn is None:
            self._fetch_turn = asyncio.Lock()
        empty_answers = self._empty_answers
        async with self._fetch_turn:
            # Paused or closing while this fetch waited: a job taken now would sit in
            # `active` with nothing to run it, unseen by the shutdown's drain.
            if self._empty_answers != empty_answers or self.paused or self.closing:
                return None
            job: Job | None = await super().moveToActive(token)
            if job is None:
                self._empty_answers += 1
            return job

    async def close(self, force: bool = False) -> None:
        """The package's close, with its cancel of the blocking wait repeated until it holds.

        A cancel can be lost inside the Redis client: the cancelled wait went
        back to reading its socket (redis-py 8.2 retrying the command, as far as
        the stack showed) and close() waited for it, in about one run in twenty
        of tests/test_fast_worker.py. Repeating the cancel ends the new wait.
        """
        watchdog = asyncio.ensure_future(self._cancel_lingering_wait())
        try:
            await super().close(force)
        finally:
            watchdog.cancel()

    async def _cancel_lingering_wait(self) -> None:
        while True:
            await asyncio.sleep(_RECANCEL_EVERY_S)
            waiter = self.waiting
            if waiter is not None and not waiter.done():
                logger.debug("the blocking wait outlived its cancel; cancelling it again")
                waiter.cancel()

    async def processJob(self, job: Job, token: str) -> None:
        """Run `job`, then every job its slot fetches while finishing the previous one."""
        next_job: Job | None = job
        while next_job is not None:
            next_job = await self._run_in_slot(next_job, token)

    async def _run_in_slot(self, job: Job, token: str) -> Job | None:
        """The stock `processJob` for one job; returns the job fetched when it completed."""
        self._apply_worker_retention(job)
        self.jobs.add((job, token))
        controller = self.lockManager.track_job(
            job.id,
            token,
            _now_ms(),
            should_create_controller=self._processor_wants_signal,
        )
        try:
            if job.deferredFailure:
                failure = UnrecoverableError(job.deferredFailure)
                await job.moveToFailed(failure, token)
                self.emit("failed", job, failure)
                return None

            if controller is not None:
                result = await self.processor(job, token, controller.signal)
            else:
                result = await self.processor(job, token)
            next_job_data = await self._complete(job, result, token)
        except (DelayedError, WaitingChildrenError):
            return None
        except Exception as err:  # noqa: BLE001 - the stock worker's contract: report, go on
            await self._fail(job, err, token)
            return None
        finally:
            self.jobs.discard((job, token))
            self.lockManager.untrack_job(job.id)
        return await self._fetched_job(next_job_data, token)

    def _apply_worker_retention(self, job: Job) -> None:
        # Worker-level retention applies to jobs that were added without their own.
        for option in ("removeOnComplete", "removeOnFail"):
            if option not in job.opts and option in self.opts:
                job.opts[option] = self.opts[option]

    async def _complete(self, job: Job, result: Any, token: str) -> Any:
        """Mark `job` completed, asking for the next job in the same call when more is wanted.

        Returns what the script answered about the next job, or None when none was asked for.
        """
        if self.forceClosing:
            # A forced close leaves the job active; its lock lapses and it runs again.
            self.emit("completed", job, result)
            return None

        fetch_next = not (self.closing or self.paused)
        finished = await self.backend.moveToCompleted(
            job, result, job.opts.get("removeOnComplete", False), token, fetch_next=fetch_next
        )
        job.returnvalue = result
        job.attemptsMade = job.attemptsMade + 1
        self.emit("completed", job, result)
        return finished["result"] if fetch_next else None

    async def _fetched_job(self, next_job_data: Any, token: str) -> Job | None:
        """The job `moveToFinished` moved to active for this slot, if it found one.

        `nextJobFromJobData` also records what the script said about the queue
        (drained, rate limited, the next delayed job), as after `moveToActive`.
        A failure here is the worker's, not the finished job's: it is reported
        as an `error` event, like a failed `moveToActive`.
        """
        if next_job_data is None:
            return None
        job_data, job_id, limit_until, delay_until = next_job_data
        try:
            next_job = await self.nextJobFromJobData(
                job_data, job_id, limit_until or 0, delay_until or 0, token
            )
        except Exception as err:  # noqa: BLE001 - reported; the main loop opens a new slot
            self.emit("error", err)
            return None
        if next_job is not None:
            self.emit("active", next_job, "waiting")
        return next_job

    async def _fail(self, job: Job, err: Exception, token: str) -> None:
        try:
            if not self.forceClosing:
                await job.moveToFailed(err, token)
            self.emit("failed", job, err)
        except Exception as failing:  # noqa: BLE001 - as the stock worker: an `error` event
            self.emit("error", failing, job)


def _now_ms() -> int:
    return int(time.time() * 1000)
