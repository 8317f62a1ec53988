"""A local server that plays RunPod's native job API, for the RunPod provider's tests.

`FakeRunPod` answers each route from the test's script (`polled(...)` bodies, a
`web.Response`, `Hold()` or `Drop()`); `running_fake()` serves it on 127.0.0.1 and
is what the test modules' `fake` fixture wraps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from uvian_worker.providers.base import ReplyChunk, ReplyRequest
from uvian_worker.providers.runpod import RunPodProvider

API_KEY = "rp-secret-3f9c7a1b"
JOB_ID = "job-5e2d"
REQUEST = ReplyRequest(
    messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    max_tokens=64,
    temperature=0.2,
)
WAIT_S = 5.0


class Hold:
    """A scripted answer that keeps the request open until the test releases it."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()


class Drop:
    """A scripted answer that closes the connection without a response."""


Answer = dict[str, Any] | web.Response | Hold | Drop


def polled(status: str, *outputs: object) -> dict[str, Any]:
    return {"status": status, "stream": [{"output": output} for output in outputs]}


def tokens(*pieces: str, usage: tuple[int, int] | None = None) -> dict[str, Any]:
    output: dict[str, Any] = {"choices": [{"tokens": list(pieces)}]}
    if usage is not None:
        output["usage"] = {"input": usage[0], "output": usage[1]}
    return output


class FakeRunPod:
    """RunPod's /v2/{endpoint} routes, answering from per-test scripts."""

    def __init__(self) -> None:
        self.base_url = ""
        self.run_answer: Answer = {"id": JOB_ID, "status": "IN_QUEUE"}
        self.polls: list[Answer] = []
        self.status_answer: Answer = {"id": JOB_ID, "status": "COMPLETED"}
        self.cancel_answer: Answer = {"id": JOB_ID, "status": "CANCELLED"}
        self.run_inputs: list[dict[str, Any]] = []
        self.calls: dict[str, int] = {"stream": 0, "status": 0, "cancel": 0}
        self.cancelled_ids: list[str] = []
        self.poll_times_s: list[float] = []
        self.refused_keys = 0
        self.cancelled = asyncio.Event()
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._check_key])
        app.router.add_post("/v2/{endpoint}/run", self._run)
        app.router.add_get("/v2/{endpoint}/stream/{job_id}", self._stream)
        app.router.add_get("/v2/{endpoint}/status/{job_id}", self._status)
        app.router.add_post("/v2/{endpoint}/cancel/{job_id}", self._cancel)
        return app

    @web.middleware
    async def _check_key(self, request: web.Request, handler: Any) -> web.StreamResponse:
        presented = request.headers.get("Authorization", "")
        if presented != f"Bearer {API_KEY}":
            self.refused_keys += 1
            # Echoes the key back, as some gateways do, to prove the provider hides it.
            return web.json_response({"error": f"unknown key {presented}"}, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    async def _run(self, request: web.Request) -> web.StreamResponse:
        self.run_inputs.append(await request.json())
        return await self._answer(request, self.run_answer)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        assert request.match_info["job_id"] == JOB_ID
        self.calls["stream"] += 1
        self.poll_times_s.append(asyncio.get_running_loop().time())
        if not self.polls:
            return web.json_response({"error": "polled past the script"}, status=599)
        return await self._answer(request, self.polls.pop(0))

    async def _status(self, request: web.Request) -> web.StreamResponse:
        self.calls["status"] += 1
        return await self._answer(request, self.status_answer)

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        self.calls["cancel"] += 1
        self.cancelled_ids.append(request.match_info["job_id"])
        self.cancelled.set()
        return await self._answer(request, self.cancel_answer)

    async def _answer(self, request: web.Request, answer: Answer) -> web.StreamResponse:
        if isinstance(answer, Hold):
            answer.entered.set()
            await self.release.wait()
            return web.json_response({"status": "IN_PROGRESS", "stream": []})
        if isinstance(answer, Drop):
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if isinstance(answer, web.StreamResponse):
            return answer
        return web.json_response(answer)


@asynccontextmanager
async def running_fake() -> AsyncIterator[FakeRunPod]:
    """Serve a `FakeRunPod`; its `base_url` is the endpoint's, ending in /v2/ep-test."""
    fake = FakeRunPod()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v2/ep-test"
    yield fake
    fake.release.set()
    await runner.cleanup()


def make_provider(fake: FakeRunPod, api_key: str, **options: Any) -> RunPodProvider:
    options.setdefault("poll_interval_s", 0.0)
    return RunPodProvider(base_url=fake.base_url, api_key=api_key, model="llama-3-8b", **options)


async def collect(provider: RunPodProvider) -> list[ReplyChunk]:
    async with asyncio.timeout(WAIT_S):
        return [chunk async for chunk in provider.stream_reply(REQUEST)]


def text_of(chunks: list[ReplyChunk]) -> str:
    return "".join(chunk.text for chunk in chunks)
