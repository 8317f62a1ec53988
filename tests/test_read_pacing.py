"""Reading a reply's stream at the reader's pace, against a real aiohttp server that
writes one token per packet: reads gather a window's tokens, nothing is lost, the end of
the body is not held back, and cancelling a held read closes the upstream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web

from tests.openai_server import (
    DONE,
    REQUEST,
    Serve,
    catching_loop_errors,
    delta,
    opening_providers,
    serving,
)
from uvian_worker.providers.base import ReadPace, ReplyChunk
from uvian_worker.providers.openai import OpenAIProvider

WINDOW_S = 0.05


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    async with serving() as start:
        yield start


@pytest.fixture
async def open_provider(
    caplog: pytest.LogCaptureFixture,
) -> AsyncIterator[Callable[[str], OpenAIProvider]]:
    async with catching_loop_errors(), opening_providers(caplog) as make:
        yield make


class TimedUpstream:
    """Writes each token in a packet of its own, `gap_s` apart, then ends the reply."""

    def __init__(self, tokens: list[str], gap_s: float, *, hold_open: bool = False) -> None:
        self.tokens = tokens
        self.gap_s = gap_s
        self.hold_open = hold_open
        self.last_write_s = 0.0
        self.disconnected = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for token in self.tokens:
                await response.write(delta(token))
                self.last_write_s = time.monotonic()
                await asyncio.sleep(self.gap_s)
            if self.hold_open:
                await asyncio.Event().wait()
            await response.write(delta(None, "stop") + DONE)
            self.last_write_s = time.monotonic()
        except asyncio.CancelledError:
            self.disconnected.set()
            raise
        await response.write_eof()
        return response


class WindowedReader:
    """Reads like a live reply: the first text at once, then once per window."""

    def __init__(self) -> None:
        self.chunks: list[ReplyChunk] = []
        self.first_text = asyncio.Event()
        self._last_text_s = 0.0

    def next_read_s(self) -> float:
        return self._last_text_s + WINDOW_S if self._last_text_s else 0.0

    async def read(self, provider: OpenAIProvider, pace: ReadPace | None) -> float:
        """Read the whole reply; returns when its end reached the reader."""
        async for chunk in provider.stream_reply(REQUEST, pace=pace):
            self.chunks.append(chunk)
            if chunk.text:
                self._last_text_s = time.monotonic()
                self.first_text.set()
        return time.monotonic()

    @property
    def text(self) -> str:
        return "".join(chunk.text for chunk in self.chunks)


async def test_a_paced_read_takes_a_window_of_tokens_at_once(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    tokens = [f"t{n} " for n in range(40)]
    upstream = TimedUpstream(tokens, gap_s=0.005)  # 40 packets in 0.2 s
    provider = open_provider(await serve(upstream.handle))

    eager, paced = WindowedReader(), WindowedReader()
    await eager.read(provider, None)
    await paced.read(provider, paced.next_read_s)

    assert eager.text == paced.text == "".join(tokens)
    assert paced.chunks[-1].finish_reason == "stop"
    # One read per packet when eager; one per 50 ms window (and the first token) paced.
    assert len([c for c in eager.chunks if c.text]) >= 20
    assert len([c for c in paced.chunks if c.text]) <= 8


async def test_the_end_of_the_reply_cuts_a_hold_short(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    upstream = TimedUpstream(["one ", "two ", "three"], gap_s=0.01)
    provider = open_provider(await serve(upstream.handle))
    reader = WindowedReader()

    def slow_pace() -> float:
        # A window far longer than the reply: only the end of the body can end the hold.
        return reader.next_read_s() and reader.next_read_s() + 10.0

    ended_s = await asyncio.wait_for(reader.read(provider, slow_pace), timeout=5)

    assert reader.text == "one two three"
    assert reader.chunks[-1].finish_reason == "stop"
    assert ended_s - upstream.last_write_s < 0.5


async def test_cancelling_a_held_read_closes_the_upstream(
    serve: Serve, open_provider: Callable[[str], OpenAIProvider]
) -> None:
    upstream = TimedUpstream(["held "], gap_s=0.0, hold_open=True)
    provider = open_provider(await serve(upstream.handle))
    reader = WindowedReader()
    task = asyncio.create_task(
        reader.read(provider, lambda: reader.next_read_s() and time.monotonic() + 60.0)
    )
    await asyncio.wait_for(reader.first_text.wait(), timeout=5)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await asyncio.wait_for(upstream.disconnected.wait(), timeout=5)
    assert reader.text == "held "
