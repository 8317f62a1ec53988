"""The ai-chat job end to end, in-process: BullMQ (real Redis) → Postgres → simulator → events."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import orjson
import pytest

from tests.support import (
    ChatJob,
    QueueWatcher,
    enqueue,
    final_status,
    job_state,
    record_events,
    running_worker,
    seed_chat_job,
    settings_for_test,
)
from uvian_worker.executors.chat import reply_message_id
from uvian_worker.providers.simulator import RunningSimulator, scripted_reply
from uvian_worker.store.database import Database
from uvian_worker.store.records import ASSISTANT_PROFILE_ID


async def run_chat(
    simulator: RunningSimulator,
    chat: ChatJob,
    data: Any = None,
    *,
    name: str = "ai-chat",
    attempts: int = 3,
    **overrides: Any,
) -> tuple[Any, Any, list[tuple[str, dict[str, Any]]]]:
    """Enqueue one job, run a worker until its final status event; returns state, job, events."""
    settings = settings_for_test(simulator.url, **overrides)
    patterns = (f"job:{chat.job_id}:*", f"conversation:{chat.conversation_id}:*")
    async with record_events(*patterns) as recorder, running_worker(settings):
        await enqueue(
            settings, name, chat.data if data is None else data, str(chat.job_id), attempts=attempts
        )
        await recorder.wait_for(final_status(chat.job_id))
        state, job = await job_state(settings, str(chat.job_id))
    return state, job, recorder.events


async def job_row(database: Database, chat: ChatJob) -> Any:
    async with database.transaction() as conn:
        return await conn.fetchrow("select * from public.jobs where id = $1", chat.job_id)


async def replies(database: Database, chat: ChatJob) -> list[Any]:
    async with database.transaction() as conn:
        return list(
            await conn.fetch(
                "select * from public.messages where conversation_id = $1 and message_type = 'ai'"
                " and job_id is not null",
                chat.conversation_id,
            )
        )


@pytest.mark.parametrize("pooler", ["transaction", "none"])
async def test_chat_job_saves_and_publishes_one_reply(
    database: Database, simulator: RunningSimulator, pooler: str
) -> None:
    chat = await seed_chat_job(database, "What should we cook tonight?")

    state, job, events = await run_chat(simulator, chat, database_pooler=pooler)

    assert state == "completed"
    result = job.returnvalue
    assert result["status"] == "completed"
    assert result["messageId"] == str(reply_message_id(chat.job_id))
    assert result["model"] == "uvian-sim-1"
    assert result["content"] == "".join(scripted_reply("What should we cook tonight?", 24))
    assert isinstance(result["tokensUsed"], int) and result["tokensUsed"] > 0

    [reply] = await replies(database, chat)
    assert str(reply["id"]) == result["messageId"]
    assert reply["content"] == result["content"]
    assert reply["sender_id"] == ASSISTANT_PROFILE_ID
    assert reply["reply_to_id"] == chat.message_id
    assert reply["status"] == "completed"
    metadata = orjson.loads(reply["metadata"])
    assert metadata["jobId"] == str(chat.job_id)
    assert metadata["attempt"] == 1
    assert metadata["model"] == "uvian-sim-1"
    assert metadata["usage"]["totalTokens"] == result["tokensUsed"]

    row = await job_row(database, chat)
    assert row["status"] == "completed"
    assert row["attempts"] == 1
    assert orjson.loads(row["output"]) == result

    statuses = [e["status"] for c, e in events if c == f"job:{chat.job_id}:status"]
    assert statuses == ["processing", "completed"]
    [response] = [e for c, e in events if e.get("type") == "ai_response"]
    assert response["messageId"] == result["messageId"]
    assert response["content"] == result["content"]
    assert response["conversationId"] == str(chat.conversation_id)
    assert response["replyToId"] == str(chat.message_id)


async def test_prompt_holds_system_history_oldest_first_and_new_message(
    database: Database, simulator: RunningSimulator
) -> None:
    chat = await seed_chat_job(database, "And for dessert?", history=3)

    await run_chat(simulator, chat)

    messages: Any = simulator.stats.prompts[-1]
    assert messages[0]["role"] == "system" and "Dinner plans" in messages[0]["content"]
    assert [(m["role"], m["content"]) for m in messages[1:]] == [
        ("user", "Hi, I need ideas for dinner"),
        ("assistant", "Happy to help! What do you have at home?"),
        ("user", "We have rice and eggs"),
        ("user", "And for dessert?"),
    ]


def _bad(chat: ChatJob, **changes: Any) -> dict[str, Any]:
    data = {**chat.input, **changes}
    return {"jobId": str(chat.job_id), "input": {k: v for k, v in data.items() if v is not ...}}


PREFIX = "invalid ai-chat input: "
BAD_INPUTS: list[tuple[str, Any, str]] = [
    (
        "input not an object",
        lambda c: {"jobId": str(c.job_id), "input": "hello"},
        "job data.input must be a JSON object",
    ),
    ("data is a list", lambda c: [1, 2], "job data must be a JSON object"),
    ("data is a string", lambda c: "hello", "job data must be a JSON object"),
    ("missing message", lambda c: _bad(c, message=...), PREFIX + "message is required"),
    ("message not a string", lambda c: _bad(c, message=42), PREFIX + "message must be a string"),
    ("empty message", lambda c: _bad(c, message=""), PREFIX + "message must not be empty"),
    ("userId not a uuid", lambda c: _bad(c, userId="admin' --"), PREFIX + "userId must be a UUID"),
    (
        "conversationId null",
        lambda c: _bad(c, conversationId=None),
        PREFIX + "conversationId must be a UUID",
    ),
    ("messageId a number", lambda c: _bad(c, messageId=7), PREFIX + "messageId must be a UUID"),
    (
        "huge message",
        lambda c: _bad(c, message="a" * 20_000),
        PREFIX + "message is too long (20000 characters, the limit is 16000)",
    ),
    (
        "control character",
        lambda c: _bad(c, message="hi\x00there"),
        PREFIX + "message contains a forbidden character U+0000",
    ),
    (
        "escape character",
        lambda c: _bad(c, message="\x1b[2Jhi"),
        PREFIX + "message contains a forbidden character U+001B",
    ),
    (
        "extra field with a 70-bit integer",
        lambda c: _bad(c, message="hi\x00", extra=2**70),
        PREFIX + "message contains a forbidden character U+0000",
    ),
    (
        "lone surrogate",
        lambda c: _bad(c, message="hi \ud800"),
        PREFIX + "message is not valid Unicode text",
    ),
]


@pytest.mark.parametrize(("case", "make", "reason"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
async def test_bad_input_fails_at_once_without_retry(
    database: Database, simulator: RunningSimulator, case: str, make: Any, reason: str
) -> None:
    chat = await seed_chat_job(database)
    before = simulator.stats.count("streams_started")

    state, job, events = await run_chat(simulator, chat, make(chat), max_message_chars=16_000)

    assert state == "failed"
    assert job.failedReason == reason
    assert job.attemptsMade == 1
    assert simulator.stats.count("streams_started") == before
    row = await job_row(database, chat)
    assert row["status"] == "failed"
    assert row["error_message"] == reason
    assert row["error_kind"] == "invalid_input"
    [failed] = [e for c, e in events if e.get("status") == "failed"]
    assert failed["willRetry"] is False and failed["attempt"] == 1
    assert await replies(database, chat) == []


async def test_user_outside_the_conversation_is_refused(
    database: Database, simulator: RunningSimulator
) -> None:
    chat = await seed_chat_job(database)
    data = _bad(chat, userId=str(chat.outsider_id))

    state, job, _events = await run_chat(simulator, chat, data)

    assert state == "failed" and job.attemptsMade == 1
    assert "is not a member of conversation" in job.failedReason
    assert (await job_row(database, chat))["error_kind"] == "not_authorized"


async def test_unknown_job_name_fails_without_retry(
    database: Database, simulator: RunningSimulator
) -> None:
    chat = await seed_chat_job(database)

    state, job, _events = await run_chat(simulator, chat, name="make-coffee")

    assert state == "failed" and job.attemptsMade == 1
    assert "unknown job name 'make-coffee'" in job.failedReason


async def test_message_from_another_conversation_is_not_found(
    database: Database, simulator: RunningSimulator
) -> None:
    chat = await seed_chat_job(database)
    other = await seed_chat_job(database)

    state, job, _events = await run_chat(
        simulator, chat, _bad(chat, messageId=str(other.message_id))
    )

    assert state == "failed" and job.attemptsMade == 1
    assert f"message {other.message_id} is not in conversation" in job.failedReason


async def test_job_id_that_is_not_a_uuid_fails_cleanly(simulator: RunningSimulator) -> None:
    settings = settings_for_test(simulator.url)
    async with running_worker(settings), QueueWatcher.open(settings) as watcher:
        await enqueue(settings, "ai-chat", {"input": {}}, "not-a-uuid")
        event, fields = await watcher.finished("not-a-uuid")
        state, job = await job_state(settings, "not-a-uuid")
    assert event == "failed" and state == "failed"
    assert fields["failedReason"] == "job id 'not-a-uuid' is not a UUID in its canonical form"
    assert job.attemptsMade == 1


async def test_transient_provider_failure_uses_every_attempt(
    database: Database, simulator: RunningSimulator
) -> None:
    chat = await seed_chat_job(database, "Tell me a joke [[sim:fault=http_500]]")

    state, job, events = await run_chat(simulator, chat, attempts=3)

    assert state == "failed"
    assert job.attemptsMade == 3
    statuses = [
        (e["status"], e["attempt"], e.get("willRetry"))
        for c, e in events
        if c == f"job:{chat.job_id}:status"
    ]
    assert statuses == [
        ("processing", 1, None),
        ("failed", 1, True),
        ("processing", 2, None),
        ("failed", 2, True),
        ("processing", 3, None),
        ("failed", 3, False),
    ]
    row = await job_row(database, chat)
    assert row["status"] == "failed" and row["attempts"] == 3
    assert row["error_kind"] == "provider_unavailable"
    assert await replies(database, chat) == []


async def test_request_the_model_rejects_fails_at_once(
    database: Database, simulator: RunningSimulator
) -> None:
    chat = await seed_chat_job(database, "A very long story [[sim:fault=http_400]]")

    state, job, _events = await run_chat(simulator, chat, attempts=3)

    assert state == "failed" and job.attemptsMade == 1
    row = await job_row(database, chat)
    assert row["error_kind"] == "provider_rejected"


async def test_running_a_job_again_keeps_its_one_reply(
    database: Database, simulator: RunningSimulator
) -> None:
    chat = await seed_chat_job(database)
    _state, first, _ = await run_chat(simulator, chat)

    # The same job delivered again (say its worker died between the commit and
    # BullMQ's acknowledgement): the job row says it is done, so no second reply.
    chat_again = ChatJob(**{**chat.__dict__})
    _state, second, events = await run_chat(simulator, chat_again)

    assert second.returnvalue == first.returnvalue
    assert len(await replies(database, chat)) == 1
    assert not [e for c, e in events if e.get("type") == "ai_response"]
    statuses = [e["status"] for c, e in events if c == f"job:{chat.job_id}:status"]
    assert statuses == ["completed"]


def test_reply_ids_are_stable_per_job() -> None:
    job_id = uuid4()
    assert reply_message_id(job_id) == reply_message_id(job_id)
    assert reply_message_id(job_id) != reply_message_id(uuid4())


async def test_long_history_is_trimmed_to_the_token_budget(
    database: Database, simulator: RunningSimulator
) -> None:
    chat = await seed_chat_job(database, "Summarize, please", history=0)
    async with database.transaction() as conn:
        for step in range(40):
            await conn.execute(
                "insert into public.messages (conversation_id, sender_id, content, created_at)"
                " values ($1, $2, $3, now() - make_interval(secs => $4))",
                chat.conversation_id,
                chat.user_id,
                f"note {step}: " + "word " * 60,
                100.0 - step,
            )
    # 1,024 context tokens - 64 for the reply - 0 margin: room for about ten notes.
    state, _job, _events = await run_chat(
        simulator, chat, model_context_tokens=1024, reply_max_tokens=64, context_margin_tokens=0
    )

    assert state == "completed"
    prompt: Any = simulator.stats.prompts[-1]
    history = prompt[1:-1]
    assert 5 < len(history) < 40
    assert [m["content"].split(":")[0] for m in history] == [
        f"note {n}" for n in range(40 - len(history), 40)
    ]
    assert prompt[-1]["content"] == "Summarize, please"
    [reply] = await replies(database, chat)
    metadata = orjson.loads(reply["metadata"])
    assert metadata["historyMessages"] == len(history)
    assert metadata["historyTrimmed"] is True


async def test_usage_is_counted_when_the_provider_reports_none(
    database: Database, simulator: RunningSimulator
) -> None:
    chat = await seed_chat_job(database, "Count yourself [[sim:usage=none]] [[sim:tokens=30]]")

    state, job, _events = await run_chat(simulator, chat)

    assert state == "completed"
    [reply] = await replies(database, chat)
    usage = orjson.loads(reply["metadata"])["usage"]
    assert usage["estimated"] is True
    assert usage["completionTokens"] > 0 and usage["promptTokens"] > 0
    assert job.returnvalue["tokensUsed"] == usage["totalTokens"]
    [attempt] = orjson.loads(reply["metadata"])["attempts"]
    assert attempt == {**attempt, "attempt": 1, "status": "completed", "usage": usage}


async def test_valid_message_with_odd_extra_fields_still_gets_its_reply(
    database: Database, simulator: RunningSimulator
) -> None:
    chat = await seed_chat_job(database, "Hello")
    nested: Any = "leaf"
    for _ in range(300):
        nested = [nested]
    data = _bad(chat, hugeNumber=2**70, deep=nested)

    state, job, _events = await run_chat(simulator, chat, data)

    assert state == "completed" and job.attemptsMade == 1
    row = await job_row(database, chat)
    assert row["status"] == "completed"
