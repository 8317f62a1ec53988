"""Queue overhead: no-op jobs drained by this worker's runtime and by the Node worker.

    python -m bench.queue [--jobs 20000] [--concurrency 50] [--rounds 1]
                          [--bullmq-worker runtime|stock|fast] [--log-file PATH]

N no-op jobs are added by the Node client (npm `bullmq`, as the platform's API
adds them), then drained by one worker process of this project, built by
`WorkerApp.create` with its real settings, JSON logging at INFO and the
no-op job type; then N more by the Node `bullmq` worker at the same
concurrency. Each side is timed from its first job taken to its N-th finished.
With `--rounds R` the two alternate R times and the median round is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from bench.common import (
    BENCH_DIR,
    NODE_BENCH_DIR,
    REDIS_URL,
    ROOT,
    BenchError,
    delete_redis_keys,
    fmt,
    fresh_database,
    print_table,
    run_async,
    run_node,
    unique_prefix,
    worker_env,
)

ENQUEUE_SCRIPT = BENCH_DIR / "enqueue_noop.mjs"
NODE_WORKER_SCRIPT = NODE_BENCH_DIR / "noop-worker.mjs"
CHAT_QUEUE = "ai-jobs"
NODE_QUEUE = "node-noop"
# The no-op jobs never reach a provider, but a worker refuses to start without one.
UNUSED_SIMULATOR_URL = "http://127.0.0.1:9"
TIMEOUT_S = 900.0


async def enqueue(prefix: str, queue: str, jobs: int) -> dict[str, Any]:
    return await run_node(
        ENQUEUE_SCRIPT,
        *("--queue", queue, "--count", str(jobs), "--prefix", prefix, "--redis-url", REDIS_URL),
    )


async def python_worker(
    dsn: str,
    prefix: str,
    jobs: int,
    concurrency: int,
    bullmq_worker: str,
    log_file: Path | None,
    launcher: Sequence[str] = (),
) -> dict[str, Any]:
    """Drain the chat queue with bench/noop_worker.py; `launcher` prefixes the command
    (a profiler)."""
    env = worker_env(
        dsn=dsn, prefix=prefix, concurrency=concurrency, simulator_url=UNUSED_SIMULATOR_URL
    )
    command = [
        *launcher,
        sys.executable,
        *("-m", "bench.noop_worker", "--expect", str(jobs), "--bullmq-worker", bullmq_worker),
    ]
    with _append(log_file) as log:
        process = await asyncio.create_subprocess_exec(
            *command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=log
        )
        async with asyncio.timeout(TIMEOUT_S):
            stdout, _ = await process.communicate()
    if process.returncode != 0 or not stdout.strip():
        where = f"see {log_file}" if log_file else "rerun with --log-file to see its log"
        raise BenchError(f"the worker exited {process.returncode}; {where}")
    # A launcher may print lines of its own after the worker's.
    last = [line for line in stdout.splitlines() if line.startswith(b"{")][-1]
    result: dict[str, Any] = orjson.loads(last)
    return result


def _append(log_file: Path | None) -> BinaryIO:
    return open(log_file or "/dev/null", "ab")


async def node_worker(prefix: str, jobs: int, concurrency: int) -> dict[str, Any]:
    return await run_node(
        NODE_WORKER_SCRIPT,
        *("--queue", NODE_QUEUE, "--expect", str(jobs), "--concurrency", str(concurrency)),
        *("--prefix", prefix, "--redis-url", REDIS_URL),
    )


async def one_round(
    dsn: str, jobs: int, concurrency: int, bullmq_worker: str, log_file: Path | None
) -> dict[str, Any]:
    prefix = unique_prefix("queue")
    try:
        enqueued = await enqueue(prefix, CHAT_QUEUE, jobs)
        python = await python_worker(dsn, prefix, jobs, concurrency, bullmq_worker, log_file)
        await enqueue(prefix, NODE_QUEUE, jobs)
        node = await node_worker(prefix, jobs, concurrency)
    finally:
        await delete_redis_keys([f"{prefix}:*"])
    return {
        "python": python,
        "node": node,
        "ratio": round(python["jobs_per_s"] / node["jobs_per_s"], 3),
        "enqueue_jobs_per_s": enqueued["jobs_per_s"],
    }


async def measure(
    jobs: int = 20_000,
    concurrency: int = 50,
    rounds: int = 1,
    bullmq_worker: str = "runtime",
    log_file: Path | None = None,
) -> dict[str, Any]:
    async with fresh_database() as dsn:
        results = [
            await one_round(dsn, jobs, concurrency, bullmq_worker, log_file) for _ in range(rounds)
        ]
    median_ratio = statistics.median_low(result["ratio"] for result in results)
    chosen = next(result for result in results if result["ratio"] == median_ratio)
    return {
        **chosen,
        "jobs": jobs,
        "concurrency": concurrency,
        "bullmq_worker": bullmq_worker,
        "rounds": [[r["python"]["jobs_per_s"], r["node"]["jobs_per_s"]] for r in results],
    }


def report(result: dict[str, Any]) -> None:
    python, node = result["python"], result["node"]
    print(
        f"queue overhead: {result['jobs']:,} no-op jobs, concurrency {result['concurrency']}, "
        f"bullmq worker class: {result['bullmq_worker']}"
    )
    rows = [
        [
            name,
            fmt(side["jobs_per_s"], 0),
            fmt(side["cpu_ms_per_job"], 3),
            fmt(side["seconds"], 2),
            str(side["failed"]),
        ]
        for name, side in (("python worker", python), ("node bullmq 6.7.6", node))
    ]
    print_table(["worker", "jobs/s", "CPU ms/job", "seconds", "failed"], rows)
    print(f"ratio python/node: {result['ratio']:.2f}   python peak RSS: {python['peak_rss_mb']} MB")
    if len(result["rounds"]) > 1:
        print(f"every round's jobs/s (python, node): {result['rounds']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--bullmq-worker", choices=["runtime", "stock", "fast"], default="runtime")
    parser.add_argument("--log-file", type=Path, help="the worker's JSON log (default /dev/null)")
    args = parser.parse_args()
    result = run_async(
        measure(args.jobs, args.concurrency, args.rounds, args.bullmq_worker, args.log_file)
    )
    report(result)


if __name__ == "__main__":
    main()
