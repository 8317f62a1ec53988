"""The simulator's `[[sim:fault=...]]` directives on both protocols, and clients that
leave a stream early, driven by a plain aiohttp client over 127.0.0.1.
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
    Start,
    chat_body,
    chat_events,
    content_of,
    poll_to_end,
    run_job,
    runpod_body,
    simulators,
    sse_events,
    text_of,
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


# On the RunPod routes


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
