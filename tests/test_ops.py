"""What operators see and run: metrics, the heartbeat and /health, and the operator
commands (stats, retry-failed, enqueue, health), on the real Redis and Postgres."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import uuid4

import aiohttp
import orjson
import pytest
import redis.asyncio as redis
from bullmq import Queue, Worker
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import TEST_DSN, TEST_REDIS_URL, WAIT_S
from uvian_worker import ops
from uvian_worker.observability.health import HealthCheck, Heartbeat, workers_index_key
from uvian_worker.observability.metrics import WorkerMetrics, start_metrics_server
from uvian_worker.settings import Settings, load_settings
from uvian_worker.store.database import Database
from uvian_worker.store.seed import add_user_message, seed_conversation

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of a Prometheus exposition, keyed by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": TEST_DSN,
        "redis_url": TEST_REDIS_URL,
        "queue_prefix": f"ops{uuid4().hex[:10]}",
        "connect_timeout_s": 2.0,
    }
    return load_settings(require_provider=False, _env_file=None, **{**values, **overrides})


@pytest.fixture
async def client() -> AsyncIterator[redis.Redis]:
    connection = redis.Redis.from_url(TEST_REDIS_URL, decode_responses=True)
    yield connection
    await connection.aclose()


@pytest.fixture
async def settings(client: redis.Redis) -> AsyncIterator[Settings]:
    made = make_settings()
    yield made
    keys = [key async for key in client.scan_iter(f"{made.queue_prefix}:*")]
    if keys:
        await client.delete(*keys)


@asynccontextmanager
async def running_heartbeat(
    client: redis.Redis, settings: Settings, taking: list[bool] | None = None
) -> AsyncIterator[Heartbeat]:
    taking = taking if taking is not None else [True]
    heartbeat = Heartbeat(
        client,
        prefix=settings.queue_prefix,
        worker_id=f"test-{uuid4().hex[:8]}",
        queues=settings.queue_names,
        jobs_in_flight=lambda: 2,
        taking_jobs=lambda: taking[0],
    )
    await heartbeat.start()
    try:
        yield heartbeat
    finally:
        await heartbeat.stop()


@asynccontextmanager
async def busy_queue(settings: Settings) -> AsyncIterator[Queue]:
    """The chat queue with 2 failed, 1 completed, 1 active, 3 waiting (1 prioritized), 1 delayed."""
    options = {"connection": settings.effective_redis_url, "prefix": settings.queue_prefix}
    queue = Queue(settings.chat_queue, options)
    loop = asyncio.get_running_loop()
    settled: list[str] = []
    three_settled: asyncio.Future[None] = loop.create_future()
    held: asyncio.Future[None] = loop.create_future()
    release = asyncio.Event()

    async def process(job: Any, _token: str) -> dict[str, Any]:
        if job.name == "fail":
            raise ValueError(f"bad input in {job.id}")
        if job.name == "hold":
            held.set_result(None)
            await release.wait()
        return {"ok": True}

    def on_settled(job: Any, *_args: Any) -> None:
        settled.append(job.id)
        if len(settled) == 3 and not three_settled.done():
            three_settled.set_result(None)

    for name, job_id in (("fail", "f1"), ("fail", "f2"), ("ok", "c1")):
        await queue.add(name, {}, {"jobId": job_id})
    worker = Worker(settings.chat_queue, process, {**options, "concurrency": 1})
    worker.on("completed", on_settled)
    worker.on("failed", on_settled)
    try:
        async with asyncio.timeout(WAIT_S):
            await three_settled
            # One slot, held by this job: what is added next stays waiting.
            await queue.add("hold", {}, {"jobId": "a1"})
            await held
        await queue.add("ok", {}, {"jobId": "w1"})
        await queue.add("ok", {}, {"jobId": "w2"})
        await queue.add("ok", {}, {"jobId": "p1", "priority": 3})
        await queue.add("ok", {}, {"jobId": "d1", "delay": 600_000})
        yield queue
    finally:
        release.set()
        await worker.close()
        await queue.close()


async def test_metrics_record_jobs_tokens_and_provider_errors() -> None:
    metrics = WorkerMetrics(job_names=["ai-chat", "notification"])
    for _ in range(3):
        metrics.job_started("ai-chat")
    metrics.job_started("surprise")
    metrics.job_finished("ai-chat", "completed", 1.5)
    metrics.job_finished("ai-chat", "retried", 0.2)
    metrics.job_finished("surprise", "failed", 0.01)
    metrics.first_token(0.3)
    metrics.reply_tokens(200)
    metrics.provider_error("provider_timeout")

    got = samples(generate_latest(metrics.registry).decode())
    assert got[("uvian_worker_jobs_started_total", (("job_name", "ai-chat"),))] == 3
    assert got[("uvian_worker_jobs_started_total", (("job_name", "other"),))] == 1
    assert got[("uvian_worker_jobs_in_flight", ())] == 1 == metrics.jobs_in_flight
    done = ("uvian_worker_jobs_finished_total", (("job_name", "ai-chat"), ("outcome", "completed")))
    assert got[done] == 1
    never = (
        "uvian_worker_jobs_finished_total",
        (("job_name", "notification"), ("outcome", "failed")),
    )
    assert got[never] == 0  # every known series exists from the start
    slow = (("job_name", "ai-chat"), ("le", "1.0"), ("outcome", "completed"))
    assert got[("uvian_worker_job_duration_seconds_bucket", slow)] == 0
    assert got[("uvian_worker_first_token_seconds_bucket", (("le", "0.5"),))] == 1
    assert got[("uvian_worker_reply_tokens_sum", ())] == 200
    assert got[("uvian_worker_provider_errors_total", (("kind", "provider_timeout"),))] == 1
    assert got[("uvian_worker_provider_errors_total", (("kind", "stream_truncated"),))] == 0
    with pytest.raises(ValueError, match="unknown job outcome"):
        metrics.job_finished("ai-chat", "vanished", 1.0)  # type: ignore[arg-type]


async def test_heartbeat_key_and_the_http_server(client: redis.Redis, settings: Settings) -> None:
    metrics = WorkerMetrics()
    metrics.job_started("ai-chat")
    taking = [True]
    async with running_heartbeat(client, settings, taking) as heartbeat:
        beat = orjson.loads(await client.get(heartbeat.key) or "null")
        assert beat["workerId"] == heartbeat.worker_id
        assert beat["queues"] == ["ai-jobs", "notifications"]
        assert (beat["jobsInFlight"], beat["takingJobs"]) == (2, True)
        assert beat["host"] == socket.gethostname() and beat["pid"] > 0
        assert 0 < await client.pttl(heartbeat.key) <= 15_000  # three beats of 5 s
        index = workers_index_key(settings.queue_prefix)
        assert await client.zscore(index, heartbeat.worker_id) is not None

        server = await start_metrics_server(metrics, "127.0.0.1", 0, HealthCheck(heartbeat))
        try:
            async with aiohttp.ClientSession(server.url) as http:
                async with http.get("/metrics") as response:
                    assert response.status == 200
                    text = await response.text()
                assert samples(text)[("uvian_worker_jobs_in_flight", ())] == 1
                async with http.get("/health") as response:
                    assert response.status == 200
                    body = await response.json()
                assert body["status"] == "ok" and body["workerId"] == heartbeat.worker_id
                assert body["lastHeartbeatAgeS"] < 5

                taking[0] = False  # shutting down: alive, but no longer taking jobs
                async with http.get("/health") as response:
                    assert response.status == 503
                    assert (await response.json())["reason"] == "not taking jobs"
                taking[0] = True

                await heartbeat.stop()
                async with http.get("/health") as response:
                    assert response.status == 503
                    assert (await response.json())["reason"] == "heartbeat stopped"
        finally:
            await server.stop()
        assert await client.exists(heartbeat.key) == 0
        assert await client.zscore(index, heartbeat.worker_id) is None


async def test_queue_counts_collector_reads_bullmq_keys(
    client: redis.Redis, settings: Settings
) -> None:
    metrics = WorkerMetrics()
    async with busy_queue(settings):
        # A job parked in the paused list by BullMQ before v5 still waits.
        await client.lpush(f"{settings.queue_prefix}:{settings.chat_queue}:paused", "old1")
        names = list(settings.queue_names)
        await metrics.refresh_queue_counts(client, settings.queue_prefix, names)

    got = samples(generate_latest(metrics.registry).decode())
    chat = {
        state: got[("uvian_worker_queue_jobs", (("queue", "ai-jobs"), ("state", state)))]
        for state in ("waiting", "active", "delayed", "failed")
    }
    assert chat == {"waiting": 4, "active": 1, "delayed": 1, "failed": 2}
    empty = ("uvian_worker_queue_jobs", (("queue", "notifications"), ("state", "waiting")))
    assert got[empty] == 0
    updated = got[("uvian_worker_queue_counts_updated_timestamp_seconds", ())]
    assert abs(updated - time.time()) < 60


async def test_stats_as_json_and_as_a_table(
    client: redis.Redis, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    async with busy_queue(settings), running_heartbeat(client, settings) as heartbeat:
        assert await ops.stats(settings, as_json=True, failed_limit=5) == 0
        report = json.loads(capsys.readouterr().out)
        assert await ops.stats(settings, as_json=False, failed_limit=1) == 0
        table = capsys.readouterr().out.splitlines()

    chat, notifications = report["queues"]
    counts = {key: chat[key] for key in ("waiting", "active", "delayed", "completed", "failed")}
    assert counts == {"waiting": 3, "active": 1, "delayed": 1, "completed": 1, "failed": 2}
    assert [job["id"] for job in chat["recentFailed"]] == ["f2", "f1"]  # newest first
    assert chat["recentFailed"][0]["failedReason"] == "bad input in f2"
    assert chat["recentFailed"][0]["attemptsMade"] == 1
    assert notifications["name"] == "notifications" and notifications["recentFailed"] == []
    assert [w["workerId"] for w in report["workers"]] == [heartbeat.worker_id]

    header = table.index("QUEUE          WAITING  ACTIVE  DELAYED  COMPLETED  FAILED")
    assert table[header + 1] == "ai-jobs              3       1        1          1       2"
    assert table[header + 2] == "notifications        0       0        0          0       0"
    assert "Live workers: 1" in table and "Recent failed jobs: 1" in table
    failed_row = table[table.index("Recent failed jobs: 1") + 2]
    finished = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"
    assert re.fullmatch(
        rf"ai-jobs  f2      fail         1  {finished}  bad input in f2", failed_row
    )


async def test_retry_failed_moves_failed_jobs_back_to_waiting(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    async with busy_queue(settings) as queue:
        assert await ops.retry_failed(settings, settings.chat_queue, limit=10) == 0
        assert capsys.readouterr().out == "ai-jobs: moved 2 failed jobs back to waiting\n"
        counts = await queue.getJobCounts("failed", "waiting")
        retried = await queue.getJob("f1")

    assert counts == {"failed": 0, "waiting": 4}  # w1, w2, f1, f2 (p1 is prioritized)
    assert retried.attemptsMade == 0  # a job retried by hand gets all its attempts again


async def test_health_exit_codes(
    client: redis.Redis, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await ops.health(settings, None) == 1
    assert "unhealthy: no live worker" in capsys.readouterr().err

    taking = [True]
    async with running_heartbeat(client, settings, taking) as heartbeat:
        assert await ops.health(settings, None) == 0
        assert capsys.readouterr().out.startswith("healthy: 1 worker(s) taking jobs")
        assert await ops.health(settings, heartbeat.worker_id) == 0
        assert await ops.health(settings, None, this_host=True) == 0
        assert await ops.health(settings, "someone-else") == 1
        taking[0] = False
        await heartbeat.beat()
        assert await ops.health(settings, None) == 1
        assert "not taking jobs" in capsys.readouterr().err
    assert await ops.health(settings, heartbeat.worker_id) == 1
    assert await ops.health(settings, None) == 1


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung Redis)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_health_fails_fast_when_redis_is_unreachable(
    silent_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    for port in (closed_port(), silent_port):
        settings = make_settings(redis_url=f"redis://127.0.0.1:{port}/0")
        started_s = time.monotonic()
        assert await ops.health(settings, None) == 1
        assert time.monotonic() - started_s < settings.connect_timeout_s + 1.5
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("unhealthy: ")


async def test_enqueue_chat_writes_the_row_and_the_job(
    database: Database, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    seeded = await seed_conversation(database, title="Ops", member_names=["Ada"], history=[])
    user_id = seeded.member_ids[0]
    message_id = await add_user_message(database, seeded.conversation_id, user_id, "Hi there")

    code = await ops.enqueue(
        settings,
        "chat",
        user_id=str(user_id),
        conversation_id=str(seeded.conversation_id),
        message_id=str(message_id),
        message="Hi there",
    )
    assert code == 0
    job_id = capsys.readouterr().out.strip()
    expected_input = {
        "conversationId": str(seeded.conversation_id),
        "message": "Hi there",
        "userId": str(user_id),
        "messageId": str(message_id),
    }

    async with database.transaction() as conn:
        row = await conn.fetchrow("select * from public.jobs where id = $1", job_id)
    assert (row["status"], row["job_type"]) == ("queued", "ai-chat")
    assert json.loads(row["input"]) == expected_input

    queue = Queue(
        settings.chat_queue, {"connection": TEST_REDIS_URL, "prefix": settings.queue_prefix}
    )
    try:
        job = await queue.getJob(job_id)
        state = await queue.getJobState(job_id)
    finally:
        await queue.close()
    assert (job.name, state) == ("ai-chat", "waiting")
    assert job.data == {"jobId": job_id, "input": expected_input}
    assert job.opts["attempts"] == settings.worker_max_retries
    assert job.opts["backoff"] == {"type": "exponential", "delay": ops.ENQUEUE_BACKOFF_MS}


async def test_enqueue_notification_and_refused_arguments(
    database: Database, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    user_id, sender_id = str(uuid4()), str(uuid4())
    data = json.dumps({"senderId": sender_id, "messagePreview": "hello"})
    kind = "message_notification"
    code = await ops.enqueue(
        settings, "notification", user_id=user_id, notification_type=kind, data=data
    )
    assert code == 0
    job_id = capsys.readouterr().out.strip()
    async with database.transaction() as conn:
        row = await conn.fetchrow("select * from public.jobs where id = $1", job_id)
    assert (row["status"], row["job_type"]) == ("queued", "notification")
    assert json.loads(row["input"])["data"] == {"senderId": sender_id, "messagePreview": "hello"}

    bad = await ops.enqueue(settings, "notification", user_id="nobody", notification_type=kind)
    assert bad == 2
    assert capsys.readouterr().err == "uvian-worker: --user-id must be a UUID\n"

    # Redis down: the job cannot be added, so its row is taken back out.
    marker = f"lost {uuid4()}"
    down = make_settings(redis_url=f"redis://127.0.0.1:{closed_port()}/0")
    args = {"conversation_id": str(uuid4()), "message_id": str(uuid4()), "message": marker}
    assert await ops.enqueue(down, "chat", user_id=user_id, **args) == 1
    assert "cannot reach Redis" in capsys.readouterr().err
    async with database.transaction() as conn:
        left = await conn.fetchval(
            "select count(*) from public.jobs where input ->> 'message' = $1", marker
        )
    assert left == 0
