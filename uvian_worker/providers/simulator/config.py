"""What one simulator is told: its pacing, its reply length, its key and its timeouts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SimulatorConfig:
    first_token_delay_ms: float = 0.0
    tokens_per_s: float = 0.0  # 0 = as fast as possible
    reply_tokens: int = 24
    model: str = "uvian-sim-1"
    chunk_tokens: int = 1  # tokens per SSE chunk / RunPod stream item
    api_key: str | None = None  # when set, requests need `Authorization: Bearer <key>`
    keepalive_interval_ms: float = 500.0  # between the comments of a stalled SSE stream
    stream_wait_ms: float = 500.0  # how long a RunPod /stream poll waits for a new item
    job_retention_s: float = 60.0  # how long an ended RunPod job stays readable
