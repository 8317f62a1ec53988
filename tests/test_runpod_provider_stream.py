"""The RunPod provider reading replies from a local server that plays RunPod's native
job API: token batches, plain strings and OpenAI event fragments, polled to the end.

Failed jobs, HTTP failures and cancellation are in test_runpod_provider_failures.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.runpod_server import (
    API_KEY,
    REQUEST,
    WAIT_S,
    FakeRunPod,
    collect,
    make_provider,
    polled,
    running_fake,
    text_of,
    tokens,
)
from uvian_worker.providers.base import ReplyChunk, Usage
from uvian_worker.providers.runpod import RunPodProvider


@pytest.fixture
async def fake() -> AsyncIterator[FakeRunPod]:
    async with running_fake() as fake:
        yield fake


@pytest.fixture
async def provider(fake: FakeRunPod) -> AsyncIterator[RunPodProvider]:
    provider = make_provider(fake, API_KEY)
    yield provider
    await provider.aclose()


def sse(event: dict[str, Any] | str) -> str:
    return f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n"


def cut(text: str, sizes: list[int]) -> list[str]:
    """Split text into pieces of the given sizes, cycling through them."""
    pieces, start, turn = [], 0, 0
    while start < len(text):
        size = sizes[turn % len(sizes)]
        pieces.append(text[start : start + size])
        start, turn = start + size, turn + 1
    return pieces


async def test_token_batches_stream_in_order_and_end_with_the_last_usage(
    fake: FakeRunPod, provider: RunPodProvider
) -> None:
    fake.polls = [
        polled("IN_PROGRESS", tokens("Hel", "lo"), tokens(",", usage=(12, 3))),
        polled("IN_PROGRESS", tokens(" wor", "ld", usage=(12, 5))),
        polled("COMPLETED", tokens("!")),
    ]

    chunks = await collect(provider)

    assert [chunk.text for chunk in chunks[:-1]] == ["Hello", ",", " world", "!"]
    assert chunks[-1] == ReplyChunk(finish_reason="stop", usage=Usage(12, 5), model="llama-3-8b")
    assert fake.run_inputs == [
        {
            "input": {
                "messages": list(REQUEST.messages),
                "sampling_params": {"max_tokens": 64, "temperature": 0.2},
                "stream": True,
                "model": "llama-3-8b",
            }
        }
    ]
    assert fake.calls == {"stream": 3, "status": 1, "cancel": 0}
    assert fake.refused_keys == 0


async def test_plain_strings_are_text_and_no_cancel_follows_completion(
    fake: FakeRunPod, provider: RunPodProvider
) -> None:
    fake.polls = [polled("IN_PROGRESS", "\nda", "rk ", "and"), polled("COMPLETED", " stormy")]
    reply = provider.stream_reply(REQUEST)
    chunks: list[ReplyChunk] = []

    # Stop at the finish, as a consumer would, and close the reply.
    async with asyncio.timeout(WAIT_S):
        async for chunk in reply:
            chunks.append(chunk)
            if chunk.finish_reason is not None:
                break
        await reply.aclose()

    assert text_of(chunks) == "\ndark and stormy"
    assert chunks[-1] == ReplyChunk(finish_reason="stop", model="llama-3-8b")
    assert fake.calls == {"stream": 2, "status": 1, "cancel": 0}


async def test_a_whole_reply_that_looks_like_the_start_of_an_event_is_text(
    fake: FakeRunPod, provider: RunPodProvider
) -> None:
    fake.polls = [polled("IN_PROGRESS", " d"), polled("COMPLETED", "a")]

    chunks = await collect(provider)

    assert text_of(chunks) == " da"


async def test_openai_event_fragments_split_mid_line_and_mid_json(
    fake: FakeRunPod, provider: RunPodProvider
) -> None:
    events: list[dict[str, Any]] = [
        {"model": "served-model", "choices": [{"delta": {"role": "assistant"}}]},
        *({"choices": [{"delta": {"content": piece}}]} for piece in ["Hé", "llo,", " wörld"]),
        {"choices": [{"delta": {}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}},
    ]
    fragments = cut("".join(sse(event) for event in events) + sse("[DONE]"), [2, 9, 4, 17, 1, 6])
    fake.polls = [polled("IN_PROGRESS", *fragments[i : i + 3]) for i in range(0, 60, 3)]
    fake.polls.append(polled("COMPLETED", *fragments[60:]))

    chunks = await collect(provider)

    assert len(fragments) > 60
    assert text_of(chunks) == "Héllo, wörld"
    assert chunks[-1] == ReplyChunk(finish_reason="length", usage=Usage(9, 4), model="served-model")
    assert all(chunk.finish_reason is None for chunk in chunks[:-1])


async def test_a_cold_start_waits_through_queued_polls(fake: FakeRunPod) -> None:
    provider = make_provider(fake, API_KEY, poll_interval_s=0.03)
    fake.polls = [polled("IN_QUEUE") for _ in range(4)]
    fake.polls += [polled("IN_PROGRESS"), polled("IN_PROGRESS", "warm"), polled("COMPLETED")]

    chunks = await collect(provider)
    await provider.aclose()

    assert text_of(chunks) == "warm"
    assert fake.calls == {"stream": 7, "status": 1, "cancel": 0}
    # Every empty poll was followed by a pause (less a little for the loop's clock).
    gaps_s = [later - earlier for earlier, later in itertools.pairwise(fake.poll_times_s)]
    assert all(gap_s >= 0.025 for gap_s in gaps_s[:5])


async def test_each_stream_item_is_used_exactly_once(
    fake: FakeRunPod, provider: RunPodProvider
) -> None:
    pieces = [f"<{n}>" for n in range(40)]
    fake.polls = [polled("IN_PROGRESS", *pieces[i : i + 4]) for i in range(0, 36, 4)]
    fake.polls += [polled("IN_QUEUE"), polled("COMPLETED", *pieces[36:])]

    chunks = await collect(provider)

    assert text_of(chunks) == "".join(pieces)
    assert fake.polls == []
