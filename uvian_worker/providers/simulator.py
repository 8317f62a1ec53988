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
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

logger = logging.getLogger(__name__)

_DIRECTIVE = re.compile(r"\[\[sim:([a-z_]+)=([^\]\s]+)\]\]")
_FAULT_AFTER_TOKENS = 3
_ECHO_WORDS = 4
_OPENING = ("Simulated", "reply", "to")
_FILLER = ("café", "🚀", "lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "elit")
_REFUSALS: dict[str, tuple[int, str, str]] = {
    "http_500": (500, "server_error", "simulated internal error"),
    "http_429": (429, "rate_limit_exceeded", "simulated rate limit"),
    "http_400": (400, "context_length_exceeded", "simulated: prompt exceeds the context length"),
}
_FAILING = frozenset({"error_mid_stream", "runpod_failed"})
_DROPPING = frozenset({"truncate", "reset"})
_MID_STREAM = _FAILING | _DROPPING | {"stall"}
_JOB_STOPPING = _FAILING | {"stall"}
_TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
_COUNTERS = ("streams_started", "streams_completed", "closed_early", "runpod_cancelled")
_JSON = "application/json"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_SSE_DONE = b"data: [DONE]\n\n"
_SSE_KEEPALIVE = b": keep-alive\n\n"
_SSE_ERROR = b'data: {"error":{"message":"simulated model failure","type":"server_error"}}\n\n'
_JOB_ERROR = "simulated failure of the model handler"
# aiohttp waits this long for open handlers at stop before cancelling them; a
# stalled stream would otherwise hold stop() for the library's default minute.
_SHUTDOWN_GRACE_S = 0.1
# The default listen backlog (128) drops SYNs when a benchmark opens 1,000 streams at once.
_LISTEN_BACKLOG = 2048


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


@dataclass
class SimulatorStats:
    """What the simulator has seen. A stream is one generated reply (an SSE
    response or a RunPod job); `requests` counts by route name."""

    requests: dict[str, int] = field(default_factory=dict)
    streams_started: int = 0
    streams_completed: int = 0
    closed_early: int = 0  # SSE streams whose client left (or the server stopped)
    runpod_cancelled: int = 0
    last_disconnect_at: float | None = None  # time.monotonic() of the last leave or cancel
    # The prompts of the most recent chat requests, newest last (for tests to read).
    prompts: deque[object] = field(default_factory=lambda: deque(maxlen=100))
    _waiters: list[tuple[str, int, asyncio.Future[None]]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )

    def count(self, name: str) -> int:
        return int(getattr(self, name)) if name in _COUNTERS else self.requests.get(name, 0)

    def record(self, name: str) -> None:
        if name in _COUNTERS:
            setattr(self, name, self.count(name) + 1)
        else:
            self.requests[name] = self.requests.get(name, 0) + 1
        if self._waiters:
            self._wake_waiters()

    def client_left(self, counter: str) -> None:
        self.last_disconnect_at = time.monotonic()
        self.record(counter)

    async def wait_for(self, name: str, at_least: int = 1) -> None:
        """Return once the counter or route `name` has reached `at_least`."""
        if self.count(name) >= at_least:
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((name, at_least, future))
        await future

    def as_json(self) -> dict[str, Any]:
        counters = {name: self.count(name) for name in _COUNTERS}
        last = {"last_disconnect_at": self.last_disconnect_at}
        return {"requests": dict(self.requests), **counters, **last}

    def _wake_waiters(self) -> None:
        still_waiting = []
        for name, at_least, future in self._waiters:
            if future.done():
                continue  # its waiter gave up
            if self.count(name) >= at_least:
                future.set_result(None)
            else:
                still_waiting.append((name, at_least, future))
        self._waiters = still_waiting


SIMULATOR_STATS = web.AppKey("simulator_stats", SimulatorStats)


def scripted_reply(prompt: str, count: int) -> list[str]:
    """The reply's tokens for a last user message: an echo of its first words,
    then filler with an accented word and an emoji early on."""
    echo = _DIRECTIVE.sub(" ", prompt).split()[:_ECHO_WORDS]
    words = [*_OPENING, *echo]
    while len(words) < count:
        words.extend(_FILLER)
    return [word if index == 0 else f" {word}" for index, word in enumerate(words[:count])]


@dataclass(frozen=True, slots=True)
class _Script:
    """Everything one request will get, decided when it arrives."""

    tokens: list[str]
    finish_reason: str
    prompt_tokens: int
    first_token_delay_s: float
    chunk_gap_s: float
    chunk_tokens: int
    fault: str | None
    reports_usage: bool = True  # `[[sim:usage=none]]` plays a server that reports no usage

    def cut_at(self, faults: frozenset[str]) -> int:
        """How many tokens go out before one of `faults` strikes."""
        if self.fault in faults:
            return min(len(self.tokens), _FAULT_AFTER_TOKENS)
        return len(self.tokens)

    def usage(self) -> dict[str, int]:
        made = len(self.tokens)
        total = self.prompt_tokens + made
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": made,
            "total_tokens": total,
        }


