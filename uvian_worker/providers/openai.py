"""The provider for any OpenAI-compatible chat completions endpoint, streamed.

vLLM, Ollama, RunPod's `/openai/v1` route and OpenAI itself all answer
`POST {base_url}/chat/completions` with `"stream": true` as Server-Sent Events:
one JSON chunk per event, then `data: [DONE]`. This module is the one place
where aiohttp's errors and the server's error answers become errors of
`uvian_worker.errors`; nothing it raises carries the API key.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncGenerator, Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson

from uvian_worker.errors import (
    ProviderFailed,
    ProviderRejected,
    ProviderUnavailable,
    StreamTruncated,
    WorkerError,
)
from uvian_worker.providers.base import ReadPace, ReplyChunk, ReplyRequest, Usage
from uvian_worker.providers.pacing import ReadPacer
from uvian_worker.providers.sse import SSEDecoder

logger = logging.getLogger(__name__)

# Every streaming reply holds one connection for its whole life, and the worker's
# own concurrency already bounds how many run at once: the pool must never be the
# thing that makes a reply wait.
_CONNECTION_LIMIT = 4096

_ERROR_BODY_LIMIT_BYTES = 64 * 1024
_ERROR_TEXT_LIMIT = 300
_DONE = "[DONE]"

# What an error object inside a stream says when the request itself is at fault;
# resending the same prompt cannot succeed. Compared in lower case.
_REQUEST_FAULT_MARKERS = frozenset(
    {
        "invalid_request_error",
        "context_length_exceeded",
        "badrequesterror",
        "bad_request",
        "invalid_request",
    }
)
# 4xx statuses that say "not now" rather than "not this request".
_TRANSIENT_CLIENT_STATUSES = frozenset({408, 429})


class OpenAIProvider:
    """Streams replies from `{base_url}/chat/completions`."""

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        connect_timeout_s: float = 10.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._model = model
        self._api_key = api_key or None
        # Only connecting is bounded here: the caller owns the streaming deadlines
        # (first token, gap, total) and enforces them by cancelling.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_connect=connect_timeout_s
        )
        self._session = session
        self._owns_session = session is None

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def stream_reply(
        self, request: ReplyRequest, *, pace: ReadPace | None = None
    ) -> AsyncGenerator[ReplyChunk, None]:
        response = await self._post(request)
        reached_end = False
        try:
            await self._check_status(response)
            pacer = ReadPacer(response.content, pace)
            decoder = SSEDecoder()
            finish_seen = False
            while not reached_end:
                await pacer.hold()
                data = await self._read_some(response)
                reached_end = not data
                events = decoder.feed(data) if data else decoder.finish()
                if not events:
                    continue
                # What one read brought is one chunk: the reply's cost grows with the
                # reads, not with the tokens a busy upstream packs into each of them.
                batch = _Batch()
                failure: WorkerError | None = None
                done = False
                for event in events:
                    if event.strip() == _DONE:
                        reached_end = done = True
                        break
                    try:
                        self._read_event(event, batch)
                    except WorkerError as exc:
                        failure = exc
                        break
                # Text read before an error in the same read still reaches the reply.
                chunk = batch.chunk()
                if chunk is not None:
                    finish_seen = finish_seen or chunk.finish_reason is not None
                    yield chunk
                if failure is not None:
                    raise failure
                if done:
                    # `[DONE]` ends the reply whether or not a finish reason came first.
                    return
            if not finish_seen:
                raise StreamTruncated("openai: the stream ended before the reply finished")
        finally:
            # At the end, release() pools the connection if the body is complete (and
            # closes it if not). Any other exit (aclose, a cancelled task, an error)
            # closes it at once instead of draining a reply nobody will read.
            if reached_end:
                response.release()
            else:
                response.close()

    def _session_for_request(self) -> aiohttp.ClientSession:
        # Created on first use so that it binds to the running event loop.
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=_CONNECTION_LIMIT)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def _post(self, request: ReplyRequest) -> aiohttp.ClientResponse:
        body = {
            "model": self._model,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key}"

        logger.debug("openai: POST %s model=%s", self._url, self._model)
        session = self._session_for_request()
        try:
            return await session.post(
                self._url,
                data=orjson.dumps(body),
                headers=headers,
                timeout=self._timeout,
                # A redirect would turn the POST into a GET and may drop the key; the
                # base URL should name the final address instead.
                allow_redirects=False,
            )
        except aiohttp.ClientError as exc:
            raise self._unavailable("cannot reach the model server", exc) from exc

    async def _read_some(self, response: aiohttp.ClientResponse) -> bytes:
        """The next bytes of the body as they arrive; empty at its end."""
        try:
            return await response.content.readany()
        except aiohttp.ClientError as exc:
            raise self._unavailable("the connection broke during the reply", exc) from exc

    def _unavailable(self, what: str, exc: BaseException) -> ProviderUnavailable:
        detail = self._shorten(str(exc) or type(exc).__name__)
        return ProviderUnavailable(f"openai: {what}: {detail}")

    async def _check_status(self, response: aiohttp.ClientResponse) -> None:
        """Raise the error an unsuccessful answer stands for."""
        status = response.status
        if 200 <= status < 300 and response.content_type != "application/json":
            return

        body = await self._read_error_body(response)
        if status < 300:
            # A server that ignored `stream` answers with one JSON document.
            raise self._error_in_answer(body)

        message = self._error_message(body)
        if status == 429:
            retry_after_s = _retry_after_s(response.headers)
            raise ProviderUnavailable(
                f"openai: rate limited (HTTP 429): {message}", retry_after_s=retry_after_s
            )
        if status >= 500 or status in _TRANSIENT_CLIENT_STATUSES:
            raise ProviderUnavailable(f"openai: server error (HTTP {status}): {message}")
        if status in (401, 403):
            raise ProviderRejected(f"openai: not authorized (HTTP {status}): {message}")
        if status >= 400:
            raise ProviderRejected(f"openai: request rejected (HTTP {status}): {message}")
        raise ProviderRejected(f"openai: unexpected HTTP {status}; check the base URL")

    async def _read_error_body(self, response: aiohttp.ClientResponse) -> bytes:
        # Bounded: an error answer is short, and a misbehaving server must not make
        # the worker buffer an endless body.
        body = bytearray()
        try:
            while len(body) < _ERROR_BODY_LIMIT_BYTES:
                piece = await response.content.read(_ERROR_BODY_LIMIT_BYTES - len(body))
                if not piece:
                    break
                body += piece
        except aiohttp.ClientError:
            logger.debug("openai: the error answer broke off after %d bytes", len(body))
        return bytes(body)

    def _error_message(self, body: bytes) -> str:
        """The server's own words about an error answer, short and free of secrets."""
        text = body.decode("utf-8", errors="replace")
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._shorten(text)
        error = _error_object(document)
        source = error if error is not None else document
        message = _message_of(source) if isinstance(source, dict) else None
        return self._shorten(message or text)

    def _error_in_answer(self, body: bytes) -> WorkerError:
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            document = None
        error = _error_object(document)
        if error is None:
            return ProviderFailed("openai: the server answered without streaming")
        return self._classify_error(error)

    def _read_event(self, event: str, batch: _Batch) -> None:
        """Add one `chat.completion.chunk` event to the read's batch; errors raise."""
        try:
            document = orjson.loads(event)
        except orjson.JSONDecodeError as exc:
            raise ProviderFailed("openai: the stream carried data that is not JSON") from exc
        if not isinstance(document, dict):
            raise ProviderFailed("openai: the stream carried JSON that is not an object")

        error = _error_object(document)
        if error is not None:
            raise self._classify_error(error)
        _add_chunk(document, batch)

    def _classify_error(self, error: dict[str, Any]) -> WorkerError:
        """An error object the server sent instead of (or in the middle of) a reply."""
        message = self._shorten(_message_of(error) or "no message")
        if _is_request_fault(error):
            return ProviderRejected(f"openai: request rejected: {message}")
        return ProviderFailed(f"openai: the model server failed: {message}")

    def _shorten(self, text: str) -> str:
        text = self._redact(text.strip())
        if len(text) > _ERROR_TEXT_LIMIT:
            return text[:_ERROR_TEXT_LIMIT] + "…"
        return text

    def _redact(self, text: str) -> str:
        # Some servers quote the key they refused; it must not reach job rows or logs.
        if self._api_key is None:
            return text
        return text.replace(self._api_key, "[redacted]")


