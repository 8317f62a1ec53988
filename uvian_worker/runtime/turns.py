"""One generation at a time per conversation, across every worker process.

A chat job streams only while it holds its conversation's slot: a Redis key
holding the job's id, with an expiry renewed while it runs, so a crashed
holder frees it within `ttl_ms`. A later run of the same job (a take-over)
may take the slot its earlier run left behind. Other jobs wait their turn,
woken through the control channel when the slot is released; in `supersede`
mode a newer job first asks the holder to stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import orjson
import redis.asyncio as redis
from redis.exceptions import RedisError

from uvian_worker import events
from uvian_worker.errors import TransientError
from uvian_worker.runtime.control import ControlChannel, turn_free_channel

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0  # a missed wake-up costs at most this much

# KEYS[1] slot; ARGV: job id, ttl ms. Returns "" when taken, else the holder's job id.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if not holder or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ''
end
return holder
"""

# KEYS[1] slot; ARGV: job id, channel. Frees the slot only for its holder.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], '1')
  return 1
end
return 0
"""

# KEYS[1] slot; ARGV: job id, ttl ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


def turn_key(conversation_id: object) -> str:
    return f"uvian:turn:{conversation_id}"


class ConversationTurns:
    def __init__(
        self,
        client: redis.Redis,
        control: ControlChannel,
        *,
        ttl_ms: int,
        supersede: bool = False,
        max_wait_s: float = 300.0,
    ) -> None:
        self._client = client
        self._control = control
        self._ttl_ms = ttl_ms
        self._supersede = supersede
        self._max_wait_s = max_wait_s
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)

    @asynccontextmanager
    async def turn(self, conversation_id: str, job_id: str) -> AsyncIterator[None]:
        """Hold the conversation's slot for the body; waits while another job holds it."""
        await self._wait_for_slot(conversation_id, job_id)
        renewing = asyncio.create_task(self._keep(conversation_id, job_id))
        try:
            yield
        finally:
            renewing.cancel()
            with suppress(asyncio.CancelledError):
                await renewing
            # Shielded: a cancelled job must still free its conversation.
            await asyncio.shield(self._free(conversation_id, job_id))

    async def _wait_for_slot(self, conversation_id: str, job_id: str) -> None:
        key = turn_key(conversation_id)
        asked_to_stop: set[str] = set()
        with self._control.turn_waiter(conversation_id) as freed:
            try:
                async with asyncio.timeout(self._max_wait_s):
                    while holder := await self._acquire(keys=[key], args=[job_id, self._ttl_ms]):
                        holder = holder.decode() if isinstance(holder, bytes) else str(holder)
                        if self._supersede and holder not in asked_to_stop:
                            asked_to_stop.add(holder)
                            await self._ask_to_stop(holder, job_id)
                        freed.clear()
                        with suppress(TimeoutError):
                            async with asyncio.timeout(POLL_INTERVAL_S):
                                await freed.wait()
            except TimeoutError:
                raise TransientError(
                    f"conversation busy for {self._max_wait_s:g} s with another reply"
                ) from None

    async def _ask_to_stop(self, holder: str, job_id: str) -> None:
        logger.info("Superseding the reply of job %s", holder)
        reason = orjson.dumps({"reason": f"superseded by job {job_id}"})
        await self._client.publish(events.job_cancel_channel(holder), reason)

    async def _keep(self, conversation_id: str, job_id: str) -> None:
        key = turn_key(conversation_id)
        while True:
            await asyncio.sleep(self._ttl_ms / 3000)
            try:
                await self._renew(keys=[key], args=[job_id, self._ttl_ms])
            except RedisError as exc:
                logger.warning("Could not renew the conversation's slot: %s", type(exc).__name__)

    async def _free(self, conversation_id: str, job_id: str) -> None:
        try:
            await self._release(
                keys=[turn_key(conversation_id)], args=[job_id, turn_free_channel(conversation_id)]
            )
        except RedisError as exc:
            # The slot then frees itself when its expiry passes.
            logger.warning("Could not free the conversation's slot: %s", type(exc).__name__)
