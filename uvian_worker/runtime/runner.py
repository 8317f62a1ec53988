"""Runs one BullMQ job: select its executor, bind its log context, record its outcome.

The processor handed to `bullmq.Worker` is `JobRunner.process`. Its contract
with BullMQ: a returned dict completes the job; `UnrecoverableError` fails it
at once whatever attempts are left; any other exception fails this attempt and
lets the job's attempts and backoff decide whether it runs again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol, runtime_checkable
from uuid import UUID

from bullmq import Job, UnrecoverableError

from uvian_worker import events
from uvian_worker.clock import monotonic_s
from uvian_worker.errors import (
    InternalError,
    InvalidInput,
    JobCancelled,
    ReplySuperseded,
    TransientError,
    WorkerError,
)
from uvian_worker.events import Publisher
from uvian_worker.executors.base import Executor, JobContext, StopSignal
from uvian_worker.observability.logs import bind_job
from uvian_worker.observability.metrics import PROVIDER_ERROR_KINDS
from uvian_worker.observability.redaction import redact
from uvian_worker.runtime.progress import ProgressReporter
from uvian_worker.runtime.retry import (
    BACKOFF_TYPE,
    RetryableJobError,
    base_delay_ms,
    classify,
    retry_delay_ms,
    should_retry,
)

logger = logging.getLogger(__name__)


class OutcomeStore(Protocol):
    async def record_outcome(
        self,
        *,
        job_id: UUID,
        job_name: str,
        job_input: dict[str, Any],
        status: str,
        attempt: int,
        error_message: str | None,
        error_kind: str | None,
    ) -> None: ...


class JobMetrics(Protocol):
    def job_started(self, job_name: str) -> None: ...

    def job_finished(self, job_name: str, outcome: Any, duration_s: float) -> None: ...

    def provider_error(self, kind: str) -> None: ...


class NoMetrics:
    def job_started(self, job_name: str) -> None:
        return None

    def job_finished(self, job_name: str, outcome: Any, duration_s: float) -> None:
        return None

    def provider_error(self, kind: str) -> None:
        return None


@runtime_checkable
class CancelAware(Protocol):
    """An executor with something to end when its job is stopped before a run began."""

    async def cancelled_before_start(self, job: JobContext) -> None: ...


class StopRequests(Protocol):
    def track(self, job_id: str) -> AbstractContextManager[StopSignal]: ...

    async def was_cancelled(self, job_id: str) -> str | None: ...


class NoStopRequests:
    """For runners without a control channel (unit tests)."""

    @contextmanager
    def track(self, job_id: str) -> Iterator[StopSignal]:
        yield StopSignal()

    async def was_cancelled(self, job_id: str) -> str | None:
        return None


class JobRunner:
    def __init__(
        self,
        executors: Mapping[str, Executor],
        outcomes: OutcomeStore,
        publisher: Publisher,
        stops: StopRequests | None = None,
        *,
        metrics: JobMetrics | None = None,
        progress: ProgressReporter | None = None,
    ) -> None:
        self._executors = dict(executors)
        self._progress = progress
        self._outcomes = outcomes
        self._publisher = publisher
        self._stops = stops or NoStopRequests()
        self._metrics = metrics or NoMetrics()
        # Runs in flight in this process: job id -> BullMQ token -> its stop signal.
        # Two runs of one job meet here when its lock lapsed (an outage, a blocked
        # loop) and BullMQ handed it out again while the first still streamed.
        self._runs: dict[str, dict[str, StopSignal]] = {}

    async def process(self, job: Job, token: str) -> dict[str, Any]:
        attempt = int(job.attemptsMade) + 1
        max_attempts = _max_attempts(job.opts.get("attempts"))
        # BullMQ compares this option with numbers when an attempt fails; a string
        # or a huge value stored by a producer would break that comparison.
        job.opts["attempts"] = max_attempts
        with (
            bind_job(job_id=str(job.id)[:100], job_name=str(job.name)[:100], attempt=attempt),
            self._stops.track(str(job.id)) as stop,
            self._running(str(job.id), token, stop),
        ):
            started_s = monotonic_s()
            logger.info("Job started")
            self._metrics.job_started(job.name)
            outcome = "retried"  # what a run cancelled from outside (shutdown) comes to
            context: JobContext | None = None
            try:
                context = self._context(job, attempt, max_attempts, stop)
                result = await self._execute(job, context)
            except asyncio.CancelledError:
                logger.warning(
                    "Job stopped by the shutdown; it runs again once its lock lapses",
                    extra={"outcome": outcome, "duration_ms": _ms(started_s)},
                )
                raise
            except ReplySuperseded as exc:
                # This run lost its job to a newer run (its lock lapsed), which
                # records the outcome; BullMQ refuses this run's verdict anyway.
                logger.warning("Job run superseded: %s", exc, extra={"outcome": "superseded"})
                outcome = "superseded"
                raise
            except Exception as exc:
                error = classify(exc)
                if isinstance(error, InternalError):
                    logger.exception("Job failed with an unexpected error")
                outcome = _outcome(error, attempt, max_attempts)
                # `from None`: BullMQ stores the traceback where dashboards show it, and
                # a library's text may quote what it should not; the log keeps it all.
                raise await self._fail(job, attempt, max_attempts, error, started_s) from None
            else:
                outcome = "completed"
            finally:
                self._metrics.job_finished(job.name, outcome, monotonic_s() - started_s)
            timings = context.timings_ms if context is not None else {}
            logger.info(
                "Job completed",
                extra={
                    "outcome": "completed",
                    "duration_ms": _ms(started_s),
                    "queue_ms": _queue_ms(job),
                    **timings,
                },
            )
            return result

    @contextmanager
    def _running(self, job_id: str, token: str, stop: StopSignal) -> Iterator[None]:
        runs = self._runs.setdefault(job_id, {})
        for older in runs.values():
            older.request("a newer run of this job started", quiet=True)
        runs[token] = stop
        try:
            yield
        finally:
            del runs[token]
            if not runs:
                del self._runs[job_id]

    def is_running(self, job_id: str, token: str) -> bool:
        return token in self._runs.get(job_id, {})

    def lock_lost(self, job_ids: list[str]) -> None:
        """BullMQ could not renew these jobs' locks: another worker may hold them now."""
        for job_id in job_ids:
            for stop in self._runs.get(str(job_id), {}).values():
                stop.request("the job's lock was lost", quiet=True)

    async def _execute(self, job: Job, context: JobContext) -> dict[str, Any]:
        executor = self._executor(job.name)
        reason = await self._stops.was_cancelled(str(job.id))
        if reason is not None:
            if isinstance(executor, CancelAware):
                await executor.cancelled_before_start(context)
            raise JobCancelled(f"cancelled before it started: {reason}")
        return await executor.run(context)

    def _executor(self, name: str) -> Executor:
        executor = self._executors.get(name)
        if executor is None:
            known = ", ".join(sorted(self._executors))
            raise InvalidInput(f"unknown job name {str(name)[:100]!r} (this worker runs: {known})")
        return executor

    def _context(self, job: Job, attempt: int, max_attempts: int, stop: StopSignal) -> JobContext:
        async def report_progress(progress: dict[str, Any]) -> None:
            if self._progress is not None:
                await self._progress.report(job, progress)
            else:
                await job.updateProgress(progress)

        return JobContext(
            job_id=_job_uuid(job),
            name=job.name,
            input=_job_input(job.data),
            attempt=attempt,
            max_attempts=max_attempts,
            queue=str(getattr(job.queue, "qualifiedName", "")),
            report_progress=report_progress,
            stop=stop,
        )

    async def _fail(
        self, job: Job, attempt: int, max_attempts: int, exc: WorkerError, started_s: float
    ) -> Exception:
        """Record and publish a failed attempt; returns what tells BullMQ to retry or not."""
        will_retry = should_retry(exc, attempt, max_attempts)
        if exc.kind in PROVIDER_ERROR_KINDS:
            self._metrics.provider_error(exc.kind)
        status = _failure_status(exc, will_retry)
        delay_ms = 0
        if will_retry:
            retry_after_s = exc.retry_after_s if isinstance(exc, TransientError) else None
            delay_ms = retry_delay_ms(
                attempt, base_delay_ms=base_delay_ms(job.opts), retry_after_s=retry_after_s
            )
        message = redact(str(exc) or exc.kind)
        # A stop on request is not an error; a failure with attempts left is a warning.
        log = logger.warning if will_retry or isinstance(exc, JobCancelled) else logger.error
        log(
            "Job %s: %s",
            f"attempt failed, retrying in {delay_ms} ms" if will_retry else status,
            message,
            extra={"outcome": status, "error_kind": exc.kind, "duration_ms": _ms(started_s)},
        )

        job_id = _maybe_uuid(job.id)
        if job_id is not None:
            await self._record(job, job_id, status, attempt, message, exc.kind)
            event = events.job_status_event(
                job_id,
                "failed" if status == "queued" else status,
                attempt=attempt,
                max_attempts=max_attempts,
                error=message,
                error_kind=exc.kind,
                will_retry=will_retry,
            )
            if will_retry:
                event["retryInMs"] = delay_ms
            await self._publish(events.job_status_channel(job_id), event)

        if will_retry:
            # BullMQ asks the worker's backoff strategy for the delay of a job
            # whose backoff type is ours; the error carries the delay chosen here.
            job.opts["backoff"] = {"type": BACKOFF_TYPE, "delay": base_delay_ms(job.opts)}
            return RetryableJobError(message, delay_ms)
        unrecoverable: Exception = UnrecoverableError(message)
        return unrecoverable

    async def _record(
        self, job: Job, job_id: UUID, status: str, attempt: int, message: str, kind: str
    ) -> None:
        data = job.data if isinstance(job.data, dict) else {}
        raw_input = data.get("input")
        try:
            await self._outcomes.record_outcome(
                job_id=job_id,
                job_name=str(job.name)[:100],
                job_input=raw_input if isinstance(raw_input, dict) else {},
                status=status,
                attempt=attempt,
                error_message=message,
                error_kind=kind,
            )
        except WorkerError as exc:
            logger.warning("Could not record the job's outcome in Postgres: %s", exc)
        except Exception:
            # A bug here must not turn a permanent failure into a retried one.
            logger.exception("Could not record the job's outcome in Postgres")

    async def _publish(self, channel: str, event: dict[str, Any]) -> None:
        try:
            await self._publisher.publish(channel, event)
        except Exception as exc:  # noqa: BLE001 - an event lost must not change the job's outcome
            logger.warning("Could not publish on %s: %s", channel, type(exc).__name__)


