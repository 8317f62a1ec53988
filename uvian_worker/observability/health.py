"""The worker's heartbeat in Redis, and what it says about the worker's health.

A live worker keeps a key `{prefix}:uvian:worker:{workerId}` holding a JSON
description of itself, rewritten every few seconds with a lifetime of three
beats: a worker that dies or hangs disappears on its own. The ids of the
workers are also kept in a sorted set, `{prefix}:uvian:workers`, scored by
their last beat, so readers find them without scanning every key of the
database (SCAN would walk all the job keys, and covers one node of a cluster
only). Both names start with the queue prefix, so a hash-tagged prefix keeps
them in the queues' Redis Cluster slot.

`HealthCheck` is the process's own view (for `/health`): healthy while its
last beat succeeded recently and it is taking jobs. `read_workers` is
everyone else's view (for `uvian-worker health` and `stats`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import redis.asyncio as redis
from redis.exceptions import RedisError

from uvian_worker.clock import monotonic_s, now_s

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 5.0
HEARTBEAT_TTL_BEATS = 3
# Ids of workers that died without deleting their key are dropped from the
# index once their last beat is this old (by the writer's clock).
INDEX_RETENTION_S = 3600.0
# At most this many workers are read back from the index.
MAX_WORKERS_READ = 1000


def worker_key(prefix: str, worker_id: str) -> str:
    return f"{prefix}:uvian:worker:{worker_id}"


def workers_index_key(prefix: str) -> str:
    return f"{prefix}:uvian:workers"


def default_worker_id(worker_name: str | None = None) -> str:
    """`WORKER_NAME` or the host name, then the process id: unique per process and readable."""
    return f"{worker_name or socket.gethostname()}:{os.getpid()}"


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds")


def _describe(exc: BaseException) -> str:
    # redis-py's messages name a host and port at most, never the password.
    first_line = (str(exc).splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


class Heartbeat:
    """Writes this worker's key every `interval_s` while it runs; `stop()` deletes it."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str,
        worker_id: str,
        queues: Sequence[str],
        jobs_in_flight: Callable[[], int],
        taking_jobs: Callable[[], bool],
        interval_s: float = HEARTBEAT_INTERVAL_S,
    ) -> None:
        self._client = client
        self.prefix = prefix
        self.worker_id = worker_id
        self._queues = list(queues)
        self._jobs_in_flight = jobs_in_flight
        self._taking_jobs = taking_jobs
        self.interval_s = interval_s
        self._started_at_s = now_s()
        self._last_success_s: float | None = None
        self._failing = False
        self._stopped = False
        self._task: asyncio.Task[None] | None = None

    @property
    def key(self) -> str:
        return worker_key(self.prefix, self.worker_id)

    @property
    def ttl_s(self) -> float:
        return self.interval_s * HEARTBEAT_TTL_BEATS

    @property
    def stopped(self) -> bool:
        return self._stopped

    def taking_jobs(self) -> bool:
        return self._taking_jobs()

    def jobs_in_flight(self) -> int:
        return self._jobs_in_flight()

    def last_beat_age_s(self) -> float | None:
        """Seconds since the last successful beat; None before the first."""
        if self._last_success_s is None:
            return None
        return monotonic_s() - self._last_success_s

    async def start(self) -> None:
        """Beat once now, then every `interval_s` in a background task.

        A first beat that fails is logged and retried on schedule: Redis being
        away for a moment must not stop the worker from starting.
        """
        self._started_at_s = now_s()
        self._stopped = False
        await self.beat()
        self._task = asyncio.create_task(self._run(), name=f"heartbeat:{self.worker_id}")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.beat()

    async def beat(self) -> bool:
        """Write the key and the index entry; True when Redis took both."""
        beat_at_s = now_s()
        payload = orjson.dumps(self._payload(beat_at_s))
        index = workers_index_key(self.prefix)
        try:
            async with asyncio.timeout(self.interval_s):
                pipe = self._client.pipeline(transaction=False)
                pipe.set(self.key, payload, px=round(self.ttl_s * 1000))
                pipe.zadd(index, {self.worker_id: round(beat_at_s * 1000)})
                pipe.zremrangebyscore(index, "-inf", round((beat_at_s - INDEX_RETENTION_S) * 1000))
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            if not self._failing:
                logger.warning("Heartbeat failed: %s", _describe(exc))
            self._failing = True
            return False

        if self._failing:
            logger.info("Heartbeat written again")
        self._failing = False
        self._last_success_s = monotonic_s()
        return True

    def _payload(self, beat_at_s: float) -> dict[str, Any]:
        return {
            "workerId": self.worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": self._queues,
            "startedAt": _iso(self._started_at_s),
            "heartbeatAt": _iso(beat_at_s),
            "jobsInFlight": self._jobs_in_flight(),
            "takingJobs": self._taking_jobs(),
        }

    async def stop(self) -> None:
        """Stop beating and delete the key, so readers see the worker gone at once."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            async with asyncio.timeout(self.interval_s):
                pipe = self._client.pipeline(transaction=False)
                pipe.delete(self.key)
                pipe.zrem(workers_index_key(self.prefix), self.worker_id)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            # The key lapses by itself within its lifetime.
            logger.warning("Could not delete the heartbeat key: %s", _describe(exc))


@dataclass(frozen=True, slots=True)
class HealthStatus:
    healthy: bool
    reason: str
    worker_id: str
    taking_jobs: bool
    jobs_in_flight: int
    last_beat_age_s: float | None

    def as_json(self) -> dict[str, Any]:
        age = self.last_beat_age_s
        return {
            "status": "ok" if self.healthy else "unhealthy",
            "reason": self.reason,
            "workerId": self.worker_id,
            "takingJobs": self.taking_jobs,
            "jobsInFlight": self.jobs_in_flight,
            "lastHeartbeatAgeS": None if age is None else round(age, 3),
        }


class HealthCheck:
    """Healthy while the heartbeat succeeded within `max_beat_age_s` and jobs are taken."""

    def __init__(self, heartbeat: Heartbeat, *, max_beat_age_s: float | None = None) -> None:
        self._heartbeat = heartbeat
        # By default as long as the key itself lives: past that, others see the worker gone.
        self._max_beat_age_s = max_beat_age_s if max_beat_age_s is not None else heartbeat.ttl_s

    def status(self) -> HealthStatus:
        heartbeat = self._heartbeat
        age_s = heartbeat.last_beat_age_s()
        taking_jobs = heartbeat.taking_jobs()
        healthy, reason = self._verdict(age_s, taking_jobs)
        return HealthStatus(
            healthy=healthy,
            reason=reason,
            worker_id=heartbeat.worker_id,
            taking_jobs=taking_jobs,
            jobs_in_flight=heartbeat.jobs_in_flight(),
            last_beat_age_s=age_s,
        )

    def _verdict(self, age_s: float | None, taking_jobs: bool) -> tuple[bool, str]:
        if self._heartbeat.stopped:
            return False, "heartbeat stopped"
        if age_s is None:
            return False, "no heartbeat written yet"
        if age_s > self._max_beat_age_s:
            return False, f"last heartbeat written {age_s:.1f} s ago"
        if not taking_jobs:
            return False, "not taking jobs"
        return True, "taking jobs"


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One live worker, as its heartbeat describes it."""

    worker_id: str
    host: str
    pid: int
    queues: list[str]
    started_at: str
    heartbeat_at: str
    jobs_in_flight: int
    taking_jobs: bool

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerInfo:
        """Raises ValueError or TypeError when `raw` is not a heartbeat's JSON."""
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("a heartbeat is a JSON object")
        return cls(
            worker_id=str(data.get("workerId", "")),
            host=str(data.get("host", "")),
            pid=int(data.get("pid", 0)),
            queues=[str(name) for name in data.get("queues", [])],
            started_at=str(data.get("startedAt", "")),
            heartbeat_at=str(data.get("heartbeatAt", "")),
            jobs_in_flight=int(data.get("jobsInFlight", 0)),
            taking_jobs=bool(data.get("takingJobs", False)),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "workerId": self.worker_id,
            "host": self.host,
            "pid": self.pid,
            "queues": self.queues,
            "startedAt": self.started_at,
            "heartbeatAt": self.heartbeat_at,
            "jobsInFlight": self.jobs_in_flight,
            "takingJobs": self.taking_jobs,
        }


async def read_workers(
    client: redis.Redis, prefix: str, worker_id: str | None = None
) -> list[WorkerInfo]:
    """The workers whose heartbeat key exists: all of the prefix's, or the one named."""
    if worker_id is not None:
        worker_ids = [worker_id]
    else:
        index = workers_index_key(prefix)
        members = await client.zrevrange(index, 0, MAX_WORKERS_READ - 1)
        worker_ids = [m.decode() if isinstance(m, bytes) else str(m) for m in members]

    pipe = client.pipeline(transaction=False)
    for each in worker_ids:
        pipe.get(worker_key(prefix, each))
    values = await pipe.execute() if worker_ids else []
    workers: list[WorkerInfo] = []
    for value in values:
        if value is None:  # lapsed since the index was read, or never existed
            continue
        try:
            workers.append(WorkerInfo.from_json(value))
        except (ValueError, TypeError):
            logger.warning("Ignoring a heartbeat key that is not a heartbeat's JSON")
    return workers
