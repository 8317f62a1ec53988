"""`uvian-worker demo`: the worker's main job end to end on local services.

Real Redis, real Postgres, the built-in LLM simulator and a real worker
process: the demo applies the migrations, seeds a conversation, enqueues chat
jobs through BullMQ as the platform's API does, shows each reply as it is
published and each job's final state, then stops the worker with SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import textwrap
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import aiohttp
import orjson
import redis.asyncio as redis
from bullmq import Queue

from uvian_worker.events import conversation_channel, job_status_channel
from uvian_worker.providers.simulator import SimulatorConfig, start_simulator
from uvian_worker.store import migrations
from uvian_worker.store.database import Database
from uvian_worker.store.seed import add_job_row, add_user_message, seed_conversation

DEMO_DSN = "postgresql://postgres@127.0.0.1:5432/uvian_demo"
DEMO_REDIS_URL = "redis://127.0.0.1:6379/0"
DEMO_PREFIX = "uvian-demo"
QUEUE = "ai-jobs"
FINAL = ("completed", "failed", "cancelled")
WAIT_S = 60.0

QUESTIONS = [
    (0, "Where should we have dinner on Saturday?"),
    (1, "Is the tram to Belém worth it?"),
    (0, "Give us a packing list, please."),
]


# Tasks that echo the worker's log; kept here so they are not collected while running.
_background: set[asyncio.Task[None]] = set()


@dataclass
class DemoJob:
    job_id: UUID
    asked_by: str
    question: str
    expect_failure: bool = False


def say(text: str = "") -> None:
    print(text, flush=True)


async def run_demo() -> int:
    dsn = os.environ.get("DATABASE_URL", DEMO_DSN)
    redis_url = os.environ.get("REDIS_URL", DEMO_REDIS_URL)
    say("Uvian worker demo: chat jobs from BullMQ to saved, published AI replies\n")

    await migrations.create_database_if_missing(dsn)
    applied = await migrations.apply_migrations(dsn)
    say(f"1. Postgres ready ({len(applied)} migrations applied now)")

    simulator = await start_simulator(
        SimulatorConfig(first_token_delay_ms=250, tokens_per_s=40, reply_tokens=24)
    )
    say(f"2. LLM simulator on {simulator.url} (250 ms to first token, 40 tokens/s)")

    metrics_port = _free_port()
    worker = await _start_worker(dsn, redis_url, simulator.url, metrics_port)
    database = await Database.connect(dsn, min_size=1, max_size=2)
    try:
        code = await _converse(database, redis_url)
        await _show_metrics(metrics_port)
    finally:
        exit_code = await _stop_worker(worker)
        await database.close()
        await simulator.stop()
    say(f"\n7. Worker stopped with SIGTERM, exit code {exit_code}")
    return code if exit_code == 0 else 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _show_metrics(port: int) -> None:
    """What an operator's Prometheus would scrape from the worker now."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    wanted = ("uvian_worker_jobs_finished_total{", "uvian_worker_first_token_seconds_count")
    lines = [line for line in text.splitlines() if line.startswith(wanted) and " 0.0" not in line]
    say(f"\n6. Metrics on http://127.0.0.1:{port}/metrics (a few of them)")
    for line in lines:
        say(f"   {line}")


async def _start_worker(
    dsn: str, redis_url: str, simulator_url: str, metrics_port: int
) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "REDIS_URL": redis_url,
        "LLM_PROVIDER": "simulator",
        "SIMULATOR_URL": simulator_url,
        "QUEUE_PREFIX": DEMO_PREFIX,
        "LOG_FORMAT": "console",
        "WORKER_CONCURRENCY": "10",
        "METRICS_PORT": str(metrics_port),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "uvian_worker", "run", env=env, stderr=asyncio.subprocess.PIPE
    )
    started = asyncio.get_running_loop().create_future()
    _background.add(asyncio.create_task(_echo_worker_log(process, started)))
    async with asyncio.timeout(WAIT_S):
        await started
    say("3. Worker process started (its log lines are shown with │)")
    return process


async def _echo_worker_log(
    process: asyncio.subprocess.Process, started: asyncio.Future[None]
) -> None:
    assert process.stderr is not None
    async for raw in process.stderr:
        line = raw.decode(errors="replace").rstrip()
        say(f"   │ {line}")
        if "Worker started" in line and not started.done():
            started.set_result(None)
    if not started.done():
        started.set_exception(RuntimeError("the worker exited before it started"))


