"""The OpenAI-compatible provider against a real aiohttp server that refuses the request
or breaks the connection, and a reply closed or cancelled by its reader.

The stream's parsing is in test_openai_provider_stream.py.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.openai_server import (
    API_KEY,
    DONE,
    GUARD_S,
    MODEL,
    REQUEST,
    Serve,
    Upstream,
    answer,
    catching_loop_errors,
    delta,
    opening_providers,
    run,
    run_expecting,
    serving,
)
from uvian_worker.errors import ProviderRejected, ProviderUnavailable
from uvian_worker.providers.openai import OpenAIProvider


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    async with serving() as start:
        yield start


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    async with catching_loop_errors() as errors:
        yield errors


@pytest.fixture
async def open_provider(
    caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> AsyncIterator[Callable[[str], OpenAIProvider]]:
    async with opening_providers(caplog) as make:
        yield make


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
