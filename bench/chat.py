"""Chat pipeline: ai-chat jobs through the whole worker, at several concurrencies, with
the simulator at zero latency and at a realistic one (300 ms to the first token,
50 tokens/s, 200 tokens).

    python -m bench.chat [--concurrency 1 100 1000] [--latency zero realistic]
                         [--jobs N] [--arrival-rate R] [--pooler none|transaction]
                         [--keep-logs]

`--arrival-rate R` adds the jobs one by one, R per second, instead of all at once;
`--pooler` is the workers' DATABASE_POOLER (default `none`: the benchmark reaches
Postgres directly).

Each phase starts a fresh worker process (so its peak RSS is that phase's),
gives each job a conversation of its own, and waits until every job's row is
final. bench/measures.py says how each figure is computed.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import fmt, fresh_database, print_table, run_async
from bench.measures import summarize
from bench.pipeline import ChatSeeds, PhaseSetup, connect_database, run_phase
from bench.processes import REALISTIC, ZERO, Latency, SimulatorProcess

LATENCIES = {"zero": ZERO, "realistic": REALISTIC}


def default_jobs(latency: Latency, concurrency: int) -> int:
    """Enough rounds for a steady state: three when replies take seconds, more when not."""
    if latency.reply_s:
        return 3 * concurrency
    return max(200, min(10 * concurrency, 3000))


async def run_setups(setups: Sequence[PhaseSetup], keep_logs: bool = False) -> list[dict[str, Any]]:
    """Run the phases in order, one simulator per latency, and summarize each."""
    log_dir = Path(tempfile.mkdtemp(prefix="uvian-bench-"))
    summaries: list[dict[str, Any]] = []
    try:
        async with fresh_database() as dsn:
            database = await connect_database(dsn)
            try:
                seeds = ChatSeeds(database, dsn)
                for latency in dict.fromkeys(setup.latency for setup in setups):
                    async with SimulatorProcess(latency) as simulator:
                        for setup in (s for s in setups if s.latency == latency):
                            summary = summarize(await run_phase(setup, simulator, seeds, log_dir))
                            summaries.append(summary)
                            print(f"  {phase_line(summary)}", flush=True)
            finally:
                await database.close()
    finally:
        if keep_logs:
            print(f"worker logs kept in {log_dir}")
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
    return summaries


def arrival(summary: dict[str, Any]) -> str:
    rate = summary.get("arrival_per_s")
    return "at once" if rate is None else f"{rate:g}/s"


def phase_line(summary: dict[str, Any]) -> str:
    return (
        f"{summary['latency']} latency, concurrency {summary['concurrency']}, "
        f"jobs added {arrival(summary)}, DATABASE_POOLER={summary['pooler']} "
        f"({summary['processes']} process(es)): {summary['completed']}/{summary['jobs']} "
        f"completed in {summary['seconds']} s"
    )


def report(summaries: Sequence[dict[str, Any]]) -> None:
    headers = [
        "latency",
        "conc",
        "procs",
        "arrival",
        "pooler",
        "jobs/s",
        "ideal",
        "effic.",
        "added p50",
        "added p99",
        "1st pub p50",
        "1st pub p99",
        "tok pub p50",
        "tok pub p99",
        "tok/delta",
        "CPU us/tok",
        "CPU ms/job",
        "RSS MB",
        "failed",
    ]
    rows = [
        [
            s["latency"],
            str(s["concurrency"]),
            str(s["processes"]),
            arrival(s),
            s["pooler"],
            fmt(s["jobs_per_s"]),
            fmt(s["ideal_jobs_per_s"]),
            fmt(s["efficiency"], 3),
            fmt(s["worker_added_p50_ms"], 2),
            fmt(s["worker_added_p99_ms"], 2),
            fmt(s["first_token_publish_p50_ms"], 2),
            fmt(s["first_token_publish_p99_ms"], 2),
            fmt(s["token_publish_p50_ms"], 1),
            fmt(s["token_publish_p99_ms"], 1),
            fmt(s["tokens_per_delta"]),
            fmt(s["cpu_us_per_token"]),
            fmt(s["cpu_ms_per_job"], 2),
            fmt(s["peak_rss_mb"], 0),
            str(s["failed"]),
        ]
        for s in summaries
    ]
    print_table(headers, rows)
    print(
        "added: worker-added time per job (runner span minus the simulator's own); "
        "1st pub / tok pub: simulator write to subscriber receipt, first token / every token "
        "(later tokens wait for the 50 ms delta window); times in ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--latency", choices=list(LATENCIES), nargs="+", default=list(LATENCIES))
    parser.add_argument("--jobs", type=int, help="jobs per phase (default: a few rounds)")
    parser.add_argument("--arrival-rate", type=float, help="jobs added per second (open loop)")
    parser.add_argument("--pooler", choices=["none", "transaction"], default="none")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    setups = [
        PhaseSetup(
            LATENCIES[name],
            c,
            args.jobs or default_jobs(LATENCIES[name], c),
            arrival_per_s=args.arrival_rate,
            pooler=args.pooler,
        )
        for name in args.latency
        for c in args.concurrency
    ]
    print("chat pipeline:")
    summaries = run_async(run_setups(setups, args.keep_logs))
    report(summaries)


if __name__ == "__main__":
    main()