class _Batch:
    """The chunks of one read folded into one: their text joined, the last of the rest."""

    __slots__ = ("_count", "_finish_reason", "_model", "_parts", "_usage")

    def __init__(self) -> None:
        self._count = 0
        self._parts: list[str] = []
        self._finish_reason: str | None = None
        self._usage: Usage | None = None
        self._model: str | None = None

    def add(
        self, text: str, finish_reason: str | None, usage: Usage | None, model: str | None
    ) -> None:
        self._count += 1
        if text:
            self._parts.append(text)
        self._finish_reason = finish_reason or self._finish_reason
        self._usage = usage or self._usage
        self._model = model or self._model

    def chunk(self) -> ReplyChunk | None:
        if self._count == 0:
            return None
        return ReplyChunk(
            text="".join(self._parts),
            finish_reason=self._finish_reason,
            usage=self._usage,
            model=self._model,
        )


def _error_object(document: object) -> dict[str, Any] | None:
    """The error a JSON document reports, in either of the shapes servers use."""
    if not isinstance(document, dict):
        return None
    error = document.get("error")
    if isinstance(error, dict):
        return error
    if isinstance(error, str) and error:
        return {"message": error}
    # vLLM and some proxies put the error's fields at the top level.
    if document.get("object") == "error":
        return document
    return None


