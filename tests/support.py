"""Shared test helpers: settings for a test, the worker in-process or as a process,
chat jobs seeded as the API would, and a recorder of published events."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import orjson
import redis.asyncio as redis
from bullmq import Queue

from uvian_worker.app import WorkerApp
from uvian_worker.settings import Settings, load_settings
from uvian_worker.store.database import Database
from uvian_worker.store.seed import add_job_row, add_user_message, seed_conversation

ROOT = Path(__file__).resolve().parents[1]
TEST_DSN = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/uvian_test")
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
WAIT_S = 20.0  # upper bound for anything a test awaits; a healthy run takes far less


def settings_for_test(simulator_url: str, **overrides: Any) -> Settings:
    """Settings for one test: its own queue prefix, so tests never share jobs."""
    values: dict[str, Any] = {
        "database_url": TEST_DSN,
        "redis_url": TEST_REDIS_URL,
        "llm_provider": "simulator",
        "simulator_url": simulator_url,
        "queue_prefix": f"t{uuid4().hex[:10]}",
        "worker_concurrency": 8,
        "notification_concurrency": 4,
        "lock_duration_ms": 5_000,
        "stalled_interval_ms": 2_000,
        "shutdown_grace_s": 5.0,
        "db_pool_max_size": 10,
        "log_format": "console",
    }
    values.update(overrides)
    return load_settings(_env_file=None, **values)


@asynccontextmanager
async def running_worker(settings: Settings, grace_s: float = 5.0) -> AsyncIterator[WorkerApp]:
    app = await WorkerApp.create(settings)
    await app.start()
    try:
        yield app
    finally:
        await app.close(grace_s)


@dataclass
class ChatJob:
    job_id: UUID
    conversation_id: UUID
    user_id: UUID
    message_id: UUID
    outsider_id: UUID
    input: dict[str, Any]

    @property
    def data(self) -> dict[str, Any]:
        return {"jobId": str(self.job_id), "input": self.input}


async def seed_chat_job(
    database: Database, message: str = "What should we cook tonight?", *, history: int = 2
) -> ChatJob:
    """A conversation with history, the user's new message and the job row, as the API writes."""
    lines: list[tuple[int | None, str]] = [
        (0, "Hi, I need ideas for dinner"),
        (None, "Happy to help! What do you have at home?"),
        (1, "We have rice and eggs"),
    ][:history]
    seeded = await seed_conversation(
        database, title="Dinner plans", member_names=["Ada", "Bo"], history=lines
    )
    user_id = seeded.member_ids[0]
    message_id = await add_user_message(database, seeded.conversation_id, user_id, message)
    job_id = uuid4()
    job_input = {
        "conversationId": str(seeded.conversation_id),
        "message": message,
        "userId": str(user_id),
        "messageId": str(message_id),
    }
    await add_job_row(database, job_id, "ai-chat", job_input)
    return ChatJob(
        job_id, seeded.conversation_id, user_id, message_id, seeded.outsider_id, job_input
    )


async def enqueue(
    settings: Settings,
    name: str,
    data: Any,
    job_id: str,
    *,
    attempts: int = 3,
    backoff_ms: int = 100,
    queue_name: str | None = None,
) -> None:
    """Add a job with the options the platform's API uses."""
    queue = Queue(
        queue_name or settings.chat_queue,
        {"connection": settings.effective_redis_url, "prefix": settings.queue_prefix},
    )
    try:
        await queue.add(
            name,
            data,
            {
                "jobId": job_id,
                "attempts": attempts,
                "backoff": {"type": "exponential", "delay": backoff_ms},
            },
        )
    finally:
        await queue.close()


async def job_state(settings: Settings, job_id: str, queue_name: str | None = None) -> Any:
    """The BullMQ state and job of a job whose final status was published.

    The worker publishes that status just before BullMQ records the job's end,
    so the job may still be `active` for a moment: this waits it out.
    """
    queue = Queue(
        queue_name or settings.chat_queue,
        {"connection": settings.effective_redis_url, "prefix": settings.queue_prefix},
    )
    try:
        async with asyncio.timeout(WAIT_S):
            while (state := await queue.getJobState(job_id)) == "active":  # noqa: ASYNC110 - polled: nothing here signals it
                await asyncio.sleep(0.005)
        return state, await queue.getJob(job_id)
    finally:
        await queue.close()


@dataclass
class EventRecorder:
    """Subscribes to channel patterns and keeps every event, decoded, in arrival order."""

    client: redis.Redis
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def wait_for(
        self, predicate: Callable[[str, dict[str, Any]], bool], count: int = 1
    ) -> list[tuple[str, dict[str, Any]]]:
        async with asyncio.timeout(WAIT_S), self._changed:
            await self._changed.wait_for(lambda: len(self.matching(predicate)) >= count)
        return self.matching(predicate)

    def matching(
        self, predicate: Callable[[str, dict[str, Any]], bool]
    ) -> list[tuple[str, dict[str, Any]]]:
        return [(channel, event) for channel, event in self.events if predicate(channel, event)]

    def on(self, channel: str) -> list[dict[str, Any]]:
        return [event for name, event in self.events if name == channel]

    async def _add(self, channel: str, event: dict[str, Any]) -> None:
        async with self._changed:
            self.events.append((channel, event))
            self._changed.notify_all()


