"""The notification job end to end: BullMQ (real Redis) → Postgres → events, on a worker
in-process that runs the notification executor, and once from the platform's Node producer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import orjson
import pytest

from tests.support import (
    EventRecorder,
    QueueWatcher,
    enqueue,
    final_status,
    job_state,
    record_events,
    settings_for_test,
)
from tests.test_interop_node import node
from tests.test_interop_node import pytestmark as needs_node
from uvian_worker.events import RedisPublisher
from uvian_worker.executors.notification import (
    NotificationExecutor,
    NotificationRecord,
    notification_id,
)
from uvian_worker.runtime.connections import make_redis
from uvian_worker.runtime.lifecycle import QueueOptions, QueueSpec, QueueWorkers
from uvian_worker.runtime.runner import JobRunner
from uvian_worker.settings import Settings
from uvian_worker.store.database import Database
from uvian_worker.store.jobs import JobRepository
from uvian_worker.store.notifications import NotificationRepository
from uvian_worker.store.seed import SeededConversation, add_job_row, seed_conversation

# Settings insist on a provider; this harness builds none, so nothing is ever sent here.
UNUSED_PROVIDER_URL = "http://127.0.0.1:9"


@asynccontextmanager
async def notification_worker(settings: Settings, database: Database) -> AsyncIterator[None]:
    """The notification queue consumed as app.py wires a worker, with only this executor."""
    events_redis = make_redis(
        settings.effective_redis_url, connect_timeout_s=settings.connect_timeout_s
    )
    publisher = RedisPublisher(events_redis)
    executor = NotificationExecutor(NotificationRepository(database), publisher)
    runner = JobRunner({executor.job_name: executor}, JobRepository(database), publisher)
    options = QueueOptions(
        redis_url=settings.effective_redis_url,
        prefix=settings.queue_prefix,
        lock_duration_ms=settings.lock_duration_ms,
        stalled_interval_ms=settings.stalled_interval_ms,
        connect_timeout_s=settings.connect_timeout_s,
    )
    spec = QueueSpec(settings.notification_queue, settings.notification_concurrency)
    queues = QueueWorkers([spec], options, runner)
    queues.start()
    try:
        yield
    finally:
        await queues.close(settings.shutdown_grace_s)
        await events_redis.aclose()


@dataclass
class NotificationJob:
    job_id: UUID
    people: SeededConversation  # member 0 sends, member 1 receives
    input: dict[str, Any]

    @property
    def data(self) -> dict[str, Any]:
        return {"jobId": str(self.job_id), "input": self.input}

    @property
    def recipient(self) -> UUID:
        return UUID(self.input["userId"])

    @property
    def channels(self) -> list[str]:
        everyone = [*self.people.member_ids, self.people.outsider_id, self.input["userId"]]
        return [f"user:{user_id}:notifications" for user_id in everyone]


async def seed_notification_job(
    database: Database, *, recipient: str = "member", **input_changes: Any
) -> NotificationJob:
    """Ada writes to Bo in their conversation; the API asks to notify `recipient`."""
    people = await seed_conversation(
        database, title="Weekend trip", member_names=["Ada", "Bo"], history=[]
    )
    sender_id, member_id = people.member_ids
    user_id = {"member": member_id, "sender": sender_id, "outsider": people.outsider_id}
    job_input: dict[str, Any] = {
        "userId": str(user_id[recipient]),
        "type": "message_notification",
        "data": {
            "conversationId": str(people.conversation_id),
            "senderId": str(sender_id),
            "messagePreview": "Are we still on for Saturday? 🚲",
        },
    } | input_changes
    job_id = uuid4()
    await add_job_row(database, job_id, "notification", job_input)
    return NotificationJob(job_id, people, job_input)


async def run_notification(
    database: Database, job: NotificationJob, data: Any = None
) -> tuple[Any, Any, EventRecorder]:
    """Enqueue on a queue prefix of its own and run until BullMQ and the events say it ended."""
    settings = settings_for_test(UNUSED_PROVIDER_URL)
    queue = settings.notification_queue
    data = job.data if data is None else data
    async with (
        record_events(f"job:{job.job_id}:*", *job.channels) as recorder,
        notification_worker(settings, database),
        QueueWatcher.open(settings, queue) as watcher,
    ):
        await enqueue(settings, "notification", data, str(job.job_id), queue_name=queue)
        await watcher.finished(str(job.job_id))
        await recorder.wait_for(final_status(job.job_id))
        state, bull_job = await job_state(settings, str(job.job_id), queue)
    return state, bull_job, recorder


async def stored_for(database: Database, job: NotificationJob) -> list[Any]:
    people = [*job.people.member_ids, job.people.outsider_id, job.recipient]
    query = "select * from public.notifications where user_id = any($1::uuid[])"
    async with database.transaction() as conn:
        return list(await conn.fetch(query, people))


async def job_row(database: Database, job_id: UUID) -> Any:
    async with database.transaction() as conn:
        return await conn.fetchrow("select * from public.jobs where id = $1", job_id)


def statuses(recorder: EventRecorder, job_id: UUID) -> list[str]:
    return [event["status"] for event in recorder.on(f"job:{job_id}:status")]


def notification_events(recorder: EventRecorder) -> list[tuple[str, dict[str, Any]]]:
    return recorder.matching(lambda channel, _event: channel.startswith("user:"))


async def assert_delivered(
    database: Database, job: NotificationJob, result: Any, recorder: EventRecorder
) -> None:
    expected_id = notification_id(job.job_id, job.recipient)
    assert result == {"status": "completed", "notificationId": str(expected_id), "delivered": True}

    [row] = await stored_for(database, job)
    assert row["id"] == expected_id and row["user_id"] == job.recipient
    assert row["notification_type"] == job.input["type"]
    assert orjson.loads(row["data"]) == job.input["data"]
    assert row["job_id"] == job.job_id and row["read_at"] is None

    [(channel, event)] = notification_events(recorder)
    assert channel == f"user:{job.recipient}:notifications"
    assert event == {
        "type": "notification",
        "notificationId": str(expected_id),
        "userId": str(job.recipient),
        "notificationType": job.input["type"],
        "data": job.input["data"],
        "jobId": str(job.job_id),
        "createdAt": row["created_at"].isoformat(timespec="milliseconds"),
    }
    assert statuses(recorder, job.job_id) == ["processing", "completed"]

    job_record = await job_row(database, job.job_id)
    assert job_record["status"] == "completed" and job_record["attempts"] == 1
    assert orjson.loads(job_record["output"]) == result


async def assert_failed_at_once(
    database: Database, job: NotificationJob, run: tuple[Any, Any, EventRecorder], reason: str
) -> str:
    """Failed after one attempt, recorded and published, nothing stored; returns the kind."""
    state, bull_job, recorder = run
    assert state == "failed" and bull_job.attemptsMade == 1
    assert bull_job.failedReason == reason

    job_record = await job_row(database, job.job_id)
    assert job_record["status"] == "failed" and job_record["error_message"] == reason
    [failed] = recorder.on(f"job:{job.job_id}:status")  # refused before `processing`
    assert failed["status"] == "failed" and failed["attempt"] == 1
    assert failed["willRetry"] is False and failed["errorKind"] == job_record["error_kind"]

    assert await stored_for(database, job) == []
    assert notification_events(recorder) == []
    return str(job_record["error_kind"])


DELIVERED = {
    "message": {},
    "no conversation": {
        "recipient": "outsider",
        "type": "system_notice",
        "data": {"title": "Welcome to Uvian", "links": [{"label": "Settings", "path": "/me"}]},
    },
}


@pytest.mark.parametrize("changes", DELIVERED.values(), ids=DELIVERED.keys())
async def test_notification_is_stored_and_published_once(
    database: Database, changes: dict[str, Any]
) -> None:
    job = await seed_notification_job(database, **changes)

    state, bull_job, recorder = await run_notification(database, job)

    assert state == "completed" and bull_job.attemptsMade == 1
    await assert_delivered(database, job, bull_job.returnvalue, recorder)


@pytest.mark.parametrize(
    ("recipient", "reason"), [("sender", "sender"), ("outsider", "not_member")]
)
async def test_undelivered_notification_completes_without_storing(
    database: Database, recipient: str, reason: str
) -> None:
    job = await seed_notification_job(database, recipient=recipient)

    state, bull_job, recorder = await run_notification(database, job)

    assert state == "completed" and bull_job.attemptsMade == 1
    expected = {"status": "completed", "notificationId": None, "delivered": False, "reason": reason}
    assert bull_job.returnvalue == expected
    assert await stored_for(database, job) == []
    assert notification_events(recorder) == []
    assert statuses(recorder, job.job_id) == ["processing", "completed"]
    job_record = await job_row(database, job.job_id)
    assert job_record["status"] == "completed"
    assert orjson.loads(job_record["output"]) == expected


async def test_same_job_run_twice_stores_and_publishes_one_notification(
    database: Database,
) -> None:
    job = await seed_notification_job(database)

    # The same job delivered again (say its worker died between the commit and
    # BullMQ's acknowledgement): a fresh queue prefix makes BullMQ run it again.
    _state, first, first_events = await run_notification(database, job)
    state, second, second_events = await run_notification(database, job)

    assert state == "completed"
    assert first.returnvalue["delivered"] is True
    assert second.returnvalue == first.returnvalue
    assert len(await stored_for(database, job)) == 1
    assert len(notification_events(first_events)) == 1
    assert notification_events(second_events) == []
    assert statuses(second_events, job.job_id) == ["completed"]


async def test_a_second_store_of_one_notification_is_ignored(database: Database) -> None:
    # Two runs of one job at once (a stalled job taken over while its first
    # worker still runs) both get past the start; only the first store counts.
    job = await seed_notification_job(database)
    repository = NotificationRepository(database)
    record = NotificationRecord(
        notification_id(job.job_id, job.recipient), job.job_id, job.recipient, "message", {}
    )

    stored_at = [
        await repository.finish_notification(job_id=job.job_id, output={}, notification=record)
        for _run in range(2)
    ]

    assert stored_at[0] is not None and stored_at[1] is None
    assert len(await stored_for(database, job)) == 1
    assert (await job_row(database, job.job_id))["status"] == "completed"


async def test_unknown_recipient_fails_at_once(database: Database) -> None:
    nobody = uuid4()
    job = await seed_notification_job(database, userId=str(nobody))

    run = await run_notification(database, job)

    reason = f"recipient profile {nobody} does not exist"
    assert await assert_failed_at_once(database, job, run, reason) == "not_found"


def changed(job: NotificationJob, changes: dict[str, Any]) -> dict[str, Any]:
    """The job's data with `changes` applied: `data.key` names a key of `data`, `...` drops it."""
    job_input = {**job.input, "data": {**job.input["data"]}}
    for key, value in changes.items():
        target, name = (job_input["data"], key[5:]) if key.startswith("data.") else (job_input, key)
        target[name] = value
        if value is ...:
            del target[name]
    return {"jobId": str(job.job_id), "input": job_input}


