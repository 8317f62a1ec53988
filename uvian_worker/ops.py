"""What an operator runs against the queues: stats, retrying failed jobs, enqueueing a job
by hand, and the health probe of container platforms.

Each command returns the process's exit code: 0 done, 1 failed (Redis or
Postgres could not be reached, or the probe found no live worker), 2 for a
bad argument. Results go to stdout, problems to stderr as one line. Redis is
reached with a client of bounded timeouts and no retries, so a command never
hangs on an unreachable server the way BullMQ's own default client would.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import orjson
import redis.asyncio as redis
from bullmq import Queue
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from uvian_worker.errors import InvalidInput, StoreUnavailable
from uvian_worker.observability.health import read_workers
from uvian_worker.settings import Settings
from uvian_worker.store.database import Database
from uvian_worker.store.seed import add_job_row

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

CHAT_JOB_NAME = "ai-chat"
NOTIFICATION_JOB_NAME = "notification"
# The first retry of a job enqueued by hand waits this long, then twice as long each time.
ENQUEUE_BACKOFF_MS = 1_000
# The health probe answers within this, however Redis behaves.
HEALTH_TIMEOUT_S = 3.0
REASON_CHARS = 100  # of a failed reason, in the table; JSON keeps up to JSON_REASON_CHARS
JSON_REASON_CHARS = 2_000
COUNT_COLUMNS = ("waiting", "active", "delayed", "completed", "failed")

_REDIS_ERRORS = (RedisError, OSError, TimeoutError)


def _redis(settings: Settings, timeout_s: float | None = None) -> redis.Redis:
    timeout_s = timeout_s or settings.connect_timeout_s
    return redis.Redis.from_url(
        settings.effective_redis_url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


@asynccontextmanager
async def _open_queue(settings: Settings, name: str) -> AsyncIterator[Queue]:
    # Each queue gets its own client: closing a BullMQ queue closes the client it was given.
    queue = Queue(name, {"connection": _redis(settings), "prefix": settings.queue_prefix})
    try:
        yield queue
    finally:
        await queue.close()


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds")


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"uvian-worker: {message}", file=sys.stderr)
    return code


def _redis_problem(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer from Redis in time"
    first_line = (str(exc).splitlines() or [""])[0][:200]
    return f"cannot reach Redis: {type(exc).__name__}: {first_line}".rstrip(": ")


async def stats(settings: Settings, as_json: bool, failed_limit: int = 5) -> int:
    """Each queue's counts, its most recent failed jobs, and the live workers."""
    try:
        queues = [await _queue_stats(settings, name, failed_limit) for name in settings.queue_names]
        client = _redis(settings)
        try:
            workers = await read_workers(client, settings.queue_prefix)
        finally:
            await client.aclose()
    except _REDIS_ERRORS as exc:
        return _fail(_redis_problem(exc))

    # One report for both outputs, so the table can never show what the JSON does not.
    report = {
        "prefix": settings.queue_prefix,
        "queues": queues,
        "workers": [worker.as_json() for worker in workers],
    }
    if as_json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print("\n".join(render_stats(report)))
    return EXIT_OK


async def _queue_stats(settings: Settings, name: str, failed_limit: int) -> dict[str, Any]:
    async with _open_queue(settings, name) as queue:
        raw = await queue.getJobCounts(
            "waiting", "paused", "prioritized", "active", "delayed", "completed", "failed"
        )
        failed_jobs = (
            await queue.getJobs(["failed"], 0, failed_limit - 1) if failed_limit > 0 else []
        )

    # A job waits in one of three places: the wait list, the prioritized set, or
    # (before BullMQ v5, while the queue was paused) the paused list.
    waiting = int(raw["waiting"]) + int(raw["paused"]) + int(raw["prioritized"])
    counts = {state: int(raw[state]) for state in COUNT_COLUMNS if state != "waiting"}
    recent_failed = [_failed_job(job) for job in failed_jobs]
    return {"name": name, "waiting": waiting, **counts, "recentFailed": recent_failed}


def _failed_job(job: Any) -> dict[str, Any]:
    finished_ms = int(getattr(job, "finishedOn", 0) or 0)
    return {
        "id": str(job.id),
        "name": str(job.name),
        "attemptsMade": int(getattr(job, "attemptsMade", 0) or 0),
        "failedReason": str(getattr(job, "failedReason", "") or "")[:JSON_REASON_CHARS],
        "finishedAt": _iso(finished_ms / 1000) if finished_ms else None,
    }


