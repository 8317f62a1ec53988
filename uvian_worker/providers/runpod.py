"""The RunPod Serverless provider, over the endpoint's native job API.

One reply is one RunPod job: `POST /run` queues it, `GET /stream/{id}` is polled
for the items the handler has produced so far, and once the stream shows a
terminal status `GET /status/{id}` gives the final word (and the only copy of a
failure's error). RunPod hands each stream item out exactly once, so every item
of every poll is read before the next poll is made.

vLLM workers put one of two things in an item's `output`: a batch of tokens
(`{"choices": [{"tokens": [...]}], "usage": {...}}`, or a bare string), or a
fragment of an OpenAI chat-completions event stream, cut wherever the worker's
batching happened to cut it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncGenerator, Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson

from uvian_worker.errors import (
    ProviderFailed,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    WorkerError,
)
from uvian_worker.providers.base import ReadPace, ReplyChunk, ReplyRequest, Usage
from uvian_worker.providers.sse import SSEDecoder

logger = logging.getLogger(__name__)

_TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
# One HTTP exchange with RunPod; the reply's own deadlines are the caller's to enforce.
_READ_TIMEOUT_S = 30.0
# The cancel runs while a reply is being abandoned, so it may delay that only briefly.
_CANCEL_TIMEOUT_S = 2.0
_ERROR_TEXT_MAX_CHARS = 300
_SSE_FIELD = "data:"
# Words in a failed job's error that mean the request itself is bad, not the server.
_REJECTION_HINTS = ("context length", "too long", "invalid", "validation", "bad request")


class RunPodProvider:
    """Streams replies from one RunPod Serverless endpoint (a vLLM worker)."""

    name = "runpod"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        model: str,
        poll_interval_s: float = 0.05,
        connect_timeout_s: float = 10.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._model = model
        self._poll_interval_s = poll_interval_s
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=_READ_TIMEOUT_S
        )
        # Created on first use when not given, so that it belongs to the running loop.
        self._session = session
        self._owns_session = session is None
        # Cancels that outlived the reply that started them (its task was cancelled
        # again while waiting); held so they are neither collected nor forgotten.
        self._pending_cancels: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        if self._pending_cancels:
            await asyncio.gather(*self._pending_cancels, return_exceptions=True)
        if self._owns_session and self._session is not None:
            await self._session.close()

    async def stream_reply(
        self, request: ReplyRequest, *, pace: ReadPace | None = None
    ) -> AsyncGenerator[ReplyChunk, None]:
        # `pace` goes unused: each poll of `/stream` already brings everything produced
        # since the last one, so the reads follow the polls, not the tokens.
        job = _Job(await self._submit(request), _OutputReader(self._redact))
        try:
            while job.status not in _TERMINAL_STATUSES:
                items = await self._poll(job)
                for chunk in job.reader.read_items(items):
                    yield chunk
                if not items and job.status not in _TERMINAL_STATUSES:
                    await asyncio.sleep(self._poll_interval_s)

            for chunk in job.reader.finish():
                yield chunk
            yield await self._conclude(job)
        finally:
            # Abandoned before RunPod finished it (closed early, an error, or the
            # task cancelled): the job would otherwise keep a GPU busy and billed.
            if job.status not in _TERMINAL_STATUSES:
                await self._cancel_remote(job.id)

    async def _submit(self, request: ReplyRequest) -> str:
        sampling = {"max_tokens": request.max_tokens, "temperature": request.temperature}
        job_input = {
            "messages": list(request.messages),
            "sampling_params": sampling,
            "stream": True,
            "model": self._model,
        }
        body = await self._call("POST", "/run", {"input": job_input})

        job_id = body.get("id")
        if not isinstance(job_id, str) or not job_id:
            raise ProviderFailed("RunPod /run answered without a job id")
        logger.debug("RunPod job %s queued on %s", job_id, self._base_url)
        return job_id

    async def _poll(self, job: _Job) -> list[object]:
        """Fetch the items produced since the last poll and note the job's status."""
        body = await self._call("GET", f"/stream/{job.id}")

        status = body.get("status")
        if isinstance(status, str):
            job.status = status
        items = body.get("stream")
        return list(items) if isinstance(items, list) else []

    async def _conclude(self, job: _Job) -> ReplyChunk:
        body = await self._call("GET", f"/status/{job.id}")
        status = body.get("status")
        final_status = status if status in _TERMINAL_STATUSES else job.status
        logger.debug("RunPod job %s ended %s", job.id, final_status)

        if final_status != "COMPLETED":
            raise self._failure(job.id, final_status, body.get("error"))
        return ReplyChunk(
            finish_reason=job.reader.finish_reason or "stop",
            usage=job.reader.usage,
            model=job.reader.model or self._model,
        )

    def _failure(self, job_id: str, status: str, error: object) -> WorkerError:
        detail = self._redact(_error_text(error)) or "no error given"
        message = f"RunPod job {job_id} ended {status}: {detail}"
        if status == "TIMED_OUT":
            return ProviderTimeout(message)
        if status == "FAILED":
            return _model_server_error(message, detail)
        return ProviderFailed(message)

    async def _cancel_remote(self, job_id: str) -> None:
        # Shielded so that a cancelled task still stops the remote job; if the task
        # is cancelled again meanwhile, the cancel finishes on its own.
        cancel = asyncio.ensure_future(self._send_cancel(job_id))
        self._pending_cancels.add(cancel)
        cancel.add_done_callback(self._pending_cancels.discard)
        await asyncio.shield(cancel)

    async def _send_cancel(self, job_id: str) -> None:
        try:
            async with asyncio.timeout(_CANCEL_TIMEOUT_S):
                await self._call("POST", f"/cancel/{job_id}")
        except (WorkerError, TimeoutError, RuntimeError) as exc:
            # RuntimeError: the session was already closed. Nothing is left to try;
            # RunPod's own execution timeout ends the job.
            logger.warning("could not cancel RunPod job %s: %r", job_id, exc)
            return
        logger.info("cancelled RunPod job %s, its reply was abandoned", job_id)

    async def _call(self, method: str, path: str, payload: object = None) -> dict[str, Any]:
        """One request to the endpoint; every failure leaves as a WorkerError."""
        route = path.split("/", 2)[1]
        status, retry_after, text = await self._exchange(method, path, payload)
        if status >= 400:
            raise self._http_error(route, status, retry_after, text)

        try:
            body = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ProviderFailed(f"RunPod /{route} answered with malformed JSON") from exc
        if not isinstance(body, dict):
            raise ProviderFailed(f"RunPod /{route} answered with a non-object JSON")
        return body

    async def _exchange(
        self, method: str, path: str, payload: object
    ) -> tuple[int, str | None, str]:
        """The raw exchange: (HTTP status, Retry-After, body). The one place where
        aiohttp's errors are translated."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.request(
                method,
                self._base_url + path,
                json=payload,
                headers=self._headers,
                timeout=self._timeout,
            ) as response:
                text = await response.text(errors="replace")
                return response.status, response.headers.get("Retry-After"), text
        except TimeoutError as exc:
            raise ProviderUnavailable(f"RunPod {method} {path} timed out") from exc
        except aiohttp.ClientError as exc:
            reason = type(exc).__name__
            raise ProviderUnavailable(f"RunPod {method} {path} failed: {reason}") from exc

    def _http_error(
        self, route: str, status: int, retry_after: str | None, text: str
    ) -> WorkerError:
        if status in (401, 403):
            return ProviderRejected(f"RunPod /{route} refused the API key (HTTP {status})")

        message = f"RunPod /{route} answered HTTP {status}: {self._redact(text)}"
        if status == 429 or status >= 500:
            return ProviderUnavailable(message, retry_after_s=_parse_retry_after(retry_after))
        return ProviderRejected(message)

    def _redact(self, text: str) -> str:
        """A server's text fit for an error message: one short line, without the API key."""
        if self._api_key:
            text = text.replace(self._api_key, "[redacted]")
        return " ".join(text.split())[:_ERROR_TEXT_MAX_CHARS]


