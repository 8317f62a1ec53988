"""Prometheus metrics of one worker process, and the small HTTP server that exposes them.

`WorkerMetrics` owns a registry of its own rather than the process-wide one,
so several workers in one process (the tests, an embedding app) never share
or double-register series. The runtime records each job's start and end, the
provider's first-token latency, reply sizes and provider errors; a collector
adds the queues' depths, read straight from BullMQ's Redis keys every few
seconds so a scrape never waits on Redis.

The server is off unless `METRICS_PORT` is set. It answers `GET /metrics`
(Prometheus text, or OpenMetrics when the scraper asks for it) and
`GET /health` (200 or 503 with a JSON body, for load balancers and probes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as redis
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import GaugeMetricFamily, Metric
from redis.exceptions import RedisError

from uvian_worker.clock import now_s
from uvian_worker.errors import (
    ProviderFailed,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    StreamTruncated,
)
from uvian_worker.observability.health import HealthCheck

logger = logging.getLogger(__name__)

# retried: failed with attempts left; superseded: a newer run of the same job took it over.
Outcome = Literal["completed", "failed", "retried", "cancelled", "superseded"]
OUTCOMES: tuple[Outcome, ...] = ("completed", "failed", "retried", "cancelled", "superseded")
PROVIDER_ERROR_KINDS = tuple(
    cls.kind
    for cls in (
        ProviderUnavailable,
        ProviderTimeout,
        StreamTruncated,
        ProviderFailed,
        ProviderRejected,
    )
)
QUEUE_STATES = ("waiting", "active", "delayed", "failed")
QUEUE_COUNTS_INTERVAL_S = 5.0
# A job name outside the ones the worker runs is recorded under this label, so a
# producer sending arbitrary names cannot grow the number of series without bound.
OTHER_JOB_NAME = "other"

# A chat reply takes about a second on a warm model and minutes when a serverless
# endpoint starts cold or the reply is long; the buckets cover both ends.
JOB_DURATION_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
FIRST_TOKEN_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
REPLY_TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True, slots=True)
class QueueCounts:
    waiting: int  # wait + prioritized + the legacy paused list
    active: int
    delayed: int
    failed: int

    def as_dict(self) -> dict[str, int]:
        return {state: getattr(self, state) for state in QUEUE_STATES}


class QueueCountsCollector:
    """Serves the queue depths last read from Redis, and when they were read."""

    def __init__(self) -> None:
        self._counts: dict[str, QueueCounts] = {}
        self._updated_at_s: float | None = None

    def update(self, counts: dict[str, QueueCounts]) -> None:
        self._counts = dict(counts)
        self._updated_at_s = now_s()

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        jobs, updated = self._families()
        for queue, counts in sorted(self._counts.items()):
            for state, value in counts.as_dict().items():
                jobs.add_metric([queue, state], value)
        if self._updated_at_s is not None:
            updated.add_metric([], self._updated_at_s)
        return [jobs, updated]

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "uvian_worker_queue_jobs",
                "Jobs in each BullMQ queue by state, as last read from Redis",
                labels=["queue", "state"],
            ),
            GaugeMetricFamily(
                "uvian_worker_queue_counts_updated_timestamp_seconds",
                "When the queue counts were last read from Redis (Unix time)",
            ),
        ]


async def read_queue_counts(
    client: redis.Redis, prefix: str, queue_names: Sequence[str]
) -> dict[str, QueueCounts]:
    """Each queue's depths in one pipelined round trip, from the keys BullMQ's scripts use.

    Lists: `wait`, `active` and `paused` (where BullMQ before v5 parked the
    jobs of a paused queue). Sorted sets: `prioritized`, `delayed`, `failed`.
    """
    pipe = client.pipeline(transaction=False)
    for name in queue_names:
        base = f"{prefix}:{name}"
        pipe.llen(f"{base}:wait")
        pipe.llen(f"{base}:paused")
        pipe.zcard(f"{base}:prioritized")
        pipe.llen(f"{base}:active")
        pipe.zcard(f"{base}:delayed")
        pipe.zcard(f"{base}:failed")
    replies = [int(value) for value in await pipe.execute()]

    counts: dict[str, QueueCounts] = {}
    for index, name in enumerate(queue_names):
        wait, paused, prioritized, active, delayed, failed = replies[index * 6 : index * 6 + 6]
        counts[name] = QueueCounts(wait + paused + prioritized, active, delayed, failed)
    return counts


class WorkerMetrics:
    """The series of one worker process; the runtime calls the recording methods."""

    def __init__(self, job_names: Collection[str] | None = None) -> None:
        """`job_names`: the names this worker runs; None accepts any name (tests, tools)."""
        self.registry = CollectorRegistry()
        self._job_names = frozenset(job_names) if job_names is not None else None
        self._in_flight_count = 0
        self._define_series()
        self._queue_counts = QueueCountsCollector()
        self.registry.register(self._queue_counts)
        self._start_at_zero()

    def _define_series(self) -> None:
        registry = self.registry
        self._started = Counter(
            "uvian_worker_jobs_started", "Job attempts started", ["job_name"], registry=registry
        )
        self._finished = Counter(
            "uvian_worker_jobs_finished",
            "Job attempts ended, by outcome",
            ["job_name", "outcome"],
            registry=registry,
        )
        self._duration = Histogram(
            "uvian_worker_job_duration_seconds",
            "How long one job attempt ran, by outcome",
            ["job_name", "outcome"],
            buckets=JOB_DURATION_BUCKETS_S,
            registry=registry,
        )
        self._in_flight = Gauge(
            "uvian_worker_jobs_in_flight", "Job attempts running now", registry=registry
        )
        self._first_token = Histogram(
            "uvian_worker_first_token_seconds",
            "From sending the request to the provider to its first reply token",
            buckets=FIRST_TOKEN_BUCKETS_S,
            registry=registry,
        )
        self._reply_tokens = Histogram(
            "uvian_worker_reply_tokens",
            "Tokens in each reply, as the provider counted them",
            buckets=REPLY_TOKEN_BUCKETS,
            registry=registry,
        )
        self._provider_errors = Counter(
            "uvian_worker_provider_errors",
            "Provider failures by error kind",
            ["kind"],
            registry=registry,
        )

    def _start_at_zero(self) -> None:
        # Series that exist from the start make rate() and alerts work before
        # the first failure instead of appearing out of nowhere.
        for kind in PROVIDER_ERROR_KINDS:
            self._provider_errors.labels(kind)
        for name in sorted(self._job_names or ()):
            self._started.labels(name)
            for outcome in OUTCOMES:
                self._finished.labels(name, outcome)

    def job_started(self, job_name: str) -> None:
        self._started.labels(self._job_label(job_name)).inc()
        self._in_flight_count += 1
        self._in_flight.set(self._in_flight_count)

    def job_finished(self, job_name: str, outcome: Outcome, duration_s: float) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown job outcome {outcome!r}")
        label = self._job_label(job_name)
        self._finished.labels(label, outcome).inc()
        self._duration.labels(label, outcome).observe(max(duration_s, 0.0))
        self._in_flight_count = max(self._in_flight_count - 1, 0)
        self._in_flight.set(self._in_flight_count)

    def first_token(self, seconds: float) -> None:
        self._first_token.observe(max(seconds, 0.0))

    def reply_tokens(self, count: int) -> None:
        self._reply_tokens.observe(max(count, 0))

    def provider_error(self, kind: str) -> None:
        self._provider_errors.labels(kind).inc()

    @property
    def jobs_in_flight(self) -> int:
        return self._in_flight_count

    async def refresh_queue_counts(
        self, redis_client: redis.Redis, prefix: str, queue_names: Sequence[str]
    ) -> None:
        """Read every queue's depths now; the next scrape serves them."""
        self._queue_counts.update(await read_queue_counts(redis_client, prefix, queue_names))

    def _job_label(self, job_name: str) -> str:
        if self._job_names is None:
            return job_name[:64]
        return job_name if job_name in self._job_names else OTHER_JOB_NAME


