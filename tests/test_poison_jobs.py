"""Jobs a producer stored so badly that they cannot even be read: each fails at once, and a
good job behind them still runs."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import orjson
import pytest
import redis.asyncio as redis
from bullmq import Queue

from tests.support import (
    TEST_REDIS_URL,
    QueueWatcher,
    enqueue,
    running_worker,
    seed_chat_job,
    settings_for_test,
)
from uvian_worker.providers.simulator import RunningSimulator
from uvian_worker.settings import Settings
from uvian_worker.store.database import Database


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


async def add_then_spoil(settings: Settings, job_id: str, fields: dict[str, Any]) -> None:
    """Add a delayed job, then overwrite fields of its hash before it becomes due."""
    queue = Queue(
        settings.chat_queue,
        {"connection": settings.effective_redis_url, "prefix": settings.queue_prefix},
    )
    try:
        await queue.add("ai-chat", {"input": {}}, {"jobId": job_id, "delay": 300, "attempts": 3})
    finally:
        await queue.close()
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        await client.hset(f"{settings.queue_prefix}:{settings.chat_queue}:{job_id}", mapping=fields)
    finally:
        await client.aclose()


SPOILED: list[tuple[str, dict[str, Any], str]] = [
    ("data not JSON", {"data": "{not json"}, "the job could not be read: JSONDecodeError"),
    ("data nested too deep", {"data": nested(5000)}, "the job could not be read: RecursionError"),
    ("options not JSON", {"opts": "[[["}, "the job could not be read: JSONDecodeError"),
    ("timestamp not a number", {"timestamp": "soon"}, "the job could not be read: ValueError"),
    # Bytes that are not UTF-8 read as U+FFFD: the input is then simply invalid.
    (
        "data not UTF-8",
        {"data": b'{"input": {"message": "\xff\xfe"}}'},
        "invalid ai-chat input: conversationId is required",
    ),
]


@pytest.mark.parametrize(("case", "fields", "reason"), SPOILED, ids=[c[0] for c in SPOILED])
async def test_unreadable_job_fails_at_once(
    database: Database, simulator: RunningSimulator, case: str, fields: dict[str, Any], reason: str
) -> None:
    settings = settings_for_test(simulator.url)
    good = await seed_chat_job(database)
    bad_id = str(uuid4())
    async with running_worker(settings), QueueWatcher.open(settings) as watcher:
        await add_then_spoil(settings, bad_id, fields)
        event, details = await watcher.finished(bad_id)
        await enqueue(settings, "ai-chat", good.data, str(good.job_id))
        good_event, _ = await watcher.finished(str(good.job_id))
    queue = Queue(
        settings.chat_queue,
        {"connection": settings.effective_redis_url, "prefix": settings.queue_prefix},
    )
    try:
        state = await queue.getJobState(bad_id)  # getJob would choke on the spoiled hash too
    finally:
        await queue.close()
    assert event == "failed" and state == "failed"
    assert details["failedReason"].startswith(reason), details
    assert good_event == "completed"


async def test_attempts_stored_as_a_string_still_fail_cleanly(
    database: Database, simulator: RunningSimulator
) -> None:
    settings = settings_for_test(simulator.url)
    chat = await seed_chat_job(database)
    data = {"jobId": str(chat.job_id), "input": {**chat.input, "userId": "nobody"}}
    async with running_worker(settings), QueueWatcher.open(settings) as watcher:
        queue = Queue(
            settings.chat_queue,
            {"connection": settings.effective_redis_url, "prefix": settings.queue_prefix},
        )
        try:
            await queue.add("ai-chat", data, {"jobId": str(chat.job_id), "delay": 300})
        finally:
            await queue.close()
        client = redis.Redis.from_url(TEST_REDIS_URL)
        key = f"{settings.queue_prefix}:{settings.chat_queue}:{chat.job_id}"
        opts = orjson.loads(await client.hget(key, "opts"))
        await client.hset(key, "opts", orjson.dumps({**opts, "attempts": "3"}))
        await client.aclose()
        event, details = await watcher.finished(str(chat.job_id))
    assert event == "failed"
    assert details["failedReason"] == "invalid ai-chat input: userId must be a UUID"
