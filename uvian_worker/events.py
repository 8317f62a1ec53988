"""Events published on Redis pub/sub for the API to relay to chat clients.

Channel names and event shapes are the contract with the Node API (README's
"Events" section documents them); keys are camelCase, the Node side's way.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
import redis.asyncio as redis

from uvian_worker.clock import now_s


class Publisher(Protocol):
    async def publish(self, channel: str, event: Mapping[str, Any]) -> None: ...


def conversation_channel(conversation_id: object) -> str:
    return f"conversation:{conversation_id}:messages"


def job_status_channel(job_id: object) -> str:
    return f"job:{job_id}:status"


def job_cancel_channel(job_id: object) -> str:
    return f"job:{job_id}:cancel"


def user_notifications_channel(user_id: object) -> str:
    return f"user:{user_id}:notifications"


def timestamp() -> str:
    return datetime.fromtimestamp(now_s(), UTC).isoformat(timespec="milliseconds")


def job_status_event(
    job_id: object,
    status: str,
    *,
    attempt: int,
    max_attempts: int,
    error: str | None = None,
    error_kind: str | None = None,
    will_retry: bool = False,
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "job_status",
        "jobId": str(job_id),
        "status": status,
        "attempt": attempt,
        "maxAttempts": max_attempts,
        "timestamp": timestamp(),
    }
    if error is not None:
        event |= {"error": error, "errorKind": error_kind, "willRetry": will_retry}
    return event


class RedisPublisher:
    """Publishes JSON events on a redis-py client (its own pool, not the queue's)."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    async def publish(self, channel: str, event: Mapping[str, Any]) -> None:
        await self._client.publish(channel, orjson.dumps(event))
