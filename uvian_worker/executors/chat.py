"""The `ai-chat` executor: read the conversation, stream the reply, save it, publish it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID, uuid5

from uvian_worker import events
from uvian_worker.clock import monotonic_s
from uvian_worker.errors import InvalidInput, NotAuthorized, NotFound
from uvian_worker.events import Publisher
from uvian_worker.executors.base import JobContext
from uvian_worker.executors.inputs import ChatInput, check_text, parse_input
from uvian_worker.executors.prompt import build_prompt
from uvian_worker.providers.base import PromptMessage, Provider, ReplyChunk, ReplyRequest, Usage
from uvian_worker.providers.deadlines import Deadlines, consume_stream
from uvian_worker.store.records import ASSISTANT_PROFILE_ID, ChatContext, ReplyRecord, SavedReply

logger = logging.getLogger(__name__)

# Reply message ids derive from job ids, so every run of a job names the same reply.
REPLY_ID_NAMESPACE = UUID("5f0c6a8e-3d1b-4c55-9a51-0b7e2d9c4a10")


def reply_message_id(job_id: UUID) -> UUID:
    return uuid5(REPLY_ID_NAMESPACE, str(job_id))


class ChatStore(Protocol):
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

    async def finish_reply(
        self,
        reply: ReplyRecord,
        *,
        job_status: str,
        job_output: dict[str, Any] | None,
        error_message: str | None = None,
        error_kind: str | None = None,
    ) -> SavedReply: ...


@dataclass(frozen=True, slots=True)
class ChatOptions:
    history_limit: int
    max_message_chars: int
    reply_max_tokens: int
    temperature: float
    deadlines: Deadlines


@dataclass(slots=True)
class _Reply:
    """The reply as it streams in."""

    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    model: str | None = None
    first_token_ms: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


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
    ) -> None:
        self._store = store
        self._provider = provider
        self._publisher = publisher
        self._options = options
        self._default_model = default_model

    async def run(self, job: JobContext) -> dict[str, Any]:
        chat = parse_input(ChatInput, job.input, what="ai-chat")
        _check_message(chat.message, self._options.max_message_chars)

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

        reply = await self._stream_reply(build_prompt(context, chat.message))
        saved = await self._save(job, chat, reply)
        if saved.written:
            await self._publish_reply(job, chat, saved)
        else:
            logger.warning("Another run of this job already saved its reply; keeping that one")
        return _result(saved)

    async def _stream_reply(self, prompt: list[PromptMessage]) -> _Reply:
        request = ReplyRequest(
            messages=prompt,
            max_tokens=self._options.reply_max_tokens,
            temperature=self._options.temperature,
        )
        reply = _Reply()
        started_s = monotonic_s()

        async def take(chunk: ReplyChunk) -> None:
            if chunk.text:
                if reply.first_token_ms is None:
                    reply.first_token_ms = (monotonic_s() - started_s) * 1000.0
                reply.parts.append(chunk.text)
            reply.finish_reason = chunk.finish_reason or reply.finish_reason
            reply.usage = chunk.usage or reply.usage
            reply.model = chunk.model or reply.model

        await consume_stream(self._provider.stream_reply(request), self._options.deadlines, take)
        return reply

    async def _save(self, job: JobContext, chat: ChatInput, reply: _Reply) -> SavedReply:
        message_id = reply_message_id(job.job_id)
        model = reply.model or self._default_model
        metadata: dict[str, Any] = {
            "model": model,
            "provider": self._provider.name,
            "jobId": str(job.job_id),
            "attempt": job.attempt,
            "finishReason": reply.finish_reason,
            "usage": _usage_json(reply.usage),
        }
        record = ReplyRecord(
            message_id=message_id,
            job_id=job.job_id,
            conversation_id=chat.conversation_id,
            reply_to_id=chat.message_id,
            content=reply.text,
            status="completed",
            metadata=metadata,
        )
        output = _result(SavedReply(True, message_id, reply.text, "completed", metadata))
        return await self._store.finish_reply(record, job_status="completed", job_output=output)

    async def _publish_reply(self, job: JobContext, chat: ChatInput, saved: SavedReply) -> None:
        usage = saved.metadata.get("usage") or {}
        event = {
            "type": "ai_response",
            "conversationId": str(chat.conversation_id),
            "messageId": str(saved.message_id),
            "replyToId": str(chat.message_id),
            "senderId": str(ASSISTANT_PROFILE_ID),
            "jobId": str(job.job_id),
            "status": saved.status,
            "content": saved.content,
            "model": saved.metadata.get("model"),
            "tokensUsed": usage.get("totalTokens"),
            "attempt": job.attempt,
            "timestamp": events.timestamp(),
        }
        await self._publisher.publish(events.conversation_channel(chat.conversation_id), event)
        await self._publish_status(job, "completed")

    async def _publish_status(self, job: JobContext, status: str) -> None:
        event = events.job_status_event(
            job.job_id, status, attempt=job.attempt, max_attempts=job.max_attempts
        )
        await self._publisher.publish(events.job_status_channel(job.job_id), event)


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


def _usage_json(usage: Usage | None) -> dict[str, int] | None:
    if usage is None:
        return None
    return {
        "promptTokens": usage.prompt_tokens,
        "completionTokens": usage.completion_tokens,
        "totalTokens": usage.total_tokens,
    }


def _result(saved: SavedReply) -> dict[str, Any]:
    usage = saved.metadata.get("usage") or {}
    return {
        "status": "completed",
        "messageId": str(saved.message_id),
        "content": saved.content,
        "model": saved.metadata.get("model"),
        "tokensUsed": usage.get("totalTokens"),
    }
