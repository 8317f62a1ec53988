"""The LLM simulator in a process of its own, timing what the chat benchmark needs.

    python -m bench.sim_server [--first-token-ms 0] [--tokens-per-s 0] [--reply-tokens 200]

Serves `uvian_worker.providers.simulator` on 127.0.0.1 (a free port), prints
`{"url": ...}` once listening, and runs until SIGTERM or SIGINT. Its CPU is its
own, not the worker's. `GET /_bench/spans` answers, and forgets, the requests
seen since the last call, keyed by the job id found in the last user message:
when the request arrived and when its response ended, and for messages with the
word "probe", the time of each write and how many tokens it carried. Times are
`time.monotonic()` seconds: CLOCK_MONOTONIC, the same clock in every process of
the machine, so they compare with the benchmark's own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp.web
import orjson
from aiohttp import web

from bench.common import run_async
from uvian_worker.providers.simulator import SimulatorConfig, build_app

_JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Each content chunk of an OpenAI stream carries one of these; the role chunk does not.
_CONTENT_CHUNK = b'"delta":{"content":'
_LISTEN_BACKLOG = 2048
_SHUTDOWN_GRACE_S = 0.1

Write = tuple[float, int]  # (monotonic s, content chunks in the write)
_writes: contextvars.ContextVar[list[Write] | None] = contextvars.ContextVar(
    "bench_writes", default=None
)


class _TimedStreamResponse(web.StreamResponse):
    """Notes when each write of a probed response leaves, and how many tokens it holds."""

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        writes = _writes.get()
        if writes is not None:
            writes.append((time.monotonic(), bytes(data).count(_CONTENT_CHUNK)))
        await super().write(data)


class Spans:
    def __init__(self) -> None:
        self.by_job: dict[str, dict[str, Any]] = {}

    @web.middleware
    async def timing(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if not request.path.endswith("/chat/completions"):
            return await handler(request)
        arrived_s = time.monotonic()
        job_id, probed = _job_of(await request.read())  # aiohttp keeps the body for the handler
        writes: list[Write] | None = [] if probed else None
        token = _writes.set(writes)
        try:
            return await handler(request)
        finally:
            _writes.reset(token)
            if job_id is not None:
                span = {"start": arrived_s, "end": time.monotonic(), "writes": writes}
                self.by_job[job_id] = span

    async def answer(self, _request: web.Request) -> web.Response:
        spans, self.by_job = self.by_job, {}
        return web.Response(body=orjson.dumps(spans), content_type="application/json")


def _job_of(body: bytes) -> tuple[str | None, bool]:
    try:
        last = orjson.loads(body)["messages"][-1]["content"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None, False
    found = _JOB_ID.search(str(last))
    return (found.group(0) if found else None), "probe" in str(last)


async def serve(config: SimulatorConfig) -> None:
    # The simulator builds its streaming responses from `aiohttp.web.StreamResponse`.
    aiohttp.web.StreamResponse = _TimedStreamResponse  # type: ignore[misc]
    spans = Spans()
    app = build_app(config)
    app.middlewares.append(spans.timing)
    app.router.add_get("/_bench/spans", spans.answer)
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=_SHUTDOWN_GRACE_S
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, backlog=_LISTEN_BACKLOG).start()
    port = runner.addresses[0][1]
    sys.stdout.write(orjson.dumps({"url": f"http://127.0.0.1:{port}"}).decode() + "\n")
    sys.stdout.flush()
    try:
        await _stop_signal()
    finally:
        await runner.cleanup()


async def _stop_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-token-ms", type=float, default=0.0)
    parser.add_argument("--tokens-per-s", type=float, default=0.0, help="0 = as fast as possible")
    parser.add_argument("--reply-tokens", type=int, default=200)
    args = parser.parse_args()
    config = SimulatorConfig(
        first_token_delay_ms=args.first_token_ms,
        tokens_per_s=args.tokens_per_s,
        reply_tokens=args.reply_tokens,
    )
    run_async(serve(config))


if __name__ == "__main__":
    main()
