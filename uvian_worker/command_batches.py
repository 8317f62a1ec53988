"""Redis commands packed by their callers and sent in batches, one round trip at a time.

Deltas (one per streaming reply every 50 ms) and BullMQ progress updates (one per
reply every second) are the worker's most frequent Redis traffic. Sent through
redis-py one by one or in its pipelines, each command costs command objects, an
encoder call per argument and a parse and callback per reply: at a thousand
replies that was more CPU than the rest of their publishing. Here each caller
packs its commands in C (hiredis) as it hands them over, and one sender writes
what is queued in one go and reads the replies back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import hiredis
import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

logger = logging.getLogger(__name__)

Arg = bytes | bytearray | memoryview | str | int | float
# What a caller's replies must satisfy: it raises to fail that caller's future.
Check = Callable[[list[Any]], None]
# What a broken round trip (or one that never happened) becomes for its callers.
Broken = Callable[[BaseException], Exception]


def pack(*args: Arg) -> bytes:
    """One command in Redis's wire format."""
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]  # stub: a 1-tuple
    return packed


class CommandBatcher:
    """Sends queued commands on one pooled connection of `client`, in the order queued.

    What is queued while a batch is on its way goes in the next, so no two
    batches overtake each other. A command's error reply is handed to its
    caller's check like any reply; a broken connection fails the whole batch.
    Nothing is resent after a failure: the commands before the break may have
    run (a delta published twice would reach clients twice). The pool checks a
    connection as it hands it out and reconnects one Redis closed.
    """

    def __init__(self, client: redis.Redis, what: str, broken: Broken) -> None:
        self._client = client
        self._what = what
        self._broken = broken
        self._queued: list[tuple[list[bytes], Check, asyncio.Future[None]]] = []
        self._sender: asyncio.Task[None] | None = None

    def send(self, commands: list[bytes], check: Check) -> asyncio.Future[None]:
        """Queue `commands`; the future ends when their replies passed `check`."""
        sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queued.append((commands, check, sent))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.ensure_future(self._send_queued())
        return sent

    async def _send_queued(self) -> None:
        while self._queued:
            batch, self._queued = self._queued, []
            try:
                await self._send(batch)
            except BaseException as exc:
                # Cancelled (the worker stopping) or broken in an unforeseen way: no
                # caller may wait for commands that will never be sent, this batch's
                # or those queued behind it.
                batch, self._queued = batch + self._queued, []
                self._fail(batch, exc)
                if not isinstance(exc, Exception):
                    raise
                logger.exception("Sending %s failed", self._what)
                return

    async def _send(self, batch: list[tuple[list[bytes], Check, asyncio.Future[None]]]) -> None:
        counts = [len(commands) for commands, _check, _sent in batch]
        packed = b"".join(command for commands, _check, _sent in batch for command in commands)
        try:
            replies = await self._round_trip(packed, sum(counts))
        except (RedisError, OSError) as exc:
            self._fail(batch, exc)
            return
        start = 0
        for count, (_commands, check, sent) in zip(counts, batch, strict=True):
            outcome = replies[start : start + count]
            start += count
            if sent.done():
                continue
            try:
                check(outcome)
            except Exception as refused:  # noqa: BLE001 - the check's verdict, for its caller
                sent.set_exception(refused)
            else:
                sent.set_result(None)

    def _fail(
        self, batch: list[tuple[list[bytes], Check, asyncio.Future[None]]], exc: BaseException
    ) -> None:
        for _commands, _check, sent in batch:
            if not sent.done():
                sent.set_exception(self._broken(exc))

    async def _round_trip(self, packed: bytes, count: int) -> list[Any]:
        """Send packed commands and read their `count` replies, error replies included."""
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
