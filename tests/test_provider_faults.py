"""Slow and broken model servers: retry policy, streaming deadlines, failed replies.

The simulator injects the faults for real over HTTP (see providers/simulator/).
"""

from __future__ import annotations

import random
from datetime import datetime
from typing import Any

import orjson
import pytest

from tests.support import (
    ChatJob,
    ask_to_stop,
    chat_job_running,
    final_status,
    job_state,
    seed_chat_job,
    settings_for_test,
)
from uvian_worker.providers.simulator import RunningSimulator
from uvian_worker.runtime.retry import MAX_DELAY_MS, retry_delay_ms
from uvian_worker.store.database import Database


async def run_until_final(
    simulator: RunningSimulator, chat: ChatJob, *, attempts: int = 1, **overrides: Any
) -> tuple[Any, Any, list[tuple[str, dict[str, Any]]]]:
    settings = settings_for_test(simulator.url, **overrides)
    async with chat_job_running(settings, chat, attempts=attempts) as rec:
        await rec.wait_for(final_status(chat.job_id))
        state, job = await job_state(settings, str(chat.job_id))
    return state, job, rec.events


async def job_row(database: Database, chat: ChatJob) -> Any:
    async with database.transaction() as conn:
        return await conn.fetchrow("select * from public.jobs where id = $1", chat.job_id)


def statuses(chat: ChatJob, events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [e for c, e in events if c == f"job:{chat.job_id}:status"]


def test_retry_delay_grows_is_capped_and_jittered() -> None:
    rng = random.Random(7)
    delays = [retry_delay_ms(n, base_delay_ms=1000, rng=rng) for n in range(1, 12)]
    for attempt, delay in enumerate(delays, start=1):
        ceiling = min(1000 * 2 ** (attempt - 1), MAX_DELAY_MS)
        assert ceiling // 2 <= delay <= ceiling
    assert max(delays) <= MAX_DELAY_MS
    assert len(set(delays[-4:])) > 1  # capped delays still spread


def test_retry_after_is_never_cut_short() -> None:
    assert retry_delay_ms(1, base_delay_ms=100, retry_after_s=7) == 7000
    assert retry_delay_ms(1, base_delay_ms=100, retry_after_s=10**9) == 600_000


async def test_429_waits_for_retry_after(database: Database, simulator: RunningSimulator) -> None:
    chat = await seed_chat_job(database, "Busy? [[sim:fault=http_429]]")

    state, job, events = await run_until_final(simulator, chat, attempts=2)

    assert state == "failed" and job.attemptsMade == 2
    first_failure, second_start = statuses(chat, events)[1:3]
    assert first_failure["willRetry"] is True and first_failure["retryInMs"] >= 1000
    assert first_failure["errorKind"] == "provider_unavailable"
    gap_s = (
        datetime.fromisoformat(second_start["timestamp"])
        - datetime.fromisoformat(first_failure["timestamp"])
    ).total_seconds()
    assert gap_s >= 0.99


@pytest.mark.parametrize(
    ("message", "overrides", "expected"),
    [
        (
            "Slow start [[sim:delay_ms=5000]]",
            {"first_token_timeout_s": 0.3},
            "provider deadline passed: no first token within 0.3 s",
        ),
        (
            "Stalls [[sim:fault=stall]]",
            {"chunk_gap_timeout_s": 0.3},
            "provider deadline passed: no new text for 0.3 s",
        ),
        (
            "Too long [[sim:tokens=500]] [[sim:tps=50]]",
            {"reply_timeout_s": 0.5},
            "provider deadline passed: reply not finished within 0.5 s",
        ),
    ],
    ids=["first token", "gap (keep-alives only)", "whole reply"],
)
@pytest.mark.parametrize("protocol", ["openai", "native"])
async def test_deadline_closes_upstream_and_is_transient(
    database: Database,
    simulator: RunningSimulator,
    protocol: str,
    message: str,
    overrides: dict[str, Any],
    expected: str,
) -> None:
    chat = await seed_chat_job(database, message)
    closed_before = simulator.stats.count("closed_early")
    cancelled_before = simulator.stats.count("runpod_cancelled")

    state, job, _events = await run_until_final(
        simulator, chat, simulator_protocol=protocol, **overrides
    )

    assert state == "failed" and job.failedReason == expected
    assert (await job_row(database, chat))["error_kind"] == "provider_timeout"
    if protocol == "openai":
        await simulator.stats.wait_for("closed_early", closed_before + 1)
    else:
        await simulator.stats.wait_for("runpod_cancelled", cancelled_before + 1)


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        ("truncate", "stream_truncated"),
        ("reset", "provider_unavailable"),
        ("error_mid_stream", "provider_failed"),
        ("http_500", "provider_unavailable"),
    ],
)
async def test_broken_stream_is_retried_and_the_reply_ends_failed(
    database: Database, simulator: RunningSimulator, fault: str, kind: str
) -> None:
    chat = await seed_chat_job(database, f"Break [[sim:fault={fault}]]")

    state, job, events = await run_until_final(simulator, chat, attempts=2)

    assert state == "failed" and job.attemptsMade == 2
    seen = [(e["status"], e["attempt"], e.get("willRetry")) for e in statuses(chat, events)]
    assert seen == [
        ("processing", 1, None),
        ("failed", 1, True),
        ("processing", 2, None),
        ("failed", 2, False),
    ]
    assert all(e.get("errorKind") in (None, kind) for e in statuses(chat, events))
    finals = [e for _c, e in events if e.get("type") == "ai_response"]
    async with database.transaction() as conn:
        reply = await conn.fetchrow("select * from public.messages where job_id = $1", chat.job_id)
    if fault == "http_500":
        assert finals == [] and reply is None  # no token ever streamed: no reply was started
        return
    [final] = finals
    assert final["status"] == "failed" and reply["status"] == "failed"
    assert final["content"] == reply["content"] != ""
    attempts = orjson.loads(reply["metadata"])["attempts"]
    assert [(a["attempt"], a["status"], a["errorKind"]) for a in attempts] == [
        (1, "retried", kind),
        (2, "failed", kind),
    ]


