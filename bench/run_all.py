"""Every benchmark in one run (what `make bench` runs), well within ten minutes on 2 cores.

    python -m bench.run_all [--quick] [--results bench/results.json]

Runs the queue overhead, the chat pipeline and the scale-out benchmarks in
turn, prints the figures of each, writes them all with the machine, the
versions and the date to `--results` (bench/chart.py draws bench/chart.png
from that file), and ends with one line:

    bench: queue_jobs_per_s=N node_jobs_per_s=N chat_overhead_p50_ms=X
           chat_overhead_p99_ms=X chat_efficiency=X rss_mb_1000=N

(on one line). chat_overhead_*: the worker-added time per job at zero latency
and concurrency 100; chat_efficiency and rss_mb_1000: the realistic latency at
concurrency 1,000. `--quick` runs smaller versions of each, in about a minute
and a half, and its line names the concurrency it stood in with.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import redis.asyncio as redis

from bench import chat, queue, scale
from bench.common import NODE_BENCH_DIR, REDIS_URL, SERVER_DSN, machine, run_async
from bench.pipeline import PhaseSetup
from bench.processes import REALISTIC, ZERO

DEFAULT_RESULTS = Path(__file__).with_name("results.json")
PYTHON_PACKAGES = ("bullmq", "redis", "hiredis", "uvloop", "asyncpg", "aiohttp", "orjson")


def chat_setups(quick: bool) -> list[PhaseSetup]:
    concurrencies = [1, 100] if quick else [1, 100, 1000]
    setups = []
    for latency in (ZERO, REALISTIC):
        for concurrency in concurrencies:
            jobs = chat.default_jobs(latency, concurrency)
            if quick:
                jobs = max(jobs // 3, 2 * concurrency)  # two rounds at least
            setups.append(PhaseSetup(latency, concurrency, jobs))
    return setups


def more_chat_setups(measured: list[dict[str, Any]], quick: bool) -> list[PhaseSetup]:
    """Concurrency 100 at zero latency once more: with the jobs added at a quarter of the
    rate the worker reached when they were all added at once (a job then seldom waits for
    the CPU behind others; at half that rate the worker was still 90 % busy, since a job
    costs more CPU when it shares no pipeline or loop turn with others), and with
    DATABASE_POOLER=transaction (concurrency 1 and 100)."""
    saturated = next(s for s in measured if s["latency"] == "zero" and s["concurrency"] == 100)
    rate = max(round(saturated["jobs_per_s"] / 4), 1)
    jobs = 200 if quick else 600
    return [
        PhaseSetup(ZERO, 100, jobs, arrival_per_s=rate),
        PhaseSetup(ZERO, 1, 200, pooler="transaction"),
        PhaseSetup(ZERO, 100, jobs, pooler="transaction"),
    ]


def scale_setups(quick: bool) -> list[PhaseSetup]:
    if quick:
        return scale.setups([1, 2], 20, ["realistic"])
    return scale.setups([1, 2, 4], 50, ["realistic", "zero"])


async def versions() -> dict[str, str]:
    found = {name: importlib.metadata.version(name) for name in PYTHON_PACKAGES}
    client = redis.Redis.from_url(REDIS_URL)
    try:
        found["redis_server"] = str((await client.info("server"))["redis_version"])
    finally:
        await client.aclose()
    conn = await asyncpg.connect(SERVER_DSN.rsplit("/", 1)[0] + "/postgres")
    try:
        found["postgres"] = str(await conn.fetchval("show server_version"))
    finally:
        await conn.close()
    node = await asyncio.create_subprocess_exec("node", "--version", stdout=asyncio.subprocess.PIPE)
    found["node"] = (await node.communicate())[0].decode().strip()
    package = orjson.loads((NODE_BENCH_DIR / "node_modules/bullmq/package.json").read_bytes())
    found["npm_bullmq"] = package["version"]
    return found


async def run_everything(quick: bool) -> dict[str, Any]:
    started_s = time.monotonic()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": await versions(),
        "quick": quick,
    }
    # Three rounds, the median by ratio: one round of Node alone moved between 8,000
    # and 16,000 jobs/s on this shared machine.
    results["queue"] = await queue.measure(
        jobs=5_000 if quick else 20_000, rounds=1 if quick else 3
    )
    queue.report(results["queue"])
    print("chat pipeline:", flush=True)
    results["chat"] = await chat.run_setups(chat_setups(quick))
    chat.report(results["chat"])
    print("chat pipeline, zero latency, jobs paced and the pooler-safe path:", flush=True)
    results["chat_more"] = await chat.run_setups(more_chat_setups(results["chat"], quick))
    chat.report(results["chat_more"])
    print("scale out:", flush=True)
    results["scale"] = scale.with_ratios(await chat.run_setups(scale_setups(quick)))
    scale.report(results["scale"])
    results["seconds"] = round(time.monotonic() - started_s, 1)
    return results


def final_line(results: dict[str, Any]) -> str:
    top = max(s["concurrency"] for s in results["chat"])
    overhead = _phase(results, "zero", 100)
    realistic = _phase(results, "realistic", top)
    suffix = "" if top == 1000 else f" (quick: concurrency {top} stands in for 1,000)"
    return (
        f"bench: queue_jobs_per_s={results['queue']['python']['jobs_per_s']:.0f}"
        f" node_jobs_per_s={results['queue']['node']['jobs_per_s']:.0f}"
        f" chat_overhead_p50_ms={_number(overhead, 'worker_added_p50_ms')}"
        f" chat_overhead_p99_ms={_number(overhead, 'worker_added_p99_ms')}"
        f" chat_efficiency={_number(realistic, 'efficiency', 3)}"
        f" rss_mb_1000={_number(realistic, 'peak_rss_mb', 0)}{suffix}"
    )


def _phase(results: dict[str, Any], latency: str, concurrency: int) -> dict[str, Any]:
    return next(
        (
            s
            for s in results["chat"]
            if s["latency"] == latency
            and s["concurrency"] == concurrency
            and s.get("arrival_per_s") is None
        ),
        {},
    )


def _number(summary: dict[str, Any], key: str, digits: int = 2) -> str:
    value = summary.get(key, math.nan)
    return "nan" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args()
    results = run_async(run_everything(args.quick))
    args.results.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(f"figures written to {args.results} in {results['seconds']} s")
    print(final_line(results))


if __name__ == "__main__":
    main()
