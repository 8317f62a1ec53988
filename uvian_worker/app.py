"""The composition root: builds the worker from settings and runs it until a signal."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from bullmq import Queue

from uvian_worker.errors import ConfigError, StoreUnavailable
from uvian_worker.events import RedisPublisher
from uvian_worker.executors.base import Executor
from uvian_worker.executors.chat import ChatExecutor, ChatOptions
from uvian_worker.executors.context import make_counter, prompt_budget
from uvian_worker.executors.notification import NotificationExecutor
from uvian_worker.executors.reply import ReplyOptions
from uvian_worker.observability.health import HealthCheck, Heartbeat, default_worker_id
from uvian_worker.observability.metrics import (
    WorkerMetrics,
    poll_queue_counts,
    start_metrics_server,
)
from uvian_worker.providers.base import Provider
from uvian_worker.providers.deadlines import Deadlines
from uvian_worker.providers.factory import build_provider, provider_model
from uvian_worker.runtime.connections import check_redis, make_redis
from uvian_worker.runtime.control import ControlChannel
from uvian_worker.runtime.lifecycle import (
    QueueOptions,
    QueueSpec,
    QueueWorkers,
    ShutdownSignals,
)
from uvian_worker.runtime.progress import ProgressReporter
from uvian_worker.runtime.runner import JobRunner
from uvian_worker.runtime.stall_watch import StallWatch
from uvian_worker.runtime.sweeper import ReplySweeper
from uvian_worker.runtime.turns import ConversationTurns
from uvian_worker.settings import ConversationMode, DatabasePooler, Settings, resolve_provider
from uvian_worker.store.chat import ChatRepository, SweepRepository
from uvian_worker.store.database import Database
from uvian_worker.store.jobs import JobRepository
from uvian_worker.store.notifications import NotificationRepository

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Connected:
    database: Database
    redis_version: str


async def connect(settings: Settings) -> Connected:
    """Check Redis and Postgres once, each within its timeout, before taking any job."""
    redis_version = await check_redis(
        settings.effective_redis_url, timeout_s=settings.connect_timeout_s
    )
    logger.info("Connected to Redis", extra={"redis_version": redis_version})
    try:
        database = await Database.connect(
            settings.database_url.get_secret_value(),
            min_size=settings.db_pool_min_size,
            max_size=settings.db_pool_max_size,
            acquire_timeout_s=settings.db_acquire_timeout_s,
            command_timeout_s=settings.db_command_timeout_s,
            connect_timeout_s=settings.connect_timeout_s,
            behind_pooler=settings.database_pooler is DatabasePooler.TRANSACTION,
        )
        await _check_schema(database)
    except StoreUnavailable as exc:
        raise ConfigError(f"DATABASE_URL: {exc}") from None
    logger.info("Connected to Postgres", extra={"pool_max_size": settings.db_pool_max_size})
    return Connected(database, redis_version)


async def _check_schema(database: Database) -> None:
    async with database.transaction() as conn:
        missing = await conn.fetchval(
            "select count(*) from unnest($1::text[]) t(name) where to_regclass(t.name) is null",
            ["public.jobs", "public.messages", "public.notifications", "public.profiles"],
        )
    if missing:
        raise ConfigError("DATABASE_URL: the schema is missing; run `uvian-worker migrate` first")


class WorkerApp:
    """Everything one worker process runs, wired together; `run_worker` adds the signals."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        extra_executors: Mapping[str, Executor] | None = None,
    ) -> None:
        self.settings = settings
        self.database = database
        self._stack = AsyncExitStack()
        self._stack.push_async_callback(database.close)
        self.events_redis = make_redis(
            settings.effective_redis_url, connect_timeout_s=settings.connect_timeout_s
        )
        self._stack.push_async_callback(self.events_redis.aclose)
        self.provider = build_provider(settings)
        self._stack.push_async_callback(self.provider.aclose)

        publisher = RedisPublisher(self.events_redis)
        self.control = ControlChannel(self.events_redis)
        turns = ConversationTurns(
            self.events_redis,
            self.control,
            ttl_ms=3 * settings.lock_duration_ms,
            supersede=settings.conversation_mode is ConversationMode.SUPERSEDE,
            max_wait_s=settings.reply_timeout_s,
        )
        self.metrics = WorkerMetrics(
            job_names=["ai-chat", "notification", *(extra_executors or {}).keys()]
        )
        executors = _executors(settings, database, self.provider, publisher, turns, self.metrics)
        executors.update(extra_executors or {})
        runner = JobRunner(
            executors,
            JobRepository(database),
            publisher,
            self.control,
            metrics=self.metrics,
            # The queues' Redis: events and queues share one server (REDIS_URL).
            progress=ProgressReporter(self.events_redis),
        )
        self.queues = QueueWorkers(_queue_specs(settings), _queue_options(settings), runner)
        self.chat_queue = Queue(
            settings.chat_queue,
            {"connection": settings.effective_redis_url, "prefix": settings.queue_prefix},
        )
        self._stack.push_async_callback(self.chat_queue.close)
        self.sweeper = ReplySweeper(
            SweepRepository(database),
            self._chat_job_state,
            publisher,
            queue=f"{settings.queue_prefix}:{settings.chat_queue}",
            interval_s=settings.sweep_interval_s,
            stale_after_s=settings.sweep_stale_after_s,
        )
        self._background: list[asyncio.Task[None]] = []
        # Its own client: a blocking XREAD holds a connection for seconds at a time.
        self.stall_redis = make_redis(
            settings.effective_redis_url, connect_timeout_s=settings.connect_timeout_s
        )
        self._stack.push_async_callback(self.stall_redis.aclose)
        self.stall_watch = StallWatch(
            self.stall_redis,
            JobRepository(database),
            publisher,
            [f"{settings.queue_prefix}:{queue}:events" for queue in settings.queue_names],
        )
        self.worker_id = default_worker_id(settings.worker_name)
        self._taking_jobs = False
        self.heartbeat = Heartbeat(
            self.events_redis,
            prefix=settings.queue_prefix,
            worker_id=self.worker_id,
            queues=settings.queue_names,
            jobs_in_flight=lambda: self.queues.jobs_in_flight,
            taking_jobs=lambda: self._taking_jobs,
        )

    @classmethod
    async def create(
        cls, settings: Settings, extra_executors: Mapping[str, Executor] | None = None
    ) -> WorkerApp:
        """Connect and build; `extra_executors` adds job types (benchmarks use a no-op one)."""
        connected = await connect(settings)
        return cls(settings, connected.database, extra_executors)

    async def _chat_job_state(self, job_id: str) -> str:
        return str(await self.chat_queue.getJobState(job_id))

    async def start(self) -> None:
        # Everything that can refuse to start goes first, before any job is taken.
        if self.settings.metrics_port is not None:
            await self._serve_metrics(self.settings.metrics_port)
        await self.control.start()
        self._stack.push_async_callback(self.control.close)
        self.queues.start()
        self._taking_jobs = True
        await self.heartbeat.start()
        self._background.append(asyncio.create_task(self.sweeper.run_forever(), name="sweep"))
        self._background.append(asyncio.create_task(self.stall_watch.run_forever(), name="stalls"))
        counts = poll_queue_counts(
            self.metrics, self.events_redis, self.settings.queue_prefix, self.settings.queue_names
        )
        self._background.append(asyncio.create_task(counts, name="queue-counts"))
        logger.info(
            "Worker started",
            extra={
                "queues": list(self.settings.queue_names),
                "concurrency": self.settings.worker_concurrency,
                "notification_concurrency": self.settings.notification_concurrency,
                "provider": resolve_provider(self.settings).value,
            },
        )

    async def _serve_metrics(self, port: int) -> None:
        host = self.settings.metrics_host
        try:
            server = await start_metrics_server(
                self.metrics, host, port, HealthCheck(self.heartbeat)
            )
        except OSError as exc:
            reason = "address in use" if exc.errno == errno.EADDRINUSE else type(exc).__name__
            raise ConfigError(f"METRICS_PORT: cannot listen on {host}:{port}: {reason}") from None
        self._stack.push_async_callback(server.stop)

    async def close(self, grace_s: float) -> None:
        self._taking_jobs = False
        try:
            await self.heartbeat.beat()
            await self.queues.close(grace_s)
        finally:
            for task in self._background:
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            await self.heartbeat.stop()
            await self._stack.aclose()


