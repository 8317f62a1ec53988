"""The publisher's delta queue on the real Redis: deltas handed over without waiting go
out in order, in few round trips, a connection Redis dropped is replaced, and a failure
reaches every waiting delta."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import uuid4

import pytest
import redis.asyncio as redis

from tests.faults.redis_server import PrivateRedis
from tests.support import TEST_REDIS_URL, record_events
from uvian_worker.errors import EventsUnavailable
from uvian_worker.events import RedisPublisher, conversation_channel, reply_stream_key


def delta_event(conversation: str, message: str, seq: int) -> dict[str, object]:
    return {
        "type": "ai_delta",
        "conversationId": conversation,
        "messageId": message,
        "attempt": 1,
        "seq": seq,
        "delta": f"<{seq}>",
    }


async def test_deltas_handed_over_at_once_arrive_in_order_on_channel_and_stream() -> None:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    publisher = RedisPublisher(client)
    replies = [(str(uuid4()), str(uuid4())) for _ in range(20)]
    round_trips = 0
    round_trip = publisher._deltas._round_trip

    async def counting_round_trip(packed: bytes, count: int) -> list[object]:
        nonlocal round_trips
        round_trips += 1
        return await round_trip(packed, count)

    publisher._deltas._round_trip = counting_round_trip  # type: ignore[method-assign]
    try:
        async with record_events(*(conversation_channel(c) for c, _ in replies)) as recorder:
            sent = []
            # 20 replies of 30 deltas each, handed over across several loop turns while the
            # earlier pipelines are still on their way.
            for seq in range(1, 31):
                for conversation, message in replies:
                    event = delta_event(conversation, message, seq)
                    sent.append(
                        publisher.send_delta(
                            conversation_channel(conversation),
                            event,
                            stream_key=reply_stream_key(message),
                            restart=seq == 1,
                        )
                    )
                if seq % 3 == 0:
                    await asyncio.sleep(0)
            await asyncio.gather(*sent)
            await recorder.wait_for(lambda _c, e: e.get("seq") == 30, count=len(replies))

            for conversation, message in replies:
                on_channel = [e["seq"] for e in recorder.on(conversation_channel(conversation))]
                assert on_channel == list(range(1, 31))
                entries = await client.xrange(reply_stream_key(message))
                assert [int(fields[b"seq"]) for _id, fields in entries] == list(range(1, 31))
        assert round_trips <= 12  # one per batch, not one per delta (600)
    finally:
        for _conversation, message in replies:
            await client.delete(reply_stream_key(message))
        await client.aclose()


def send_one(publisher: RedisPublisher, conversation: str, message: str, seq: int) -> Any:
    return publisher.send_delta(
        conversation_channel(conversation),
        delta_event(conversation, message, seq),
        stream_key=reply_stream_key(message),
        restart=seq == 1,
    )


async def test_a_stream_entry_refused_still_publishes_the_delta() -> None:
    # An older run of a taken-over job streaming beside the new one: its entry ids are
    # not above the stream's last, Redis refuses the XADD, the publish goes on.
    client = redis.Redis.from_url(TEST_REDIS_URL)
    publisher = RedisPublisher(client)
    conversation, message = str(uuid4()), str(uuid4())
    try:
        async with record_events(conversation_channel(conversation)) as recorder:
            await send_one(publisher, conversation, message, 1)
            await send_one(publisher, conversation, message, 5)
            await send_one(publisher, conversation, message, 3)  # refused by the stream
            await recorder.wait_for(lambda _c, e: e.get("seq") == 3)
        entries = await client.xrange(reply_stream_key(message))
        assert [int(fields[b"seq"]) for _id, fields in entries] == [1, 5]
        assert [e["seq"] for e in recorder.on(conversation_channel(conversation))] == [1, 5, 3]
    finally:
        await client.delete(reply_stream_key(message))
        await client.aclose()


async def test_any_other_refusal_is_logged_as_a_warning_and_the_delta_still_goes_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A key of the wrong type stands in for out of memory or a read-only replica: the
    # stream refuses the entry, clients still get the delta, and the log says why.
    client = redis.Redis.from_url(TEST_REDIS_URL)
    publisher = RedisPublisher(client)
    conversation, message = str(uuid4()), str(uuid4())
    await client.set(reply_stream_key(message), "not a stream")
    try:
        async with record_events(conversation_channel(conversation)) as recorder:
            await send_one(publisher, conversation, message, 2)
            await recorder.wait_for(lambda _c, e: e.get("seq") == 2)
    finally:
        await client.delete(reply_stream_key(message))
        await client.aclose()
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "WRONGTYPE" in warning.getMessage()


async def test_a_connection_redis_dropped_is_replaced_and_the_delta_goes_out() -> None:
    with PrivateRedis() as server:
        client = redis.Redis.from_url(server.url)
        publisher = RedisPublisher(client)
        conversation, message = str(uuid4()), str(uuid4())
        try:
            await send_one(publisher, conversation, message, 1)  # pools a connection
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.start)  # the pooled connection is dead now

            await send_one(publisher, conversation, message, 2)

            entries = await client.xrange(reply_stream_key(message))
            assert [int(fields[b"seq"]) for _id, fields in entries] == [2]
        finally:
            await client.aclose()


async def test_a_failed_round_trip_fails_every_delta_it_carried() -> None:
    # Nothing listens on this port: every send fails as Redis being unavailable.
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    publisher = RedisPublisher(client)
    conversation, message = str(uuid4()), str(uuid4())
    try:
        sent = [
            publisher.send_delta(
                conversation_channel(conversation),
                delta_event(conversation, message, seq),
                stream_key=reply_stream_key(message),
                restart=seq == 1,
            )
            for seq in (1, 2, 3)
        ]
        for future in sent:
            with pytest.raises(EventsUnavailable):
                await future
    finally:
        await client.aclose()


async def test_deltas_queued_behind_a_batch_that_broke_are_failed_not_left_waiting() -> None:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    publisher = RedisPublisher(client)
    conversation, message = str(uuid4()), str(uuid4())
    started = asyncio.Event()

    async def breaking_send(_batch: object) -> None:
        started.set()
        await asyncio.sleep(0.05)  # the next deltas are queued meanwhile
        raise RuntimeError("unforeseen")

    publisher._deltas._send = breaking_send  # type: ignore[method-assign]

    def send(seq: int) -> asyncio.Future[None]:
        return publisher.send_delta(
            conversation_channel(conversation),
            delta_event(conversation, message, seq),
            stream_key=reply_stream_key(message),
            restart=seq == 1,
        )

    try:
        first = send(1)
        await started.wait()
        queued_behind = [send(2), send(3)]
        async with asyncio.timeout(5):
            for future in (first, *queued_behind):
                with pytest.raises(EventsUnavailable):
                    await future
    finally:
        await client.aclose()
