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

import hiredis
import orjson
import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

from uvian_worker.clock import now_s
from uvian_worker.errors import EventsUnavailable
from uvian_worker.observability.logs import LogThrottle

logger = logging.getLogger(__name__)

_StreamValue = bytes | bytearray | memoryview | str | int | float


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

# A queued delta: its commands, packed in Redis's wire format, and the future its
# sender waits on.
_Queued = list[tuple[list[bytes], asyncio.Future[None]]]


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


def _pack(*args: _StreamValue) -> bytes:
    """One command in Redis's wire format."""
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]  # stub: a 1-tuple
    return packed


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
        self._deltas: _Queued = []
        self._sender: asyncio.Task[None] | None = None

    async def publish(self, channel: str, event: Mapping[str, Any]) -> None:
        try:
            await self._client.publish(channel, orjson.dumps(event))
        except (RedisError, OSError) as exc:
            raise EventsUnavailable(f"cannot publish events: {type(exc).__name__}") from None

    def send_delta(
        self, channel: str, event: Mapping[str, Any], *, stream_key: str, restart: bool
    ) -> asyncio.Future[None]:
        # Packed here, in C, rather than by a redis-py pipeline: at a thousand replies the
        # pipeline's own bookkeeping cost four times the rest of a delta's publishing.
        seq = event["seq"]
        entry = ("seq", seq, "delta", event["delta"], "attempt", event["attempt"])
        commands = [
            _pack("XADD", stream_key, "MAXLEN", "~", REPLY_STREAM_MAXLEN, f"0-{seq}", *entry),
            _pack("PUBLISH", channel, orjson.dumps(event)),
        ]
        if restart:
            commands[:1] = [
                _pack("DEL", stream_key),
                commands[0],
                _pack("EXPIRE", stream_key, REPLY_STREAM_LIVE_TTL_S),
            ]
        sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._deltas.append((commands, sent))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.ensure_future(self._send_queued())
        return sent

    async def _send_queued(self) -> None:
        """Send the queued deltas, one round trip at a time: what is queued while one is
        on its way goes in the next, so no two batches can overtake each other."""
        while self._deltas:
            batch, self._deltas = self._deltas, []
            try:
                await self._send(batch)
            except BaseException as exc:
                # Cancelled (the worker stopping) or broken in an unforeseen way: no
                # reply may wait for a delta that will never be sent, this batch's
                # or one queued behind it.
                self._fail_queued(batch)
                if not isinstance(exc, Exception):
                    raise
                logger.exception("Sending reply deltas failed")
                return

    def _fail_queued(self, batch: _Queued) -> None:
        batch, self._deltas = batch + self._deltas, []
        for _commands, sent in batch:
            if not sent.done():
                sent.set_exception(EventsUnavailable("the delta was not sent"))

    async def _send(self, batch: _Queued) -> None:
        counts = [len(commands) for commands, _sent in batch]
        packed = b"".join(command for commands, _sent in batch for command in commands)
        try:
            replies = await self._round_trip(packed, sum(counts))
        except (RedisError, OSError) as exc:
            unavailable = EventsUnavailable(f"cannot publish events: {type(exc).__name__}")
            for _commands, sent in batch:
                if not sent.done():
                    sent.set_exception(unavailable)
            return
        start = 0
        for count, (_commands, sent) in zip(counts, batch, strict=True):
            outcome = replies[start : start + count]
            start += count
            if sent.done():
                continue
            try:
                RedisPublisher._check(outcome)
            except EventsUnavailable as exc:
                sent.set_exception(exc)
            else:
                sent.set_result(None)

    async def _round_trip(self, packed: bytes, count: int) -> list[Any]:
        """Send packed commands on one pooled connection and read their `count` replies.

        A command's error reply is kept as its reply and the rest are read on; an
        error that leaves the connection unusable (a break, LOADING) fails them all.

        The pool checks a connection as it hands it out and reconnects one that
        Redis closed (a restart since it was last used). Nothing is resent after a
        failure: the commands before the break may have run, and a delta published
        twice would reach clients twice.
        """
        pool = self._client.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.send_packed_command(packed)
            replies: list[Any] = []
            for _ in range(count):
                try:
                    replies.append(await connection.read_response())
                except ResponseError as refused:
                    replies.append(refused)
            return replies
        finally:
            await pool.release(connection)

    async def publish_reply_end(
        self, channel: str, event: Mapping[str, Any], *, stream_key: str, seq: int | None
    ) -> None:
        fields: dict[_StreamValue, _StreamValue] = {"final": event["status"]}
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
