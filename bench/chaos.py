"""The chaos run: several workers, a few hundred chat jobs, faults everywhere, then a count.

    python -m bench.chaos [--jobs 300] [--workers 3] [--seconds 40]

Everything runs on servers this script starts on 127.0.0.1 (its own Redis with
an append-only file, its own Postgres cluster, the simulator) so nothing else
on the machine is disturbed. While the jobs run it `kill -9`s a random worker
every few seconds (and starts a new one), restarts Redis once and Postgres
once; a share of the jobs meet provider faults (5xx, 429, resets, truncated
streams, error objects, stalls, refusals). At the end it waits for every job
to settle and the reply sweep to run, then counts from BullMQ and Postgres.
The last line reads:

    chaos: enqueued=N completed=N failed=N lost=N duplicate_replies=N unfinished_replies=N
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import signal
import sys
import time
from uuid import uuid4

import orjson
import redis.asyncio as redis
from bullmq import Queue

from tests.faults import PrivatePostgres, PrivateRedis, free_port
from uvian_worker.store.database import Database
from uvian_worker.store.seed import add_job_row, add_user_message, seed_conversation

PREFIX = "chaos"
QUEUE = "ai-jobs"
# Directives the simulator understands; None is a plain reply.
FAULTS: list[tuple[str | None, int]] = [
    (None, 70),
    ("http_500", 6),
    ("http_429", 4),
    ("reset", 4),
    ("truncate", 4),
    ("error_mid_stream", 4),
    ("stall", 4),
    ("http_400", 4),
]


def say(text: str) -> None:
    print(text, flush=True)


async def main(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    with PrivateRedis(appendonly=True) as redis_server, PrivatePostgres() as postgres:
        simulator_port = free_port()
        simulator = await _spawn(
            [
                "simulator",
                "--port",
                str(simulator_port),
                "--first-token-ms",
                "100",
                "--tokens-per-s",
                "100",
                "--reply-tokens",
                "60",
            ],
            {},
        )
        env = _worker_env(redis_server.url, postgres.dsn, simulator_port)
        try:
            return await _run(args, rng, redis_server, postgres, env)
        finally:
            simulator.send_signal(signal.SIGTERM)
            await simulator.wait()


async def _run(
    args: argparse.Namespace,
    rng: random.Random,
    redis_server: PrivateRedis,
    postgres: PrivatePostgres,
    env: dict[str, str],
) -> int:
    database = await Database.connect(postgres.dsn, min_size=1, max_size=4)
    job_ids = await _seed_and_enqueue(database, redis_server.url, args.jobs, rng)
    await database.close()
    say(f"chaos: {len(job_ids)} jobs enqueued; starting {args.workers} workers")

    workers = [await _spawn(["run"], env) for _ in range(args.workers)]
    finals: collections.Counter[str] = collections.Counter()
    listener = asyncio.create_task(_count_final_events(redis_server.url, finals))
    try:
        await _make_chaos(args, rng, workers, env, redis_server, postgres)
        await _settle(redis_server.url, len(job_ids), args.settle_s)
        # Replies left generating by a killed run end at the sweep (stale after 10 s).
        await asyncio.sleep(20)
    finally:
        for worker in workers:
            if worker.returncode is None:
                worker.send_signal(signal.SIGTERM)
        await asyncio.gather(*(worker.wait() for worker in workers))
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
    return await _count(redis_server.url, postgres.dsn, job_ids, finals)


async def _seed_and_enqueue(
    database: Database, redis_url: str, jobs: int, rng: random.Random
) -> list[str]:
    faults = [fault for fault, weight in FAULTS for _ in range(weight)]
    conversations = [
        await seed_conversation(
            database, title=f"Chaos {n}", member_names=["Ada", "Bo"], history=[(0, "hello")]
        )
        for n in range(max(jobs // 5, 1))
    ]
    queue = Queue(QUEUE, {"connection": redis_url, "prefix": PREFIX})
    job_ids = []
    try:
        for n in range(jobs):
            seeded = conversations[n % len(conversations)]
            fault = rng.choice(faults)
            text = f"Question {n}" + (f" [[sim:fault={fault}]]" if fault else "")
            user = seeded.member_ids[0]
            message_id = await add_user_message(database, seeded.conversation_id, user, text)
            job_id = uuid4()
            job_input = {
                "conversationId": str(seeded.conversation_id),
                "message": text,
                "userId": str(user),
                "messageId": str(message_id),
            }
            await add_job_row(database, job_id, "ai-chat", job_input)
            options = {
                "jobId": str(job_id),
                "attempts": 4,
                "backoff": {"type": "exponential", "delay": 200},
            }
            await queue.add("ai-chat", {"jobId": str(job_id), "input": job_input}, options)
            job_ids.append(str(job_id))
    finally:
        await queue.close()
    return job_ids


async def _make_chaos(
    args: argparse.Namespace,
    rng: random.Random,
    workers: list[asyncio.subprocess.Process],
    env: dict[str, str],
    redis_server: PrivateRedis,
    postgres: PrivatePostgres,
) -> None:
    started = time.monotonic()
    redis_done = postgres_done = False
    kills = 0
    while (elapsed := time.monotonic() - started) < args.seconds:
        await asyncio.sleep(rng.uniform(2, 5))
        victim = rng.randrange(len(workers))
        if workers[victim].returncode is None:
            workers[victim].kill()
            kills += 1
        await workers[victim].wait()
        workers[victim] = await _spawn(["run"], env)
        if not redis_done and elapsed > args.seconds / 3:
            redis_done = True
            say("chaos: restarting Redis (2 s down)")
            await asyncio.to_thread(redis_server.stop)
            await asyncio.sleep(2)
            await asyncio.to_thread(redis_server.start)
        if not postgres_done and elapsed > 2 * args.seconds / 3:
            postgres_done = True
            say("chaos: restarting Postgres")
            await asyncio.to_thread(postgres.restart)
    # A worker started while Redis or Postgres was down refuses to start (as a
    # deployed one would, to be restarted by its supervisor): start those again.
    for index, worker in enumerate(workers):
        if worker.returncode is not None:
            workers[index] = await _spawn(["run"], env)
    say(f"chaos: {kills} workers killed with SIGKILL; letting the jobs settle")


async def _settle(redis_url: str, expected: int, timeout_s: float) -> None:
    queue = Queue(QUEUE, {"connection": redis_url, "prefix": PREFIX})
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            counts = await queue.getJobCounts("completed", "failed")
            if counts["completed"] + counts["failed"] >= expected:
                return
            await asyncio.sleep(1)
    finally:
        await queue.close()


async def _count_final_events(redis_url: str, finals: collections.Counter[str]) -> None:
    """Count each reply's final events, reconnecting through the Redis restart."""
    while True:
        client = redis.Redis.from_url(redis_url)
        pubsub = client.pubsub()
        try:
            await pubsub.psubscribe("conversation:*:messages")
            async for message in pubsub.listen():
                if message["type"] == "pmessage":
                    event = orjson.loads(message["data"])
                    if event.get("type") == "ai_response":
                        finals[event["jobId"]] += 1
        except (redis.ConnectionError, OSError):
            await asyncio.sleep(0.5)
        finally:
            await client.aclose()


