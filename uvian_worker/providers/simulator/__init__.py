"""A local model server with scripted replies, for the demo, the tests and the benchmarks.

It speaks both protocols the providers use: OpenAI-compatible chat completions
(streaming or not) at `/v1/...` and `/v2/{endpoint_id}/openai/v1/...`, and RunPod's
native job API at `/v2/{endpoint_id}/run|stream|status|cancel`.

The reply is `scripted_reply(last user message, n)`, paced by the first-token delay
and token rate. Directives in the last user message change one request:
`[[sim:fault=NAME]]`, `[[sim:delay_ms=N]]`, `[[sim:tokens=N]]`, `[[sim:tps=N]]`.

    http_500, http_429, http_400  the request is refused (429 with Retry-After: 1)
    error_mid_stream              an error object in the stream after a few tokens
    runpod_failed                 the RunPod job ends FAILED, the error only in /status
    truncate                      the stream ends after a few tokens: no finish, no [DONE]
    reset                         the connection drops after a few tokens
    stall                         a few tokens, then only keep-alive comments

On the RunPod routes `error_mid_stream` fails the job like `runpod_failed`, `stall`
leaves it IN_PROGRESS, and `truncate` / `reset` break the one /stream poll after
the first items (the next poll hands those items out). On the OpenAI routes
`runpod_failed` acts as `error_mid_stream`.

A thousand concurrent streams must fit on a small machine: tokens are paced by
sleeping, and the JSON around each token is encoded once per stream.

The modules: `config` and `stats` (what a simulator is told and what it saw),
`script` (the reply, its faults and its pacing), `openai_routes` and
`runpod_routes` (the two protocols), `responses` (JSON bodies and errors shared by
both) and `server` (the application and its listener).
"""

from uvian_worker.providers.simulator.config import SimulatorConfig
from uvian_worker.providers.simulator.script import scripted_reply
from uvian_worker.providers.simulator.server import RunningSimulator, build_app, start_simulator
from uvian_worker.providers.simulator.stats import SIMULATOR_STATS, SimulatorStats

__all__ = [
    "SIMULATOR_STATS",
    "RunningSimulator",
    "SimulatorConfig",
    "SimulatorStats",
    "build_app",
    "scripted_reply",
    "start_simulator",
]