async def test_request_too_long_for_the_model_fails_without_retry(
    database: Database, simulator: RunningSimulator
) -> None:
    chat = await seed_chat_job(database, "word " * 3000)

    state, job, _events = await run_until_final(
        simulator, chat, attempts=3, model_context_tokens=2048, reply_max_tokens=256
    )

    assert state == "failed" and job.attemptsMade == 1
    assert job.failedReason.startswith("message is too long for the model's context: ")


async def test_stop_between_attempts_ends_the_earlier_attempts_reply(
    database: Database, simulator: RunningSimulator
) -> None:
    chat = await seed_chat_job(database, "Breaks once [[sim:fault=truncate]]")
    settings = settings_for_test(simulator.url)
    async with chat_job_running(settings, chat, backoff_ms=1500) as rec:
        await rec.wait_for(lambda c, e: e.get("willRetry") is True)
        await ask_to_stop(chat.job_id, "not needed any more")
        await rec.wait_for(final_status(chat.job_id))
    [final] = [e for _c, e in rec.events if e.get("type") == "ai_response"]
    assert final["status"] == "stopped" and final["content"]
    assert statuses(chat, rec.events)[-1]["status"] == "cancelled"
    async with database.transaction() as conn:
        reply = await conn.fetchrow("select * from public.messages where job_id = $1", chat.job_id)
    assert reply["status"] == "stopped" and reply["content"] == final["content"]


async def test_last_attempt_failing_before_text_ends_the_earlier_attempts_reply(
    database: Database, simulator: RunningSimulator
) -> None:
    chat = await seed_chat_job(database, "Breaks, then the server is gone [[sim:fault=truncate]]")
    settings = settings_for_test(simulator.url)
    async with chat_job_running(settings, chat, attempts=2, backoff_ms=1500) as rec:
        await rec.wait_for(lambda c, e: e.get("willRetry") is True)
        await simulator.stop()  # the second attempt finds no server: no text at all
        await rec.wait_for(final_status(chat.job_id))
    [final] = [e for _c, e in rec.events if e.get("type") == "ai_response"]
    assert final["status"] == "failed" and final["content"]
    async with database.transaction() as conn:
        reply = await conn.fetchrow("select * from public.messages where job_id = $1", chat.job_id)
    assert reply["status"] == "failed"
