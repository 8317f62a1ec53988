"""A real aiohttp server playing an OpenAI-compatible endpoint, for the provider's tests.

`Upstream` streams scripted bytes; `answer()` gives a fixed response; `serving()`
and `opening_providers()` are what the test modules' `serve` and `open_provider`
fixtures wrap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import orjson
import pytest
from aiohttp import web

from uvian_worker.errors import WorkerError
from uvian_worker.providers.base import ReplyChunk, ReplyRequest
from uvian_worker.providers.openai import OpenAIProvider

API_KEY = "sk-test-5ecret-key-0123456789"
MODEL = "test-model"
REQUEST = ReplyRequest(
    messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello"},
    ],
    max_tokens=64,
    temperature=0.2,
)
# A guard against a hung test, never a wait for something to happen.
GUARD_S = 5

E = TypeVar("E", bound=WorkerError)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[[Handler], Awaitable[str]]
OpenProvider = Callable[[str], OpenAIProvider]


def event(document: object) -> bytes:
    return b"data: " + orjson.dumps(document) + b"\n\n"


def delta(content: str | None, finish_reason: str | None = None) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "finish_reason": finish_reason}
    return event({"object": "chat.completion.chunk", "model": MODEL, "choices": [choice]})


USAGE = event(
    {"model": MODEL, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}
)
DONE = b"data: [DONE]\n\n"


class Upstream:
    """A scripted endpoint: records each request, then streams the given bytes."""

    def __init__(self, pieces: list[bytes], *, hold_open: bool = False) -> None:
        self.pieces = pieces
        self.hold_open = hold_open
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.disconnected = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(orjson.loads(await request.read()))
        self.headers.append(dict(request.headers))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in self.pieces:
            await response.write(piece)
        if self.hold_open:
            await self.wait_for_disconnect()
        await response.write_eof()
        return response

    async def wait_for_disconnect(self) -> None:
        # The runner cancels a handler whose client went away.
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.disconnected.set()
            raise


def answer(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Handler:
    async def handle(_request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, headers=headers)

    return handle


@asynccontextmanager
async def serving() -> AsyncIterator[Serve]:
    """Start a server per handler on 127.0.0.1; each one's base URL ends in `/v1/`."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}/v1/"

    yield start
    for runner in runners:
        await runner.cleanup()


@asynccontextmanager
async def catching_loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(None)
    assert errors == []


@asynccontextmanager
async def opening_providers(caplog: pytest.LogCaptureFixture) -> AsyncIterator[OpenProvider]:
    """Providers on the test key, closed at the end; the key must be in no log line."""
    caplog.set_level(logging.DEBUG)
    providers: list[OpenAIProvider] = []

    def make(base_url: str) -> OpenAIProvider:
        provider = OpenAIProvider(base_url=base_url, model=MODEL, api_key=API_KEY)
        providers.append(provider)
        return provider

    yield make
    for provider in providers:
        await provider.aclose()
    assert API_KEY not in caplog.text


async def run(provider: OpenAIProvider) -> list[ReplyChunk]:
    return [chunk async for chunk in provider.stream_reply(REQUEST)]


async def run_expecting(provider: OpenAIProvider, error: type[E]) -> E:
    with pytest.raises(error) as caught:
        await run(provider)
    assert API_KEY not in str(caught.value)
    return caught.value
