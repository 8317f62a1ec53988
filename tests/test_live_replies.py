"""Live replies: deltas as the API receives them, the resumable stream, stop, and turns."""

from __future__ import annotations

import itertools
import time
from typing import Any

import orjson
import pytest
import redis.asyncio as redis

from tests.support import (
    TEST_REDIS_URL,
    ChatJob,
    ask_to_stop,
    chat_job_running,
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
from uvian_worker.settings import Settings
from uvian_worker.store.database import Database


def is_reply_event(chat: ChatJob) -> Any:
    return lambda channel, event: channel == f"conversation:{chat.conversation_id}:messages"


def deltas_of(events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [e for _c, e in events if e.get("type") == "ai_delta"]


async def reply_row(database: Database, chat: ChatJob) -> Any:
    async with database.transaction() as conn:
        return await conn.fetchrow("select * from public.messages where job_id = $1", chat.job_id)


async def test_deltas_are_ordered_coalesced_and_add_up_to_the_saved_reply(
    database: Database, simulator: RunningSimulator
) -> None:
    message = "Tell me about café culture [[sim:tokens=120]] [[sim:tps=400]]"
    chat = await seed_chat_job(database, message)
    settings = settings_for_test(simulator.url, reply_delta_window_ms=50)

    async with chat_job_running(settings, chat) as rec:
        await rec.wait_for(final_status(chat.job_id))

    deltas = deltas_of(rec.events)
    [final] = [e for _c, e in rec.events if e.get("type") == "ai_response"]
    expected = "".join(scripted_reply(message, 120))
    assert "".join(d["delta"] for d in deltas) == expected == final["content"]
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert deltas[0]["restart"] is True and all("restart" not in d for d in deltas[1:])
    assert all(d["messageId"] == str(reply_message_id(chat.job_id)) for d in deltas)
    # 120 tokens at 400 tokens/s take ~300 ms: a 50 ms window allows only a handful of deltas.
    assert 2 <= len(deltas) <= 12, len(deltas)
    assert "🚀" in expected and "é" in expected
    # The final event comes after every delta.
    order = [e.get("type") for _c, e in rec.events if "type" in e and e["type"] != "job_status"]
    assert order[-1] == "ai_response"
    assert (await reply_row(database, chat))["content"] == expected


async def test_a_stream_too_fast_for_its_window_is_cut_at_the_size_threshold(
    database: Database, simulator: RunningSimulator
) -> None:
    # The provider reads once per window; a window that brought more than
    # REPLY_DELTA_MAX_CHARS makes the reads eager, so later deltas keep to the threshold.
    message = "Fast and long [[sim:tokens=400]] [[sim:tps=400]]"  # 1 s of text
    chat = await seed_chat_job(database, message)
    settings = settings_for_test(simulator.url, reply_delta_window_ms=300, reply_delta_max_chars=60)

    async with chat_job_running(settings, chat) as rec:
        await rec.wait_for(final_status(chat.job_id))

    deltas = [d["delta"] for d in deltas_of(rec.events)]
    expected = "".join(scripted_reply(message, 400))
    assert "".join(deltas) == expected
    longest_token = max(len(token) for token in scripted_reply(message, 400))
    oversized = [len(d) for d in deltas if len(d) >= 60 + longest_token]
    # The first paced window (and at most one more) may bring more than the threshold.
    assert len(oversized) <= 2, [len(d) for d in deltas]
    # Paced without that, the 1 s reply would be four deltas, each of them oversized.
    assert len(deltas) >= 10


async def test_reply_stream_can_be_read_from_a_middle_sequence_number(
    database: Database, simulator: RunningSimulator
) -> None:
    message = "Stream me [[sim:tokens=80]] [[sim:tps=300]]"
    chat = await seed_chat_job(database, message)
    settings = settings_for_test(simulator.url, reply_delta_window_ms=20)

    async with (
        record_events(f"job:{chat.job_id}:*") as rec,
        running_worker(settings),
    ):
        await enqueue(settings, "ai-chat", chat.data, str(chat.job_id))
        await rec.wait_for(final_status(chat.job_id))

    client = redis.Redis.from_url(TEST_REDIS_URL, decode_responses=True)
    try:
        key = f"reply:{reply_message_id(chat.job_id)}:deltas"
        everything = await client.xrange(key, "-", "+")
        middle = len(everything) // 2
        tail = await client.xrange(key, f"0-{middle}", "+")
        ttl_s = await client.ttl(key)
    finally:
        await client.aclose()

    *entries, end = everything
    assert end[1]["final"] == "completed"
    text = "".join(fields["delta"] for _id, fields in entries)
    assert text == "".join(scripted_reply(message, 80))
    assert [int(f["seq"]) for _i, f in tail] == list(range(middle, len(everything) + 1))
    assert (
        "".join(f.get("delta", "") for _i, f in tail)
        == text[len("".join(f["delta"] for _i, f in entries[: middle - 1])) :]
    )
    assert 0 < ttl_s <= 300


async def stop_mid_stream(
    database: Database, simulator: RunningSimulator, settings: Settings
) -> tuple[ChatJob, list[tuple[str, dict[str, Any]]], float]:
    """Start a long reply, publish a stop after its first deltas; returns the stop's latency."""
    chat = await seed_chat_job(database, "Go on forever [[sim:tokens=2000]] [[sim:tps=50]]")
    async with chat_job_running(settings, chat) as rec:
        await rec.wait_for(lambda c, e: e.get("type") == "ai_delta", count=3)
        sent_s = time.monotonic()
        await ask_to_stop(chat.job_id, orjson.dumps({"reason": "user"}))
        await simulator.stats.wait_for(
            "closed_early" if settings.simulator_protocol.value == "openai" else "runpod_cancelled"
        )
        closed_s = (simulator.stats.last_disconnect_at or 0) - sent_s
        await rec.wait_for(final_status(chat.job_id))
        state, job = await job_state(settings, str(chat.job_id))
    assert state == "failed" and job.attemptsMade == 1
    assert job.failedReason == "user"
    return chat, rec.events, closed_s


@pytest.mark.parametrize("protocol", ["openai", "native"])
async def test_stop_closes_the_upstream_and_saves_the_partial_reply(
    database: Database, simulator: RunningSimulator, protocol: str
) -> None:
    settings = settings_for_test(simulator.url, simulator_protocol=protocol)

    chat, events, closed_s = await stop_mid_stream(database, simulator, settings)

    print(f"stop to upstream closed ({protocol}): {closed_s * 1000:.1f} ms")
    assert 0 <= closed_s < 0.2, f"upstream closed {closed_s * 1000:.0f} ms after the stop"
    [final] = [e for _c, e in events if e.get("type") == "ai_response"]
    assert final["status"] == "stopped"
    streamed = "".join(d["delta"] for d in deltas_of(events))
    assert final["content"] == streamed and streamed
    row = await reply_row(database, chat)
    assert row["status"] == "stopped" and row["content"] == streamed
    statuses = [e["status"] for c, e in events if c == f"job:{chat.job_id}:status"]
    assert statuses == ["processing", "cancelled"]
    async with database.transaction() as conn:
        job_row = await conn.fetchrow("select * from public.jobs where id = $1", chat.job_id)
    assert job_row["status"] == "cancelled" and job_row["error_message"] == "user"


async def test_stop_before_start_never_calls_the_provider(
    database: Database, simulator: RunningSimulator
) -> None:
    chat = await seed_chat_job(database)
    settings = settings_for_test(simulator.url)
    before = simulator.stats.count("streams_started")
    async with record_events(f"job:{chat.job_id}:*") as rec, running_worker(settings) as app:
        await app.control.ready.wait()
        await ask_to_stop(chat.job_id, "changed my mind")
        await enqueue(settings, "ai-chat", chat.data, str(chat.job_id))
        await rec.wait_for(final_status(chat.job_id))
        state, job = await job_state(settings, str(chat.job_id))

    assert state == "failed" and job.attemptsMade == 1
    assert job.failedReason == "cancelled before it started: changed my mind"
    assert simulator.stats.count("streams_started") == before
    assert [e["status"] for c, e in rec.events if c.endswith(":status")] == ["cancelled"]
    assert await reply_row(database, chat) is None


async def test_two_replies_in_one_conversation_never_stream_at_once(
    database: Database, simulator: RunningSimulator
) -> None:
    first = await seed_chat_job(database, "First [[sim:tokens=30]] [[sim:tps=200]]")
    async with database.transaction() as conn:
        second_message = await conn.fetchval(
            "insert into public.messages (conversation_id, sender_id, content) values ($1, $2, $3)"
            " returning id",
            first.conversation_id,
            first.user_id,
            "Second [[sim:tokens=30]]",
        )
    second = ChatJob(
        job_id=__import__("uuid").uuid4(),
        conversation_id=first.conversation_id,
        user_id=first.user_id,
        message_id=second_message,
        outsider_id=first.outsider_id,
        input={
            **first.input,
            "message": "Second [[sim:tokens=30]]",
            "messageId": str(second_message),
        },
    )
    other = await seed_chat_job(database, "Elsewhere [[sim:tokens=30]] [[sim:tps=200]]")
    settings = settings_for_test(simulator.url, worker_concurrency=4)

    async with (
        record_events(
            "job:*:status",
            f"conversation:{first.conversation_id}:*",
            f"conversation:{other.conversation_id}:*",
        ) as rec,
        running_worker(settings),
    ):
        for chat in (first, second, other):
            await enqueue(settings, "ai-chat", chat.data, str(chat.job_id))
        for chat in (first, second, other):
            await rec.wait_for(final_status(chat.job_id))

    timeline = [
        (e["jobId"], e.get("type"))
        for _c, e in rec.events
        if e.get("type") in ("ai_delta", "ai_response")
    ]
    mine = [job for job, _ in timeline if job in (str(first.job_id), str(second.job_id))]
    # One conversation: all of one reply's events, then all of the other's.
    switches = sum(1 for a, b in itertools.pairwise(mine) if a != b)
    assert switches == 1, mine
    # The other conversation was not held up: it streamed while the first pair did.
    other_events = [i for i, (job, _) in enumerate(timeline) if job == str(other.job_id)]
    pair_events = [i for i, (job, _) in enumerate(timeline) if job != str(other.job_id)]
    assert other_events[0] < pair_events[-1]


async def test_newer_job_supersedes_the_streaming_one_when_configured(
    database: Database, simulator: RunningSimulator
) -> None:
    first = await seed_chat_job(database, "Long one [[sim:tokens=3000]] [[sim:tps=50]]")
    async with database.transaction() as conn:
        newer_message = await conn.fetchval(
            "insert into public.messages (conversation_id, sender_id, content) values ($1, $2, $3)"
            " returning id",
            first.conversation_id,
            first.user_id,
            "Actually, short",
        )
    newer_id = __import__("uuid").uuid4()
    newer_data = {
        "jobId": str(newer_id),
        "input": {**first.input, "message": "Actually, short", "messageId": str(newer_message)},
    }
    settings = settings_for_test(simulator.url, conversation_mode="supersede")

    async with (
        record_events("job:*:status", f"conversation:{first.conversation_id}:*") as rec,
        running_worker(settings),
    ):
        await enqueue(settings, "ai-chat", first.data, str(first.job_id))
        await rec.wait_for(lambda c, e: e.get("type") == "ai_delta")
        await enqueue(settings, "ai-chat", newer_data, str(newer_id))
        await rec.wait_for(final_status(newer_id))
        await rec.wait_for(final_status(first.job_id))

    finals = {e["jobId"]: e for _c, e in rec.events if e.get("type") == "ai_response"}
    assert finals[str(first.job_id)]["status"] == "stopped"
    assert finals[str(newer_id)]["status"] == "completed"
    ours = (str(first.job_id), str(newer_id))  # other tests may share this Redis
    statuses = {
        e["jobId"]: e["status"]
        for c, e in rec.events
        if c.endswith(":status")
        and e["status"] in ("completed", "cancelled")
        and e["jobId"] in ours
    }
    assert statuses == {str(first.job_id): "cancelled", str(newer_id): "completed"}


async def test_reply_row_exists_from_the_first_token_and_saves_its_partial_text(
    database: Database, simulator: RunningSimulator
) -> None:
    message = "Slowly now [[sim:tokens=150]] [[sim:tps=60]]"
    chat = await seed_chat_job(database, message)
    settings = settings_for_test(simulator.url, reply_save_interval_s=0.3)

    async with chat_job_running(settings, chat) as rec:
        await rec.wait_for(lambda c, e: e.get("type") == "ai_delta")
        at_first_token = await reply_row(database, chat)
        # 60 tokens/s and 50 ms windows: 25 deltas are over a second of text.
        await rec.wait_for(lambda c, e: e.get("type") == "ai_delta", count=25)
        midway = await reply_row(database, chat)
        await rec.wait_for(final_status(chat.job_id))

    final = await reply_row(database, chat)
    assert at_first_token is not None and at_first_token["status"] == "generating"
    assert midway["status"] == "generating" and midway["content"]
    assert final["content"].startswith(midway["content"]) and final["content"] != midway["content"]
    assert final["status"] == "completed"


async def test_stop_before_the_first_token_leaves_no_reply(
    database: Database, simulator: RunningSimulator
) -> None:
    chat = await seed_chat_job(database, "Cold start [[sim:delay_ms=3000]]")
    settings = settings_for_test(simulator.url)
    async with chat_job_running(settings, chat) as rec:
        await rec.wait_for(lambda c, e: e.get("status") == "processing")
        await simulator.stats.wait_for("streams_started")
        await ask_to_stop(chat.job_id, "never mind")
        await rec.wait_for(final_status(chat.job_id))
    assert [e["status"] for c, e in rec.events if c.endswith(":status")] == [
        "processing",
        "cancelled",
    ]
    assert not [e for _c, e in rec.events if e.get("type") in ("ai_delta", "ai_response")]
    assert await reply_row(database, chat) is None


async def test_stray_bytes_on_the_cancel_channel_do_not_deafen_the_worker(
    database: Database, simulator: RunningSimulator
) -> None:
    chat = await seed_chat_job(database, "Go on [[sim:tokens=2000]] [[sim:tps=50]]")
    settings = settings_for_test(simulator.url)
    async with (
        record_events(f"job:{chat.job_id}:status") as rec,
        running_worker(settings) as app,
    ):
        await app.control.ready.wait()
        await ask_to_stop("not-a-job", b"\xff\xfe not UTF-8")
        await enqueue(settings, "ai-chat", chat.data, str(chat.job_id))
        await rec.wait_for(lambda c, e: e["status"] == "processing")
        await ask_to_stop(chat.job_id, "stop")
        [(_c, final)] = await rec.wait_for(final_status(chat.job_id))
    assert final["status"] == "cancelled"
