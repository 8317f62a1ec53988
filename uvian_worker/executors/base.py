"""What an executor is given and what it must do.

An executor validates its input before anything else, does the work, records
the outcome, and returns the small JSON result BullMQ stores. Failures are
raised as errors from `uvian_worker.errors`; the runtime turns them into the
job's failed state, its row and its status event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

ProgressReporter = Callable[[dict[str, Any]], Awaitable[None]]


async def _no_progress(_progress: dict[str, Any]) -> None:
    return None


class StopSignal:
    """Set when a job is to stop, with the reason.

    A stop asked for on the job's cancel channel ends the job cancelled. A quiet
    stop means this run no longer holds the job (its lock was lost, or a newer
    run of it started here): the run writes nothing more and leaves the outcome
    to the run that holds the job.
    """

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason = "stopped on request"
        self.quiet = False

    def request(self, reason: str, *, quiet: bool = False) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.quiet = quiet
            self.event.set()


@dataclass(slots=True)
class JobContext:
    """One attempt of one job, as an executor sees it."""

    job_id: UUID
    name: str
    input: dict[str, Any]
    attempt: int  # 1 for the first attempt
    max_attempts: int
    queue: str = ""  # the BullMQ queue it came from, with its prefix ("bull:ai-jobs")
    report_progress: ProgressReporter = _no_progress
    stop: StopSignal = field(default_factory=StopSignal)
    # Where the attempt's time went (`db_ms`, `provider_ms`, ...), for its closing log line.
    timings_ms: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the time spent in the body to `timings_ms[phase]`."""
        started_s = time.perf_counter()
        try:
            yield
        finally:
            spent_ms = (time.perf_counter() - started_s) * 1000.0
            self.timings_ms[phase] = round(self.timings_ms.get(phase, 0.0) + spent_ms, 2)

    @property
    def cancelled(self) -> asyncio.Event:
        return self.stop.event

    @property
    def cancel_reason(self) -> str:
        return self.stop.reason

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts


class Executor(Protocol):
    """Runs one job type. `run` validates `job.input` before touching anything."""

    job_name: str

    async def run(self, job: JobContext) -> dict[str, Any]: ...