async def run_worker(settings: Settings) -> None:
    signals = ShutdownSignals()
    creating = asyncio.ensure_future(WorkerApp.create(settings))
    waits: list[asyncio.Future[Any]] = [creating, signals.received]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    if not creating.done():
        # Stopped while still connecting (a slow or absent service): nothing to drain.
        creating.cancel()
        await asyncio.gather(creating, return_exceptions=True)
        logger.info("Stopped on %s before the worker started", signals.received.result())
        return
    app = creating.result()
    await app.start()
    signals.on_second_signal = app.queues.skip_grace
    signal_name = await signals.received
    logger.info(
        "Stopping on %s: %d jobs in flight, grace period %g s",
        signal_name,
        app.queues.jobs_in_flight,
        settings.shutdown_grace_s,
    )
    await app.close(settings.shutdown_grace_s)
    logger.info("Worker stopped")


def _executors(
    settings: Settings,
    database: Database,
    provider: Provider,
    publisher: RedisPublisher,
    turns: ConversationTurns,
    metrics: WorkerMetrics,
) -> dict[str, Executor]:
    counter = make_counter(settings.tokenizer_path)
    chat = ChatExecutor(
        ChatRepository(database),
        provider,
        publisher,
        ChatOptions(
            history_limit=settings.history_limit,
            max_message_chars=settings.max_message_chars,
            reply_max_tokens=settings.reply_max_tokens,
            temperature=settings.reply_temperature,
            deadlines=Deadlines(
                first_token_s=settings.first_token_timeout_s,
                chunk_gap_s=settings.chunk_gap_timeout_s,
                total_s=settings.reply_timeout_s,
            ),
            counter=counter,
            prompt_budget_tokens=prompt_budget(
                settings.model_context_tokens,
                settings.reply_max_tokens,
                settings.effective_context_margin_tokens,
            ),
            reply=ReplyOptions(
                delta_window_s=settings.reply_delta_window_ms / 1000.0,
                delta_max_chars=settings.reply_delta_max_chars,
                save_interval_s=settings.reply_save_interval_s,
            ),
        ),
        default_model=provider_model(settings),
        turns=turns,
        metrics=metrics,
    )
    notification = NotificationExecutor(NotificationRepository(database), publisher)
    return {chat.job_name: chat, notification.job_name: notification}


def _queue_specs(settings: Settings) -> list[QueueSpec]:
    return [
        QueueSpec(settings.chat_queue, settings.worker_concurrency),
        QueueSpec(settings.notification_queue, settings.notification_concurrency),
    ]


def _queue_options(settings: Settings) -> QueueOptions:
    return QueueOptions(
        redis_url=settings.effective_redis_url,
        prefix=settings.queue_prefix,
        lock_duration_ms=settings.lock_duration_ms,
        stalled_interval_ms=settings.stalled_interval_ms,
        connect_timeout_s=settings.connect_timeout_s,
        worker_name=settings.worker_name,
    )