def render_stats(report: dict[str, Any]) -> list[str]:
    """The stats report as aligned plain-text tables."""
    queues, workers = report["queues"], report["workers"]
    lines = [f"Queues (prefix {report['prefix']})"]
    lines += _table(
        ["QUEUE", *(column.upper() for column in COUNT_COLUMNS)],
        [[queue["name"], *(str(queue[c]) for c in COUNT_COLUMNS)] for queue in queues],
        numeric=(1, 2, 3, 4, 5),
    )

    lines += ["", f"Live workers: {len(workers)}"]
    if workers:
        keys = ("workerId", "host", "pid", "jobsInFlight", "takingJobs", "heartbeatAt")
        lines += _table(
            ["WORKER", "HOST", "PID", "IN FLIGHT", "TAKING JOBS", "LAST BEAT"],
            [[_cell(worker[key]) for key in keys] for worker in workers],
            numeric=(2, 3),
        )

    failed = [(queue["name"], job) for queue in queues for job in queue["recentFailed"]]
    lines += ["", f"Recent failed jobs: {len(failed)}"]
    if failed:
        job_keys = ("id", "name", "attemptsMade", "finishedAt")
        lines += _table(
            ["QUEUE", "JOB ID", "NAME", "ATTEMPTS", "FINISHED", "REASON"],
            [
                [name, *(_cell(job[key]) for key in job_keys), _one_line(job["failedReason"])]
                for name, job in failed
            ],
            numeric=(3,),
        )
    return lines


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "-" if value is None else str(value)