def _build_script(messages: object, max_tokens: object, config: SimulatorConfig) -> _Script:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _bad_request("messages must be a list of objects")
    texts = [(m.get("role"), _text_of(m.get("content"))) for m in messages]
    last_user = next((text for role, text in reversed(texts) if role == "user"), "")
    directives = dict(_DIRECTIVE.findall(last_user))
    fault = directives.get("fault")
    if fault is not None and fault not in _REFUSALS and fault not in _MID_STREAM:
        raise _bad_request(f"unknown simulator fault {fault!r}")

    count = max(0, int(_number(directives, "tokens", config.reply_tokens)))
    tokens = scripted_reply(last_user, count)
    finish_reason = "stop"
    if isinstance(max_tokens, int) and 0 <= max_tokens < len(tokens):
        tokens, finish_reason = tokens[:max_tokens], "length"

    tokens_per_s = _number(directives, "tps", config.tokens_per_s)
    chunk_tokens = max(1, config.chunk_tokens)
    return _Script(
        tokens=tokens,
        finish_reason=finish_reason,
        prompt_tokens=sum(len(text.split()) for _, text in texts),
        first_token_delay_s=_number(directives, "delay_ms", config.first_token_delay_ms) / 1000,
        chunk_gap_s=chunk_tokens / tokens_per_s if tokens_per_s > 0 else 0.0,
        chunk_tokens=chunk_tokens,
        fault=fault,
        reports_usage=directives.get("usage") != "none",
    )


def _text_of(content: object) -> str:
    if isinstance(content, list):  # OpenAI's content parts
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def _number(directives: dict[str, str], name: str, default: float) -> float:
    try:
        return float(directives.get(name, default))
    except ValueError:
        raise _bad_request(f"simulator directive {name} needs a number") from None


async def _paced(script: _Script, count: int) -> AsyncGenerator[list[list[str]], None]:
    """Yield the first `count` tokens as chunks on the script's schedule, in groups:
    a group holds every chunk already due, so a stream that fell behind a busy loop
    catches up in one write rather than one per chunk. Each chunk is due at a fixed
    offset from the first, so lateness does not add up."""
    loop = asyncio.get_running_loop()
    size, gap_s = script.chunk_tokens, script.chunk_gap_s
    chunks = [script.tokens[start : min(start + size, count)] for start in range(0, count, size)]
    await asyncio.sleep(script.first_token_delay_s)
    started_at = loop.time()
    sent = 0
    while sent < len(chunks):
        wait_s = started_at + sent * gap_s - loop.time()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        due = int((loop.time() - started_at) / gap_s) + 1 if gap_s > 0 else len(chunks)
        group_end = min(len(chunks), max(due, sent + 1))
        yield chunks[sent:group_end]
        sent = group_end


