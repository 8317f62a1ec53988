"""The RunPod provider against a local server that plays RunPod's native job API."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from uvian_worker.errors import (
    ProviderFailed,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    WorkerError,
)
from uvian_worker.providers import runpod
from uvian_worker.providers.base import ReplyChunk, ReplyRequest, Usage
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


@pytest.fixture
async def fake() -> AsyncIterator[FakeRunPod]:
    fake = FakeRunPod()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v2/ep-test"
    yield fake
    fake.release.set()
    await runner.cleanup()


@pytest.fixture
async def provider(fake: FakeRunPod) -> AsyncIterator[RunPodProvider]:
    provider = make_provider(fake, API_KEY)
    yield provider
    await provider.aclose()


def make_provider(fake: FakeRunPod, api_key: str, **options: Any) -> RunPodProvider:
    options.setdefault("poll_interval_s", 0.0)
    return RunPodProvider(base_url=fake.base_url, api_key=api_key, model="llama-3-8b", **options)


async def collect(provider: RunPodProvider) -> list[ReplyChunk]:
    async with asyncio.timeout(WAIT_S):
        return [chunk async for chunk in provider.stream_reply(REQUEST)]


def text_of(chunks: list[ReplyChunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


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


SDK_ERROR = {
    "error_type": "<class 'ValueError'>",
    "error_message": "This model's maximum context length is 4096 tokens",
    "error_traceback": "Traceback (most recent call last): ...",
}


@pytest.mark.parametrize(
    "case",
    [
        ("FAILED", f"OOM with {API_KEY}", ProviderFailed, "OOM with [redacted]"),
        ("FAILED", json.dumps(SDK_ERROR), ProviderRejected, SDK_ERROR["error_message"]),
        ("CANCELLED", None, ProviderFailed, "no error given"),
        ("TIMED_OUT", None, ProviderTimeout, "no error given"),
    ],
)
async def test_a_failed_job_raises_what_only_status_tells(
    fake: FakeRunPod,
    provider: RunPodProvider,
    caplog: pytest.LogCaptureFixture,
    case: tuple[str, str | None, type[WorkerError], str],
) -> None:
    status, error, expected, detail = case
    caplog.set_level(logging.DEBUG)
    fake.polls = [polled("IN_PROGRESS", tokens("Par", "tial")), polled(status)]
    fake.status_answer = {"id": JOB_ID, "status": status, "error": error}
    chunks: list[ReplyChunk] = []

    with pytest.raises(expected) as caught:
        async for chunk in provider.stream_reply(REQUEST):
            chunks.append(chunk)

    assert text_of(chunks) == "Partial"
    assert str(caught.value) == f"RunPod job {JOB_ID} ended {status}: {detail}"
    assert API_KEY not in caplog.text
    assert fake.calls == {"stream": 2, "status": 1, "cancel": 0}


@pytest.mark.parametrize(
    ("answer", "expected", "retry_after_s"),
    [
        (web.Response(status=401, text=f"unknown key {API_KEY}"), ProviderRejected, None),
        (web.Response(status=403, text="no access"), ProviderRejected, None),
        (web.Response(status=422, text="messages: field required"), ProviderRejected, None),
        (web.Response(status=429, headers={"Retry-After": "7"}), ProviderUnavailable, 7.0),
        (web.Response(status=500, text=f"upstream broke for {API_KEY}"), ProviderUnavailable, None),
        (Drop(), ProviderUnavailable, None),
    ],
)
async def test_http_failures_on_run_map_to_the_error_tree(
    fake: FakeRunPod,
    provider: RunPodProvider,
    answer: Answer,
    expected: type[WorkerError],
    retry_after_s: float | None,
) -> None:
    fake.run_answer = answer

    with pytest.raises(expected) as caught:
        await collect(provider)

    assert type(caught.value) is expected
    assert getattr(caught.value, "retry_after_s", None) == retry_after_s
    assert API_KEY not in str(caught.value)
    if isinstance(answer, web.Response):
        assert f"HTTP {answer.status}" in str(caught.value)
    else:
        assert isinstance(caught.value.__cause__, aiohttp.ClientError)


async def test_an_error_while_polling_cancels_the_job(
    fake: FakeRunPod, provider: RunPodProvider
) -> None:
    fake.polls = [polled("IN_PROGRESS", "so far"), web.Response(status=503, text="busy")]

    with pytest.raises(ProviderUnavailable, match="HTTP 503"):
        await collect(provider)

    assert fake.cancelled_ids == [JOB_ID]


@pytest.mark.parametrize("cancel_hangs", [False, True])
async def test_closing_the_reply_mid_stream_cancels_the_job_once(
    fake: FakeRunPod,
    provider: RunPodProvider,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    cancel_hangs: bool,
) -> None:
    caplog.set_level(logging.INFO, logger=runpod.__name__)
    fake.polls = [polled("IN_PROGRESS", "Hel"), polled("IN_PROGRESS", "lo")]
    if cancel_hangs:
        # A cancel that gets no answer is given up on, and closing still succeeds.
        monkeypatch.setattr(runpod, "_CANCEL_TIMEOUT_S", 0.05)
        fake.cancel_answer = Hold()
    reply = provider.stream_reply(REQUEST)

    async with asyncio.timeout(WAIT_S):
        first = await anext(reply)
        await reply.aclose()
        await fake.cancelled.wait()

    assert first.text == "Hel"
    assert fake.cancelled_ids == [JOB_ID]
    assert fake.calls["status"] == 0
    outcome = "could not cancel" if cancel_hangs else "cancelled"
    assert f"{outcome} RunPod job {JOB_ID}" in caplog.text


@pytest.mark.parametrize("cancel_twice", [False, True])
async def test_cancelling_the_consuming_task_cancels_the_job(
    fake: FakeRunPod,
    provider: RunPodProvider,
    caplog: pytest.LogCaptureFixture,
    cancel_twice: bool,
) -> None:
    caplog.set_level(logging.INFO, logger=runpod.__name__)
    poll = Hold()
    fake.polls = [polled("IN_PROGRESS", "Hel"), poll]
    if cancel_twice:
        # The task is cancelled again while its cancel is on the wire; the shield lets the
        # cancel finish anyway.
        fake.cancel_answer = Hold()
    received: list[str] = []

    async def consume() -> None:
        async for chunk in provider.stream_reply(REQUEST):
            received.append(chunk.text)

    task = asyncio.create_task(consume())
    await asyncio.wait_for(poll.entered.wait(), WAIT_S)
    task.cancel()
    await asyncio.wait_for(fake.cancelled.wait(), WAIT_S)
    if cancel_twice:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    fake.release.set()
    await provider.aclose()

    assert received == ["Hel"]
    assert fake.cancelled_ids == [JOB_ID]
    assert f"cancelled RunPod job {JOB_ID}" in caplog.text


async def test_aclose_leaves_a_given_session_open(fake: FakeRunPod) -> None:
    async with aiohttp.ClientSession() as session:
        provider = make_provider(fake, API_KEY, session=session)
        fake.polls = [polled("COMPLETED", "ok")]

        chunks = await collect(provider)
        await provider.aclose()

        assert text_of(chunks) == "ok"
        assert not session.closed
