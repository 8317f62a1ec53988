"""The worker process of the queue benchmark: the real runtime with a no-op job type.

    python -m bench.noop_worker --expect N [--bullmq-worker runtime|stock|fast]

Settings come from the environment as for `uvian-worker run`; logs go to stderr
as JSON (the benchmark points stderr at a file or /dev/null). It drains the
chat queue until N jobs have finished and prints one JSON line: jobs/s and CPU
per job measured from the first job started to the N-th finished, the way
bench/node/noop-worker.mjs measures the Node worker, and its peak RSS.

`--bullmq-worker stock|fast` gives the runtime's queue workers the package's own
loop or `FastWorker`'s, for side-by-side measurements; `runtime` (the default)
leaves them as the runtime builds them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from typing import Any

import bullmq
import orjson

from bench.common import read_process, run_async
from uvian_worker.app import WorkerApp
from uvian_worker.executors.base import JobContext
from uvian_worker.observability.logs import configure_logging
from uvian_worker.runtime import lifecycle
from uvian_worker.runtime.fast_worker import FastWorker
from uvian_worker.settings import load_settings

FINAL_OUTCOMES = frozenset({"completed", "failed", "cancelled"})
WORKER_LOOPS = ("stock", "fast")
TIMEOUT_S = 600.0


class NoopExecutor:
    """A job type that does nothing, so that only the runtime's own cost is measured."""

    job_name = "noop"

    async def run(self, job: JobContext) -> dict[str, Any]:
        return {}


class Meter(logging.Handler):
    """Counts jobs from the runner's log records: its first line starts the clock,
    each final outcome counts one job finished."""

    def __init__(self, expect: int) -> None:
        super().__init__(logging.INFO)
        self.expect = expect
        self.finished = 0
        self.failed = 0
        self.started_s: float | None = None
        self.started_cpu_s = 0.0
        self.ended_s = 0.0
        self.ended_cpu_s = 0.0
        self.done = asyncio.get_running_loop().create_future()

    def emit(self, record: logging.LogRecord) -> None:
        if self.started_s is None:
            self.started_s = time.perf_counter()
            self.started_cpu_s = time.process_time()
        outcome = getattr(record, "outcome", None)
        if outcome not in FINAL_OUTCOMES:
            return
        self.finished += 1
        self.failed += outcome != "completed"
        if self.finished == self.expect:
            self.ended_s = time.perf_counter()
            self.ended_cpu_s = time.process_time()
            self.done.set_result(None)

    def result(self) -> dict[str, Any]:
        seconds = self.ended_s - (self.started_s or self.ended_s)
        cpu_s = self.ended_cpu_s - self.started_cpu_s
        return {
            "jobs": self.finished,
            "failed": self.failed,
            "seconds": round(seconds, 3),
            "jobs_per_s": round(self.finished / seconds, 1) if seconds > 0 else 0.0,
            "cpu_ms_per_job": round(cpu_s * 1000 / max(self.finished, 1), 4),
        }


def use_worker_class(choice: str) -> None:
    """Make the runtime build its queue workers with the stock or the fast loop.

    A measurement switch: every `bullmq.Worker` class the runtime's lifecycle
    module names is replaced by a variant that keeps its other overrides.
    """
    if choice == "runtime":
        return
    for name, value in list(vars(lifecycle).items()):
        if isinstance(value, type) and issubclass(value, bullmq.Worker):
            setattr(lifecycle, name, _variant(value, choice))


def _variant(base: type[Any], choice: str) -> type[Any]:
    if choice == "stock":
        return type(f"Stock{base.__name__}", (base,), {"processJob": bullmq.Worker.processJob})
    if issubclass(base, FastWorker):
        return base
    return type(f"Fast{base.__name__}", (FastWorker, base), {})


async def drain(expect: int) -> dict[str, Any]:
    settings = load_settings(_env_file=None)
    configure_logging(settings.log_level, "json")
    meter = Meter(expect)
    logging.getLogger("uvian_worker.runtime.runner").addHandler(meter)

    app = await WorkerApp.create(settings, extra_executors={"noop": NoopExecutor()})
    await app.start()
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await meter.done
    finally:
        await app.close(settings.shutdown_grace_s)
    return {**meter.result(), "peak_rss_mb": round(read_process(os.getpid()).peak_rss_mb, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--bullmq-worker", choices=["runtime", *WORKER_LOOPS], default="runtime")
    args = parser.parse_args()
    use_worker_class(args.bullmq_worker)
    result = run_async(drain(args.expect))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