def nested(levels: int) -> Any:
    return json.loads('{"in": ' * levels + "{}" + "}" * levels)


P = "invalid notification input: "
TYPE_RULE = (
    P + "type must be a lowercase identifier such as message_notification"
    " (a-z, 0-9 and _, at most 64 characters)"
)
PREVIEW = "data.messagePreview"


def forbidden(where: str, code_point: str) -> str:
    return f"{P}{where} contains a forbidden character U+{code_point}"


# (changes to a valid input, see `changed`; the job's exact failed reason)
BAD_INPUTS: list[tuple[dict[str, Any], str]] = [
    ({"userId": ...}, P + "userId is required"),
    ({"userId": "admin' --"}, P + "userId must be a UUID"),
    ({"type": ...}, P + "type is required"),
    ({"type": 7}, P + "type must be a string"),
    ({"type": ""}, TYPE_RULE),
    ({"type": "NewMessage"}, TYPE_RULE),
    ({"type": "new message"}, TYPE_RULE),
    ({"type": "nachricht_ü"}, TYPE_RULE),
    ({"type": "a" * 65}, TYPE_RULE),
    ({"data": [1]}, P + "data must be a JSON object"),
    ({"data.conversationId": "general"}, P + "data.conversationId must be a UUID"),
    ({"data.senderId": 42}, P + "data.senderId must be a UUID"),
    ({PREVIEW: 3}, P + PREVIEW + " must be a string"),
    ({PREVIEW: "a" * 501}, P + PREVIEW + " is too long (501 characters, the limit is 500)"),
    ({PREVIEW: "\x1b[2Jhi"}, forbidden(PREVIEW, "001B")),
    ({PREVIEW: "hi \ud800"}, forbidden(PREVIEW, "D800")),
    ({"data.title": "a\x00b"}, forbidden("data.title", "0000")),
    ({"data.links": [{"label": "x\x00"}]}, forbidden("data.links[0].label", "0000")),
    ({"data.bell\x07": 1}, P + "data has a key that contains a forbidden character U+0007"),
    ({"data": nested(9)}, P + "data is nested too deeply (the limit is 8 levels)"),
    ({"data": nested(200)}, P + "data is nested too deeply (the limit is 8 levels)"),
    (
        {"data": {"a": "x" * 5_000, "b": "y" * 5_000}},
        P + "data is too large (10015 bytes as JSON, the limit is 8192)",
    ),
    ({"data.blob": "a" * 9_000}, P + "data.blob is too long (9000 characters, the limit is 8192)"),
]


