"""The simulator's RunPod job API, driven by a plain aiohttp client over 127.0.0.1.

Its faults, on RunPod's routes too, are in test_simulator_faults.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.simulator_client import PROMPT, Start, poll_to_end, run_job, simulators, text_of
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