@asynccontextmanager
async def record_events(*patterns: str, url: str = TEST_REDIS_URL) -> AsyncIterator[EventRecorder]:
    client = redis.Redis.from_url(url)
    recorder = EventRecorder(client)
    pubsub = client.pubsub()
    await pubsub.psubscribe(*patterns)  # confirmed by the server before this returns

    async def pump() -> None:
        async for message in pubsub.listen():
            if message["type"] == "pmessage":
                channel = message["channel"].decode()
                try:
                    event = orjson.loads(message["data"])
                except orjson.JSONDecodeError:
                    event = {"raw": message["data"].decode(errors="replace")}
                await recorder._add(channel, event if isinstance(event, dict) else {"raw": event})

    task = asyncio.create_task(pump())
    try:
        yield recorder
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pubsub.aclose()
        await client.aclose()


@asynccontextmanager
async def chat_job_running(
    settings: Settings, chat: ChatJob, *, attempts: int = 3, backoff_ms: int = 100
) -> AsyncIterator[EventRecorder]:
    """A worker running with `chat` enqueued; every event of the job and its
    conversation is recorded from before the job was added."""
    async with (
        record_events(f"job:{chat.job_id}:*", f"conversation:{chat.conversation_id}:*") as rec,
        running_worker(settings),
    ):
        await enqueue(
            settings,
            "ai-chat",
            chat.data,
            str(chat.job_id),
            attempts=attempts,
            backoff_ms=backoff_ms,
        )
        yield rec


async def ask_to_stop(job_id: object, payload: str | bytes) -> None:
    """Publish on the job's cancel channel, as the API does when a user presses stop."""
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        await client.publish(f"job:{job_id}:cancel", payload)
    finally:
        await client.aclose()


def final_status(job_id: UUID) -> Callable[[str, dict[str, Any]], bool]:
    """Matches the job's last status event: completed, cancelled, or failed with no retry."""

    def match(channel: str, event: dict[str, Any]) -> bool:
        return (
            channel == f"job:{job_id}:status"
            and event["status"] in ("completed", "failed", "cancelled")
            and not event.get("willRetry", False)
        )

    return match


class WorkerProcess:
    """`uvian-worker run` as a real process, its stderr collected line by line."""

    def __init__(self, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self._seen = asyncio.Condition()
        self._env = {**os.environ, **env}
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self, wait_for: str | None = "Worker started") -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "uvian_worker",
            "run",
            env=self._env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        self._reader = asyncio.create_task(self._read())
        if wait_for:
            await self.wait_for_line(wait_for)

    async def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        async for raw in self.process.stderr:
            async with self._seen:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._seen.notify_all()

    async def wait_for_line(self, text: str, timeout_s: float = WAIT_S) -> str:
        def found() -> bool:
            return any(text in line for line in self.lines)

        async with asyncio.timeout(timeout_s), self._seen:
            await self._seen.wait_for(found)
        return next(line for line in self.lines if text in line)

    async def stop(self, signum: int = signal.SIGTERM, timeout_s: float = WAIT_S) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signum)
        async with asyncio.timeout(timeout_s):
            code = await self.process.wait()
            if self._reader is not None:
                await self._reader
        return code

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a worker process use the same settings as `settings`."""
    env = {
        "DATABASE_URL": settings.database_url.get_secret_value(),
        "REDIS_URL": settings.effective_redis_url,
        "LLM_PROVIDER": settings.llm_provider.value if settings.llm_provider else "",
        "SIMULATOR_URL": settings.simulator_url or "",
        "QUEUE_PREFIX": settings.queue_prefix,
        "WORKER_CONCURRENCY": str(settings.worker_concurrency),
        "LOCK_DURATION_MS": str(settings.lock_duration_ms),
        "STALLED_INTERVAL_MS": str(settings.stalled_interval_ms),
        "SHUTDOWN_GRACE_S": str(settings.shutdown_grace_s),
        "LOG_FORMAT": "console",
        "LOG_LEVEL": "INFO",
    }
    return env


class QueueWatcher:
    """Follows a queue's BullMQ event stream (what Node's QueueEvents reads) from now on."""

    def __init__(self, client: redis.Redis, stream_key: str, last_id: str) -> None:
        self._client = client
        self._key = stream_key
        self._last_id = last_id
        self._finished: dict[str, tuple[str, dict[str, str]]] = {}

    @classmethod
    @asynccontextmanager
    async def open(
        cls, settings: Settings, queue_name: str | None = None, *, from_start: bool = False
    ) -> AsyncIterator[QueueWatcher]:
        """Follow from now on, or with `from_start` from the stream's first event."""
        client = redis.Redis.from_url(settings.effective_redis_url, decode_responses=True)
        key = f"{settings.queue_prefix}:{queue_name or settings.chat_queue}:events"
        newest = [] if from_start else await client.xrevrange(key, count=1)
        try:
            yield cls(client, key, newest[0][0] if newest else "0-0")
        finally:
            await client.aclose()

    async def finished(self, job_id: str) -> tuple[str, dict[str, str]]:
        """The job's `completed` or (final) `failed` event."""
        async with asyncio.timeout(WAIT_S):
            while job_id not in self._finished:
                batch = await self._client.xread({self._key: self._last_id}, block=1000)
                for _key, entries in batch:
                    for entry_id, fields in entries:
                        self._last_id = entry_id
                        # BullMQ emits `failed` only when no attempt is left.
                        if fields["event"] in ("completed", "failed"):
                            self._finished[fields["jobId"]] = (fields["event"], fields)
        return self._finished[job_id]