class _SseEncoder:
    """The SSE lines of one completion; only the token text is serialized per chunk."""

    def __init__(self, model: str) -> None:
        envelope = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        self._head = b"data: " + orjson.dumps(envelope)[:-1] + b","
        self._content_head = self._head + b'"choices":[{"index":0,"delta":{"content":'

    def content(self, group: list[list[str]]) -> bytes:
        tail = b'},"finish_reason":null}]}\n\n'
        return b"".join(self._content_head + orjson.dumps("".join(c)) + tail for c in group)

    def event(self, **fields: object) -> bytes:
        return self._head + orjson.dumps(fields)[1:] + b"\n\n"

    def role(self) -> bytes:
        delta = {"role": "assistant", "content": ""}
        return self.event(choices=[{"index": 0, "delta": delta, "finish_reason": None}])

    def ending(self, script: _Script, include_usage: bool) -> bytes:
        finish = [{"index": 0, "delta": {}, "finish_reason": script.finish_reason}]
        wanted = include_usage and script.reports_usage
        usage = self.event(choices=[], usage=script.usage()) if wanted else b""
        return self.event(choices=finish) + usage + _SSE_DONE


@dataclass(eq=False)
class _Job:
    id: str
    script: _Script
    status: str = "IN_QUEUE"
    items: list[dict[str, Any]] = field(default_factory=list)
    handed_out: int = 0
    output_tokens: int = 0
    error: str | None = None
    broken_poll: str | None = None  # the fault the next /stream poll with items suffers
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def add_items(self, group: list[list[str]]) -> None:
        # Queued until the first item, as a job waiting for a cold worker would look.
        self.status = "IN_PROGRESS"
        for tokens in group:
            self.output_tokens += len(tokens)
            output: dict[str, Any] = {"choices": [{"tokens": tokens}]}
            if self.script.reports_usage:
                output["usage"] = {"input": self.script.prompt_tokens, "output": self.output_tokens}
            self.items.append({"output": output})
        self.changed.set()

    def status_json(self) -> dict[str, Any]:
        reply: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.status == "COMPLETED":
            reply["output"] = [item["output"] for item in self.items]
        if self.error is not None:
            reply["error"] = self.error
        return reply


