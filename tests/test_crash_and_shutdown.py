"""Real worker processes: a `kill -9` mid-stream, SIGTERM with and past its grace period."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

from tests.support import (
    ChatJob,
    WorkerProcess,
    enqueue,
    final_status,
    record_events,
    seed_chat_job,
    settings_for_test,
    worker_env,
)
from uvian_worker.providers.simulator import RunningSimulator, scripted_reply
from uvian_worker.runtime.lifecycle import SECOND_SIGNAL_AFTER_S
from uvian_worker.settings import Settings
from uvian_worker.store.database import Database

LONG = "[[sim:tokens=150]] [[sim:tps=50]]"  # three seconds of streaming


def fast_takeover(simulator: RunningSimulator, **overrides: Any) -> Settings:
    return settings_for_test(
        simulator.url, lock_duration_ms=2_000, stalled_interval_ms=1_000, **overrides
    )


async def replies_of(database: Database, chat: ChatJob) -> list[Any]:
    async with database.transaction() as conn:
        return list(
            await conn.fetch("select * from public.messages where job_id = $1", chat.job_id)
        )


def finals(chat: ChatJob, events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [
        e for _c, e in events if e.get("type") == "ai_response" and e["jobId"] == str(chat.job_id)
    ]


async def test_killed_worker_job_is_taken_over_and_replied_once(
    database: Database, simulator: RunningSimulator
) -> None:
    message = f"Survive this {LONG}"
    chat = await seed_chat_job(database, message)
    settings = fast_takeover(simulator)
    workers = [WorkerProcess(worker_env(settings)) for _ in range(2)]
    for worker in workers:
        await worker.start()
    try:
        async with record_events(
            f"job:{chat.job_id}:*", f"conversation:{chat.conversation_id}:*"
        ) as rec:
            await enqueue(settings, "ai-chat", chat.data, str(chat.job_id))
            await rec.wait_for(lambda c, e: e.get("type") == "ai_delta", count=2)
            holder = next(w for w in workers if str(chat.job_id) in w.output)
            survivor = next(w for w in workers if w is not holder)
            holder.kill()
            killed_at = time.monotonic()
            await survivor.wait_for_line(str(chat.job_id), timeout_s=15)
            taken_over_s = time.monotonic() - killed_at
            await rec.wait_for(final_status(chat.job_id))
    finally:
        for worker in workers:
            worker.kill()
            await worker.stop()

    [reply] = await replies_of(database, chat)
    [final] = finals(chat, rec.events)
    expected = "".join(scripted_reply(message, 150))
    assert reply["status"] == "completed" and reply["content"] == expected
    assert final["content"] == expected
    restarts = [e for _c, e in rec.events if e.get("restart")]
    assert len(restarts) == 2  # the dead run's first delta, then the survivor's
    assert taken_over_s < 6, f"taken over after {taken_over_s:.1f} s"
    print(f"take-over after kill -9: {taken_over_s:.2f} s")


async def test_sigterm_lets_a_job_in_flight_finish(
    database: Database, simulator: RunningSimulator
) -> None:
    chat = await seed_chat_job(database, "Finish me [[sim:tokens=60]] [[sim:tps=60]]")
    settings = settings_for_test(simulator.url, shutdown_grace_s=10)
    worker = WorkerProcess(worker_env(settings))
    await worker.start()
    async with record_events(f"job:{chat.job_id}:*") as rec:
        await enqueue(settings, "ai-chat", chat.data, str(chat.job_id))
        await rec.wait_for(lambda c, e: e["status"] == "processing")
        code = await worker.stop(signal.SIGTERM)
        await rec.wait_for(final_status(chat.job_id))
    assert code == 0, worker.output
    assert [e["status"] for _c, e in rec.events] == ["processing", "completed"]
    assert "Traceback" not in worker.output


async def test_sigterm_past_grace_stops_the_job_and_another_worker_finishes_it(
    database: Database, simulator: RunningSimulator
) -> None:
    message = f"Too slow for the grace period {LONG}"
    chat = await seed_chat_job(database, message)
    settings = fast_takeover(simulator, shutdown_grace_s=0.5)
    first = WorkerProcess(worker_env(settings))
    await first.start()
    second = WorkerProcess(worker_env(settings))
    try:
        async with record_events(
            f"job:{chat.job_id}:*", f"conversation:{chat.conversation_id}:*"
        ) as rec:
            await enqueue(settings, "ai-chat", chat.data, str(chat.job_id))
            await rec.wait_for(lambda c, e: e.get("type") == "ai_delta")
            stopped_at = time.monotonic()
            code = await first.stop(signal.SIGTERM)
            stop_s = time.monotonic() - stopped_at
            await second.start()
            await rec.wait_for(final_status(chat.job_id))
    finally:
        second.kill()
        await second.stop()

    assert code == 0 and stop_s < 3, (code, stop_s, first.output)
    assert "Grace period of 0.5 s is over" in first.output
    [reply] = await replies_of(database, chat)
    [final] = finals(chat, rec.events)
    expected = "".join(scripted_reply(message, 150))
    assert reply["content"] == final["content"] == expected and reply["status"] == "completed"


async def test_second_signal_skips_the_grace_period(
    database: Database, simulator: RunningSimulator
) -> None:
    chat = await seed_chat_job(database, f"Interrupt me {LONG}")
    settings = settings_for_test(simulator.url, shutdown_grace_s=60)
    worker = WorkerProcess(worker_env(settings))
    await worker.start()
    async with record_events(f"conversation:{chat.conversation_id}:*") as rec:
        await enqueue(settings, "ai-chat", chat.data, str(chat.job_id))
        await rec.wait_for(lambda c, e: e.get("type") == "ai_delta")
        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)
        await worker.wait_for_line("Stopping on SIGTERM")
        # A supervisor signalling the process and its group delivers the same
        # signal twice at once; only a later signal is a second one.
        await asyncio.sleep(SECOND_SIGNAL_AFTER_S)
        started = time.monotonic()
        code = await worker.stop(signal.SIGINT)
    assert code == 0 and time.monotonic() - started < 3
    assert "Grace period of 60 s cut short by a second signal" in worker.output


async def test_grace_period_keeps_the_locks_of_jobs_longer_than_the_lock(
    database: Database, simulator: RunningSimulator
) -> None:
    """The reply outlives its 2 s lock by far; no other worker may take it over."""
    message = "Longer than the lock [[sim:tokens=250]] [[sim:tps=50]]"  # five seconds
    chat = await seed_chat_job(database, message)
    settings = fast_takeover(simulator, shutdown_grace_s=15)
    stopping, standby = (WorkerProcess(worker_env(settings)) for _ in range(2))
    await stopping.start()
    try:
        async with record_events(
            f"job:{chat.job_id}:*", f"conversation:{chat.conversation_id}:*"
        ) as rec:
            await enqueue(settings, "ai-chat", chat.data, str(chat.job_id))
            await rec.wait_for(lambda c, e: e.get("type") == "ai_delta")
            await standby.start()
            assert stopping.process is not None
            stopping.process.send_signal(signal.SIGTERM)
            await rec.wait_for(final_status(chat.job_id))
            code = await stopping.stop()
    finally:
        standby.kill()
        await standby.stop()

    assert code == 0, stopping.output
    assert str(chat.job_id) not in standby.output
    assert len([e for _c, e in rec.events if e.get("restart")]) == 1
    [final] = finals(chat, rec.events)
    assert final["status"] == "completed"
    assert final["content"] == "".join(scripted_reply(message, 250))


async def test_job_that_stalls_too_often_ends_failed_in_its_row_and_status(
    database: Database, simulator: RunningSimulator
) -> None:
    """Kill the worker holding the job each time it is taken: BullMQ fails it on the third
    stall, and a live worker records that in the row and publishes the status."""
    chat = await seed_chat_job(database, f"Cursed {LONG}")
    settings = fast_takeover(simulator)
    watcher = WorkerProcess(worker_env(settings) | {"WORKER_CONCURRENCY": "1"})
    async with record_events(f"job:{chat.job_id}:status") as rec:
        await enqueue(settings, "ai-chat", chat.data, str(chat.job_id))
        for _ in range(3):
            victim = WorkerProcess(worker_env(settings))
            await victim.start()
            await victim.wait_for_line(str(chat.job_id))
            victim.kill()
            await victim.stop()
        await watcher.start()
        try:
            [(_c, final)] = await rec.wait_for(final_status(chat.job_id))
        finally:
            await watcher.stop()
    assert final["status"] == "failed" and final["errorKind"] == "stalled"
    async with database.transaction() as conn:
        row = await conn.fetchrow("select * from public.jobs where id = $1", chat.job_id)
    assert row["status"] == "failed" and row["error_kind"] == "stalled"
