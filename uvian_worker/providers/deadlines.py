"""Streaming deadlines in phases: the first token, the gap between content, the whole reply.

Content moves the deadline forward; chunks without text (keep-alives never
reach here; usage-only or empty deltas do) move nothing. When a deadline
passes, the consuming task is cancelled: the cancellation lands inside the
provider's stream, whose `finally` closes the upstream request (and cancels the
RunPod job), and comes out of here as `ProviderTimeout`.
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
    watch = _DeadlineWatch(deadlines)
    try:
        async with aclosing(stream):  # type: ignore[type-var]
            async for chunk in stream:
                if chunk.text:
                    watch.progress()
                await on_chunk(chunk)
    except asyncio.CancelledError:
        if watch.expired():
            raise ProviderTimeout(f"provider deadline passed: {watch.phase}") from None
        raise
    finally:
        watch.stop()


class _DeadlineWatch:
    """One timer for the three phases, moved only when it fires.

    Text moves the deadline forward by updating a number; the timer, when it
    fires, either finds the deadline moved and sleeps again, or cancels the
    consuming task. Rescheduling a timer for every chunk cost more than the
    rest of the chunk's handling.
    """

    def __init__(self, deadlines: Deadlines) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._deadlines = deadlines
        started_s = self._loop.time()
        self._total_deadline_s = started_s + deadlines.total_s
        self._deadline_s = min(started_s + deadlines.first_token_s, self._total_deadline_s)
        self.phase = f"no first token within {deadlines.first_token_s:g} s"
        self._fired = False
        self._timer = self._loop.call_at(self._deadline_s, self._check)

    def progress(self) -> None:
        next_gap_s = self._loop.time() + self._deadlines.chunk_gap_s
        if next_gap_s >= self._total_deadline_s:
            self._deadline_s = self._total_deadline_s
            self.phase = f"reply not finished within {self._deadlines.total_s:g} s"
        else:
            self._deadline_s = next_gap_s
            self.phase = f"no new text for {self._deadlines.chunk_gap_s:g} s"
        if self._deadline_s < self._timer.when():
            # The first text can bring the deadline closer (a gap shorter than the
            # first-token allowance): the timer must not sleep past it.
            self._arm()

    def _arm(self) -> None:
        self._timer.cancel()
        self._timer = self._loop.call_at(self._deadline_s, self._check)

    def _check(self) -> None:
        if self._loop.time() < self._deadline_s:
            self._arm()
            return
        self._fired = True
        self._task.cancel()

    def expired(self) -> bool:
        """Whether the cancellation being handled is this watch's own (and only that)."""
        return self._fired and self._task.uncancel() == 0

    def stop(self) -> None:
        self._timer.cancel()
