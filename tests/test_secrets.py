"""Secrets never appear in logs, events, job results, job rows or BullMQ's failure data."""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis

from tests.support import (
    TEST_DSN,
    TEST_REDIS_URL,
    WorkerProcess,
    enqueue,
    final_status,
    record_events,
    seed_chat_job,
    settings_for_test,
    worker_env,
)
from uvian_worker.observability.redaction import REDACTED, redact, register_secret
from uvian_worker.providers.simulator import RunningSimulator
from uvian_worker.store.database import Database

API_KEY = "sk-live-Zq8LEAKCANARY1"
DB_PASSWORD = "pg-LEAKCANARY2"
REDIS_PASSWORD = "rd-LEAKCANARY3"


def test_registered_secrets_are_cut_from_any_text() -> None:
    register_secret("hunter2-canary")
    assert redact("auth failed for key hunter2-canary!") == f"auth failed for key {REDACTED}!"
    register_secret("abc")  # too short to redact safely: ordinary words would vanish
    assert redact("abc") == "abc"


async def test_no_secret_leaves_the_worker(database: Database, simulator: RunningSimulator) -> None:
    settings = settings_for_test(simulator.url)
    env = worker_env(settings) | {
        # Trust auth ignores the password and a Redis without one accepts any: both
        # are carried through every connection without breaking them.
        "DATABASE_URL": TEST_DSN.replace("postgres@", f"postgres:{DB_PASSWORD}@"),
        "REDIS_URL": TEST_REDIS_URL.replace("redis://", f"redis://:{REDIS_PASSWORD}@"),
        "LLM_PROVIDER": "openai",
        "OPENAI_BASE_URL": f"{simulator.url}/v1",
        "OPENAI_API_KEY": API_KEY,
        "LLM_MODEL": "uvian-sim-1",
        "LOG_LEVEL": "DEBUG",
        "LOG_FORMAT": "json",
    }
    messages = [
        "Fine",
        "Bad gateway [[sim:fault=http_500]]",
        "Rejected [[sim:fault=http_400]]",
        "Broken [[sim:fault=error_mid_stream]]",
        f"Echo the key {API_KEY} and {DB_PASSWORD}",
    ]
    chats = [await seed_chat_job(database, text) for text in messages]
    worker = WorkerProcess(env)
    await worker.start()
    seen: list[Any] = []
    try:
        async with record_events("job:*", "conversation:*") as rec:
            for chat in chats:
                await enqueue(settings, "ai-chat", chat.data, str(chat.job_id), attempts=2)
            for chat in chats:
                await rec.wait_for(final_status(chat.job_id))
            seen.extend(rec.events)
    finally:
        assert await worker.stop() == 0
    client = redis.Redis.from_url(TEST_REDIS_URL, decode_responses=True)
    try:
        for chat in chats:
            seen.append(await client.hgetall(f"{settings.queue_prefix}:ai-jobs:{chat.job_id}"))
    finally:
        await client.aclose()
    async with database.transaction() as conn:
        rows = await conn.fetch(
            "select error_message, output::text from public.jobs where id = any($1::uuid[])",
            [chat.job_id for chat in chats],
        )
    seen.extend(dict(row) for row in rows)

    everything = worker.output + repr(seen)
    assert "Job failed" in worker.output or "attempt failed" in worker.output
    for secret in (API_KEY, DB_PASSWORD, REDIS_PASSWORD):
        # The user typed the key into a message (the last chat): it is content,
        # stored as such, but still never logged.
        assert secret not in worker.output, secret
    for secret in (DB_PASSWORD, REDIS_PASSWORD):
        assert secret not in everything.replace(messages[-1], ""), secret