def _outcome(error: WorkerError, attempt: int, max_attempts: int) -> str:
    """The metrics' name for how an attempt ended."""
    if isinstance(error, JobCancelled):
        return "cancelled"
    return "retried" if should_retry(error, attempt, max_attempts) else "failed"


def _failure_status(exc: WorkerError, will_retry: bool) -> str:
    if isinstance(exc, JobCancelled):
        return "cancelled"
    if will_retry:
        return "queued"
    return "failed"


def _job_uuid(job: Job) -> UUID:
    job_id = _maybe_uuid(job.id)
    if job_id is None or str(job_id) != job.id:
        # The canonical form only: events are published on channels named by the id.
        raise InvalidInput(f"job id {str(job.id)[:80]!r} is not a UUID in its canonical form")
    data_id = job.data.get("jobId") if isinstance(job.data, dict) else None
    if data_id is not None and str(data_id) != str(job.id) and _maybe_uuid(data_id) != job_id:
        raise InvalidInput("data.jobId does not match the BullMQ job id")
    return job_id


def _job_input(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InvalidInput("job data must be a JSON object")
    raw_input = data.get("input")
    if not isinstance(raw_input, dict):
        raise InvalidInput("job data.input must be a JSON object")
    return raw_input


def _maybe_uuid(value: Any) -> UUID | None:
    try:
        return UUID(str(value))
    except ValueError:
        return None


MAX_ATTEMPTS_CAP = 100


def _max_attempts(value: Any) -> int:
    """The job's `attempts` option as a sane integer, whatever the producer stored."""
    try:
        attempts = int(float(value)) if value is not None else 1
    except (TypeError, ValueError, OverflowError):
        return 1
    return min(max(attempts, 1), MAX_ATTEMPTS_CAP)


def _queue_ms(job: Job) -> int | None:
    """From the job's creation to a worker taking it (delays and backoffs included)."""
    if not job.processedOn or not job.timestamp:
        return None
    return int(job.processedOn) - int(job.timestamp)


def _ms(started_s: float) -> float:
    return round((monotonic_s() - started_s) * 1000.0, 1)
