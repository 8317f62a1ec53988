"""BullMQ progress updates sent in batches, on the real Redis with the package's own
script: what the package's `Job.updateProgress` would write, in one round trip for many
jobs, a refusal when the job is gone, and the script loaded again after Redis lost it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import orjson
import pytest
import redis.asyncio as redis
from bullmq import Job, Queue

from tests.faults.redis_server import PrivateRedis
from tests.support import TEST_REDIS_URL
from uvian_worker.runtime.progress import ProgressRefused, ProgressReporter

QUEUE = "progress"


class Jobs:
    """A queue of its own on `url`, its jobs, and a client to read what they hold."""

    def __init__(self, url: str) -> None:
        self.prefix = f"t{uuid4().hex[:10]}"
        self.client = redis.Redis.from_url(url)
        self.queue = Queue(QUEUE, {"connection": url, "prefix": self.prefix})

    async def add(self, count: int) -> list[Job]:
        jobs = []
        for _ in range(count):
            added = await self.queue.add("job", {}, {"jobId": str(uuid4())})
            jobs.append(await Job.fromId(self.queue, added.id))
        return jobs

    async def progress_of(self, job: Job) -> Any:
        stored = await self.client.hget(f"{self.prefix}:{QUEUE}:{job.id}", "progress")
        return orjson.loads(stored) if stored is not None else None

    async def progress_events(self) -> list[dict[bytes, bytes]]:
        entries = await self.client.xrange(f"{self.prefix}:{QUEUE}:events")
        return [fields for _id, fields in entries if fields[b"event"] == b"progress"]

    async def close(self) -> None:
        await self.queue.close()
        keys = [key async for key in self.client.scan_iter(match=f"{self.prefix}:*")]
        if keys:
            await self.client.unlink(*keys)
        await self.client.aclose()


@pytest.fixture
async def jobs() -> AsyncIterator[Jobs]:
    running = Jobs(TEST_REDIS_URL)
    try:
        yield running
    finally:
        await running.close()


async def test_updates_of_many_jobs_go_in_one_round_trip_as_the_package_writes_them(
    jobs: Jobs,
) -> None:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    reporter = ProgressReporter(client)
    batches = reporter._batches
    round_trips = 0
    round_trip = batches._round_trip

    async def counting(packed: bytes, count: int) -> list[Any]:
        nonlocal round_trips
        round_trips += 1
        return await round_trip(packed, count)

    batches._round_trip = counting  # type: ignore[method-assign]
    running = await jobs.add(30)
    try:
        await asyncio.gather(
            *(reporter.report(job, {"seq": n, "chars": 10 * n}) for n, job in enumerate(running))
        )
        by_package = (await jobs.add(1))[0]
        await by_package.updateProgress({"seq": 99, "chars": 990})
    finally:
        await client.aclose()

    assert round_trips <= 2
    for n, job in enumerate(running):
        assert await jobs.progress_of(job) == {"seq": n, "chars": 10 * n}
        assert job.progress == {"seq": n, "chars": 10 * n}
    events = await jobs.progress_events()
    assert len(events) == 31
    # The same fields and serialization as the package's own update.
    ours, theirs = events[0], events[-1]
    assert set(ours) == set(theirs)
    assert orjson.loads(ours[b"data"]) == {"seq": 0, "chars": 0}
    assert theirs[b"data"] == b'{"seq":99,"chars":990}'


async def test_an_update_for_a_job_that_is_gone_is_refused(jobs: Jobs) -> None:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    [job] = await jobs.add(1)
    await client.delete(f"{jobs.prefix}:{QUEUE}:{job.id}")
    try:
        with pytest.raises(ProgressRefused, match="code -1"):
            await ProgressReporter(client).report(job, {"seq": 1})
    finally:
        await client.aclose()


async def test_the_script_is_loaded_again_after_redis_lost_it() -> None:
    with PrivateRedis() as server:
        running = Jobs(server.url)
        client = redis.Redis.from_url(server.url)
        try:
            [job] = await running.add(1)
            await client.script_flush()  # as after a restart of a Redis that keeps no data

            await ProgressReporter(client).report(job, {"seq": 7})

            assert await running.progress_of(job) == {"seq": 7}
        finally:
            await client.aclose()
            await running.close()
