"""Outages of the services the worker depends on, for real: Redis gone for 10 s while a
reply streams, Postgres restarted mid-job, and the worker behind pgbouncer in
transaction mode under 200 concurrent jobs."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.faults import PgBouncer, PrivatePostgres, PrivateRedis
from tests.support import (
    QueueWatcher,
    WorkerProcess,
    enqueue,
    final_status,
    job_state,
    record_events,
    seed_chat_job,
    settings_for_test,
    worker_env,
)
from uvian_worker.providers.simulator import RunningSimulator, scripted_reply
from uvian_worker.store.database import Database

CLOCK_TICKS_S = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds a process has used (from /proc)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_S


@pytest.fixture
def redis_server() -> Iterator[PrivateRedis]:
    with PrivateRedis(appendonly=True) as server:
        yield server


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PrivatePostgres]:
    with PrivatePostgres() as server:
        yield server


async def test_redis_gone_for_ten_seconds_while_a_reply_streams(
    database: Database, simulator: RunningSimulator, redis_server: PrivateRedis
) -> None:
    message = "Outlast the outage [[sim:tokens=700]] [[sim:tps=50]]"  # 14 s of streaming
    chat = await seed_chat_job(database, message)
    quick = await seed_chat_job(database, "Right after")
    settings = settings_for_test(
        simulator.url,
        redis_url=redis_server.url,
        lock_duration_ms=2_000,
        stalled_interval_ms=1_000,
    )
    worker = WorkerProcess(worker_env(settings))
    await worker.start()
    assert worker.process is not None
    try:
        async with record_events(
            f"conversation:{chat.conversation_id}:*", url=redis_server.url
        ) as rec:
            await enqueue(settings, "ai-chat", chat.data, str(chat.job_id))
            await rec.wait_for(lambda c, e: e.get("type") == "ai_delta", count=2)
        redis_server.stop()
        lines_before, cpu_before = len(worker.lines), cpu_s(worker.process.pid)
        await asyncio.sleep(10)  # the outage itself
        outage_cpu_s = cpu_s(worker.process.pid) - cpu_before
        outage_lines = len(worker.lines) - lines_before
        await asyncio.to_thread(redis_server.start)

        back_at = time.monotonic()
        async with QueueWatcher.open(settings, from_start=True) as watcher:
            await enqueue(settings, "ai-chat", quick.data, str(quick.job_id))
            assert (await watcher.finished(str(quick.job_id)))[0] == "completed"
            resumed_s = time.monotonic() - back_at
            event, _fields = await watcher.finished(str(chat.job_id))
        state, _job = await job_state(settings, str(chat.job_id))
    finally:
        assert await worker.stop() == 0, worker.output

    print(
        f"outage: {outage_cpu_s:.2f} s CPU, {outage_lines} log lines; resumed in {resumed_s:.2f} s"
    )
    assert outage_cpu_s < 1.0, worker.output
    assert outage_lines < 25, worker.output
    assert resumed_s < 5
    assert event == "completed" and state == "completed", worker.output
    async with database.transaction() as conn:
        rows = await conn.fetch("select * from public.messages where job_id = $1", chat.job_id)
        job_row = await conn.fetchrow("select * from public.jobs where id = $1", chat.job_id)
    [reply] = rows
    assert reply["status"] == "completed"
    assert reply["content"] == "".join(scripted_reply(message, 700))
    assert job_row["status"] == "completed"


async def test_postgres_restarted_mid_job_is_retried_and_completes(
    simulator: RunningSimulator, postgres_server: PrivatePostgres
) -> None:
    database = await Database.connect(postgres_server.dsn, min_size=1, max_size=2)
    try:
        message = "Keep going [[sim:tokens=150]] [[sim:tps=50]]"
        chat = await seed_chat_job(database, message)
    finally:
        await database.close()
    settings = settings_for_test(
        simulator.url, database_url=postgres_server.dsn, reply_save_interval_s=0.2
    )
    worker = WorkerProcess(worker_env(settings))
    await worker.start()
    try:
        async with record_events(
            f"job:{chat.job_id}:*", f"conversation:{chat.conversation_id}:*"
        ) as rec:
            await enqueue(settings, "ai-chat", chat.data, str(chat.job_id), attempts=3)
            await rec.wait_for(lambda c, e: e.get("type") == "ai_delta", count=3)
            await asyncio.to_thread(postgres_server.restart)
            await rec.wait_for(final_status(chat.job_id))
    finally:
        assert await worker.stop() == 0, worker.output

    statuses = [e["status"] for c, e in rec.events if c.endswith(":status")]
    assert statuses[-1] == "completed", (statuses, worker.output)
    database = await Database.connect(postgres_server.dsn, min_size=1, max_size=2)
    try:
        async with database.transaction() as conn:
            rows = await conn.fetch("select * from public.messages where job_id = $1", chat.job_id)
    finally:
        await database.close()
    [reply] = rows
    assert reply["status"] == "completed"
    assert reply["content"] == "".join(scripted_reply(message, 150))
    finals = [e for _c, e in rec.events if e.get("type") == "ai_response"]
    assert len(finals) == 1


@pytest.mark.skipif(shutil.which("pgbouncer") is None, reason="needs Debian's pgbouncer")
async def test_200_concurrent_jobs_behind_pgbouncer_in_transaction_mode(
    migrated_dsn: str, database: Database, simulator: RunningSimulator
) -> None:
    chats = [await seed_chat_job(database, f"Pooled {n} [[sim:tokens=20]]") for n in range(200)]
    with PgBouncer(5432, pool_size=10) as bouncer:
        settings = settings_for_test(
            simulator.url,
            database_url=bouncer.dsn_for("uvian_test"),
            worker_concurrency=200,
            db_pool_max_size=40,
        )
        env = worker_env(settings) | {"DB_POOL_MAX_SIZE": "40", "WORKER_CONCURRENCY": "200"}
        worker = WorkerProcess(env)
        await worker.start()
        try:
            async with QueueWatcher.open(settings) as watcher:
                for chat in chats:
                    await enqueue(settings, "ai-chat", chat.data, str(chat.job_id), attempts=1)
                outcomes: list[Any] = [await watcher.finished(str(c.job_id)) for c in chats]
        finally:
            assert await worker.stop() == 0
    assert [event for event, _fields in outcomes] == ["completed"] * 200
    assert "prepared statement" not in worker.output
    async with database.transaction() as conn:
        replies = await conn.fetchval(
            "select count(*) from public.messages where job_id = any($1::uuid[])"
            " and status = 'completed'",
            [c.job_id for c in chats],
        )
    assert replies == 200
