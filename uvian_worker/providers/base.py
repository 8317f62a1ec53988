"""The one streaming interface every LLM provider implements.

A provider turns a prompt into a stream of `ReplyChunk`s. The stream ends
normally only after the provider has seen the model's own end (a finish reason,
`[DONE]`, a terminal RunPod status); every other ending raises an error from
`uvian_worker.errors`. Closing the iterator early (`aclose()`, or cancelling
the task that awaits it) must close the upstream request, and cancel the remote
job where the protocol has one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal, Protocol, TypedDict


class PromptMessage(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class ReplyRequest:
    messages: list[PromptMessage]
    max_tokens: int
    temperature: float = 0.7


@dataclass(frozen=True, slots=True)
class ReplyChunk:
    """A piece of the reply. `text` may be empty (a chunk that only carries
    `finish_reason`, `usage` or `model`); empty chunks are not progress."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    model: str | None = None


# The moment (on `uvian_worker.clock.monotonic_s`) before which reading more of a
# reply's stream cannot change what its clients see; a provider may leave bytes unread
# until then (uvian_worker.providers.pacing).
ReadPace = Callable[[], float]


class Provider(Protocol):
    """An LLM backend. `name` is the setting value that selects it."""

    name: str

    def stream_reply(
        self, request: ReplyRequest, *, pace: ReadPace | None = None
    ) -> AsyncIterator[ReplyChunk]: ...

    async def aclose(self) -> None: ...
