"""The OpenAI-compatible routes: chat completions, streamed as SSE or whole, and models."""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import aclosing

import orjson
from aiohttp import web

from uvian_worker.providers.simulator.config import SimulatorConfig
from uvian_worker.providers.simulator.responses import (
    abort,
    error_response,
    json_response,
    read_json,
)
from uvian_worker.providers.simulator.script import (
    DROPPING,
    FAILING,
    MID_STREAM,
    Script,
    build_script,
    paced,
    refusal,
)
from uvian_worker.providers.simulator.stats import SimulatorStats

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_SSE_DONE = b"data: [DONE]\n\n"
_SSE_KEEPALIVE = b": keep-alive\n\n"
_SSE_ERROR = b'data: {"error":{"message":"simulated model failure","type":"server_error"}}\n\n'


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

    def ending(self, script: Script, include_usage: bool) -> bytes:
        finish = [{"index": 0, "delta": {}, "finish_reason": script.finish_reason}]
        wanted = include_usage and script.reports_usage
        usage = self.event(choices=[], usage=script.usage()) if wanted else b""
        return self.event(choices=finish) + usage + _SSE_DONE


class OpenAIRoutes:
    """The OpenAI-compatible handlers, bound to one config and its stats."""

    def __init__(self, config: SimulatorConfig, stats: SimulatorStats) -> None:
        self.config = config
        self.stats = stats

    async def models(self, _: web.Request) -> web.Response:
        model = {"id": self.config.model, "object": "model", "owned_by": "uvian-simulator"}
        return json_response({"object": "list", "data": [model]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        self.stats.prompts.append(body.get("messages"))
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        script = build_script(body.get("messages"), max_tokens, self.config)
        if script.refused:
            return refusal(script.fault)
        if body.get("stream") is not True:
            return await self._whole(request, script)
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return await self._stream(request, script, include_usage)

    async def _stream(
        self, request: web.Request, script: Script, include_usage: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        self.stats.record("streams_started")
        sse = _SseEncoder(self.config.model)
        try:
            await response.write(sse.role())
            async with aclosing(paced(script, script.cut_at(MID_STREAM))) as groups:
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
        elif fault in FAILING:
            await response.write(_SSE_ERROR + _SSE_DONE)
        elif fault == "reset":
            abort(request)
        elif fault == "stall":
            while True:
                await asyncio.sleep(self.config.keepalive_interval_ms / 1000)
                await response.write(_SSE_KEEPALIVE)
        # "truncate": returning ends the chunked body cleanly, with no finish and no [DONE]

    async def _whole(self, request: web.Request, script: Script) -> web.Response:
        async with aclosing(paced(script, len(script.tokens))) as groups:
            async for _ in groups:
                pass
        if script.fault == "stall":
            await asyncio.Event().wait()  # until the client leaves or the server stops
        if script.fault in DROPPING:
            abort(request)
            return web.Response()
        if script.fault in FAILING:
            return error_response(500, "server_error", "simulated model failure")

        message = {"role": "assistant", "content": "".join(script.tokens)}
        choice = {"index": 0, "message": message, "finish_reason": script.finish_reason}
        completion = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion"}
        created = {"created": int(time.time()), "model": self.config.model}
        return json_response(
            {**completion, **created, "choices": [choice], "usage": script.usage()}
        )
