"""The OpenAI-compatible provider reading replies from a real aiohttp server: the request
it sends, the SSE stream it parses, and errors or a truncation inside the stream.

HTTP refusals and broken connections are in test_openai_provider_http.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.openai_server import (
    API_KEY,
    DONE,
    GUARD_S,
    MODEL,
    REQUEST,
    USAGE,
    Serve,
    Upstream,
    catching_loop_errors,
    delta,
    event,
    opening_providers,
    run,
    run_expecting,
    serving,
)
from uvian_worker.errors import ProviderFailed, ProviderRejected, StreamTruncated
from uvian_worker.providers.base import ReplyChunk, Usage
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
    assert [chunk.usage for chunk in chunks if chunk.usage] == [chunks[-1].usage]


async def test_the_events_of_one_read_are_one_chunk(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    body = b"".join([delta(""), delta("Hel"), delta("lo"), delta(None, "stop"), USAGE, DONE])
    upstream = Upstream([body])
    provider = open_provider(await serve(upstream.handle))

    chunks = await run(provider)

    assert chunks == [
        ReplyChunk(
            text="Hello",
            finish_reason="stop",
            usage=Usage(prompt_tokens=9, completion_tokens=2),
            model=MODEL,
        )
    ]


async def texts_before_failure(provider: OpenAIProvider, message: str) -> list[str]:
    """The chunks' texts a reply yields before it fails with `message`."""
    seen: list[str] = []
    with pytest.raises(ProviderFailed, match=message):
        async for chunk in provider.stream_reply(REQUEST):
            seen.append(chunk.text)
    return seen


async def test_text_before_an_error_in_the_same_read_reaches_the_reply(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    failure = event({"error": {"message": "CUDA out of memory", "type": "server_error"}})
    upstream = Upstream([delta("Part") + delta("ial") + failure])
    provider = open_provider(await serve(upstream.handle))

    seen = await texts_before_failure(provider, "CUDA out of memory")

    assert seen == ["Partial"]


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

    assert "".join(chunk.text for chunk in chunks) == "ok"
    assert chunks[-1].finish_reason == "length"


async def test_done_ends_the_reply_without_waiting_for_the_body_to_end(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    upstream = Upstream([delta("Hi"), delta(None, "stop"), DONE], hold_open=True)
    provider = open_provider(await serve(upstream.handle))

    async with asyncio.timeout(GUARD_S):
        chunks = await run(provider)
        await upstream.disconnected.wait()

    assert "".join(chunk.text for chunk in chunks) == "Hi"
    assert chunks[-1].finish_reason == "stop"


async def test_done_without_a_finish_reason_is_a_normal_end(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    # Some servers and proxies send no finish reason; `[DONE]` is the end all the same,
    # in the read that carried the text or in one of its own.
    for pieces in ([delta("Hi") + DONE], [delta("Hi"), DONE]):
        upstream = Upstream(pieces)
        provider = open_provider(await serve(upstream.handle))

        chunks = await run(provider)

        assert "".join(chunk.text for chunk in chunks) == "Hi"
        assert all(chunk.finish_reason is None for chunk in chunks)


async def test_finish_then_end_of_body_without_done_is_a_normal_end(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    upstream = Upstream([delta("Hi"), delta(None, "stop"), USAGE])
    provider = open_provider(await serve(upstream.handle))

    chunks = await run(provider)

    assert [chunk.finish_reason for chunk in chunks if chunk.finish_reason] == ["stop"]
    assert chunks[-1].usage == Usage(prompt_tokens=9, completion_tokens=2)


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

    assert "".join(chunk.text for chunk in chunks) == "héllo 世界 🎉"
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

    seen = await texts_before_failure(provider, "CUDA out of memory")

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

    assert "".join(seen) == "Hello"


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