class _Job:
    """The state of one RunPod job while its reply streams."""

    def __init__(self, job_id: str, reader: _OutputReader) -> None:
        self.id = job_id
        self.status = "IN_QUEUE"
        self.reader = reader


class _OutputReader:
    """Turns the outputs of one job's stream items into reply chunks, and keeps
    what the final chunk reports: finish reason, usage and model."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        self._redact = redact
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.model: str | None = None
        # Whether string outputs are event-stream fragments; None until the first
        # characters tell, since a fragment may end before "data:" is complete.
        self._is_sse: bool | None = None
        self._undecided = ""
        self._decoder = SSEDecoder()

    def read_items(self, items: list[object]) -> list[ReplyChunk]:
        chunks: list[ReplyChunk] = []
        for item in items:
            output = item.get("output") if isinstance(item, dict) else None
            if isinstance(output, str):
                chunks += self._read_string(output)
            elif isinstance(output, dict):
                chunks += self._read_token_batch(output)
            else:
                logger.debug("skipped a RunPod stream item of no known shape: %.200r", item)
        return [chunk for chunk in chunks if chunk.text]

    def finish(self) -> list[ReplyChunk]:
        """The stream is over: hand out whatever was held back."""
        if self._is_sse:
            return [chunk for p in self._decoder.finish() if (chunk := self._read_event(p))]
        leftover, self._undecided = self._undecided, ""
        return [ReplyChunk(text=leftover)] if leftover else []

    def _read_string(self, text: str) -> list[ReplyChunk]:
        if self._is_sse is None:
            self._undecided += text
            head = self._undecided.lstrip()
            if _SSE_FIELD.startswith(head):
                return []
            self._is_sse = head.startswith(_SSE_FIELD)
            text, self._undecided = self._undecided, ""

        if not self._is_sse:
            return [ReplyChunk(text=text)]
        payloads = self._decoder.feed(text.encode("utf-8"))
        return [chunk for p in payloads if (chunk := self._read_event(p))]

    def _read_token_batch(self, output: dict[str, Any]) -> list[ReplyChunk]:
        usage = output.get("usage")
        if isinstance(usage, dict):
            self.usage = _usage(usage, prompt_key="input", completion_key="output") or self.usage

        chunks: list[ReplyChunk] = []
        for choice in _list(output.get("choices")):
            if not isinstance(choice, dict):
                continue
            tokens = [token for token in _list(choice.get("tokens")) if isinstance(token, str)]
            chunks.append(ReplyChunk(text="".join(tokens)))
            self._note_finish_reason(choice)
        return chunks

    def _read_event(self, payload: str) -> ReplyChunk | None:
        """One OpenAI chat.completion.chunk (or the closing `[DONE]`)."""
        if payload.strip() == "[DONE]":
            return None
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise ProviderFailed("RunPod stream carried a malformed event") from exc
        if not isinstance(event, dict):
            return None

        if "error" in event:
            detail = self._redact(_error_text(event["error"]))
            raise _model_server_error(f"RunPod stream reported an error: {detail}", detail)
        if isinstance(event.get("model"), str):
            self.model = event["model"]
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.usage = _usage(usage, "prompt_tokens", "completion_tokens") or self.usage

        text = ""
        for choice in _list(event.get("choices")):
            if isinstance(choice, dict):
                delta = choice.get("delta")
                if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                    text += delta["content"]
                self._note_finish_reason(choice)
        return ReplyChunk(text=text)

    def _note_finish_reason(self, choice: dict[str, Any]) -> None:
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            self.finish_reason = reason


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def _usage(raw: dict[str, Any], prompt_key: str, completion_key: str) -> Usage | None:
    prompt, completion = raw.get(prompt_key), raw.get(completion_key)
    if isinstance(prompt, int) and isinstance(completion, int):
        return Usage(prompt_tokens=prompt, completion_tokens=completion)
    return None


def _model_server_error(message: str, detail: str) -> WorkerError:
    """The model server failed the job: is the request to blame, or the server?"""
    if any(hint in detail.lower() for hint in _REJECTION_HINTS):
        return ProviderRejected(message)
    return ProviderFailed(message)


def _error_text(error: object) -> str:
    """A failure's error as text. RunPod's SDK reports a handler's exception as a
    JSON object encoded in a string, traceback included; its message is enough."""
    if isinstance(error, str) and error.startswith("{"):
        with contextlib.suppress(orjson.JSONDecodeError):
            error = orjson.loads(error)
    if isinstance(error, dict):
        for key in ("error_message", "message", "error"):
            if isinstance(error.get(key), str):
                return str(error[key])
    if error is None or isinstance(error, str):
        return error or ""
    return orjson.dumps(error).decode()


def _parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds to wait: a delay in seconds or an HTTP date."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
