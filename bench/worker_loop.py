"""The `bullmq` worker loop alone: `bullmq.Worker` against `FastWorker`, no runtime around them.

    python -m bench.worker_loop [--jobs 20000] [--concurrency 50] [--rounds 3]

Each round adds N no-op jobs with the Python client (the API's job options),
drains them with one class, then the other, in this process on uvloop, with the
Redis client the runtime builds, and a processor that returns at once. It
isolates what fetching the next job in the finishing call saves; bench/queue.py
measures the whole runtime. CPU is this process's, from the first job to the last.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import bullmq

from bench.common import REDIS_URL, delete_redis_keys, print_table, run_async, unique_prefix
from bench.pipeline import JOB_OPTIONS
from uvian_worker.runtime.connections import make_redis
from uvian_worker.runtime.fast_worker import FastWorker

CLASSES: dict[str, type[Any]] = {"bullmq.Worker": bullmq.Worker, "FastWorker": FastWorker}
QUEUE = "loop"


async def drain(worker_class: type[Any], jobs: int, concurrency: int) -> dict[str, float]:
    prefix = unique_prefix("loop")
    queue = bullmq.Queue(QUEUE, {"connection": REDIS_URL, "prefix": prefix})
    try:
        for start in range(0, jobs, 1000):
            batch = range(start, min(start + 1000, jobs))
            await queue.addBulk(
                [{"name": "noop", "data": {"n": n}, "opts": JOB_OPTIONS} for n in batch]
            )
        return await _timed_drain(worker_class, prefix, jobs, concurrency)
    finally:
        await queue.close()
        await delete_redis_keys([f"{prefix}:*"])


async def _timed_drain(
    worker_class: type[Any], prefix: str, jobs: int, concurrency: int
) -> dict[str, float]:
    done = asyncio.get_running_loop().create_future()
    clock: dict[str, float] = {}
    finished = 0

    async def processor(_job: Any, _token: str) -> None:
        clock.setdefault("started_s", time.perf_counter())
        clock.setdefault("started_cpu_s", time.process_time())

    def on_completed(_job: Any, _result: Any) -> None:
        nonlocal finished
        finished += 1
        if finished == jobs:
            clock["ended_s"], clock["ended_cpu_s"] = time.perf_counter(), time.process_time()
            done.set_result(None)

    client = make_redis(REDIS_URL, connect_timeout_s=5.0, max_connections=concurrency + 4)
    options = {"connection": client, "prefix": prefix, "concurrency": concurrency, "autorun": False}
    worker = worker_class(QUEUE, processor, options)
    worker.on("completed", on_completed)
    running = asyncio.create_task(worker.run())
    await done
    await worker.close()
    await running
    seconds = clock["ended_s"] - clock["started_s"]
    cpu_s = clock["ended_cpu_s"] - clock["started_cpu_s"]
    return {"jobs_per_s": jobs / seconds, "cpu_ms_per_job": cpu_s * 1000 / jobs}


async def compare(jobs: int, concurrency: int, rounds: int) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {name: [] for name in CLASSES}
    for _ in range(rounds):
        for name, worker_class in CLASSES.items():
            results[name].append(await drain(worker_class, jobs, concurrency))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = run_async(compare(args.jobs, args.concurrency, args.rounds))
    print(
        f"bullmq worker loop: {args.jobs:,} no-op jobs, concurrency {args.concurrency}, "
        f"median of {args.rounds} rounds"
    )
    rows = []
    for name, runs in results.items():
        rate = statistics.median(run["jobs_per_s"] for run in runs)
        cpu = statistics.median(run["cpu_ms_per_job"] for run in runs)
        spread = ", ".join(f"{run['jobs_per_s']:,.0f}" for run in runs)
        rows.append([name, f"{rate:,.0f}", f"{cpu:.3f}", spread])
    print_table(["class", "jobs/s", "CPU ms/job", "every round's jobs/s"], rows)


if __name__ == "__main__":
    main()
