"""What the benchmarks share: service addresses, the bench database, child processes,
readings of a process's CPU and memory, and percentiles.

Every benchmark runs against the local Redis and Postgres under a queue prefix
of its own, in a database of its own (`uvian_bench_<random>` on the server of
`BENCH_DATABASE_URL`, created and migrated at the start), and when it ends
deletes its Redis keys and drops its database.
"""

from __future__ import annotations

import asyncio
import math
import os
import platform
import subprocess
import sys
from collections.abc import AsyncIterator, Coroutine, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import asyncpg
import orjson
import redis.asyncio as redis

from uvian_worker.store import migrations

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "bench"
NODE_BENCH_DIR = BENCH_DIR / "node"
SERVER_DSN = os.environ.get(
    "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/uvian_bench"
)
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
# Clock ticks per second of /proc/<pid>/stat's CPU times.
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_DELETE_BATCH = 500


class BenchError(Exception):
    """A benchmark could not run (a child process failed, a run timed out)."""


def unique_prefix(kind: str) -> str:
    return f"bench-{kind}-{uuid4().hex[:8]}"


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop, as the worker's command line does."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


@asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """A migrated database for one benchmark run, dropped when it ends; yields its DSN."""
    base, _, _name = SERVER_DSN.rpartition("/")
    name = f"uvian_bench_{uuid4().hex[:8]}"
    dsn = f"{base}/{name}"
    await migrations.create_database_if_missing(dsn)
    try:
        await migrations.apply_migrations(dsn)
        yield dsn
    finally:
        admin = await asyncpg.connect(f"{base}/postgres")
        try:
            await admin.execute(f'drop database if exists "{name}" with (force)')
        finally:
            await admin.close()


async def delete_redis_keys(patterns: Iterable[str]) -> int:
    """Delete every key matching the patterns (each names this run's own prefix or ids)."""
    client = redis.Redis.from_url(REDIS_URL)
    deleted = 0
    try:
        for pattern in patterns:
            batch: list[bytes] = []
            async for key in client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= _DELETE_BATCH:
                    deleted += await client.unlink(*batch)
                    batch.clear()
            if batch:
                deleted += await client.unlink(*batch)
    finally:
        await client.aclose()
    return deleted


async def unlink_keys(keys: Sequence[str]) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for start in range(0, len(keys), _DELETE_BATCH):
            await client.unlink(*keys[start : start + _DELETE_BATCH])
    finally:
        await client.aclose()


async def run_node(script: Path, *args: str, timeout_s: float = 900.0) -> dict[str, Any]:
    """Run a Node benchmark script; it prints one JSON object on stdout."""
    process = await asyncio.create_subprocess_exec(
        "node",
        str(script),
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    async with asyncio.timeout(timeout_s):
        stdout, stderr = await process.communicate()
    if process.returncode != 0:
        raise BenchError(f"{script.name} exited {process.returncode}: {stderr.decode()[-800:]}")
    result: dict[str, Any] = orjson.loads(stdout.splitlines()[-1])
    return result


@dataclass(frozen=True, slots=True)
class ProcessReading:
    cpu_s: float
    rss_mb: float
    peak_rss_mb: float


def read_process(pid: int) -> ProcessReading:
    """CPU time (user + system) and memory of a live process, from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces; the fields after its closing parenthesis do not.
    fields = stat.rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return ProcessReading(cpu_s, _kib_to_mb(status["VmRSS"]), _kib_to_mb(status["VmHWM"]))


def _kib_to_mb(value: str) -> float:
    return int(value.split(maxsplit=1)[0]) / 1024


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between closest ranks; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = math.floor(position)
    high = math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    for line in (headers, *rows):
        print("  ".join(str(cell).rjust(width) for cell, width in zip(line, widths, strict=True)))


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    memory_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model,
        "memory_gb": round(memory_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
    }


def worker_env(
    *, dsn: str, prefix: str, concurrency: int, simulator_url: str, **extra: str
) -> dict[str, str]:
    """The environment of a worker process: this run's database and queue prefix."""
    return {
        **os.environ,
        "DATABASE_URL": dsn,
        "REDIS_URL": REDIS_URL,
        "LLM_PROVIDER": "simulator",
        "SIMULATOR_URL": simulator_url,
        "QUEUE_PREFIX": prefix,
        "WORKER_CONCURRENCY": str(concurrency),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        **extra,
    }
