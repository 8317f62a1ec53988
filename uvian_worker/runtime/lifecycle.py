"""The BullMQ workers of one process: start, run until a signal, and shut down cleanly.

Shutdown on SIGTERM or SIGINT: stop taking jobs at once, give jobs in flight up
to `SHUTDOWN_GRACE_S` to finish, then cancel the rest. A cancelled job keeps its
place in BullMQ's active list until its lock lapses; the stalled check of any
live worker then puts it back in the queue, and its next run reuses the same
reply (the reply is keyed by the job). A second signal skips the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from bullmq import Worker

from uvian_worker.observability.logs import LogThrottle
from uvian_worker.observability.redaction import redact
from uvian_worker.runtime.connections import make_redis
from uvian_worker.runtime.guarded_worker import GuardedWorker
from uvian_worker.runtime.retry import backoff_strategy

logger = logging.getLogger(__name__)

# One warning per this many seconds for repeated queue errors (a Redis outage
# raises one per command), with a count of those left out.
ERROR_LOG_INTERVAL_S = 5.0
# A signal this soon after the first is the same signal delivered twice, not a second one.
SECOND_SIGNAL_AFTER_S = 0.5
# How long a worker waits before asking Redis again after a connection error.
RUN_RETRY_DELAY_MS = 1_000


class Runs(Protocol):
    """What the queue workers need to know of the runs in flight (the job runner)."""

    async def process(self, job: Any, token: str) -> dict[str, Any]: ...

    def is_running(self, job_id: str, token: str) -> bool: ...

    def lock_lost(self, job_ids: list[str]) -> None: ...


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    concurrency: int


@dataclass(frozen=True, slots=True)
class QueueOptions:
    redis_url: str
    prefix: str
    lock_duration_ms: int
    stalled_interval_ms: int
    connect_timeout_s: float
    worker_name: str | None = None


class _ErrorLog:
    """Logs queue errors at most once per interval per error type."""

    def __init__(self) -> None:
        self._throttle = LogThrottle(ERROR_LOG_INTERVAL_S)

    def __call__(self, error: BaseException, *_args: Any) -> None:
        kind = type(error).__name__
        left_out = self._throttle.allow(kind)
        if left_out is not None:
            logger.warning(
                "Queue error: %s: %s",
                kind,
                redact(str(error))[:200],
                extra={"repeats_left_out": left_out},
            )


class QueueWorkers:
    """One `bullmq.Worker` per queue, each with its own Redis client and concurrency."""

    def __init__(self, queues: list[QueueSpec], options: QueueOptions, runs: Runs):
        self._queues = queues
        self._options = options
        self._runs = runs
        self._workers: list[Worker] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._on_error = _ErrorLog()
        self._grace_over = asyncio.Event()

    def start(self) -> None:
        for queue in self._queues:
            worker = GuardedWorker(queue.name, self._runs.process, self._worker_options(queue))
            worker.on("error", self._on_error)
            worker.on("lockRenewalFailed", self._runs.lock_lost)
            _untrack_only_finished_runs(worker, self._runs)
            self._workers.append(worker)
            self._tasks.append(asyncio.create_task(worker.run(), name=f"queue:{queue.name}"))

    def _worker_options(self, queue: QueueSpec) -> dict[str, Any]:
        options = self._options
        client = make_redis(
            options.redis_url,
            connect_timeout_s=options.connect_timeout_s,
            max_connections=max(8, min(queue.concurrency + 4, 256)),
        )
        worker_options: dict[str, Any] = {
            "connection": client,
            "prefix": options.prefix,
            "concurrency": queue.concurrency,
            "lockDuration": options.lock_duration_ms,
            "stalledInterval": options.stalled_interval_ms,
            "maxStalledCount": 2,
            "runRetryDelay": RUN_RETRY_DELAY_MS,
            "autorun": False,
            "settings": {"backoffStrategy": backoff_strategy},
        }
        if options.worker_name:
            worker_options["name"] = options.worker_name
        return worker_options

    @property
    def jobs_in_flight(self) -> int:
        return sum(len(worker.jobs) for worker in self._workers)

    async def _drained(self) -> None:
        """Return once no job runs here. A worker's tasks also include its wait for the
        next job, which may block for seconds and must not hold a shutdown up."""
        while self.jobs_in_flight:
            running = [task for worker in self._workers for task in worker.processing]
            pending = [task for task in running if not task.done()]
            if not pending:
                return
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)

    def skip_grace(self) -> None:
        """End the grace period of a shutdown now (a second signal)."""
        self._grace_over.set()

    async def close(self, grace_s: float) -> None:
        """Take no new job, wait up to `grace_s` for jobs in flight, then cancel them.

        The workers are paused first rather than closed: the package's `close()`
        ends its loop, and the renewal of the locks of jobs still running with
        it, as soon as no new job comes back, so a reply longer than the lock
        would be handed to another worker in the middle of the grace period.
        """
        await asyncio.gather(*(worker.pause(do_not_wait_active=True) for worker in self._workers))
        drained: asyncio.Future[Any] = asyncio.ensure_future(self._drained())
        grace_over: asyncio.Future[Any] = asyncio.ensure_future(self._grace_over.wait())
        await asyncio.wait(
            [drained, grace_over], timeout=grace_s, return_when=asyncio.FIRST_COMPLETED
        )
        grace_over.cancel()
        drained.cancel()
        force = self.jobs_in_flight > 0
        if force:
            cut = "cut short by a second signal" if self._grace_over.is_set() else "is over"
            logger.warning(
                "Grace period of %g s %s; stopping %d jobs in flight, "
                "they will run again once their locks lapse",
                grace_s,
                cut,
                self.jobs_in_flight,
            )
        await asyncio.gather(*(worker.close(force=force) for worker in self._workers))
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _untrack_only_finished_runs(worker: Worker, runs: Runs) -> None:
    """Make BullMQ stop renewing a job's lock only when no run of it is in flight here.

    The package keys lock renewal by job id alone: when an older run of a job
    ends after BullMQ handed the job to a newer run in this same process, it
    would stop renewing the newer run's lock, and the job would stall again.
    """
    locks = worker.lockManager
    untrack = locks.untrack_job

    def untrack_finished(job_id: str) -> None:
        tracked = locks.tracked_jobs.get(job_id)
        if tracked is None or not runs.is_running(job_id, tracked["token"]):
            untrack(job_id)

    locks.untrack_job = untrack_finished


class ShutdownSignals:
    """SIGTERM and SIGINT, caught from the start of the process's life.

    Installed before anything connects, so a signal that arrives while the
    worker starts still ends it cleanly. The first signal resolves `received`;
    a second one, at least `SECOND_SIGNAL_AFTER_S` later, calls
    `on_second_signal`: supervisors that signal a process and its group deliver
    one signal twice at once, which is not an operator asking twice.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.received: asyncio.Future[str] = self._loop.create_future()
        self.on_second_signal: Callable[[], None] = lambda: None
        self._first_at_s = 0.0
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(signum, self._handle, signum)

    def _handle(self, signum: signal.Signals) -> None:
        if not self.received.done():
            self._first_at_s = self._loop.time()
            self.received.set_result(signum.name)
        elif self._loop.time() - self._first_at_s >= SECOND_SIGNAL_AFTER_S:
            self.on_second_signal()
