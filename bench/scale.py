"""Scale out: the chat pipeline with 1, 2 and 4 worker processes on the same Redis and Postgres.

    python -m bench.scale [--processes 1 2 4] [--concurrency 50] [--latency realistic zero]

Every process runs at the same concurrency, so the load grows with the number
of processes. At the realistic latency the replies, not the CPU, bound the
rate: the ratio shows whether anything shared (Redis, Postgres, the queue, the
conversation turns) holds the processes back. At zero latency the CPU bounds
it: on a machine with few cores the processes share them with the simulator,
Redis and Postgres.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from bench.chat import LATENCIES, default_jobs, run_setups
from bench.common import fmt, print_table, run_async
from bench.pipeline import PhaseSetup


def setups(
    processes: Sequence[int], concurrency: int, latencies: Sequence[str]
) -> list[PhaseSetup]:
    return [
        PhaseSetup(
            LATENCIES[name],
            concurrency,
            default_jobs(LATENCIES[name], concurrency * count),
            processes=count,
        )
        for name in latencies
        for count in processes
    ]


def with_ratios(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run's jobs/s over the one-process run's at the same latency."""
    single = {s["latency"]: s["jobs_per_s"] for s in summaries if s["processes"] == 1}
    return [
        {**s, "vs_one_process": round(s["jobs_per_s"] / single[s["latency"]], 2)}
        if s["latency"] in single
        else s
        for s in summaries
    ]


def report(summaries: Sequence[dict[str, Any]]) -> None:
    rows = [
        [
            s["latency"],
            str(s["processes"]),
            str(s["concurrency"]),
            fmt(s["jobs_per_s"]),
            fmt(s.get("vs_one_process"), 2),
            fmt(s["efficiency"], 3),
            fmt(s["worker_added_p50_ms"], 1),
            fmt(s["cpu_ms_per_job"], 2),
            f"{s['completed']}/{s['jobs']}",
        ]
        for s in summaries
    ]
    headers = ["latency", "procs", "conc", "jobs/s", "x one", "effic.", "added p50", "CPU ms/job"]
    print_table([*headers, "done"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--concurrency", type=int, default=50, help="per process")
    parser.add_argument(
        "--latency", choices=list(LATENCIES), nargs="+", default=["realistic", "zero"]
    )
    args = parser.parse_args()
    print("scale out:")
    summaries = run_async(run_setups(setups(args.processes, args.concurrency, args.latency)))
    report(with_ratios(summaries))


if __name__ == "__main__":
    main()
