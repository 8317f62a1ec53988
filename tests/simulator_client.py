"""A plain aiohttp client's view of the simulator, for the simulator's own tests:
request bodies for both protocols, SSE events read off a response, RunPod jobs
polled to their end, and `simulators()`, which the test modules' `start` fixture wraps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson

from uvian_worker.providers.simulator import RunningSimulator, SimulatorConfig, start_simulator

Start = Callable[..., Awaitable[RunningSimulator]]
PROMPT = "Tell me about the harbour lights tonight"
SYSTEM = "Be brief."


@asynccontextmanager
async def simulators() -> AsyncIterator[Start]:
    """Start simulators with the given config options; all are stopped at the end."""
    running: list[RunningSimulator] = []

    async def _start(**options: Any) -> RunningSimulator:
        sim = await start_simulator(SimulatorConfig(**options))
        running.append(sim)
        return sim

    yield _start
    for sim in running:
        await sim.stop()


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
