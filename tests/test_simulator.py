"""The simulator, driven by a plain aiohttp client over 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from uvian_worker.providers.simulator import (
    RunningSimulator,
    SimulatorConfig,
    scripted_reply,
    start_simulator,
)

Start = Callable[..., Awaitable[RunningSimulator]]
PROMPT = "Tell me about the harbour lights tonight"
SYSTEM = "Be brief."


# The conftest's autouse guard fails any of these tests whose event loop logged an error.


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    running: list[RunningSimulator] = []

    async def _start(**options: Any) -> RunningSimulator:
        sim = await start_simulator(SimulatorConfig(**options))
        running.append(sim)
        return sim

    yield _start
    for sim in running:
        await sim.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def chat_body(prompt: str = PROMPT, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    return {"model": "any", "messages": messages, **extra}


def runpod_body(prompt: str = PROMPT, max_tokens: int = 512) -> dict[str, Any]:
    messages = [{"role": "user", "content": prompt}]
    return {"input": {"messages": messages, "sampling_params": {"max_tokens": max_tokens}}}


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """Each `data:` payload of an SSE response, in order."""
    async for line in response.content:
        if line.startswith(b"data: "):
            yield line[len(b"data: ") :].rstrip(b"\n")


async def all_events(response: aiohttp.ClientResponse) -> list[bytes]:
    return [event async for event in sse_events(response)]


async def chat_events(
    http: aiohttp.ClientSession, url: str, prompt: str = PROMPT, **extra: Any
) -> list[bytes]:
    body = chat_body(prompt, stream=True, **extra)
    async with http.post(f"{url}/v1/chat/completions", json=body) as response:
        assert response.status == 200
        return await all_events(response)


async def run_job(
    http: aiohttp.ClientSession, url: str, prompt: str = PROMPT, max_tokens: int = 512
) -> str:
    async with http.post(f"{url}/v2/ep/run", json=runpod_body(prompt, max_tokens)) as response:
        job = await response.json()
    assert job["status"] == "IN_QUEUE"
    return str(job["id"])


def content_of(events: list[bytes]) -> str:
    chunks = [orjson.loads(event) for event in events if event != b"[DONE]"]
    deltas = [choice["delta"] for chunk in chunks for choice in chunk.get("choices", [])]
    return "".join(delta.get("content") or "" for delta in deltas)


async def poll_to_end(
    http: aiohttp.ClientSession, sim: RunningSimulator, job_id: str
) -> tuple[str, list[dict[str, Any]]]:
    """Poll /stream until the job ends; return its status and every item."""
    items: list[dict[str, Any]] = []
    while True:
        async with http.get(f"{sim.url}/v2/ep/stream/{job_id}") as response:
            body = await response.json()
        items.extend(body["stream"])
        if body["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
            return body["status"], items


def text_of(items: list[dict[str, Any]]) -> str:
    return "".join("".join(item["output"]["choices"][0]["tokens"]) for item in items)


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


# RunPod native


async def test_runpod_job_streams_each_item_once_then_completes(
    start: Start, http: aiohttp.ClientSession
) -> None:
    sim = await start(tokens_per_s=400, chunk_tokens=3, stream_wait_ms=50)
    job_id = await run_job(http, sim.url, max_tokens=10)

    status, items = await poll_to_end(http, sim, job_id)
    assert status == "COMPLETED"
    assert text_of(items) == "".join(scripted_reply(PROMPT, 10))
    assert [item["output"]["usage"]["output"] for item in items] == [3, 6, 9, 10]
    assert {item["output"]["usage"]["input"] for item in items} == {len(PROMPT.split())}

    async with http.get(f"{sim.url}/v2/ep/stream/{job_id}") as response:
        assert await response.json() == {"status": "COMPLETED", "stream": []}
    async with http.get(f"{sim.url}/v2/ep/status/{job_id}") as response:
        final = await response.json()
    assert final["status"] == "COMPLETED"
    assert text_of([{"output": output} for output in final["output"]]) == text_of(items)


async def test_runpod_cancel_stops_generation(start: Start, http: aiohttp.ClientSession) -> None:
    sim = await start(tokens_per_s=50, reply_tokens=1000)
    job_id = await run_job(http, sim.url)
    async with http.get(f"{sim.url}/v2/ep/stream/{job_id}") as response:
        assert (await response.json())["stream"]

    async with http.post(f"{sim.url}/v2/ep/cancel/{job_id}") as response:
        assert await response.json() == {"id": job_id, "status": "CANCELLED"}
    status, items_at_cancel = await poll_to_end(http, sim, job_id)
    assert status == "CANCELLED"
    assert sim.stats.runpod_cancelled == 1
    assert sim.stats.last_disconnect_at is not None

    # A second job at the same rate is the clock: while its five tokens are made,
    # the cancelled job would have made five more.
    clock_id = await run_job(http, sim.url, "[[sim:tokens=5]]")
    assert (await poll_to_end(http, sim, clock_id))[0] == "COMPLETED"
    async with http.get(f"{sim.url}/v2/ep/stream/{job_id}") as response:
        assert await response.json() == {"status": "CANCELLED", "stream": []}
    assert len(items_at_cancel) < 5


async def test_runpod_takes_a_prompt_and_forgets_ended_jobs(
    start: Start, http: aiohttp.ClientSession
) -> None:
    sim = await start()
    body = {"input": {"prompt": "short one [[sim:tokens=4]]"}}
    async with http.post(f"{sim.url}/v2/ep/run", json=body) as response:
        job_id = (await response.json())["id"]
    status, items = await poll_to_end(http, sim, job_id)
    assert (status, text_of(items)) == ("COMPLETED", "Simulated reply to short")

    forgetful = await start(job_retention_s=0)
    job_id = await run_job(http, forgetful.url)
    await asyncio.wait_for(forgetful.stats.wait_for("streams_completed", 1), 5)
    async with http.get(f"{forgetful.url}/v2/ep/status/{job_id}") as response:
        assert response.status == 404
    async with http.post(f"{sim.url}/v2/ep/run", json={"input": "text"}) as response:
        assert response.status == 400


# Access and timing


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


# Faults


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ("http_500", 500, "server_error"),
        ("http_429", 429, "rate_limit_exceeded"),
        ("http_400", 400, "context_length_exceeded"),
    ],
)
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v2/ep/run"])
async def test_refusal_faults(
    start: Start, http: aiohttp.ClientSession, fault: str, status: int, code: str, route: str
) -> None:
    sim = await start()
    prompt = f"please [[sim:fault={fault}]]"
    body = runpod_body(prompt) if route.endswith("/run") else chat_body(prompt, stream=True)
    async with http.post(f"{sim.url}{route}", json=body) as response:
        assert response.status == status
        assert (await response.json())["error"]["code"] == code
        assert response.headers.get("Retry-After") == ("1" if status == 429 else None)
    assert sim.stats.streams_started == 0


async def test_error_mid_stream(start: Start, http: aiohttp.ClientSession) -> None:
    sim = await start()
    events = await chat_events(http, sim.url, "go [[sim:fault=error_mid_stream]]")

    assert content_of(events[:-2]) == "Simulated reply to"
    assert orjson.loads(events[-2])["error"]["type"] == "server_error"
    assert events[-1] == b"[DONE]"
    assert sim.stats.streams_completed == 0


async def test_truncate_ends_the_stream_without_finish_or_done(
    start: Start, http: aiohttp.ClientSession
) -> None:
    sim = await start()
    events = await chat_events(http, sim.url, "go [[sim:fault=truncate]]")

    assert content_of(events) == "Simulated reply to"
    assert b"[DONE]" not in events
    assert all(orjson.loads(e)["choices"][0]["finish_reason"] is None for e in events)


async def test_reset_aborts_the_connection(start: Start, http: aiohttp.ClientSession) -> None:
    sim = await start()
    body = chat_body("go [[sim:fault=reset]]", stream=True)
    received: list[bytes] = []
    with pytest.raises(aiohttp.ClientError):
        async with http.post(f"{sim.url}/v1/chat/completions", json=body) as response:
            async for event in sse_events(response):
                received.append(event)
    assert content_of(received) == "Simulated reply to"


async def test_stall_sends_keepalives_and_a_leaving_client_is_counted(
    start: Start, http: aiohttp.ClientSession
) -> None:
    sim = await start(keepalive_interval_ms=10)
    body = chat_body("go [[sim:fault=stall]]", stream=True)
    before_s = time.monotonic()
    async with http.post(f"{sim.url}/v1/chat/completions", json=body) as response:
        lines = [await response.content.readline() for _ in range(10)]
        response.close()

    assert lines[-2:] == [b": keep-alive\n", b"\n"]
    data = [line.removeprefix(b"data: ") for line in lines if line.startswith(b"data: ")]
    assert content_of(data) == "Simulated reply to"
    await asyncio.wait_for(sim.stats.wait_for("closed_early", 1), 5)
    assert sim.stats.last_disconnect_at is not None
    assert sim.stats.last_disconnect_at > before_s
    assert sim.stats.streams_completed == 0


async def test_a_client_leaving_a_slow_stream_is_counted(
    start: Start, http: aiohttp.ClientSession
) -> None:
    sim = await start(tokens_per_s=20, reply_tokens=500)
    body = chat_body(stream=True)
    async with http.post(f"{sim.url}/v1/chat/completions", json=body) as response:
        async for _ in sse_events(response):
            break
        response.close()

    await asyncio.wait_for(sim.stats.wait_for("closed_early", 1), 5)
    async with http.get(f"{sim.url}/_sim/stats") as response:
        stats = await response.json()
    assert stats["closed_early"] == 1
    assert stats["streams_started"] == 1
    assert stats["streams_completed"] == 0
    assert stats["last_disconnect_at"] == sim.stats.last_disconnect_at


async def test_runpod_failed_shows_the_error_only_in_status(
    start: Start, http: aiohttp.ClientSession
) -> None:
    sim = await start()
    job_id = await run_job(http, sim.url, "[[sim:fault=runpod_failed]]")
    status, items = await poll_to_end(http, sim, job_id)
    async with http.get(f"{sim.url}/v2/ep/status/{job_id}") as response:
        final = await response.json()

    assert (status, text_of(items)) == ("FAILED", "Simulated reply to")
    assert final["status"] == "FAILED"
    assert final["error"]
    assert "output" not in final


async def test_runpod_stall_keeps_the_job_in_progress(
    start: Start, http: aiohttp.ClientSession
) -> None:
    sim = await start(stream_wait_ms=20)
    job_id = await run_job(http, sim.url, "[[sim:fault=stall]]")
    items: list[dict[str, Any]] = []
    while len(items) < 3:
        async with http.get(f"{sim.url}/v2/ep/stream/{job_id}") as response:
            items.extend((await response.json())["stream"])

    # Every further poll waits its full time and comes back empty.
    for _ in range(3):
        async with http.get(f"{sim.url}/v2/ep/stream/{job_id}") as response:
            assert await response.json() == {"status": "IN_PROGRESS", "stream": []}
    async with http.post(f"{sim.url}/v2/ep/cancel/{job_id}") as response:
        assert (await response.json())["status"] == "CANCELLED"
    assert text_of(items) == "Simulated reply to"


@pytest.mark.parametrize("fault", ["reset", "truncate"])
async def test_runpod_broken_poll_loses_no_items(
    start: Start, http: aiohttp.ClientSession, fault: str
) -> None:
    sim = await start(tokens_per_s=200, reply_tokens=12)
    prompt = f"[[sim:fault={fault}]]"
    job_id = await run_job(http, sim.url, prompt)

    items: list[dict[str, Any]] = []
    failures = 0
    status = "IN_QUEUE"
    while status not in ("COMPLETED", "FAILED", "CANCELLED"):
        try:
            async with http.get(f"{sim.url}/v2/ep/stream/{job_id}") as response:
                body = await response.json()
        except aiohttp.ClientError:
            failures += 1
            continue
        items.extend(body["stream"])
        status = body["status"]

    assert failures == 1
    assert (status, text_of(items)) == ("COMPLETED", "".join(scripted_reply(prompt, 12)))


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
