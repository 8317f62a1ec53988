"""Retry policy: which failures run again, and how long to wait before they do.

Transient errors retry while the job has attempts left; everything else fails
at once. The wait grows exponentially from the job's own backoff delay (the
API's `backoff.delay`, or `DEFAULT_BASE_DELAY_MS` when it set none), is capped,
and is spread with jitter so that jobs failing together do not return
together. A provider's `Retry-After` is honoured: the wait is never shorter.

BullMQ computes the delay of a retry from the job's `backoff` option; the
runner sets that option to `BACKOFF_TYPE` just before failing the attempt, and
the worker's `backoffStrategy` setting is `backoff_strategy` below.
"""

from __future__ import annotations

import random
from typing import Any

from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from uvian_worker.errors import (
    InternalError,
    RedisUnavailable,
    TransientError,
    WorkerError,
)

BACKOFF_TYPE = "uvian"
DEFAULT_BASE_DELAY_MS = 1_000
MAX_DELAY_MS = 60_000
MAX_RETRY_AFTER_MS = 600_000  # a server asking for more than 10 minutes is not taken literally


def classify(error: Exception) -> WorkerError:
    """Any exception out of an executor, as the worker's own error.

    Providers and the store translate their libraries' errors where they meet
    them; Redis errors can come from several places (the conversation slot,
    stop requests), so they are translated here. Anything else is a bug, and a
    bug is retried like a transient error: it may depend on timing, and the
    job's attempts bound it.
    """
    if isinstance(error, WorkerError):
        return error
    if isinstance(error, RedisConnectionError | RedisTimeoutError | BusyLoadingError):
        return RedisUnavailable(f"Redis unavailable: {type(error).__name__}")
    return InternalError(f"internal error: {type(error).__name__}")


def should_retry(error: WorkerError, attempt: int, max_attempts: int) -> bool:
    return isinstance(error, TransientError) and attempt < max_attempts


def retry_delay_ms(
    attempt: int,
    *,
    base_delay_ms: int,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> int:
    """How long to wait after failed attempt number `attempt` (1 for the first)."""
    exponential_ms = min(base_delay_ms * 2 ** (attempt - 1), MAX_DELAY_MS)
    jittered_ms = int(exponential_ms * (0.5 + 0.5 * (rng or random).random()))
    if retry_after_s is None:
        return jittered_ms
    return max(jittered_ms, min(int(retry_after_s * 1000), MAX_RETRY_AFTER_MS))


def base_delay_ms(job_options: dict[str, Any]) -> int:
    """The job's own backoff delay, as the API set it."""
    backoff = job_options.get("backoff")
    if isinstance(backoff, dict) and isinstance(backoff.get("delay"), int | float):
        return max(int(backoff["delay"]), 0) or DEFAULT_BASE_DELAY_MS
    if isinstance(backoff, int | float) and backoff > 0:
        return int(backoff)
    return DEFAULT_BASE_DELAY_MS


class RetryableJobError(Exception):
    """Fails one attempt of a job so BullMQ runs it again after `delay_ms`."""

    def __init__(self, message: str, delay_ms: int) -> None:
        super().__init__(message)
        self.delay_ms = delay_ms


def backoff_strategy(attempts_made: int, backoff_type: str, error: Any, job: Any) -> int:
    """BullMQ's custom strategy hook: the delay the runner already chose for this failure."""
    if isinstance(error, RetryableJobError):
        return error.delay_ms
    return DEFAULT_BASE_DELAY_MS