async def _stop_worker(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(WAIT_S):
        return await process.wait()


async def _converse(database: Database, redis_url: str) -> int:
    seeded = await seed_conversation(
        database,
        title="Weekend in Lisbon",
        member_names=["Ada", "Bo"],
        history=[(0, "We land Friday night!"), (None, "Lovely! How can I help you plan?")],
    )
    names = ["Ada", "Bo"]
    jobs: list[tuple[DemoJob, dict[str, Any]]] = []
    for who, question in QUESTIONS:
        user_id = seeded.member_ids[who]
        message_id = await add_user_message(database, seeded.conversation_id, user_id, question)
        job_input = {
            "conversationId": str(seeded.conversation_id),
            "message": question,
            "userId": str(user_id),
            "messageId": str(message_id),
        }
        jobs.append((DemoJob(uuid4(), names[who], question), job_input))

    # One job the worker must refuse: its user is not in the conversation.
    outsider_input = {**jobs[0][1], "userId": str(seeded.outsider_id)}
    jobs.append(
        (DemoJob(uuid4(), "Outsider", jobs[0][0].question, expect_failure=True), outsider_input)
    )
    say(f'4. Conversation "Weekend in Lisbon" seeded; enqueuing {len(jobs)} ai-chat jobs\n')

    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.subscribe(
        conversation_channel(seeded.conversation_id),
        *(job_status_channel(job.job_id) for job, _ in jobs),
    )
    queue = Queue(QUEUE, {"connection": redis_url, "prefix": DEMO_PREFIX})
    try:
        for job, job_input in jobs:
            await add_job_row(database, job.job_id, "ai-chat", job_input)
            await queue.add(
                "ai-chat",
                {"jobId": str(job.job_id), "input": job_input},
                {
                    "jobId": str(job.job_id),
                    "attempts": 3,
                    "backoff": {"type": "exponential", "delay": 1000},
                },
            )
            say(f"   → {job.asked_by}: {job.question}")
        say()
        finals = await _show_events(pubsub, {job.job_id: job for job, _ in jobs})
        return await _report(database, queue, [job for job, _ in jobs], finals)
    finally:
        await queue.close()
        await pubsub.aclose()
        await client.aclose()


async def _show_events(pubsub: Any, jobs: dict[UUID, DemoJob]) -> dict[UUID, dict[str, Any]]:
    finals: dict[UUID, dict[str, Any]] = {}
    deltas: dict[str, int] = {}
    async with asyncio.timeout(WAIT_S):
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            event = orjson.loads(message["data"])
            if event.get("type") == "ai_delta":
                deltas[event["jobId"]] = deltas.get(event["jobId"], 0) + 1
            elif event.get("type") == "ai_response":
                job = jobs[UUID(event["jobId"])]
                reply = textwrap.fill(
                    event["content"], 76, initial_indent="     ", subsequent_indent="     "
                )
                streamed = (
                    f"{event['tokensUsed']} tokens, streamed in {deltas.get(event['jobId'])} deltas"
                )
                say(f"   ← Assistant, answering {job.asked_by} ({streamed}):\n{reply}")
            elif event.get("status") in FINAL and not event.get("willRetry"):
                finals[UUID(event["jobId"])] = event
                if len(finals) == len(jobs):
                    return finals
    return finals


async def _settled_state(queue: Queue, job_id: str) -> str:
    """The job's BullMQ state once the worker has acknowledged it (just after its last event)."""
    state = "unknown"
    for _ in range(100):
        state = str(await queue.getJobState(job_id))
        if state in FINAL:
            break
        await asyncio.sleep(0.05)
    return state


async def _report(
    database: Database, queue: Queue, jobs: list[DemoJob], finals: dict[UUID, dict[str, Any]]
) -> int:
    say("\n5. Final state of each job (BullMQ, the jobs row, the reply)")
    say(f"   {'job':<10} {'asked by':<9} {'bullmq':<10} {'row':<10} {'attempts':<9} reply / error")
    ok = True
    for job in jobs:
        state = await _settled_state(queue, str(job.job_id))
        async with database.transaction() as conn:
            row = await conn.fetchrow(
                "select j.status, j.attempts, j.error_message, m.content from public.jobs j"
                " left join public.messages m on m.job_id = j.id where j.id = $1",
                job.job_id,
            )
        detail = row["error_message"] if row["error_message"] else (row["content"] or "")[:38] + "…"
        columns = f"{str(job.job_id)[:8]:<10} {job.asked_by:<9} {state:<10}"
        say(f"   {columns} {row['status']:<10} {row['attempts']:<9} {detail}")
        expected = "failed" if job.expect_failure else "completed"
        ok = ok and state == expected and row["status"] == expected
    say("\n   All jobs ended as expected." if ok else "\n   Some jobs did NOT end as expected.")
    return 0 if ok else 1
