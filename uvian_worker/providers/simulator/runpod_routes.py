"""RunPod's native job API: /run starts a job that generates in a task of its own,
/stream hands out its new items, /status reports it and /cancel stops it."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from uvian_worker.providers.simulator.config import SimulatorConfig
from uvian_worker.providers.simulator.responses import (
    JSON_TYPE,
    abort,
    bad_request,
    json_response,
    read_json,
)
from uvian_worker.providers.simulator.script import (
    DROPPING,
    FAILING,
    JOB_STOPPING,
    Script,
    build_script,
    paced,
    refusal,
)
from uvian_worker.providers.simulator.stats import SimulatorStats

_TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
_JOB_ERROR = "simulated failure of the model handler"


@dataclass(eq=False)
class _Job:
    id: str
    script: Script
    status: str = "IN_QUEUE"
    items: list[dict[str, Any]] = field(default_factory=list)
    handed_out: int = 0
    output_tokens: int = 0
    error: str | None = None
    broken_poll: str | None = None  # the fault the next /stream poll with items suffers
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def add_items(self, group: list[list[str]]) -> None:
        # Queued until the first item, as a job waiting for a cold worker would look.
        self.status = "IN_PROGRESS"
        for tokens in group:
            self.output_tokens += len(tokens)
            output: dict[str, Any] = {"choices": [{"tokens": tokens}]}
            if self.script.reports_usage:
                output["usage"] = {"input": self.script.prompt_tokens, "output": self.output_tokens}
            self.items.append({"output": output})
        self.changed.set()

    def status_json(self) -> dict[str, Any]:
        reply: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.status == "COMPLETED":
            reply["output"] = [item["output"] for item in self.items]
        if self.error is not None:
            reply["error"] = self.error
        return reply


class RunPodRoutes:
    """The RunPod handlers, bound to one config, its stats and its jobs."""

    def __init__(self, config: SimulatorConfig, stats: SimulatorStats) -> None:
        self.config = config
        self.stats = stats
        self._jobs: dict[str, _Job] = {}

    async def run(self, request: web.Request) -> web.Response:
        job_input = (await read_json(request)).get("input")
        if not isinstance(job_input, dict):
            raise bad_request("input must be an object")
        params = job_input.get("sampling_params")
        max_tokens = params.get("max_tokens") if isinstance(params, dict) else None
        messages = job_input.get("messages")
        self.stats.prompts.append(messages)
        if messages is None and isinstance(job_input.get("prompt"), str):
            messages = [{"role": "user", "content": job_input["prompt"]}]
        script = build_script(messages, max_tokens, self.config)
        if script.refused:
            return refusal(script.fault)

        job = _Job(id=f"{uuid.uuid4()}-u1", script=script)
        job.broken_poll = script.fault if script.fault in DROPPING else None
        self._jobs[job.id] = job
        job.task = asyncio.create_task(self._generate(job))
        self.stats.record("streams_started")
        return json_response({"id": job.id, "status": job.status})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        job = self._job(request)
        if job.handed_out == len(job.items) and job.status not in _TERMINAL:
            # Hold the poll open a while rather than answer "nothing yet" at once, so a
            # client polling in a loop does not spin.
            job.changed.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(job.changed.wait(), self.config.stream_wait_ms / 1000)

        pending = job.items[job.handed_out :]
        reply = orjson.dumps({"status": job.status, "stream": pending})
        if job.broken_poll is not None and job.handed_out > 0 and pending:
            fault, job.broken_poll = job.broken_poll, None
            return await _break_poll(request, fault, reply)
        job.handed_out += len(pending)
        return web.Response(body=reply, content_type=JSON_TYPE)

    async def status(self, request: web.Request) -> web.Response:
        return json_response(self._job(request).status_json())

    async def cancel(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if job.status not in _TERMINAL:
            job.status = "CANCELLED"
            if job.task is not None:
                job.task.cancel()
            self.stats.client_left("runpod_cancelled")
        return json_response({"id": job.id, "status": job.status})

    async def close(self, _: web.Application) -> None:
        for job in self._jobs.values():
            if job.task is not None:
                job.task.cancel()

    async def _generate(self, job: _Job) -> None:
        fault = job.script.fault
        try:
            async with aclosing(paced(job.script, job.script.cut_at(JOB_STOPPING))) as groups:
                async for group in groups:
                    job.add_items(group)
            job.status = "IN_PROGRESS"
            if fault == "stall":
                await asyncio.Event().wait()  # until /cancel or the server stops
            if fault in FAILING:
                job.status, job.error = "FAILED", _JOB_ERROR
            else:
                job.status = "COMPLETED"
                self.stats.record("streams_completed")
        finally:
            job.changed.set()
            loop = asyncio.get_running_loop()
            loop.call_later(self.config.job_retention_s, self._jobs.pop, job.id, None)

    def _job(self, request: web.Request) -> _Job:
        job = self._jobs.get(request.match_info["job_id"])
        if job is None:
            raise web.HTTPNotFound(text='{"error":"job not found"}', content_type=JSON_TYPE)
        return job


async def _break_poll(request: web.Request, fault: str, reply: bytes) -> web.StreamResponse:
    """Promise the whole reply, send none of it ("reset") or half ("truncate"), and
    drop the connection. The headers go first because HTTP clients, aiohttp's among
    them, quietly repeat a GET whose connection closed before any answer."""
    response = web.StreamResponse(headers={"Content-Type": JSON_TYPE})
    response.content_length = len(reply)
    await response.prepare(request)
    await response.write(reply[: len(reply) // 2] if fault == "truncate" else b"")
    abort(request)
    return response