class _Simulator:
    """The handlers, bound to one config, its stats and its RunPod jobs."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.stats = SimulatorStats()
        self._jobs: dict[str, _Job] = {}

    @web.middleware
    async def guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        route = request.match_info.route.name or "unmatched"
        self.stats.record(route)
        key = self.config.api_key
        if key is not None and route != "sim_stats":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return _error(401, "invalid_api_key", "missing or wrong API key")
        return await handler(request)

    async def models(self, _: web.Request) -> web.Response:
        model = {"id": self.config.model, "object": "model", "owned_by": "uvian-simulator"}
        return _json({"object": "list", "data": [model]})

    async def sim_stats(self, _: web.Request) -> web.Response:
        return _json(self.stats.as_json())

    async def close(self, _: web.Application) -> None:
        for job in self._jobs.values():
            if job.task is not None:
                job.task.cancel()

    # OpenAI-compatible

    async def openai_chat(self, request: web.Request) -> web.StreamResponse:
        body = await _read_json(request)
        self.stats.prompts.append(body.get("messages"))
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        script = _build_script(body.get("messages"), max_tokens, self.config)
        if script.fault in _REFUSALS:
            return _refusal(script.fault)
        if body.get("stream") is not True:
            return await self._openai_whole(request, script)
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return await self._openai_stream(request, script, include_usage)

    async def _openai_stream(
        self, request: web.Request, script: _Script, include_usage: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        self.stats.record("streams_started")
        sse = _SseEncoder(self.config.model)
        try:
            await response.write(sse.role())
            async with aclosing(_paced(script, script.cut_at(_MID_STREAM))) as groups:
                async for group in groups:
                    await response.write(sse.content(group))
            ending = sse.ending(script, include_usage)
            await self._end_stream(request, response, script.fault, ending)
        except ConnectionResetError:
            self.stats.client_left("closed_early")
        except asyncio.CancelledError:
            self.stats.client_left("closed_early")
            raise
        return response

    async def _end_stream(
        self, request: web.Request, response: web.StreamResponse, fault: str | None, ending: bytes
    ) -> None:
        if fault is None:
            await response.write(ending)
            self.stats.record("streams_completed")
        elif fault in _FAILING:
            await response.write(_SSE_ERROR + _SSE_DONE)
        elif fault == "reset":
            _abort(request)
        elif fault == "stall":
            while True:
                await asyncio.sleep(self.config.keepalive_interval_ms / 1000)
                await response.write(_SSE_KEEPALIVE)
        # "truncate": returning ends the chunked body cleanly, with no finish and no [DONE]

    async def _openai_whole(self, request: web.Request, script: _Script) -> web.Response:
        async with aclosing(_paced(script, len(script.tokens))) as groups:
            async for _ in groups:
                pass
        if script.fault == "stall":
            await asyncio.Event().wait()  # until the client leaves or the server stops
        if script.fault in _DROPPING:
            _abort(request)
            return web.Response()
        if script.fault in _FAILING:
            return _error(500, "server_error", "simulated model failure")

        message = {"role": "assistant", "content": "".join(script.tokens)}
        choice = {"index": 0, "message": message, "finish_reason": script.finish_reason}
        completion = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion"}
        created = {"created": int(time.time()), "model": self.config.model}
        return _json({**completion, **created, "choices": [choice], "usage": script.usage()})

    # RunPod native

    async def runpod_run(self, request: web.Request) -> web.Response:
        job_input = (await _read_json(request)).get("input")
        if not isinstance(job_input, dict):
            raise _bad_request("input must be an object")
        params = job_input.get("sampling_params")
        max_tokens = params.get("max_tokens") if isinstance(params, dict) else None
        messages = job_input.get("messages")
        self.stats.prompts.append(messages)
        if messages is None and isinstance(job_input.get("prompt"), str):
            messages = [{"role": "user", "content": job_input["prompt"]}]
        script = _build_script(messages, max_tokens, self.config)
        if script.fault in _REFUSALS:
            return _refusal(script.fault)

        job = _Job(id=f"{uuid.uuid4()}-u1", script=script)
        job.broken_poll = script.fault if script.fault in _DROPPING else None
        self._jobs[job.id] = job
        job.task = asyncio.create_task(self._generate(job))
        self.stats.record("streams_started")
        return _json({"id": job.id, "status": job.status})

    async def _generate(self, job: _Job) -> None:
        fault = job.script.fault
        try:
            async with aclosing(_paced(job.script, job.script.cut_at(_JOB_STOPPING))) as groups:
                async for group in groups:
                    job.add_items(group)
            job.status = "IN_PROGRESS"
            if fault == "stall":
                await asyncio.Event().wait()  # until /cancel or the server stops
            if fault in _FAILING:
                job.status, job.error = "FAILED", _JOB_ERROR
            else:
                job.status = "COMPLETED"
                self.stats.record("streams_completed")
        finally:
            job.changed.set()
            loop = asyncio.get_running_loop()
            loop.call_later(self.config.job_retention_s, self._jobs.pop, job.id, None)

    async def runpod_stream(self, request: web.Request) -> web.StreamResponse:
        job = self._job(request)
        if job.handed_out == len(job.items) and job.status not in _TERMINAL:
            # Hold the poll open a while rather than answer "nothing yet" at once, so a
            # client polling in a loop does not spin.
            job.changed.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(job.changed.wait(), self.config.stream_wait_ms / 1000)

        pending = job.items[job.handed_out :]
        reply = orjson.dumps({"status": job.status, "stream": pending})
        if job.broken_poll is not None and job.handed_out > 0 and pending:
            fault, job.broken_poll = job.broken_poll, None
            return await _break_poll(request, fault, reply)
        job.handed_out += len(pending)
        return web.Response(body=reply, content_type=_JSON)

    async def runpod_status(self, request: web.Request) -> web.Response:
        return _json(self._job(request).status_json())

    async def runpod_cancel(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if job.status not in _TERMINAL:
            job.status = "CANCELLED"
            if job.task is not None:
                job.task.cancel()
            self.stats.client_left("runpod_cancelled")
        return _json({"id": job.id, "status": job.status})

    def _job(self, request: web.Request) -> _Job:
        job = self._jobs.get(request.match_info["job_id"])
        if job is None:
            raise web.HTTPNotFound(text='{"error":"job not found"}', content_type=_JSON)
        return job


async def _break_poll(request: web.Request, fault: str, reply: bytes) -> web.StreamResponse:
    """Promise the whole reply, send none of it ("reset") or half ("truncate"), and
    drop the connection. The headers go first because HTTP clients, aiohttp's among
    them, quietly repeat a GET whose connection closed before any answer."""
    response = web.StreamResponse(headers={"Content-Type": _JSON})
    response.content_length = len(reply)
    await response.prepare(request)
    await response.write(reply[: len(reply) // 2] if fault == "truncate" else b"")
    _abort(request)
    return response


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


async def _read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise _bad_request("the body is not JSON") from None
    if not isinstance(body, dict):
        raise _bad_request("the body must be a JSON object")
    return body


def _json(
    payload: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload), status=status, headers=headers, content_type=_JSON
    )


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _json({"error": {"message": message, "type": kind, "code": code}}, status, headers)


def _refusal(fault: str | None) -> web.Response:
    status, code, message = _REFUSALS[fault or ""]
    return _error(status, code, message, {"Retry-After": "1"} if status == 429 else None)


def _bad_request(message: str) -> web.HTTPBadRequest:
    error = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    return web.HTTPBadRequest(text=orjson.dumps(error).decode(), content_type=_JSON)


def build_app(config: SimulatorConfig) -> web.Application:
    """The simulator's routes; `app[SIMULATOR_STATS]` holds its stats."""
    simulator = _Simulator(config)
    app = web.Application(middlewares=[simulator.guard])
    app[SIMULATOR_STATS] = simulator.stats
    app.on_cleanup.append(simulator.close)

    add = app.router
    for name, prefix in (("openai", ""), ("runpod_openai", "/v2/{endpoint_id}/openai")):
        add.add_post(f"{prefix}/v1/chat/completions", simulator.openai_chat, name=f"{name}_chat")
        add.add_get(f"{prefix}/v1/models", simulator.models, name=f"{name}_models")
    add.add_post("/v2/{endpoint_id}/run", simulator.runpod_run, name="runpod_run")
    add.add_get("/v2/{endpoint_id}/stream/{job_id}", simulator.runpod_stream, name="runpod_stream")
    add.add_get("/v2/{endpoint_id}/status/{job_id}", simulator.runpod_status, name="runpod_status")
    add.add_post("/v2/{endpoint_id}/cancel/{job_id}", simulator.runpod_cancel, name="runpod_cancel")
    add.add_get("/_sim/stats", simulator.sim_stats, name="sim_stats")
    return app


@dataclass
class RunningSimulator:
    url: str
    stats: SimulatorStats
    runner: web.AppRunner

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_simulator(
    config: SimulatorConfig, host: str = "127.0.0.1", port: int = 0
) -> RunningSimulator:
    """Serve the simulator until `stop()`; port 0 picks a free port."""
    app = build_app(config)
    # Handler cancellation lets a stream notice a client that left while it slept.
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=_SHUTDOWN_GRACE_S
    )
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=_LISTEN_BACKLOG).start()

    bound_port = runner.addresses[0][1]
    url_host = f"[{host}]" if ":" in host else host
    logger.info("simulator listening on %s:%s", url_host, bound_port)
    return RunningSimulator(f"http://{url_host}:{bound_port}", app[SIMULATOR_STATS], runner)
