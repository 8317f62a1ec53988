"""The chat pipeline under load: the seeded chats, and one phase (N ai-chat jobs at a
concurrency, on the processes of bench/processes.py) with everything recorded during it.

The workers are real `uvian-worker run` processes with their default settings
but for the queue prefix, the concurrency and the simulator; they log JSON at
INFO to a file each. What a phase records:
- from each worker's log, every job's outcome and the runner's duration of it;
- from the simulator, when each request arrived and ended, and for a sample of
  jobs ("probes") when each token was written;
- from Redis pub/sub, when each delta of the probes reached a subscriber;
- from /proc, each worker's CPU time over the phase and its peak RSS.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import orjson
import redis.asyncio as redis
from bullmq import Queue

from bench.common import (
    REDIS_URL,
    delete_redis_keys,
    read_process,
    unique_prefix,
    unlink_keys,
    worker_env,
)
from bench.processes import Latency, SimulatorProcess, WorkerProcesses
from uvian_worker.events import conversation_channel, reply_stream_key
from uvian_worker.executors.chat import reply_message_id
from uvian_worker.runtime.turns import turn_key
from uvian_worker.store.database import Database
from uvian_worker.store.seed import add_job_row, add_user_message, seed_conversation

CHAT_QUEUE = "ai-jobs"
SEED_PARALLEL = 8
ENQUEUE_BATCH = 500
POLL_INTERVAL_S = 0.2
FINAL_STATUSES = ("completed", "failed", "cancelled")
# A phase that runs past its expected time this many times over (an overloaded
# machine: jobs time out and retry with backoff) is cut short and reported so.
DEADLINE_FACTOR = 4.0
MIN_DEADLINE_S = 60.0
# The API's job options (see bench/node/enqueue.mjs).
JOB_OPTIONS = {
    "attempts": 3,
    "backoff": {"type": "exponential", "delay": 1000},
    "removeOnComplete": {"age": 3600, "count": 1000},
    "removeOnFail": {"age": 86400},
}


@dataclass(frozen=True, slots=True)
class SeededChat:
    job_id: UUID
    conversation_id: UUID
    user_id: UUID
    message_id: UUID
    message: str
    probed: bool

    def data(self) -> dict[str, Any]:
        return {
            "jobId": str(self.job_id),
            "input": {
                "conversationId": str(self.conversation_id),
                "message": self.message,
                "userId": str(self.user_id),
                "messageId": str(self.message_id),
            },
        }


class ChatSeeds:
    """Conversations seeded once and shared by the phases: a phase gives each of its
    jobs a conversation of its own, so no job waits for another's turn."""

    def __init__(self, database: Database, dsn: str) -> None:
        self.database = database
        self.dsn = dsn
        self._conversations: list[tuple[UUID, UUID]] = []  # (conversation, user)

    async def chats(self, count: int, probes: int) -> list[SeededChat]:
        """`count` chat jobs as the API leaves them: the user's message and the job row."""
        await self._ensure_conversations(count)
        probe_every = max(count // max(probes, 1), 1)
        probed = [n % probe_every == 0 and n // probe_every < probes for n in range(count)]
        return await _in_parallel([self._chat(n, uuid4(), probed[n]) for n in range(count)])

    async def _chat(self, n: int, job_id: UUID, probed: bool) -> SeededChat:
        conversation_id, user_id = self._conversations[n]
        marker = " probe" if probed else ""
        message = f"Bench question {job_id}{marker}: what should we cook tonight?"
        message_id = await add_user_message(self.database, conversation_id, user_id, message)
        chat = SeededChat(job_id, conversation_id, user_id, message_id, message, probed)
        await add_job_row(self.database, job_id, "ai-chat", chat.data()["input"])
        return chat

    async def _ensure_conversations(self, count: int) -> None:
        missing = count - len(self._conversations)
        seeded = await _in_parallel([self._conversation(n) for n in range(max(missing, 0))])
        self._conversations.extend(seeded)

    async def _conversation(self, n: int) -> tuple[UUID, UUID]:
        history: list[tuple[int | None, str]] = [
            (0, "Hi, I need ideas for dinner"),
            (None, "Happy to help! What do you have at home?"),
            (1, "We have rice and eggs"),
        ]
        seeded = await seed_conversation(
            self.database, title=f"Bench {n}", member_names=["Ada", "Bo"], history=history
        )
        return seeded.conversation_id, seeded.member_ids[0]


async def _in_parallel(coros: list[Any]) -> list[Any]:
    gate = asyncio.Semaphore(SEED_PARALLEL)

    async def gated(coro: Any) -> Any:
        async with gate:
            return await coro

    return list(await asyncio.gather(*(gated(coro) for coro in coros)))


async def connect_database(dsn: str) -> Database:
    return await Database.connect(dsn, min_size=1, max_size=SEED_PARALLEL + 2)


class DeltaRecorder:
    """Notes when each event of the probed conversations reaches a subscriber."""

    def __init__(self, chats: list[SeededChat]) -> None:
        self.arrivals: list[tuple[float, bytes]] = []
        self._channels = [conversation_channel(chat.conversation_id) for chat in chats]
        self._client = redis.Redis.from_url(REDIS_URL)
        self._pubsub = self._client.pubsub()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> DeltaRecorder:
        if self._channels:
            await self._pubsub.subscribe(*self._channels)
            self._task = asyncio.create_task(self._pump())
        return self

    async def _pump(self) -> None:
        while True:
            message = await self._pubsub.get_message(timeout=None)
            if message is not None and message["type"] == "message":
                self.arrivals.append((time.monotonic(), message["data"]))

    def events(self) -> list[tuple[float, dict[str, Any]]]:
        return [(arrived_s, orjson.loads(data)) for arrived_s, data in self.arrivals]

    async def __aexit__(self, *_exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._pubsub.aclose()
        await self._client.aclose()


@dataclass(frozen=True, slots=True)
class PhaseSetup:
    latency: Latency
    concurrency: int  # per worker process
    jobs: int
    processes: int = 1
    probes: int = 40
    # None: every job is added at once (the workers always have `concurrency` in
    # flight); a rate: jobs added one by one at that many per second (open loop).
    arrival_per_s: float | None = None
    # DATABASE_POOLER of the workers: the benchmarks reach Postgres directly, for
    # which `none` is the setting (README); `transaction` measures the pooler-safe path.
    pooler: str = "none"

    @property
    def deadline_s(self) -> float:
        """How long the phase may run: a few times what its rounds would take unhindered."""
        rounds = math.ceil(self.jobs / (self.concurrency * self.processes))
        return max(MIN_DEADLINE_S, DEADLINE_FACTOR * rounds * self.latency.reply_s)


@dataclass
class PhaseRecord:
    setup: PhaseSetup
    chats: list[SeededChat]
    seconds: float
    job_records: list[dict[str, Any]] = field(default_factory=list)
    spans: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    worker_cpu_s: float = 0.0
    simulator_cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)


async def run_phase(
    setup: PhaseSetup, simulator: SimulatorProcess, seeds: ChatSeeds, log_dir: Path
) -> PhaseRecord:
    prefix = unique_prefix("chat")
    chats = await seeds.chats(setup.jobs, setup.probes)
    env = worker_env(
        dsn=seeds.dsn,
        prefix=prefix,
        concurrency=setup.concurrency,
        simulator_url=simulator.url,
        DATABASE_POOLER=setup.pooler,
    )
    workers = WorkerProcesses(setup.processes, env, log_dir / prefix)
    try:
        await workers.start()
        await simulator.spans()  # forget the requests of earlier phases
        async with DeltaRecorder([chat for chat in chats if chat.probed]) as deltas:
            before, sim_before = workers.readings(), read_process(simulator.pid)
            started_s = time.monotonic()
            if setup.arrival_per_s is None:
                await _enqueue(prefix, chats)
            else:
                await _enqueue_paced(prefix, chats, setup.arrival_per_s)
            statuses = await _until_finished(seeds.database, chats, setup.deadline_s)
            seconds = time.monotonic() - started_s
            after, sim_after = workers.readings(), read_process(simulator.pid)
        spans = await simulator.spans()
    finally:
        await workers.stop()
        await _delete_redis_state(prefix, chats)
    return PhaseRecord(
        setup,
        chats,
        seconds,
        job_records=workers.job_records(),
        spans=spans,
        events=deltas.events(),
        worker_cpu_s=sum(a.cpu_s - b.cpu_s for a, b in zip(after, before, strict=True)),
        simulator_cpu_s=sim_after.cpu_s - sim_before.cpu_s,
        peak_rss_mb=max(reading.peak_rss_mb for reading in after),
        statuses=statuses,
    )


async def _enqueue(prefix: str, chats: list[SeededChat]) -> None:
    queue = Queue(CHAT_QUEUE, {"connection": REDIS_URL, "prefix": prefix})
    try:
        for start in range(0, len(chats), ENQUEUE_BATCH):
            batch = chats[start : start + ENQUEUE_BATCH]
            await queue.addBulk(
                [
                    {
                        "name": "ai-chat",
                        "data": chat.data(),
                        "opts": {**JOB_OPTIONS, "jobId": str(chat.job_id)},
                    }
                    for chat in batch
                ]
            )
    finally:
        await queue.close()


async def _enqueue_paced(prefix: str, chats: list[SeededChat], per_s: float) -> None:
    """Add the jobs one by one, the n-th at n ÷ `per_s` seconds from the start."""
    queue = Queue(CHAT_QUEUE, {"connection": REDIS_URL, "prefix": prefix})
    try:
        started_s = time.monotonic()
        for n, chat in enumerate(chats):
            wait_s = started_s + n / per_s - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            await queue.add("ai-chat", chat.data(), {**JOB_OPTIONS, "jobId": str(chat.job_id)})
    finally:
        await queue.close()


async def _until_finished(
    database: Database, chats: list[SeededChat], deadline_s: float
) -> dict[str, int]:
    """Wait until every job's row is final, or the deadline; returns the count of each status."""
    job_ids = [chat.job_id for chat in chats]
    statuses: dict[str, int] = {}
    give_up_s = time.monotonic() + deadline_s
    while sum(statuses.get(status, 0) for status in FINAL_STATUSES) < len(job_ids):
        if time.monotonic() > give_up_s:
            statuses["unfinished_at_deadline"] = len(job_ids) - sum(
                statuses.get(status, 0) for status in FINAL_STATUSES
            )
            break
        await asyncio.sleep(POLL_INTERVAL_S)
        async with database.transaction() as conn:
            rows = await conn.fetch(
                "select status, count(*) from public.jobs where id = any($1) group by status",
                job_ids,
            )
        statuses = {row["status"]: row["count"] for row in rows}
    return statuses


async def _delete_redis_state(prefix: str, chats: list[SeededChat]) -> None:
    await delete_redis_keys([f"{prefix}:*"])
    streams = [reply_stream_key(reply_message_id(chat.job_id)) for chat in chats]
    turns = [turn_key(chat.conversation_id) for chat in chats]
    await unlink_keys([*streams, *turns])
