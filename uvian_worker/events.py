"""Events published on Redis pub/sub for the API to relay to chat clients.

Channel names and event shapes are the contract with the Node API (README's
"Events" section documents them); keys are camelCase, the Node side's way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
import redis.asyncio as redis
from redis.exceptions import RedisError

from uvian_worker.clock import now_s
from uvian_worker.command_batches import Arg, CommandBatcher, pack
from uvian_worker.errors import EventsUnavailable
from uvian_worker.observability.logs import LogThrottle

logger = logging.getLogger(__name__)

# Each in-flight reply's deltas are also kept in a capped Redis Stream, so a
# client that connects late or reconnects can catch up from a sequence number.
# Entry ids are `0-{seq}`: `XRANGE reply:{messageId}:deltas 0-{seq} +` reads from
# a sequence number, `XREAD BLOCK ... 0-{seq}` follows live.
REPLY_STREAM_MAXLEN = 10_000
REPLY_STREAM_LIVE_TTL_S = 3_600  # while a reply is generating
REPLY_STREAM_ENDED_TTL_S = 300  # after its final event


# Redis's words when an entry's id is not above the stream's last: an older run of a
# taken-over job still streaming beside the new one. Expected, so not worth a warning.
_STALE_ENTRY_ID = "equal or smaller than the target stream top item"
_throttle = LogThrottle()


class Publisher(Protocol):
    async def publish(self, channel: str, event: Mapping[str, Any]) -> None: ...

    def send_delta(
        self, channel: str, event: Mapping[str, Any], *, stream_key: str, restart: bool
    ) -> asyncio.Future[None]:
        """Queue a reply delta to publish and append to the reply's stream (restarting it if
        asked); the future says when it went out, or raises `EventsUnavailable`.

        Deltas queued by one caller go out in the order they were queued."""

    async def publish_reply_end(
        self, channel: str, event: Mapping[str, Any], *, stream_key: str, seq: int | None
    ) -> None:
        """Publish a reply's final event and mark its stream ended (it then expires soon).

        `seq` None appends after whatever the stream holds (the sweep does not know it).
        """


def _unavailable(exc: BaseException) -> EventsUnavailable:
    if isinstance(exc, RedisError | OSError):
        return EventsUnavailable(f"cannot publish events: {type(exc).__name__}")
    return EventsUnavailable("the delta was not sent")


def conversation_channel(conversation_id: object) -> str:
    return f"conversation:{conversation_id}:messages"


def job_status_channel(job_id: object) -> str:
    return f"job:{job_id}:status"


def job_cancel_channel(job_id: object) -> str:
    return f"job:{job_id}:cancel"


def user_notifications_channel(user_id: object) -> str:
    return f"user:{user_id}:notifications"


def reply_stream_key(message_id: object) -> str:
    return f"reply:{message_id}:deltas"


def job_cancelled_key(job_id: object) -> str:
    """Set by any worker (or by the API) when a stop was asked before a worker held the job."""
    return f"uvian:job:{job_id}:cancelled"


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
    """Publishes JSON events on a redis-py client (its own pool, not the queue's).

    Deltas are the hot path: every streaming reply sends one every 50 ms. Those
    queued while the previous batch is on its way go out together in the next
    (one round trip for all replies), in the order they were queued.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._deltas = CommandBatcher(client, "reply deltas", _unavailable)

    async def publish(self, channel: str, event: Mapping[str, Any]) -> None:
        try:
            await self._client.publish(channel, orjson.dumps(event))
        except (RedisError, OSError) as exc:
            raise EventsUnavailable(f"cannot publish events: {type(exc).__name__}") from None

    def send_delta(
        self, channel: str, event: Mapping[str, Any], *, stream_key: str, restart: bool
    ) -> asyncio.Future[None]:
        seq = event["seq"]
        entry = ("seq", seq, "delta", event["delta"], "attempt", event["attempt"])
        commands = [
            pack("XADD", stream_key, "MAXLEN", "~", REPLY_STREAM_MAXLEN, f"0-{seq}", *entry),
            pack("PUBLISH", channel, orjson.dumps(event)),
        ]
        if restart:
            commands[:1] = [
                pack("DEL", stream_key),
                commands[0],
                pack("EXPIRE", stream_key, REPLY_STREAM_LIVE_TTL_S),
            ]
        return self._deltas.send(commands, RedisPublisher._check)

    async def publish_reply_end(
        self, channel: str, event: Mapping[str, Any], *, stream_key: str, seq: int | None
    ) -> None:
        fields: dict[Arg, Arg] = {"final": event["status"]}
        if seq is not None:
            fields["seq"] = seq
        if event.get("attempt") is not None:
            fields["attempt"] = event["attempt"]
        async with self._client.pipeline(transaction=False) as pipe:
            # `0-*`: Redis 7 numbers the entry after the stream's last one.
            entry_id = f"0-{seq}" if seq is not None else "0-*"
            pipe.xadd(stream_key, fields, id=entry_id, maxlen=REPLY_STREAM_MAXLEN)
            pipe.expire(stream_key, REPLY_STREAM_ENDED_TTL_S)
            pipe.publish(channel, orjson.dumps(event))
            await self._execute(pipe)

    @staticmethod
    async def _execute(pipe: Any) -> None:
        """Run a pipeline; an entry refused by the stream never stops the publish.

        XADD refuses an id not above the stream's last one, which happens only
        when an older run of a taken-over job still streams beside the new run.
        Connection errors become `EventsUnavailable`.
        """
        try:
            results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            raise EventsUnavailable(f"cannot publish events: {type(exc).__name__}") from None
        RedisPublisher._check(results)

    @staticmethod
    def _check(results: list[Any]) -> None:
        for result in results:
            if isinstance(result, redis.ResponseError):
                if _STALE_ENTRY_ID in str(result):
                    logger.debug("Reply stream entry refused: %s", result)
                elif _throttle.allow("refused") is not None:
                    # Out of memory, a read-only replica after a failover, a missing
                    # permission: the reply goes on, but nobody should have to guess.
                    logger.warning("Redis refused an event command: %s", result)
            elif isinstance(result, Exception):
                raise EventsUnavailable(f"cannot publish events: {type(result).__name__}")
