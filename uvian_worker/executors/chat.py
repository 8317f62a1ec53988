"""The `ai-chat` executor: read the conversation, stream the reply, save it, publish it.

One run: validate, mark the job processing while reading the conversation (one
statement), wait for the conversation's turn, stream the reply through a
`LiveReply` under the provider deadlines, then end the reply in one of its
final states with its one final event:
- completed: the reply and the job row are saved in one statement;
- stopped: a stop was asked for; the job ends cancelled, not retried;
- failed: a permanent error, or a transient one on the last attempt;
- kept open (generating): a transient error with attempts left; the next run
  restarts the text.
A run cancelled from outside (shutdown past its grace period) writes nothing
more: its job is retried and the next run takes the reply over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID, uuid4, uuid5

from uvian_worker import events
from uvian_worker.errors import (
    EventsUnavailable,
    InvalidInput,
    JobCancelled,
    NotAuthorized,
    NotFound,
    PermanentError,
    ReplySuperseded,
    TransientError,
    WorkerError,
)
from uvian_worker.events import Publisher
from uvian_worker.executors.base import JobContext
from uvian_worker.executors.context import FittedPrompt, TokenCounter, estimate_usage, fit_prompt
from uvian_worker.executors.inputs import ChatInput, check_text, parse_input
from uvian_worker.executors.prompt import system_message
from uvian_worker.executors.reply import (
    LiveReply,
    ReplyOptions,
    ReplyStore,
    ReplyTarget,
    publish_final,
)
from uvian_worker.providers.base import Provider, ReplyRequest
from uvian_worker.providers.deadlines import Deadlines, consume_stream
from uvian_worker.store.records import ChatContext, SavedReply, StaleReply

logger = logging.getLogger(__name__)

# Reply message ids derive from job ids, so every run of a job names the same reply.
REPLY_ID_NAMESPACE = UUID("5f0c6a8e-3d1b-4c55-9a51-0b7e2d9c4a10")


def reply_message_id(job_id: UUID) -> UUID:
    return uuid5(REPLY_ID_NAMESPACE, str(job_id))


class ChatStore(ReplyStore, Protocol):
    async def begin_chat(
        self,
        *,
        job_id: UUID,
        job_name: str,
        job_input: dict[str, Any],
        attempt: int,
        conversation_id: UUID,
        user_id: UUID,
        message_id: UUID,
        history_limit: int,
    ) -> ChatContext: ...

    async def get_reply(self, job_id: UUID) -> SavedReply | None: ...

    async def end_leftover_reply(self, job_id: UUID, status: str) -> StaleReply | None: ...


class Turns(Protocol):
    def turn(self, conversation_id: str, job_id: str) -> AbstractAsyncContextManager[None]: ...


class ReplyMetrics(Protocol):
    def first_token(self, seconds: float) -> None: ...

    def reply_tokens(self, count: int) -> None: ...


class NoTurns:
    """Conversations without a generation slot (tests of one job at a time)."""

    def turn(self, conversation_id: str, job_id: str) -> AbstractAsyncContextManager[None]:
        return _no_turn()


@dataclass(frozen=True, slots=True)
class ChatOptions:
    history_limit: int
    max_message_chars: int
    reply_max_tokens: int
    temperature: float
    deadlines: Deadlines
    counter: TokenCounter
    prompt_budget_tokens: int
    reply: ReplyOptions = field(default_factory=ReplyOptions)


class ChatExecutor:
    job_name = "ai-chat"

    def __init__(
        self,
        store: ChatStore,
        provider: Provider,
        publisher: Publisher,
        options: ChatOptions,
        *,
        default_model: str,
        turns: Turns | None = None,
        metrics: ReplyMetrics | None = None,
    ) -> None:
        self._store = store
        self._provider = provider
        self._publisher = publisher
        self._options = options
        self._default_model = default_model
        self._turns = turns or NoTurns()
        self._metrics = metrics

    async def run(self, job: JobContext) -> dict[str, Any]:
        chat = parse_input(ChatInput, job.input, what="ai-chat")
        _check_message(chat.message, self._options.max_message_chars)

        with job.timed("db_ms"):
            context = await self._store.begin_chat(
                job_id=job.job_id,
                job_name=job.name,
                job_input=job.input,
                attempt=job.attempt,
                conversation_id=chat.conversation_id,
                user_id=chat.user_id,
                message_id=chat.message_id,
                history_limit=self._options.history_limit,
            )
        if context.prior_job_status == "completed" and context.prior_output is not None:
            # Delivered again after a run that saved its reply (a worker that died
            # before BullMQ heard of it). The reply event is not sent twice; the
            # status is state, so repeating it is harmless and wakes any waiter.
            logger.info("Job already completed by an earlier run; returning its result")
            await self._publish_status(job, "completed")
            return context.prior_output
        _check_access(context, chat)
        await self._publish_status(job, "processing")

        turn_asked_s = time.perf_counter()
        prompt = fit_prompt(
            system_message(context.conversation_kind, context.conversation_title),
            context.history,
            chat.message,
            budget_tokens=self._options.prompt_budget_tokens,
            counter=self._options.counter,
        )
        async with self._turns.turn(str(chat.conversation_id), str(job.job_id)):
            job.timings_ms["turn_wait_ms"] = round(_since_ms(turn_asked_s), 2)
            if job.cancelled.is_set():
                raise JobCancelled(f"cancelled before it started: {job.cancel_reason}")
            return await self._reply(job, chat, prompt)

    async def _reply(
        self, job: JobContext, chat: ChatInput, prompt: FittedPrompt
    ) -> dict[str, Any]:
        target = ReplyTarget(
            message_id=reply_message_id(job.job_id),
            run_id=uuid4(),
            conversation_id=chat.conversation_id,
            reply_to_id=chat.message_id,
            provider=self._provider.name,
        )
        reply = LiveReply(job, target, self._store, self._publisher, self._options.reply)
        request = ReplyRequest(
            messages=prompt.messages,
            max_tokens=self._options.reply_max_tokens,
            temperature=self._options.temperature,
        )
        try:
            stream = consume_stream(
                self._provider.stream_reply(request, pace=reply.next_read_s),
                self._options.deadlines,
                reply.take,
            )
            with job.timed("stream_ms"):
                stopped = await _unless_stopped(stream, job.cancelled)
        except ReplySuperseded:
            return await self._result_of_winner(job, reply)
        except WorkerError as exc:
            await self._end_unfinished(job, reply, prompt, exc)
            raise
        finally:
            reply.close()

        if stopped and job.stop.quiet:
            raise ReplySuperseded(job.cancel_reason)
        if stopped:
            # Stopped before its first token, a reply never started: nothing to end.
            if reply.opened:
                await self._end(job, reply, prompt, "stopped")
            raise JobCancelled(job.cancel_reason)
        output = self._result(target.message_id, reply, prompt)
        if not await self._end(job, reply, prompt, "completed", job_output=output):
            return await self._result_of_winner(job, reply)
        await self._publish_status(job, "completed")
        return output

    async def _end(
        self,
        job: JobContext,
        reply: LiveReply,
        prompt: FittedPrompt,
        status: str,
        *,
        job_output: dict[str, Any] | None = None,
        error: WorkerError | None = None,
    ) -> bool:
        entry = self._attempt_entry(job, reply, prompt, status, error)
        if self._metrics is not None:
            if reply.first_token_s is not None:
                self._metrics.first_token(reply.first_token_s)
            self._metrics.reply_tokens(entry["usage"]["completionTokens"])
        metadata = {
            "model": reply.model or self._default_model,
            "provider": self._provider.name,
            "jobId": str(job.job_id),
            "attempt": job.attempt,
            "finishReason": reply.finish_reason,
            "usage": entry["usage"],
            "historyMessages": prompt.history_used,
            "historyTrimmed": prompt.history_trimmed,
        }
        return await reply.end(status, entry, metadata=metadata, job_output=job_output)

    async def _end_unfinished(
        self, job: JobContext, reply: LiveReply, prompt: FittedPrompt, exc: WorkerError
    ) -> None:
        """A failed attempt: end the reply as failed, or keep it open for the next attempt."""
        if not reply.opened:
            if not (isinstance(exc, TransientError) and not job.is_last_attempt):
                await self._end_leftover(job, "failed")
            return
        try:
            if isinstance(exc, TransientError) and not job.is_last_attempt:
                await reply.suspend(self._attempt_entry(job, reply, prompt, "retried", exc))
            elif isinstance(exc, PermanentError | TransientError):
                await self._end(job, reply, prompt, "failed", error=exc)
        except WorkerError as ending:
            # The reply stays generating; the sweep ends it if no run takes it over.
            logger.warning("Could not record the failed attempt's reply: %s", ending)

    async def cancelled_before_start(self, job: JobContext) -> None:
        """The job is stopped before this run began: end what an earlier attempt streamed."""
        await self._end_leftover(job, "stopped")

    async def _end_leftover(self, job: JobContext, status: str) -> None:
        """End, with its final event, a reply an earlier attempt left generating."""
        try:
            leftover = await self._store.end_leftover_reply(job.job_id, status)
        except WorkerError as exc:
            logger.warning("Could not end the earlier attempt's reply: %s", exc)
            return
        if leftover is not None:
            await publish_final(self._publisher, leftover, status)

    async def _result_of_winner(self, job: JobContext, reply: LiveReply) -> dict[str, Any]:
        """Another run owns the reply: return what it saved, publish nothing."""
        logger.warning("Another run of this job owns its reply; this run stops here")
        saved = await self._store.get_reply(job.job_id)
        if saved is None or saved.status != "completed":
            raise ReplySuperseded("another run of this job is producing its reply")
        usage = saved.metadata.get("usage") or {}
        return {
            "status": "completed",
            "messageId": str(saved.message_id),
            "content": saved.content,
            "model": saved.metadata.get("model"),
            "tokensUsed": usage.get("totalTokens"),
        }

    def _attempt_entry(
        self,
        job: JobContext,
        reply: LiveReply,
        prompt: FittedPrompt,
        status: str,
        error: WorkerError | None = None,
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "attempt": job.attempt,
            "status": status,
            "usage": self._usage_json(reply, prompt),
            "firstTokenMs": _ms(reply.first_token_s),
        }
        if error is not None:
            entry["errorKind"] = error.kind
        return entry

    def _result(self, message_id: UUID, reply: LiveReply, prompt: FittedPrompt) -> dict[str, Any]:
        return {
            "status": "completed",
            "messageId": str(message_id),
            "content": reply.text,
            "model": reply.model or self._default_model,
            "tokensUsed": self._usage_json(reply, prompt)["totalTokens"],
        }

    def _usage_json(self, reply: LiveReply, prompt: FittedPrompt) -> dict[str, Any]:
        """The provider's usage when it reported one, else counted here and marked estimated."""
        usage = reply.usage
        estimated = usage is None
        if usage is None:
            usage = estimate_usage(prompt.prompt_tokens, reply.text, self._options.counter)
        return {
            "promptTokens": usage.prompt_tokens,
            "completionTokens": usage.completion_tokens,
            "totalTokens": usage.total_tokens,
            "estimated": estimated,
        }

    async def _publish_status(self, job: JobContext, status: str) -> None:
        event = events.job_status_event(
            job.job_id, status, attempt=job.attempt, max_attempts=job.max_attempts
        )
        try:
            with job.timed("publish_ms"):
                await self._publisher.publish(events.job_status_channel(job.job_id), event)
        except EventsUnavailable as exc:
            logger.warning("Could not publish the job's status: %s", exc)


async def _unless_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run `work` until it ends or `stop` is set; true when it was stopped.

    Stopping cancels the work, which closes the provider's stream (and cancels
    a RunPod job) from inside its own `finally`.
    """
    if stop.is_set():
        work.close()
        return True
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
    if task.cancelled():
        return True
    task.result()  # re-raise the stream's own failure
    return False


def _check_message(message: str, max_chars: int) -> None:
    try:
        check_text(message, max_chars=max_chars)
    except ValueError as exc:
        raise InvalidInput(f"invalid ai-chat input: message {exc}") from None


def _check_access(context: ChatContext, chat: ChatInput) -> None:
    if not context.conversation_found:
        raise NotFound(f"conversation {chat.conversation_id} does not exist")
    if not context.user_is_member:
        raise NotAuthorized(
            f"user {chat.user_id} is not a member of conversation {chat.conversation_id}"
        )
    if not context.message_found:
        raise NotFound(f"message {chat.message_id} is not in conversation {chat.conversation_id}")


def _since_ms(started_s: float) -> float:
    return (time.perf_counter() - started_s) * 1000.0


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


@asynccontextmanager
async def _no_turn() -> AsyncIterator[None]:
    yield