async def _count(
    redis_url: str, dsn: str, job_ids: list[str], finals: collections.Counter[str]
) -> int:
    queue = Queue(QUEUE, {"connection": redis_url, "prefix": PREFIX})
    states: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    try:
        for job_id in job_ids:
            state = await queue.getJobState(job_id)
            states[state] += 1
            if state == "failed":
                job = await queue.getJob(job_id)
                reasons[(job.failedReason or "")[:70]] += 1
    finally:
        await queue.close()

    database = await Database.connect(dsn, min_size=1, max_size=2)
    try:
        async with database.transaction() as conn:
            per_job = await conn.fetch(
                "select job_id, count(*) as replies from public.messages"
                " where job_id = any($1::uuid[]) group by job_id",
                job_ids,
            )
            unfinished = await conn.fetchval(
                "select count(*) from public.messages where status = 'generating'"
            )
            reply_states = await conn.fetch(
                "select status, count(*) from public.messages where job_id is not null"
                " group by status"
            )
    finally:
        await database.close()

    duplicate_rows = sum(1 for row in per_job if row["replies"] > 1)
    duplicate_events = sum(1 for count in finals.values() if count > 1)
    lost = len(job_ids) - states["completed"] - states["failed"]
    say(f"chaos: BullMQ states {dict(states)}")
    say(f"chaos: reply states {dict((row[0], row[1]) for row in reply_states)}")
    say(f"chaos: final events per reply {dict(collections.Counter(finals.values()))}")
    for reason, count in reasons.most_common():
        say(f"chaos: failed {count:4d}  {reason}")
    say(
        f"chaos: enqueued={len(job_ids)} completed={states['completed']} "
        f"failed={states['failed']} lost={lost} "
        f"duplicate_replies={duplicate_rows + duplicate_events} unfinished_replies={unfinished}"
    )
    return 0 if lost == 0 and duplicate_rows + duplicate_events == 0 and unfinished == 0 else 1


def _worker_env(redis_url: str, dsn: str, simulator_port: int) -> dict[str, str]:
    return {
        "DATABASE_URL": dsn,
        "REDIS_URL": redis_url,
        "LLM_PROVIDER": "simulator",
        "SIMULATOR_URL": f"http://127.0.0.1:{simulator_port}",
        "QUEUE_PREFIX": PREFIX,
        "WORKER_CONCURRENCY": "20",
        "LOCK_DURATION_MS": "2000",
        "STALLED_INTERVAL_MS": "1000",
        "CHUNK_GAP_TIMEOUT_S": "2",
        "FIRST_TOKEN_TIMEOUT_S": "5",
        "SWEEP_INTERVAL_S": "5",
        "SWEEP_STALE_AFTER_S": "10",
        "SHUTDOWN_GRACE_S": "5",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "WARNING",
    }


async def _spawn(arguments: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "uvian_worker",
        *arguments,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=40.0, help="how long the chaos lasts")
    parser.add_argument("--settle-s", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=11)
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
