"""The RunPod provider when the job fails, an HTTP call fails, or the reply is closed
or cancelled before the end, against a local server that plays RunPod's job API.

Replies that arrive whole are in test_runpod_provider_stream.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tests.runpod_server import (
    API_KEY,
    JOB_ID,
    REQUEST,
    WAIT_S,
    Answer,
    Drop,
    FakeRunPod,
    Hold,
    collect,
    make_provider,
    polled,
    running_fake,
    text_of,
    tokens,
)
from uvian_worker.errors import (
    ProviderFailed,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    WorkerError,
)
from uvian_worker.providers import runpod
from uvian_worker.providers.base import ReplyChunk
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