def _table(headers: list[str], rows: list[list[str]], numeric: tuple[int, ...] = ()) -> list[str]:
    """Columns padded to their widest cell, the `numeric` ones right-aligned; no trailing spaces."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        padded = [
            cell.rjust(width) if index in numeric else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    return [line(headers), *(line(row) for row in rows)]


def _one_line(text: str, limit: int = REASON_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


async def retry_failed(settings: Settings, queue_name: str | None, limit: int) -> int:
    """Move up to `limit` failed jobs of the queue (or of each queue) back to waiting.

    Their attempts start over: a job retried by hand gets the full set again
    rather than failing for good at its first error.
    """
    names = [queue_name] if queue_name else list(settings.queue_names)
    try:
        for name in names:
            moved, skipped = await _retry_queue(settings, name, limit)
            note = f" ({skipped} left the failed state meanwhile)" if skipped else ""
            print(f"{name}: moved {moved} failed jobs back to waiting{note}")
    except _REDIS_ERRORS as exc:
        return _fail(_redis_problem(exc))
    return EXIT_OK


async def _retry_queue(settings: Settings, name: str, limit: int) -> tuple[int, int]:
    moved = skipped = 0
    async with _open_queue(settings, name) as queue:
        for job in await queue.getJobs(["failed"], 0, limit - 1) if limit > 0 else []:
            try:
                await job.retry("failed", {"resetAttemptsMade": True, "resetAttemptsStarted": True})
            except TypeError:
                # BullMQ's answer for a job no longer in the failed set (retried or removed).
                skipped += 1
            else:
                moved += 1
    return moved, skipped


async def enqueue(
    settings: Settings,
    kind: str,
    *,
    user_id: str,
    conversation_id: str | None = None,
    message_id: str | None = None,
    message: str | None = None,
    notification_type: str | None = None,
    data: str | None = None,
) -> int:
    """Record a `queued` job row, then add the BullMQ job with the row's id, as the API does.

    `kind` is `chat` (an `ai-chat` job) or `notification`.
    """
    if kind not in ("chat", "notification"):
        return _fail(f"unknown job kind {kind!r} (chat or notification)", EXIT_USAGE)
    try:
        if kind == "chat":
            job_name, queue_name = CHAT_JOB_NAME, settings.chat_queue
            job_input = _chat_input(user_id, conversation_id, message_id, message)
        else:
            job_name, queue_name = NOTIFICATION_JOB_NAME, settings.notification_queue
            job_input = _notification_input(user_id, notification_type, data)
    except InvalidInput as exc:
        return _fail(str(exc), EXIT_USAGE)

    job_id = uuid4()
    try:
        await _insert_and_add(settings, job_id, job_name, queue_name, job_input)
    except StoreUnavailable as exc:
        return _fail(f"DATABASE_URL: {exc}")
    except _REDIS_ERRORS as exc:
        return _fail(_redis_problem(exc))
    print(job_id)
    return EXIT_OK


def _uuid(value: str | None, option: str) -> str:
    try:
        return str(UUID(str(value)))
    except ValueError:
        raise InvalidInput(f"{option} must be a UUID") from None


def _chat_input(
    user_id: str, conversation_id: str | None, message_id: str | None, message: str | None
) -> dict[str, Any]:
    if not message:
        raise InvalidInput("--message is required for a chat job")
    return {
        "conversationId": _uuid(conversation_id, "--conversation-id"),
        "message": message,
        "userId": _uuid(user_id, "--user-id"),
        "messageId": _uuid(message_id, "--message-id"),
    }


def _notification_input(user_id: str, kind: str | None, data: str | None) -> dict[str, Any]:
    if not kind:
        raise InvalidInput("--type is required for a notification job")
    try:
        payload = orjson.loads(data) if data else {}
    except orjson.JSONDecodeError:
        raise InvalidInput("--data must be JSON") from None
    if not isinstance(payload, dict):
        raise InvalidInput("--data must be a JSON object")
    return {"userId": _uuid(user_id, "--user-id"), "type": kind, "data": payload}


async def _insert_and_add(
    settings: Settings, job_id: UUID, job_name: str, queue_name: str, job_input: dict[str, Any]
) -> None:
    database = await Database.connect(
        settings.database_url.get_secret_value(),
        min_size=1,
        max_size=1,
        connect_timeout_s=settings.connect_timeout_s,
    )
    try:
        await add_job_row(database, job_id, job_name, job_input)
        try:
            await _add_job(settings, job_id, job_name, queue_name, job_input)
        except _REDIS_ERRORS:
            # Nothing refers to the row yet; without its job it would stay queued forever.
            await _delete_job_row(database, job_id)
            raise
    finally:
        await database.close()


async def _add_job(
    settings: Settings, job_id: UUID, job_name: str, queue_name: str, job_input: dict[str, Any]
) -> None:
    options = {
        "jobId": str(job_id),
        "attempts": settings.worker_max_retries,
        "backoff": {"type": "exponential", "delay": ENQUEUE_BACKOFF_MS},
    }
    async with _open_queue(settings, queue_name) as queue:
        await queue.add(job_name, {"jobId": str(job_id), "input": job_input}, options)


async def _delete_job_row(database: Database, job_id: UUID) -> None:
    try:
        async with database.transaction() as conn:
            await conn.execute(
                "delete from public.jobs where id = $1 and status = 'queued'", job_id
            )
    except StoreUnavailable as exc:
        _fail(f"could not remove job row {job_id}: {exc}")


async def health(
    settings: Settings,
    worker_id: str | None,
    *,
    this_host: bool = False,
    timeout_s: float = HEALTH_TIMEOUT_S,
) -> int:
    """0 when a live worker taking jobs has a heartbeat under the prefix, else 1; one line.

    `worker_id` asks about that worker only; `this_host` about the workers on
    this machine (a container's own worker, whatever its process id).
    """
    timeout_s = min(timeout_s, settings.connect_timeout_s)
    client = _redis(settings, timeout_s)
    try:
        async with asyncio.timeout(timeout_s):
            workers = await read_workers(client, settings.queue_prefix, worker_id)
    except _REDIS_ERRORS as exc:
        print(f"unhealthy: {_redis_problem(exc)}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        await client.aclose()

    if this_host:
        workers = [w for w in workers if w.host == socket.gethostname()]
    scope = _health_scope(settings, worker_id, this_host)
    taking = [w for w in workers if w.taking_jobs]
    if taking:
        in_flight = sum(w.jobs_in_flight for w in taking)
        print(f"healthy: {len(taking)} worker(s) taking jobs {scope}, {in_flight} in flight")
        return EXIT_OK
    if workers:
        print(f"unhealthy: the worker(s) {scope} are not taking jobs", file=sys.stderr)
    else:
        print(f"unhealthy: no live worker {scope}", file=sys.stderr)
    return EXIT_FAILED


def _health_scope(settings: Settings, worker_id: str | None, this_host: bool) -> str:
    if worker_id is not None:
        return f"with id {worker_id} (prefix {settings.queue_prefix})"
    where = f" on {socket.gethostname()}" if this_host else ""
    return f"for prefix {settings.queue_prefix}{where}"
