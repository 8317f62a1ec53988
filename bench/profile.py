"""Profile the worker under a benchmark's load with py-spy, and summarize where its time goes.

    python -m bench.profile queue [--jobs 30000] [--bullmq-worker runtime|stock|fast]
    python -m bench.profile chat [--latency zero|realistic] [--concurrency 100] [--jobs N]

Needs py-spy (`pip install py-spy`; not a dependency of the project). The
samples are written in py-spy's collapsed-stack format to `--output` (default
/tmp/uvian-profile-<target>.txt; flamegraph.pl or speedscope draw them), and
the functions holding the most samples are printed, first with their callees
(inclusive), then by their own code (self). Idle time is not sampled.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench import queue
from bench.chat import LATENCIES, default_jobs
from bench.common import BenchError, delete_redis_keys, fresh_database, run_async, unique_prefix
from bench.pipeline import ChatSeeds, PhaseRecord, PhaseSetup, connect_database, run_phase
from bench.processes import SimulatorProcess

SAMPLES_PER_S = 200
_LOCATION = re.compile(r" \((?:.*/site-packages/|.*/work/main/|<frozen )?([^:)]+)(?::\d+)?\)$")


def py_spy() -> str:
    beside_python = Path(sys.executable).with_name("py-spy")
    found = str(beside_python) if beside_python.exists() else shutil.which("py-spy")
    if found is None:
        raise BenchError("py-spy is not installed: pip install py-spy")
    return found


def recorder(output: Path) -> list[str]:
    rate = str(SAMPLES_PER_S)
    return [py_spy(), "record", "--format", "raw", "--rate", rate, "--output", str(output)]


async def profile_queue(output: Path, jobs: int, bullmq_worker: str) -> dict[str, Any]:
    prefix = unique_prefix("profile")
    async with fresh_database() as dsn:
        try:
            await queue.enqueue(prefix, queue.CHAT_QUEUE, jobs)
            return await queue.python_worker(
                dsn, prefix, jobs, 50, bullmq_worker, None, launcher=[*recorder(output), "--"]
            )
        finally:
            await delete_redis_keys([f"{prefix}:*"])


async def profile_chat(output: Path, setup: PhaseSetup) -> dict[str, Any]:
    """Run one chat phase with py-spy attached to its worker from start to exit."""
    log_dir = Path(tempfile.mkdtemp(prefix="uvian-profile-"))
    try:
        async with fresh_database() as dsn, SimulatorProcess(setup.latency) as simulator:
            database = await connect_database(dsn)
            try:
                record = await _phase_under_py_spy(
                    setup, simulator, ChatSeeds(database, dsn), log_dir, output
                )
            finally:
                await database.close()
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    return {"jobs": setup.jobs, "completed": record.statuses.get("completed", 0)}


async def _phase_under_py_spy(
    setup: PhaseSetup,
    simulator: SimulatorProcess,
    seeds: ChatSeeds,
    log_dir: Path,
    output: Path,
) -> PhaseRecord:
    phase = asyncio.ensure_future(run_phase(setup, simulator, seeds, log_dir))
    try:
        spy = await _attach_when_started(phase, log_dir, output)
    except BaseException:
        phase.cancel()
        await asyncio.gather(phase, return_exceptions=True)
        raise
    record = await phase
    await spy.wait()
    return record


async def _attach_when_started(
    phase: asyncio.Future[Any], log_dir: Path, output: Path
) -> asyncio.subprocess.Process:
    # The phase names the worker's log after its prefix; the worker is up once it logs.
    while not phase.done():
        pid = _started_worker_pid(log_dir)
        if pid is not None:
            return await asyncio.create_subprocess_exec(
                *recorder(output), "--pid", str(pid), stdout=subprocess.DEVNULL
            )
        await asyncio.sleep(0.05)
    raise BenchError("the phase ended before its worker started")


def _started_worker_pid(log_dir: Path) -> int | None:
    logs = list(log_dir.glob("*/worker-0.log"))
    if logs and b"Worker started" in logs[0].read_bytes():
        return _worker_pid(logs[0])
    return None


def _worker_pid(log_path: Path) -> int:
    """The `uvian_worker run` process writing to this log (its stderr)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "fd" / "2").resolve() == log_path.resolve():
                    return int(proc.name)
            except OSError:
                continue
    raise BenchError(f"no process writes {log_path}")


def summarize(path: Path, top: int = 30) -> None:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = [_name(frame) for frame in stack.split(";")]
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    print(f"{total} samples at {SAMPLES_PER_S}/s")
    print("inclusive (with callees):")
    for name, count in inclusive.most_common(top + 8):
        if count < 0.95 * total:
            print(f"  {100 * count / total:5.1f}%  {name}")
    print("self:")
    for name, count in own.most_common(top):
        print(f"  {100 * count / total:5.1f}%  {name}")


def _name(frame: str) -> str:
    return _LOCATION.sub(r" (\1)", frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=["queue", "chat"])
    parser.add_argument("--jobs", type=int)
    parser.add_argument("--bullmq-worker", choices=["runtime", "stock", "fast"], default="runtime")
    parser.add_argument("--latency", choices=list(LATENCIES), default="zero")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    output = args.output or Path(f"/tmp/uvian-profile-{args.target}.txt")
    if args.target == "queue":
        result = run_async(profile_queue(output, args.jobs or 30_000, args.bullmq_worker))
    else:
        latency = LATENCIES[args.latency]
        jobs = args.jobs or default_jobs(latency, args.concurrency)
        result = run_async(profile_chat(output, PhaseSetup(latency, args.concurrency, jobs)))
    print(f"{result}\nsamples: {output}")
    summarize(output)


if __name__ == "__main__":
    main()
