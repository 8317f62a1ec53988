"""Signals between processes over Redis pub/sub: stop requests and conversation turns.

One pub/sub connection per process listens on two patterns:
- `job:{jobId}:cancel`, published by the API: the worker holding the job stops
  it. A worker that does not hold it records the request under
  `uvian:job:{jobId}:cancelled` (a day's expiry), so a job cancelled before any
  worker took it ends cancelled when it starts. The API may set that key itself
  to make a cancel survive a moment with no worker listening.
- `uvian:turn-free:{conversationId}`: a conversation's generation slot was
  released; local waiters try to take it at once instead of at their next poll.

The listener reconnects with capped backoff after Redis goes away; requests
published while it was away are only seen through the key above.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import orjson
import redis.asyncio as redis
from redis.exceptions import RedisError

from uvian_worker import events
from uvian_worker.executors.base import StopSignal

logger = logging.getLogger(__name__)

CANCELLED_KEY_TTL_S = 86_400
TURN_FREE_PREFIX = "uvian:turn-free:"
_CANCEL_PATTERN = "job:*:cancel"
_TURN_PATTERN = TURN_FREE_PREFIX + "*"
_RECONNECT_MAX_S = 2.0
_REMEMBERED_CANCELS = 10_000  # recent stop requests kept in memory, beside the Redis key


def turn_free_channel(conversation_id: object) -> str:
    return f"{TURN_FREE_PREFIX}{conversation_id}"


class ControlChannel:
    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._held: dict[str, StopSignal] = {}
        self._recent: OrderedDict[str, str] = OrderedDict()
        self._turn_waiters: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[Any]] = set()
        self._lookups: list[tuple[str, asyncio.Future[str | None]]] = []
        self.ready = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="control-channel")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        if self._writes:
            await asyncio.wait(self._writes, timeout=1.0)

    # Stop requests

    @contextmanager
    def track(self, job_id: str) -> Iterator[StopSignal]:
        """Register a job this process holds, for as long as it runs here."""
        signal = StopSignal()
        self._held[job_id] = signal
        try:
            yield signal
        finally:
            if self._held.get(job_id) is signal:
                del self._held[job_id]

    async def was_cancelled(self, job_id: str) -> str | None:
        """The reason a stop was asked for this job before it started here, if one was.

        Every job starts with this look-up; those asked for in one turn of the
        event loop share one MGET.
        """
        if job_id in self._recent:
            return self._recent[job_id]
        answer: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._lookups.append((job_id, answer))
        if len(self._lookups) == 1:
            asyncio.get_running_loop().call_soon(self._send_lookups)
        return await answer

    def _send_lookups(self) -> None:
        lookups, self._lookups = self._lookups, []
        task = asyncio.ensure_future(self._look_up(lookups))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _look_up(self, lookups: list[tuple[str, asyncio.Future[str | None]]]) -> None:
        keys = [events.job_cancelled_key(job_id) for job_id, _ in lookups]
        try:
            reasons = await self._client.mget(keys)
        except Exception as exc:  # noqa: BLE001 - each waiting job gets the error itself
            for _job_id, answer in lookups:
                if not answer.done():
                    answer.set_exception(exc)
            return
        for (_job_id, answer), reason in zip(lookups, reasons, strict=True):
            if not answer.done():
                answer.set_result(None if reason is None else _text(reason))

    def _on_cancel(self, job_id: str, reason: str) -> None:
        held = self._held.get(job_id)
        if held is not None and not held.event.is_set():
            logger.info("Stop requested", extra={"job_id": job_id, "reason": reason})
            held.request(reason)
        self._remember(job_id, reason)
        write = asyncio.ensure_future(
            self._client.set(events.job_cancelled_key(job_id), reason, ex=CANCELLED_KEY_TTL_S)
        )
        self._writes.add(write)
        write.add_done_callback(self._write_done)

    def _remember(self, job_id: str, reason: str) -> None:
        self._recent[job_id] = reason
        while len(self._recent) > _REMEMBERED_CANCELS:
            self._recent.popitem(last=False)

    def _write_done(self, write: asyncio.Task[Any]) -> None:
        self._writes.discard(write)
        if not write.cancelled() and write.exception() is not None:
            logger.warning("Could not record a stop request: %s", type(write.exception()).__name__)

    # Conversation turns

    @contextmanager
    def turn_waiter(self, conversation_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever the conversation's generation slot is released anywhere."""
        waiter = asyncio.Event()
        self._turn_waiters.setdefault(conversation_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            waiters = self._turn_waiters.get(conversation_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._turn_waiters[conversation_id]

    def _on_turn_free(self, conversation_id: str) -> None:
        for waiter in self._turn_waiters.get(conversation_id, ()):
            waiter.set()

    # The listener

    async def _listen(self) -> None:
        delay_s = 0.1
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.psubscribe(_CANCEL_PATTERN, _TURN_PATTERN)
                self.ready.set()
                delay_s = 0.1
                async for message in pubsub.listen():
                    if message["type"] == "pmessage":
                        self._dispatch_safely(message)
            except Exception as exc:
                # Stop requests must keep being heard, whatever happened to the connection.
                self.ready.clear()
                if isinstance(exc, RedisError | OSError):
                    logger.warning("Control channel lost (%s); reconnecting", type(exc).__name__)
                else:
                    logger.exception("Control channel failed; reconnecting")
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, _RECONNECT_MAX_S)
            finally:
                with suppress(RedisError, OSError):
                    await pubsub.aclose()

    def _dispatch_safely(self, message: dict[str, Any]) -> None:
        try:
            self._dispatch(message)
        except Exception:
            logger.exception("Ignoring a control message that could not be handled")

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = _text(message["channel"])
        if channel.startswith(TURN_FREE_PREFIX):
            self._on_turn_free(channel.removeprefix(TURN_FREE_PREFIX))
            return
        job_id = channel.removeprefix("job:").removesuffix(":cancel")
        self._on_cancel(job_id, _cancel_reason(message["data"]))


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _cancel_reason(data: Any) -> str:
    """The API may send a bare string or `{"reason": ...}`; anything else is a plain stop."""
    payload: object
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        payload = _text(data)
    if isinstance(payload, dict) and isinstance(payload.get("reason"), str):
        return str(payload["reason"])[:200]
    if isinstance(payload, str) and payload.strip():
        return payload.strip()[:200]
    return "stopped on request"