def _message_of(error: dict[str, Any]) -> str | None:
    for key in ("message", "detail"):
        value = error.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _is_request_fault(error: dict[str, Any]) -> bool:
    """Whether an error object blames the request (resending it cannot help)."""
    markers = {str(error.get(key, "")).lower() for key in ("type", "code")}
    if markers & _REQUEST_FAULT_MARKERS:
        return True
    code = _int_or_none(error.get("code"))
    return code is not None and 400 <= code < 500 and code not in _TRANSIENT_CLIENT_STATUSES


def _add_chunk(document: dict[str, Any], batch: _Batch) -> None:
    # `n` is never set, so the reply is always the first choice; the usage chunk
    # that closes the stream has no choice at all.
    choices = document.get("choices") or [{}]
    choice = choices[0] if isinstance(choices, list) else None
    delta = (choice.get("delta") or {}) if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or not isinstance(delta, dict):
        raise ProviderFailed("openai: malformed stream chunk: no choice with a delta")

    text = delta.get("content") or ""
    finish_reason = choice.get("finish_reason") or None
    if not isinstance(text, str) or not isinstance(finish_reason, str | None):
        raise ProviderFailed("openai: malformed stream chunk: content is not text")

    model = document.get("model")
    usage = document.get("usage")
    batch.add(
        text,
        finish_reason,
        _usage_of(usage) if usage is not None else None,
        model if isinstance(model, str) and model else None,
    )


def _usage_of(usage: object) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    return Usage(
        prompt_tokens=_int_or_none(usage.get("prompt_tokens")) or 0,
        completion_tokens=_int_or_none(usage.get("completion_tokens")) or 0,
    )


def _int_or_none(value: object) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The wait a 429 asks for: `Retry-After` in seconds or as an HTTP date."""
    value = headers.get("Retry-After", "").strip()
    if not value:
        return None
    seconds: float | None
    try:
        seconds = float(value)
    except ValueError:
        seconds = _seconds_until(value)
    if seconds is None or not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _seconds_until(http_date: str) -> float | None:
    try:
        moment = parsedate_to_datetime(http_date)
    except (TypeError, ValueError):
        return None
    return moment.timestamp() - time.time()
