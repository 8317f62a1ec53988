"""The reply sweep: a reply whose job vanished is ended as interrupted, with its final event."""

from __future__ import annotations

from uuid import uuid4

import redis.asyncio as redis

from tests.support import TEST_REDIS_URL, enqueue, record_events, seed_chat_job, settings_for_test
from uvian_worker.app import WorkerApp
from uvian_worker.executors.chat import reply_message_id
from uvian_worker.providers.simulator import RunningSimulator
from uvian_worker.settings import Settings
from uvian_worker.store.chat import ChatRepository
from uvian_worker.store.database import Database
from uvian_worker.store.records import ReplyRecord


def queue_of(settings: Settings) -> str:
    return f"{settings.queue_prefix}:{settings.chat_queue}"


async def abandon_reply(
    database: Database, queue: str, minutes_ago: int = 5
) -> tuple[object, ReplyRecord]:
    """A reply a run opened and never ended (its worker died), last written `minutes_ago`."""
    chat = await seed_chat_job(database)
    record = ReplyRecord(
        message_id=reply_message_id(chat.job_id),
        job_id=chat.job_id,
        run_id=uuid4(),
        conversation_id=chat.conversation_id,
        reply_to_id=chat.message_id,
        content="",
        status="generating",
        metadata={"provider": "simulator", "queue": queue},
    )
    repository = ChatRepository(database)
    assert await repository.start_reply(record)
    assert await repository.save_partial(chat.job_id, record.run_id, "Half a thou")
    async with database.transaction() as conn:
        await conn.execute(
            "update public.messages set updated_at = now() - make_interval(mins => $2)"
            " where job_id = $1",
            chat.job_id,
            minutes_ago,
        )
    return chat, record


async def status_of(database: Database, record: ReplyRecord) -> str:
    async with database.transaction() as conn:
        return str(
            await conn.fetchval(
                "select status from public.messages where id = $1", record.message_id
            )
        )


async def test_reply_of_a_vanished_job_is_interrupted_once(
    database: Database, simulator: RunningSimulator
) -> None:
    settings = settings_for_test(simulator.url, sweep_stale_after_s=60)
    _chat, record = await abandon_reply(database, queue_of(settings))
    app = await WorkerApp.create(settings)
    client = redis.Redis.from_url(TEST_REDIS_URL, decode_responses=True)
    try:
        async with record_events(f"conversation:{record.conversation_id}:*") as rec:
            ended_first = await app.sweeper.sweep_once()
            ended_again = await app.sweeper.sweep_once()
            [(_channel, final)] = await rec.wait_for(lambda c, e: e["type"] == "ai_response")
        stream = await client.xrange(f"reply:{record.message_id}:deltas", "-", "+")
    finally:
        await client.aclose()
        await app.close(0)

    assert ended_first >= 1 and ended_again == 0
    assert await status_of(database, record) == "interrupted"
    assert final["status"] == "interrupted" and final["content"] == "Half a thou"
    assert final["messageId"] == str(record.message_id)
    assert stream[-1][1]["final"] == "interrupted"


async def test_reply_whose_job_will_still_run_is_left_alone(
    database: Database, simulator: RunningSimulator
) -> None:
    settings = settings_for_test(simulator.url)
    chat, record = await abandon_reply(database, queue_of(settings))
    await enqueue(settings, "ai-chat", chat.data, str(chat.job_id))  # waiting; no worker runs
    app = await WorkerApp.create(settings)
    try:
        await app.sweeper.sweep_once()
    finally:
        await app.close(0)
    assert await status_of(database, record) == "generating"


async def test_recently_written_reply_is_left_alone(
    database: Database, simulator: RunningSimulator
) -> None:
    settings = settings_for_test(simulator.url, sweep_stale_after_s=60)
    _chat, record = await abandon_reply(database, queue_of(settings), minutes_ago=0)
    app = await WorkerApp.create(settings)
    try:
        await app.sweeper.sweep_once()
    finally:
        await app.close(0)
    assert await status_of(database, record) == "generating"


async def test_reply_of_another_queue_is_left_to_that_queue_s_workers(
    database: Database, simulator: RunningSimulator
) -> None:
    _chat, record = await abandon_reply(database, "someone-else:ai-jobs")
    app = await WorkerApp.create(settings_for_test(simulator.url, sweep_stale_after_s=60))
    try:
        await app.sweeper.sweep_once()
    finally:
        await app.close(0)
    assert await status_of(database, record) == "generating"
