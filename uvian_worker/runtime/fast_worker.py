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
  closing nor paused, and was not paused since the slot began (`pause()` waits
  for it, resumed or not); a job fetched in the instant `close()` or `pause()` began
  still runs in its slot, which they wait for, so no job is left locked in
  `active` with nobody working on it;
- failures: a failed attempt goes through `Job.moveToFailed` as before (retry
  with backoff, or failed), and its slot then ends; the main loop opens the
  next one with `moveToActive`. Only completions fetch the next job;
- a forced close cancels the slots as it cancels the stock worker's tasks: a
  job fetched by a finishing call that was cut off is in `active` under a lock
  nobody renews, and the stalled check puts it back in the queue once the lock
  lapses, as it does for a stock worker cancelled inside `moveToActive`.

The method names `processJob` and the events (`active`, `completed`, `failed`,
`error`) are the package's own; the runtime builds this class where it built
`bullmq.Worker`, with the same options.

What differs is the main loop. The package's opens a fetch for every free slot
at once (it starts them all before any of them sees the queue empty), so every
job that reached a worker with N free slots cost about N `moveToActive` calls
and N tasks, and it waits on all its tasks at every wake. `FastWorker.run`
opens one slot at a time, the next when the last one's fetch has answered; the
blocking wait for the next job is the package's, unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from bullmq import Job, UnrecoverableError, Worker
from bullmq.custom_errors import DelayedError, WaitingChildrenError
from bullmq.timer import Timer

logger = logging.getLogger(__name__)

_RECANCEL_EVERY_S = 0.5


class FastWorker(Worker):  # type: ignore[misc]  # bullmq ships without type information
    running: bool  # the package's flags, set in its __init__
    _fetching = False  # a slot is asking Redis for a job (or waiting for one)
    _pauses = 0  # how many times pause() was called
    _slot_news: asyncio.Event | None = None  # a fetch or a slot ended: the main loop looks

    async def run(self) -> None:
        """The main loop: open slots while there is room, one fetch at a time (see the
        module's docstring). A slot is one task, its fetch and then the job it got; it
        tells the loop when its fetch answered and when it ended."""
        if self.running:
            raise RuntimeError("Worker is already running")
        await self._ensure_client_names()
        self.lockManager.start()
        self.stalledCheckTimer = Timer(
            self.opts["stalledInterval"] / 1000, self.runStalledJobsCheck, self.emit
        )
        self.running = True
        news = self._slot_news = asyncio.Event()
        opened = 0
        try:
            while not self.closed:
                if self.paused and not self.closing:
                    await self.resume_event.wait()
                    continue
                if self.closing:
                    # The slots finish their jobs; none asks for another.
                    if not self.processing:
                        break
                elif not self._fetching and len(self.processing) < self.opts["concurrency"]:
                    opened += 1
                    self._open_slot(f"{self.id}:{opened}")
                news.clear()
                await news.wait()
        finally:
            self.running = False
            if not self.closing:
                # Cancelled from outside: no slot may outlive the loop.
                for task in self.processing:
                    task.cancel()
                if self.processing:
                    await asyncio.gather(*self.processing, return_exceptions=True)
                self.processing.clear()
            self.stalledCheckTimer.stop()
            await self.lockManager.close()

    def _open_slot(self, token: str) -> None:
        self._fetching = True
        slot = asyncio.ensure_future(self._slot(token))
        self.processing.add(slot)
        slot.add_done_callback(self._slot_ended)

    async def _slot(self, token: str) -> None:
        pauses = self._pauses
        try:
            if self.paused or self.closing:
                # Paused or closing between the loop opening this slot and its start:
                # pause() and close() found no blocking wait to cancel, so none begins.
                return
            job = await self.retryIfFailed(
                lambda: self.getNextJob(token),
                {"delay_in_ms": self.opts["runRetryDelay"], "only_emit_error": True},
            )
        finally:
            self._fetching = False
            self._tell_main_loop()
        if job is not None:
            await self._run_chain(job, token, pauses)

    def _slot_ended(self, slot: asyncio.Future[None]) -> None:
        self.processing.discard(slot)
        if not slot.cancelled() and slot.exception() is not None:
            self.emit("error", slot.exception())
        self._tell_main_loop()

    def _tell_main_loop(self) -> None:
        if self._slot_news is not None:
            self._slot_news.set()

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
        await self._run_chain(job, token, self._pauses)

    async def _run_chain(self, job: Job, token: str, pauses: int) -> None:
        """Run `job` and the jobs fetched after it, until the chain must end.

        It ends at a pause since `pauses` was counted (even one resumed since:
        `pause()` waits for this slot, and a slot that went on would hold it until
        the queue ran dry), at a forced close, and when the slot was cancelled but
        the Redis client swallowed the cancel and let the finishing call return a
        job. A job fetched then stays in `active` under a lock nobody renews, and
        the stalled check puts it back.
        """
        next_job: Job | None = job
        while next_job is not None:
            next_job = await self._run_in_slot(next_job, token, chain=pauses == self._pauses)
            if next_job is not None and self._cut_off():
                raise asyncio.CancelledError

    def _cut_off(self) -> bool:
        """Whether this slot must not start the job it fetched."""
        slot = asyncio.current_task()
        return self.forceClosing or (slot is not None and slot.cancelling() > 0)

    async def pause(self, do_not_wait_active: bool = False) -> None:
        self._pauses += 1
        await super().pause(do_not_wait_active)

    async def _run_in_slot(self, job: Job, token: str, *, chain: bool) -> Job | None:
        """The stock `processJob` for one job; returns the job fetched when it completed
        (none is fetched unless `chain`)."""
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
            next_job_data = await self._complete(job, result, token, chain=chain)
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

    async def _complete(self, job: Job, result: Any, token: str, *, chain: bool) -> Any:
        """Mark `job` completed, asking for the next job in the same call when more is wanted.

        Returns what the script answered about the next job, or None when none was asked for.
        """
        if self.forceClosing:
            # A forced close leaves the job active; its lock lapses and it runs again.
            self.emit("completed", job, result)
            return None

        fetch_next = chain and not (self.closing or self.paused)
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
