"""A reply while it streams: deltas to clients, the row in Postgres, and its one final event.

The reply row exists from the first token (status `generating`) and its text is
saved every `save_interval_s`, so a crash loses little. Deltas are coalesced: at
most one per `delta_window_s`, sooner when `delta_max_chars` is pending, never
dropped or reordered, and their concatenation is the saved text. The first delta
of a run carries `restart: true`: a client discards any text it holds for that
message (an earlier run's) and starts over.

A provider that asks `next_read_s` reads the stream once per window, at its
close, and that read sends the window's delta. A window that brought
`delta_max_chars` or more (a stream too fast for the window) makes the reads
eager again, so from then on the size threshold sends deltas as the text comes.

Every run of a chat job has its own `run_id`; the newest run owns the reply.
When this run's write finds the reply owned by another run, `ReplySuperseded`
stops it quietly: that other run will publish the final event.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

from uvian_worker import events
from uvian_worker.clock import monotonic_s
from uvian_worker.errors import EventsUnavailable, ReplySuperseded
from uvian_worker.events import Publisher
from uvian_worker.executors.base import JobContext
from uvian_worker.observability.logs import LogThrottle
from uvian_worker.providers.base import ReplyChunk, Usage
from uvian_worker.store.records import ASSISTANT_PROFILE_ID, ReplyRecord, StaleReply

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 1.0  # BullMQ progress updates, for Node `QueueEvents` listeners
# uvloop's timers can fire a fraction of a millisecond early (they count whole
# milliseconds): a window counts as closed this much before its exact end, so the read
# at a window's close always sends.
_TIMER_SLACK_S = 0.002

_throttle = LogThrottle()


class ReplyStore(Protocol):
    async def start_reply(self, reply: ReplyRecord) -> bool: ...

    async def save_partial(self, job_id: UUID, run_id: UUID, content: str) -> bool: ...

    async def end_reply(
        self,
        reply: ReplyRecord,
        attempt_entry: dict[str, Any],
        *,
        job_output: dict[str, Any] | None = None,
    ) -> bool: ...

    async def suspend_reply(
        self, job_id: UUID, run_id: UUID, attempt_entry: dict[str, Any], content: str
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class ReplyOptions:
    delta_window_s: float = 0.05
    delta_max_chars: int = 512
    save_interval_s: float = 2.0


@dataclass(frozen=True, slots=True)
class ReplyTarget:
    """Which reply this is: its ids and where it is published."""

    message_id: UUID
    run_id: UUID
    conversation_id: UUID
    reply_to_id: UUID
    provider: str


class LiveReply:
    def __init__(
        self,
        job: JobContext,
        target: ReplyTarget,
        store: ReplyStore,
        publisher: Publisher,
        options: ReplyOptions,
    ) -> None:
        self._job = job
        self._target = target
        self._store = store
        self._publisher = publisher
        self._options = options
        self._channel = events.conversation_channel(target.conversation_id)
        # What every delta event of this run repeats, made once (a reply sends ~20 a second).
        self._delta_fields: dict[str, Any] = {
            "type": "ai_delta",
            "conversationId": str(target.conversation_id),
            "messageId": str(target.message_id),
            "jobId": str(job.job_id),
            "attempt": job.attempt,
        }
        self._stream_key = events.reply_stream_key(target.message_id)

        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.model: str | None = None
        self.first_token_s: float | None = None

        self._started_s = monotonic_s()
        self._opened = False
        self._seq = 0
        self._pending: list[str] = []
        self._pending_chars = 0
        self._last_delta_s = 0.0
        self._last_delta_chars = 0
        self._last_save_s = 0.0
        self._last_progress_s = 0.0
        self._timer: asyncio.TimerHandle | None = None
        # The newest delta handed to the publisher; the final event waits for it.
        self._last_sent: asyncio.Future[None] | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def opened(self) -> bool:
        return self._opened

    def next_read_s(self) -> float:
        """When reading more of the stream can next change what clients see: the close of
        the current delta window (at once before the first token, which goes out as it
        comes). A provider that asks this reads no sooner, and its read at the close
        sends what came during the window; the timer is left for text still pending.
        After a window that brought `delta_max_chars` or more, at once as well."""
        if not self._opened or self._last_delta_chars >= self._options.delta_max_chars:
            return 0.0
        return self._last_delta_s + self._options.delta_window_s

    async def take(self, chunk: ReplyChunk) -> None:
        """Everything a provider's chunk changes: text, finish reason, usage, model."""
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.usage = chunk.usage or self.usage
        self.model = chunk.model or self.model
        if not chunk.text:
            return

        self.parts.append(chunk.text)
        self._pending.append(chunk.text)
        self._pending_chars += len(chunk.text)
        now_s = monotonic_s()
        if not self._opened:
            await self._open(now_s)
            return
        if (
            now_s - self._last_delta_s >= self._options.delta_window_s - _TIMER_SLACK_S
            or self._pending_chars >= self._options.delta_max_chars
        ):
            self._send_pending()
        elif self._timer is None:
            # Text that arrives inside a window still goes out when the window closes.
            delay_s = self._last_delta_s + self._options.delta_window_s - now_s
            self._timer = asyncio.get_running_loop().call_later(delay_s, self._on_timer)
        if now_s - self._last_save_s >= self._options.save_interval_s:
            await self._save_partial(now_s)
        if now_s - self._last_progress_s >= PROGRESS_INTERVAL_S:
            await self._report_progress(now_s)

    async def _open(self, now_s: float) -> None:
        """The first token: open the row this run owns, then publish the text.

        The row comes first so that the API, given any delta, finds its message.
        """
        self.first_token_s = now_s - self._started_s
        with self._job.timed("db_ms"):
            opened = await self._store.start_reply(self._record("generating", ""))
        if not opened:
            raise ReplySuperseded("another run of this job already finished its reply")
        self._opened = True
        self._last_save_s = now_s
        self._send_pending()
        await self._report_progress(now_s)

    def _on_timer(self) -> None:
        self._timer = None
        self._send_pending()

    def _send_pending(self) -> None:
        """Hand what is pending to the publisher as one delta, without waiting for Redis.

        The publisher sends the deltas in the order they were handed over, so
        nothing here needs to wait for one delta before the next.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        delta = "".join(self._pending)
        self._last_delta_chars = self._pending_chars
        self._pending.clear()
        self._pending_chars = 0
        self._seq += 1
        self._last_delta_s = monotonic_s()
        event = {**self._delta_fields, "seq": self._seq, "delta": delta}
        if self._seq == 1:
            event["restart"] = True
        sent = self._publisher.send_delta(
            self._channel, event, stream_key=self._stream_key, restart=self._seq == 1
        )
        sent.add_done_callback(self._on_sent)
        self._last_sent = sent

    def _on_sent(self, sent: asyncio.Future[None]) -> None:
        if sent.cancelled():
            return
        exc = sent.exception()
        if isinstance(exc, EventsUnavailable):
            # Deltas are best effort: the text is saved, and the final event carries it.
            self._warn("Could not publish a reply delta: %s", exc)
        elif exc is not None:
            logger.error("Publishing a reply delta failed: %r", exc)

    async def flush(self) -> None:
        """Publish what is pending and wait until every delta handed over is sent."""
        self._send_pending()
        if self._last_sent is None:
            return
        with self._job.timed("publish_ms"):
            await asyncio.wait([self._last_sent])

    async def _save_partial(self, now_s: float) -> None:
        self._last_save_s = now_s
        saved = await self._store.save_partial(self._job.job_id, self._target.run_id, self.text)
        if not saved:
            raise ReplySuperseded("another run of this job owns its reply now")

    async def _report_progress(self, now_s: float) -> None:
        self._last_progress_s = now_s
        progress = {
            "messageId": str(self._target.message_id),
            "seq": self._seq,
            "chars": sum(len(part) for part in self.parts),
        }
        try:
            await self._job.report_progress(progress)
        except Exception as exc:  # noqa: BLE001 - progress is advisory; the reply goes on
            logger.warning("Could not report progress to BullMQ: %s", type(exc).__name__)

    async def end(
        self,
        status: str,
        attempt_entry: dict[str, Any],
        *,
        metadata: dict[str, Any],
        job_output: dict[str, Any] | None = None,
    ) -> bool:
        """Flush, save the reply's final state, and publish its one final event.

        Returns false, publishing nothing, when another run owns the reply.
        """
        self.close()
        await self.flush()
        record = self._record(status, self.text, metadata)
        with self._job.timed("db_ms"):
            ended = await self._store.end_reply(record, attempt_entry, job_output=job_output)
        if not ended:
            return False
        event = {
            "type": "ai_response",
            "conversationId": str(self._target.conversation_id),
            "messageId": str(self._target.message_id),
            "replyToId": str(self._target.reply_to_id),
            "senderId": str(ASSISTANT_PROFILE_ID),
            "jobId": str(self._job.job_id),
            "status": status,
            "content": record.content,
            "model": metadata.get("model"),
            "tokensUsed": (attempt_entry.get("usage") or {}).get("totalTokens"),
            "attempt": self._job.attempt,
            "timestamp": events.timestamp(),
        }
        try:
            with self._job.timed("publish_ms"):
                await self._publisher.publish_reply_end(
                    self._channel, event, stream_key=self._stream_key, seq=self._seq + 1
                )
        except EventsUnavailable as exc:
            # Saved all the same; clients see it when they load the conversation.
            self._warn("Could not publish the reply's final event: %s", exc)
        return True

    def _warn(self, message: str, exc: Exception) -> None:
        if _throttle.allow(message) is not None:
            logger.warning(message, exc)

    async def suspend(self, attempt_entry: dict[str, Any]) -> None:
        """A transient failure with attempts left: record the attempt, keep the reply open."""
        self.close()
        await self.flush()
        await self._store.suspend_reply(
            self._job.job_id, self._target.run_id, attempt_entry, self.text
        )

    def close(self) -> None:
        """Stop the delta timer; safe on every exit path, cancellation included."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _opening_metadata(self) -> dict[str, Any]:
        # `queue` tells the reply sweep which workers may judge whether the job is gone.
        return {
            "provider": self._target.provider,
            "jobId": str(self._job.job_id),
            "queue": self._job.queue,
        }

    def _record(
        self, status: str, content: str, metadata: dict[str, Any] | None = None
    ) -> ReplyRecord:
        return ReplyRecord(
            message_id=self._target.message_id,
            job_id=self._job.job_id,
            run_id=self._target.run_id,
            conversation_id=self._target.conversation_id,
            reply_to_id=self._target.reply_to_id,
            content=content,
            status=status,
            metadata=metadata
            or {"provider": self._target.provider, "jobId": str(self._job.job_id)},
        )


async def publish_final(publisher: Publisher, reply: StaleReply, status: str) -> None:
    """The final event of a reply no run is streaming (ended by the sweep, or after its
    job stopped or failed between attempts); best effort, like every event."""
    event = {
        "type": "ai_response",
        "conversationId": str(reply.conversation_id),
        "messageId": str(reply.id),
        "replyToId": str(reply.reply_to_id) if reply.reply_to_id else None,
        "senderId": str(ASSISTANT_PROFILE_ID),
        "jobId": str(reply.job_id),
        "status": status,
        "content": reply.content,
        "model": None,
        "tokensUsed": None,
        "attempt": None,
        "timestamp": events.timestamp(),
    }
    try:
        await publisher.publish_reply_end(
            events.conversation_channel(reply.conversation_id),
            event,
            stream_key=events.reply_stream_key(reply.id),
            seq=None,
        )
    except EventsUnavailable as exc:
        logger.warning("Could not publish a reply's final event: %s", exc)