def case_id(changes: dict[str, Any]) -> str:
    """What a case sends, shortly: `type='NewMessage'`, `data.title='a\\x00b'`."""
    return " ".join(f"{k}={'missing' if v is ... else repr(v)}"[:40] for k, v in changes.items())


@pytest.mark.parametrize(("changes", "reason"), BAD_INPUTS, ids=[case_id(c) for c, _ in BAD_INPUTS])
async def test_bad_input_fails_at_once_without_retry(
    database: Database, changes: dict[str, Any], reason: str
) -> None:
    job = await seed_notification_job(database)

    run = await run_notification(database, job, changed(job, changes))

    assert await assert_failed_at_once(database, job, run, reason) == "invalid_input"


@needs_node
@pytest.mark.parametrize("bullmq", ["6.4", "latest"])
async def test_node_producer_sees_notification_delivered(database: Database, bullmq: str) -> None:
    good = await seed_notification_job(database)
    bad = await seed_notification_job(database)
    settings = settings_for_test(UNUSED_PROVIDER_URL)
    queue = ("--bullmq", bullmq, "--queue", settings.notification_queue, "--name", "notification")

    async with (
        record_events(f"job:{good.job_id}:*", *good.channels) as recorder,
        notification_worker(settings, database),
    ):
        outcomes = [
            await node(
                settings,
                *("run", *queue, "--job-id", str(job.job_id), "--data", json.dumps(data)),
                *("--attempts", "3", "--timeout-ms", "20000"),
            )
            for job, data in [(good, good.data), (bad, changed(bad, {"type": "New Message"}))]
        ]
        await recorder.wait_for(final_status(good.job_id))

    delivered, refused = outcomes
    assert delivered["event"] == "completed", delivered
    assert delivered["state"] == "completed" and delivered["attemptsMade"] == 1
    await assert_delivered(database, good, delivered["returnvalue"], recorder)
    assert refused["event"] == "failed", refused
    assert refused["state"] == "failed" and refused["attemptsMade"] == 1
    assert refused["failedReason"] == TYPE_RULE
    assert "retries-exhausted" not in refused["events"]
    assert (await job_row(database, bad.job_id))["status"] == "failed"
