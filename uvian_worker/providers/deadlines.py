"""Streaming deadlines in phases: the first token, the gap between content, the whole reply.

One `asyncio.timeout` scope is moved forward each time content arrives, which
costs a timer reschedule per chunk instead of a task per chunk. Chunks without
text (keep-alives never reach here; usage-only or empty deltas do) move
nothing. When a deadline passes, the cancellation lands inside the provider's
stream, whose `finally` closes the upstream request (and cancels the RunPod
job); the stream is then closed for good.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

from uvian_worker.errors import ProviderTimeout
from uvian_worker.providers.base import ReplyChunk


@dataclass(frozen=True, slots=True)
class Deadlines:
    first_token_s: float
    chunk_gap_s: float
    total_s: float


async def consume_stream(
    stream: AsyncIterator[ReplyChunk],
    deadlines: Deadlines,
    on_chunk: Callable[[ReplyChunk], Awaitable[None]],
) -> None:
    """Feed every chunk to `on_chunk`, raising `ProviderTimeout` when a phase runs late."""
    loop = asyncio.get_running_loop()
    started_s = loop.time()
    total_deadline = started_s + deadlines.total_s
    phase = f"no first token within {deadlines.first_token_s:g} s"
    scope = asyncio.timeout_at(min(started_s + deadlines.first_token_s, total_deadline))
    try:
        async with scope, aclosing(stream):  # type: ignore[type-var]
            async for chunk in stream:
                if chunk.text:
                    phase = f"no new text for {deadlines.chunk_gap_s:g} s"
                    next_gap_s = loop.time() + deadlines.chunk_gap_s
                    if next_gap_s >= total_deadline:
                        phase = f"reply not finished within {deadlines.total_s:g} s"
                    scope.reschedule(min(next_gap_s, total_deadline))
                await on_chunk(chunk)
    except TimeoutError:
        if not scope.expired():
            raise
        raise ProviderTimeout(f"provider deadline passed: {phase}") from None
