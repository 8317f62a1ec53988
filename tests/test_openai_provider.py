"""The OpenAI-compatible provider against a real aiohttp server playing the endpoint."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest
from aiohttp import web

from uvian_worker.errors import (
    ProviderFailed,
    ProviderRejected,
    ProviderUnavailable,
    StreamTruncated,
    WorkerError,
)
from uvian_worker.providers.base import ReplyChunk, ReplyRequest, Usage
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


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
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


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(None)
    assert errors == []


@pytest.fixture
async def open_provider(
    caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> AsyncIterator[Callable[[str], OpenAIProvider]]:
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


def answer(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Handler:
    async def handle(_request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, headers=headers)

    return handle


async def test_streams_a_reply_with_usage_from_the_final_chunk(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    upstream = Upstream([delta(""), delta("Hel"), delta("lo"), delta(None, "stop"), USAGE, DONE])
    provider = open_provider(await serve(upstream.handle))

    chunks = await run(provider)

    assert "".join(chunk.text for chunk in chunks) == "Hello"
    assert [chunk.finish_reason for chunk in chunks if chunk.finish_reason] == ["stop"]
    assert chunks[-1].usage == Usage(prompt_tokens=9, completion_tokens=2)
    assert all(chunk.model == MODEL for chunk in chunks)
    assert [chunk.usage for chunk in chunks[:-1]] == [None] * 4


async def test_sends_a_streaming_request_with_the_key(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    upstream = Upstream([delta("Hi", "stop"), DONE])
    provider = open_provider(await serve(upstream.handle))

    await run(provider)

    assert upstream.bodies == [
        {
            "model": MODEL,
            "messages": REQUEST.messages,
            "max_tokens": 64,
            "temperature": 0.2,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ]
    assert upstream.headers[0]["Authorization"] == f"Bearer {API_KEY}"
    assert upstream.headers[0]["Accept"] == "text/event-stream"


async def test_sends_no_authorization_without_a_key(serve: Serve) -> None:
    upstream = Upstream([delta("Hi", "stop"), DONE])
    provider = OpenAIProvider(base_url=await serve(upstream.handle), model=MODEL)
    try:
        chunks = await run(provider)
    finally:
        await provider.aclose()

    assert chunks[0].text == "Hi"
    assert "Authorization" not in upstream.headers[0]


async def test_null_content_is_empty_text(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    upstream = Upstream([delta(None), delta("ok"), delta(None, "length"), DONE])
    provider = open_provider(await serve(upstream.handle))

    chunks = await run(provider)

    assert [chunk.text for chunk in chunks] == ["", "ok", ""]
    assert chunks[-1].finish_reason == "length"


async def test_done_ends_the_reply_without_waiting_for_the_body_to_end(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    upstream = Upstream([delta("Hi"), delta(None, "stop"), DONE], hold_open=True)
    provider = open_provider(await serve(upstream.handle))

    async with asyncio.timeout(GUARD_S):
        chunks = await run(provider)
        await upstream.disconnected.wait()

    assert [chunk.text for chunk in chunks] == ["Hi", ""]


async def test_finish_then_end_of_body_without_done_is_a_normal_end(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    upstream = Upstream([delta("Hi"), delta(None, "stop"), USAGE])
    provider = open_provider(await serve(upstream.handle))

    chunks = await run(provider)

    assert chunks[1].finish_reason == "stop"
    assert chunks[2].usage == Usage(prompt_tokens=9, completion_tokens=2)


async def test_crlf_keep_alives_and_reads_split_anywhere(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    stream = b"".join(
        [
            b": keep-alive\r\n\r\n",
            delta("héllo 世界 🎉"),
            b":ping\r\n\r\n",
            delta(None, "stop"),
            DONE,
        ]
    ).replace(b"\n\n", b"\r\n\r\n")
    # Cut inside the emoji and between the CR and LF of a line end.
    emoji_at = stream.index("🎉".encode()) + 2
    crlf_at = stream.index(b"\r\n", emoji_at) + 1
    upstream = Upstream([stream[:emoji_at], stream[emoji_at:crlf_at], stream[crlf_at:]])
    provider = open_provider(await serve(upstream.handle))

    chunks = await run(provider)

    assert [chunk.text for chunk in chunks] == ["héllo 世界 🎉", ""]
    assert chunks[-1].finish_reason == "stop"


@pytest.mark.parametrize(
    "error",
    [
        {
            "message": "This model's maximum context length is 4096 tokens.",
            "type": "invalid_request_error",
            "code": "context_length_exceeded",
        },
        {"object": "error", "message": "max_tokens is too large", "type": "BadRequestError"},
        {"message": "temperature must be at most 2", "type": "error", "code": 400},
    ],
)
async def test_error_object_blaming_the_request_is_rejected(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider], error: dict[str, Any]
) -> None:
    upstream = Upstream([event({"error": error}), DONE])
    provider = open_provider(await serve(upstream.handle))

    failure = await run_expecting(provider, ProviderRejected)

    assert error["message"] in str(failure)


async def test_error_object_mid_stream_is_a_failure_not_a_reply(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    error = {"message": "CUDA out of memory", "type": "InternalServerError", "code": 500}
    upstream = Upstream([delta("Partial"), event({"error": error}), DONE])
    provider = open_provider(await serve(upstream.handle))
    seen: list[str] = []

    with pytest.raises(ProviderFailed, match="CUDA out of memory"):
        async for chunk in provider.stream_reply(REQUEST):
            seen.append(chunk.text)

    assert seen == ["Partial"]


@pytest.mark.parametrize(
    "tail",
    [b"", delta(None, "stop").removesuffix(b"\n")],
    ids=["no finish at all", "finishing event cut before its blank line"],
)
async def test_body_ending_without_finish_or_done_is_truncated(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider], tail: bytes
) -> None:
    upstream = Upstream([delta("Hel"), delta("lo"), tail])
    provider = open_provider(await serve(upstream.handle))
    seen: list[str] = []

    with pytest.raises(StreamTruncated):
        async for chunk in provider.stream_reply(REQUEST):
            seen.append(chunk.text)

    assert seen == ["Hel", "lo"]


async def test_data_that_is_not_json_is_a_failure(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    upstream = Upstream([delta("Hi"), b"data: {not json\n\n", DONE])
    provider = open_provider(await serve(upstream.handle))

    await run_expecting(provider, ProviderFailed)


async def test_malformed_chunk_is_a_failure(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    upstream = Upstream([event({"choices": [{"delta": {"content": 42}}]}), DONE])
    provider = open_provider(await serve(upstream.handle))

    await run_expecting(provider, ProviderFailed)


async def test_429_honours_retry_after_seconds(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    body = orjson.dumps({"error": {"message": "Rate limit reached", "type": "requests"}})
    provider = open_provider(await serve(answer(429, body, {"Retry-After": "7"})))

    failure = await run_expecting(provider, ProviderUnavailable)

    assert failure.retry_after_s == 7.0
    assert "Rate limit reached" in str(failure)


async def test_429_honours_retry_after_as_an_http_date(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    moment = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    provider = open_provider(await serve(answer(429, headers={"Retry-After": moment})))

    failure = await run_expecting(provider, ProviderUnavailable)

    assert failure.retry_after_s is not None
    assert 100 < failure.retry_after_s <= 120


async def test_429_without_retry_after(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    provider = open_provider(await serve(answer(429)))

    failure = await run_expecting(provider, ProviderUnavailable)

    assert failure.retry_after_s is None


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_are_unavailable(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider], status: int
) -> None:
    provider = open_provider(await serve(answer(status, b"upstream exploded")))

    failure = await run_expecting(provider, ProviderUnavailable)

    assert f"HTTP {status}" in str(failure)
    assert "upstream exploded" in str(failure)


async def test_400_is_rejected_with_the_servers_message_shortened(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    message = "messages: field required. " + "x" * 2000
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error"}})
    provider = open_provider(await serve(answer(400, body)))

    failure = await run_expecting(provider, ProviderRejected)

    assert "HTTP 400" in str(failure)
    assert "messages: field required" in str(failure)
    assert len(str(failure)) < 400


@pytest.mark.parametrize("status", [401, 403])
async def test_authorization_failure_is_rejected_without_the_key(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider], status: int
) -> None:
    # OpenAI quotes the refused key back; the error text must not.
    message = f"Incorrect API key provided: {API_KEY}."
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error"}})
    provider = open_provider(await serve(answer(status, body)))

    failure = await run_expecting(provider, ProviderRejected)

    assert "not authorized" in str(failure)
    assert "Incorrect API key provided: [redacted]" in str(failure)


async def test_json_answer_to_a_streaming_request_is_read_as_an_error(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    body = orjson.dumps({"error": {"message": "model not found", "code": 404}})
    handler = answer(200, body, {"Content-Type": "application/json"})
    provider = open_provider(await serve(handler))

    failure = await run_expecting(provider, ProviderRejected)

    assert "model not found" in str(failure)


async def test_connection_refused_is_unavailable(
    open_provider: Callable[[str], OpenAIProvider],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    provider = open_provider(f"http://127.0.0.1:{port}/v1")

    failure = await run_expecting(provider, ProviderUnavailable)

    assert "cannot reach" in str(failure)


async def test_connection_reset_mid_stream_is_unavailable(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    first_chunk_read = asyncio.Event()

    async def reset_after_first_chunk(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(delta("Hel"))
        await first_chunk_read.wait()
        assert request.transport is not None
        # A zero linger makes the close send a TCP reset instead of a clean FIN.
        linger = struct.pack("ii", 1, 0)
        request.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, linger
        )
        request.transport.abort()
        await asyncio.Event().wait()
        return response

    provider = open_provider(await serve(reset_after_first_chunk))
    replies = provider.stream_reply(REQUEST)

    async with asyncio.timeout(GUARD_S):
        first = await anext(replies)
        first_chunk_read.set()
        with pytest.raises(ProviderUnavailable) as caught:
            await anext(replies)

    assert first.text == "Hel"
    assert "broke during the reply" in str(caught.value)
    assert API_KEY not in str(caught.value)


async def test_closing_the_reply_early_disconnects_at_once(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    upstream = Upstream([delta("Hel")], hold_open=True)
    provider = open_provider(await serve(upstream.handle))
    replies = provider.stream_reply(REQUEST)

    async with asyncio.timeout(GUARD_S):
        first = await anext(replies)
        await replies.aclose()
        await upstream.disconnected.wait()

    assert first.text == "Hel"


async def test_cancelling_the_reading_task_disconnects_at_once(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    upstream = Upstream([delta("Hel")], hold_open=True)
    provider = open_provider(await serve(upstream.handle))
    first_seen = asyncio.Event()

    async def consume() -> None:
        async for _chunk in provider.stream_reply(REQUEST):
            first_seen.set()

    reader = asyncio.create_task(consume())
    async with asyncio.timeout(GUARD_S):
        await first_seen.wait()
        reader.cancel()
        await upstream.disconnected.wait()

    assert reader.cancelled()


async def test_a_given_session_is_left_open(serve: Serve) -> None:
    upstream = Upstream([delta("Hi", "stop"), DONE])
    base_url = await serve(upstream.handle)

    async with aiohttp.ClientSession() as session:
        provider = OpenAIProvider(base_url=base_url, model=MODEL, session=session)
        chunks = await run(provider)
        await provider.aclose()

        assert not session.closed
        assert chunks[0].text == "Hi"
