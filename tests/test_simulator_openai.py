"""The simulator's OpenAI-compatible routes, its API key and pacing, and its stats'
waiters, driven by a plain aiohttp client over 127.0.0.1.

The RunPod routes are in test_simulator_runpod.py, the faults in test_simulator_faults.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from tests.simulator_client import (
    PROMPT,
    SYSTEM,
    Start,
    all_events,
    chat_body,
    chat_events,
    content_of,
    runpod_body,
    simulators,
)
from uvian_worker.providers.simulator import scripted_reply

# The conftest's autouse guard fails any of these tests whose event loop logged an error.


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    async with simulators() as start:
        yield start


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# OpenAI-compatible


async def test_openai_stream_has_role_content_finish_usage_and_done(
    start: Start, http: aiohttp.ClientSession
) -> None:
    sim = await start()
    body = chat_body(stream=True, stream_options={"include_usage": True})
    async with http.post(f"{sim.url}/v1/chat/completions", json=body) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = await all_events(response)

    chunks = [orjson.loads(event) for event in events[:-1]]
    assert events[-1] == b"[DONE]"
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    prompt_tokens = len(SYSTEM.split()) + len(PROMPT.split())
    total = prompt_tokens + 24
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 24, "total_tokens": total}
    assert chunks[-1]["usage"] == usage

    text = content_of(events)
    assert text == "".join(scripted_reply(PROMPT, 24))
    assert text.startswith("Simulated reply to Tell me about the")
    assert "café" in text
    assert "🚀" in text
    assert sim.stats.streams_started == sim.stats.streams_completed == 1


async def test_openai_stream_respects_max_tokens_and_chunk_size(
    start: Start, http: aiohttp.ClientSession
) -> None:
    sim = await start(chunk_tokens=2)
    events = await chat_events(http, sim.url, max_tokens=5)

    chunks = [orjson.loads(event) for event in events[:-1]]
    contents = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    expected = scripted_reply(PROMPT, 24)[:5]
    assert contents == ["".join(expected[0:2]), "".join(expected[2:4]), expected[4]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in chunk for chunk in chunks)
    assert events[-1] == b"[DONE]"


async def test_openai_whole_completion(start: Start, http: aiohttp.ClientSession) -> None:
    sim = await start(model="sim-test")
    body = chat_body("hi [[sim:tokens=6]]")
    async with http.post(f"{sim.url}/v1/chat/completions", json=body) as response:
        assert response.status == 200
        reply = await response.json()

    assert reply["object"] == "chat.completion"
    assert reply["model"] == "sim-test"
    assert reply["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Simulated reply to hi café 🚀",
    }
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] == 6


async def test_models_and_the_runpod_openai_route(
    start: Start, http: aiohttp.ClientSession
) -> None:
    sim = await start(model="sim-test")
    async with http.get(f"{sim.url}/v1/models") as response:
        models = await response.json()
    route = f"{sim.url}/v2/endpoint-1/openai/v1/chat/completions"
    async with http.post(route, json=chat_body(stream=True)) as response:
        events = await all_events(response)
    async with http.get(f"{sim.url}/_sim/stats") as response:
        stats = await response.json()

    assert [model["id"] for model in models["data"]] == ["sim-test"]
    assert content_of(events) == "".join(scripted_reply(PROMPT, 24))
    assert stats["requests"] == {"openai_models": 1, "runpod_openai_chat": 1, "sim_stats": 1}
    assert stats["streams_completed"] == 1


async def test_bad_requests_are_refused(start: Start, http: aiohttp.ClientSession) -> None:
    sim = await start()
    bodies = [
        b"not json",
        orjson.dumps({"messages": "x"}),
        orjson.dumps(chat_body("[[sim:fault=nope]]")),
    ]
    for body in bodies:
        async with http.post(f"{sim.url}/v1/chat/completions", data=body) as response:
            assert response.status == 400
            assert "error" in await response.json()


# Access, timing and stats


async def test_api_key_is_enforced(start: Start, http: aiohttp.ClientSession) -> None:
    sim = await start(api_key="s3cret")
    route = f"{sim.url}/v1/chat/completions"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        async with http.post(route, json=chat_body(), headers=headers) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "invalid_api_key"
    async with http.post(f"{sim.url}/v2/ep/run", json=runpod_body()) as response:
        assert response.status == 401

    headers = {"Authorization": "Bearer s3cret"}
    async with http.post(route, json=chat_body(), headers=headers) as response:
        assert response.status == 200
    async with http.get(f"{sim.url}/_sim/stats") as response:
        assert response.status == 200


@pytest.mark.parametrize(
    ("options", "prompt", "min_delay_s"),
    [
        ({"first_token_delay_ms": 150}, PROMPT, 0.15),
        ({}, "[[sim:delay_ms=150]] hello", 0.15),
        ({"tokens_per_s": 100}, "[[sim:tokens=21]] count", 0.2),
    ],
)
async def test_first_token_delay_and_rate_are_respected(
    start: Start,
    http: aiohttp.ClientSession,
    options: dict[str, Any],
    prompt: str,
    min_delay_s: float,
) -> None:
    sim = await start(**options)
    started_at = time.monotonic()
    events = await chat_events(http, sim.url, prompt)
    elapsed_s = time.monotonic() - started_at

    assert events[-1] == b"[DONE]"
    assert elapsed_s >= min_delay_s * 0.95  # the loop's clock may round a hair early


async def test_an_abandoned_wait_leaves_the_others_working(
    start: Start, http: aiohttp.ClientSession
) -> None:
    sim = await start()
    abandoned = asyncio.create_task(sim.stats.wait_for("streams_completed", 1))
    kept = asyncio.create_task(sim.stats.wait_for("streams_completed", 1))
    async with http.get(f"{sim.url}/v1/models") as response:
        assert response.status == 200  # meanwhile both waiters registered
    abandoned.cancel()

    await chat_events(http, sim.url)
    await asyncio.wait_for(kept, 5)
    assert abandoned.cancelled()
    assert sim.stats.count("openai_chat") == sim.stats.count("openai_models") == 1