async def poll_queue_counts(
    metrics: WorkerMetrics,
    redis_client: redis.Redis,
    prefix: str,
    queue_names: Sequence[str],
    *,
    interval_s: float = QUEUE_COUNTS_INTERVAL_S,
) -> None:
    """Refresh the queue counts every `interval_s` until cancelled; Redis trouble is logged once."""
    failing = False
    while True:
        try:
            async with asyncio.timeout(interval_s):
                await metrics.refresh_queue_counts(redis_client, prefix, queue_names)
        except (RedisError, OSError, TimeoutError) as exc:
            if not failing:
                logger.warning("Could not read the queue counts: %s", type(exc).__name__)
            failing = True
        else:
            if failing:
                logger.info("Queue counts are read again")
            failing = False
        await asyncio.sleep(interval_s)


@dataclass(frozen=True, slots=True)
class MetricsServer:
    host: str
    port: int
    runner: web.AppRunner

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_metrics_server(
    metrics: WorkerMetrics, host: str, port: int, health: HealthCheck
) -> MetricsServer:
    """Serve `/metrics` and `/health` on `host:port` (port 0 picks a free one)."""

    async def health_handler(_request: web.Request) -> web.Response:
        status = health.status()
        return web.json_response(status.as_json(), status=200 if status.healthy else 503)

    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry))
    app.router.add_get("/health", health_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        await runner.cleanup()
        raise

    bound_port = int(runner.addresses[0][1])
    logger.info("Metrics and health served on %s:%s", host, bound_port)
    return MetricsServer(host, bound_port, runner)
