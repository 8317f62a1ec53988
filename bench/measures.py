"""The figures of a chat phase, computed from what `bench.pipeline` recorded.

- jobs/s in steady state: the jobs finished after the first `concurrency` of
  them, over the time from the `concurrency`-th finish to the last. Jobs of
  equal length run in rounds; this leaves out the first round's ramp-up and
  counts every later slot refill, queue and worker overhead included.
- ideal: concurrency ÷ the simulator's reply time; efficiency is their ratio.
- arrival: every job added at once (the worker always has `concurrency` jobs in
  flight, so a job's time includes waiting for the CPU behind the others:
  Little's law makes it concurrency ÷ jobs/s), or added one by one at a fixed
  rate below what the worker can take (paced: a job waits for nobody).
- worker-added time: the runner's duration of the job (from its "Job started"
  to its "Job completed" line: Postgres, the turn, the provider request and
  stream, the saved reply, the events) minus the simulator's own time for the
  request (arrival to the end of its response).
- chunk to publish, for the probed jobs: from the simulator's write of a token
  to a subscriber's receipt of the delta holding it. The first token of a reply
  is published at once (the leading edge); later tokens wait for the delta
  window to close (coalescing, by design at most `REPLY_DELTA_WINDOW_MS`).
- CPU per streamed token: the workers' CPU time over the phase over the tokens
  of the replies completed (so it carries every per-job cost as well).
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from bench.common import percentile
from bench.pipeline import PhaseRecord

FINAL = frozenset({"completed", "failed", "cancelled"})


def summarize(record: PhaseRecord) -> dict[str, Any]:
    setup = record.setup
    concurrency = setup.concurrency * setup.processes
    finals = [r for r in record.job_records if r.get("outcome") in FINAL]
    completed = [r for r in finals if r["outcome"] == "completed"]
    jobs_per_s = _steady_jobs_per_s(completed, concurrency)
    ideal = concurrency / setup.latency.reply_s if setup.latency.reply_s else math.nan
    added_ms = _worker_added_ms(completed, record.spans)
    publish = _chunk_to_publish_ms(record)
    tokens = len(completed) * setup.latency.reply_tokens
    return {
        "latency": setup.latency.name,
        "concurrency": concurrency,
        "processes": setup.processes,
        "arrival_per_s": setup.arrival_per_s,
        "pooler": setup.pooler,
        "jobs": setup.jobs,
        "completed": len(completed),
        "failed": len(finals) - len(completed),
        "unfinished": setup.jobs - len(finals),
        "statuses": record.statuses,
        "seconds": round(record.seconds, 2),
        "jobs_per_s": round(jobs_per_s, 1),
        "ideal_jobs_per_s": round(ideal, 1),
        "efficiency": math.nan if math.isnan(ideal) else round(jobs_per_s / ideal, 3),
        "worker_added_p50_ms": round(percentile(added_ms, 0.5), 2),
        "worker_added_p99_ms": round(percentile(added_ms, 0.99), 2),
        **publish,
        "cpu_us_per_token": round(record.worker_cpu_s / tokens * 1e6, 1) if tokens else math.nan,
        "cpu_ms_per_job": round(record.worker_cpu_s / len(completed) * 1e3, 2)
        if completed
        else math.nan,
        "worker_cpu_s": round(record.worker_cpu_s, 2),
        "simulator_cpu_s": round(record.simulator_cpu_s, 2),
        "peak_rss_mb": round(record.peak_rss_mb, 1),
    }


def _steady_jobs_per_s(completed: list[dict[str, Any]], concurrency: int) -> float:
    ends_s = sorted(_wall_s(r["ts"]) for r in completed)
    if len(ends_s) <= concurrency:
        return math.nan
    window_s = ends_s[-1] - ends_s[concurrency - 1]
    return (len(ends_s) - concurrency) / window_s if window_s > 0 else math.nan


def _wall_s(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


def _worker_added_ms(completed: list[dict[str, Any]], spans: dict[str, Any]) -> list[float]:
    added = []
    for record in completed:
        span = spans.get(record["job_id"])
        if span is not None:
            added.append(record["duration_ms"] - (span["end"] - span["start"]) * 1000)
    return added


def _chunk_to_publish_ms(record: PhaseRecord) -> dict[str, Any]:
    first_ms: list[float] = []
    all_ms: list[float] = []
    deltas = 0
    unmatched = 0
    by_job: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for arrived_s, event in record.events:
        if event.get("type") == "ai_delta":
            by_job.setdefault(event["jobId"], []).append((arrived_s, event))
    for chat in record.chats:
        span = record.spans.get(str(chat.job_id))
        published = sorted(by_job.get(str(chat.job_id), []), key=lambda item: item[1]["seq"])
        latencies = _token_latencies_ms(span, published) if span and span["writes"] else None
        if not latencies:
            unmatched += chat.probed
            continue
        first_ms.append(latencies[0])
        all_ms.extend(latencies)
        deltas += len(published)
    return {
        "first_token_publish_p50_ms": round(percentile(first_ms, 0.5), 2),
        "first_token_publish_p99_ms": round(percentile(first_ms, 0.99), 2),
        "token_publish_p50_ms": round(percentile(all_ms, 0.5), 2),
        "token_publish_p99_ms": round(percentile(all_ms, 0.99), 2),
        "tokens_per_delta": round(len(all_ms) / deltas, 1) if deltas else math.nan,
        "probes_measured": len(first_ms),
        "probes_unmatched": unmatched,
    }


def _token_latencies_ms(
    span: dict[str, Any], published: list[tuple[float, dict[str, Any]]]
) -> list[float] | None:
    """Per token: its delta's arrival minus the token's write, or None if they disagree.

    The simulator's tokens are words: the first bare, every later one after one
    space, so a delta holds as many tokens as spaces, plus the first token.
    """
    written_s: list[float] = []
    for at_s, tokens in span["writes"]:
        written_s.extend([at_s] * tokens)
    published_s: list[float] = []
    for arrived_s, event in published:
        tokens = event["delta"].count(" ") + (1 if event["seq"] == 1 else 0)
        published_s.extend([arrived_s] * tokens)
    if not written_s or len(written_s) != len(published_s):
        return None
    return [(p - w) * 1000 for p, w in zip(published_s, written_s, strict=True)]
