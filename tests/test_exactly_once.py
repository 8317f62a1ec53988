"""Exactly one reply per job, whatever runs it: two runs of one job at once (a run whose
lock lapsed while a newer run took the job over) end with one reply and one final event."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.support import TEST_REDIS_URL, final_status, record_events, seed_chat_job
from uvian_worker.errors import ReplySuperseded
from uvian_worker.events import RedisPublisher
from uvian_worker.executors.base import JobContext
from uvian_worker.executors.chat import ChatExecutor, ChatOptions
from uvian_worker.executors.context import TiktokenCounter
from uvian_worker.executors.reply import ReplyOptions
from uvian_worker.providers.deadlines import Deadlines
from uvian_worker.providers.openai import OpenAIProvider
from uvian_worker.providers.simulator import RunningSimulator
from uvian_worker.runtime.connections import make_redis
from uvian_worker.store.chat import ChatRepository
from uvian_worker.store.database import Database


def executor(
    database: Database, simulator: RunningSimulator, publisher: Any
) -> tuple[ChatExecutor, OpenAIProvider]:
    options = ChatOptions(
        history_limit=20,
        max_message_chars=1000,
        reply_max_tokens=512,
        temperature=0.5,
        deadlines=Deadlines(first_token_s=5, chunk_gap_s=5, total_s=30),
        counter=TiktokenCounter(),
        prompt_budget_tokens=4000,
        reply=ReplyOptions(delta_window_s=0.02, save_interval_s=0.05),
    )
    provider = OpenAIProvider(base_url=f"{simulator.url}/v1", model="uvian-sim-1")
    chat = ChatExecutor(ChatRepository(database), provider, publisher, options, default_model="m")
    return chat, provider


@pytest.mark.parametrize("winner", ["newer", "older"])
async def test_two_runs_of_one_job_leave_one_reply_and_one_final_event(
    database: Database, simulator: RunningSimulator, winner: str
) -> None:
    # The older run streams slowly; the newer, started mid-way, is fast (or the reverse).
    slow, fast = "[[sim:tokens=60]] [[sim:tps=60]]", "[[sim:tokens=10]] [[sim:tps=500]]"
    chat = await seed_chat_job(database, "Race " + (slow if winner == "newer" else fast))
    client = make_redis(TEST_REDIS_URL, connect_timeout_s=2)
    publisher = RedisPublisher(client)
    run, provider = executor(database, simulator, publisher)

    def context() -> JobContext:
        return JobContext(chat.job_id, "ai-chat", chat.input, attempt=1, max_attempts=3)

    async with record_events(
        f"conversation:{chat.conversation_id}:*", f"job:{chat.job_id}:*"
    ) as rec:
        older = asyncio.create_task(run.run(context()))
        await rec.wait_for(lambda c, e: e.get("type") == "ai_delta")
        newer = asyncio.create_task(run.run(context()))
        outcomes = await asyncio.gather(older, newer, return_exceptions=True)
        await rec.wait_for(final_status(chat.job_id))
    await client.aclose()
    await provider.aclose()

    results = [o for o in outcomes if isinstance(o, dict)]
    assert results, outcomes
    assert all(isinstance(o, dict | ReplySuperseded) for o in outcomes), outcomes
    async with database.transaction() as conn:
        rows = await conn.fetch("select * from public.messages where job_id = $1", chat.job_id)
        job_row = await conn.fetchrow("select * from public.jobs where id = $1", chat.job_id)
    [reply] = rows
    finals = [e for _c, e in rec.events if e.get("type") == "ai_response"]
    assert len(finals) == 1
    assert reply["status"] == "completed" and finals[0]["content"] == reply["content"]
    assert all(r["content"] == reply["content"] for r in results)
    assert job_row["status"] == "completed"
