"""The script of one request: its reply tokens, its fault and the pace they go out at.

Everything a request will get is decided when it arrives, from the last user
message and its `[[sim:...]]` directives (listed in the package docstring).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from aiohttp import web

from uvian_worker.providers.simulator.config import SimulatorConfig
from uvian_worker.providers.simulator.responses import bad_request, error_response

_DIRECTIVE = re.compile(r"\[\[sim:([a-z_]+)=([^\]\s]+)\]\]")
_FAULT_AFTER_TOKENS = 3
_ECHO_WORDS = 4
_OPENING = ("Simulated", "reply", "to")
_FILLER = ("café", "🚀", "lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "elit")
_REFUSALS: dict[str, tuple[int, str, str]] = {
    "http_500": (500, "server_error", "simulated internal error"),
    "http_429": (429, "rate_limit_exceeded", "simulated rate limit"),
    "http_400": (400, "context_length_exceeded", "simulated: prompt exceeds the context length"),
}
FAILING = frozenset({"error_mid_stream", "runpod_failed"})
DROPPING = frozenset({"truncate", "reset"})
MID_STREAM = FAILING | DROPPING | {"stall"}
JOB_STOPPING = FAILING | {"stall"}


def scripted_reply(prompt: str, count: int) -> list[str]:
    """The reply's tokens for a last user message: an echo of its first words,
    then filler with an accented word and an emoji early on."""
    echo = _DIRECTIVE.sub(" ", prompt).split()[:_ECHO_WORDS]
    words = [*_OPENING, *echo]
    while len(words) < count:
        words.extend(_FILLER)
    return [word if index == 0 else f" {word}" for index, word in enumerate(words[:count])]


@dataclass(frozen=True, slots=True)
class Script:
    """Everything one request will get, decided when it arrives."""

    tokens: list[str]
    finish_reason: str
    prompt_tokens: int
    first_token_delay_s: float
    chunk_gap_s: float
    chunk_tokens: int
    fault: str | None
    reports_usage: bool = True  # `[[sim:usage=none]]` plays a server that reports no usage

    @property
    def refused(self) -> bool:
        return self.fault in _REFUSALS

    def cut_at(self, faults: frozenset[str]) -> int:
        """How many tokens go out before one of `faults` strikes."""
        if self.fault in faults:
            return min(len(self.tokens), _FAULT_AFTER_TOKENS)
        return len(self.tokens)

    def usage(self) -> dict[str, int]:
        made = len(self.tokens)
        total = self.prompt_tokens + made
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": made,
            "total_tokens": total,
        }


def build_script(messages: object, max_tokens: object, config: SimulatorConfig) -> Script:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise bad_request("messages must be a list of objects")
    texts = [(m.get("role"), _text_of(m.get("content"))) for m in messages]
    last_user = next((text for role, text in reversed(texts) if role == "user"), "")
    directives = dict(_DIRECTIVE.findall(last_user))
    fault = directives.get("fault")
    if fault is not None and fault not in _REFUSALS and fault not in MID_STREAM:
        raise bad_request(f"unknown simulator fault {fault!r}")

    count = max(0, int(_number(directives, "tokens", config.reply_tokens)))
    tokens = scripted_reply(last_user, count)
    finish_reason = "stop"
    if isinstance(max_tokens, int) and 0 <= max_tokens < len(tokens):
        tokens, finish_reason = tokens[:max_tokens], "length"

    tokens_per_s = _number(directives, "tps", config.tokens_per_s)
    chunk_tokens = max(1, config.chunk_tokens)
    return Script(
        tokens=tokens,
        finish_reason=finish_reason,
        prompt_tokens=sum(len(text.split()) for _, text in texts),
        first_token_delay_s=_number(directives, "delay_ms", config.first_token_delay_ms) / 1000,
        chunk_gap_s=chunk_tokens / tokens_per_s if tokens_per_s > 0 else 0.0,
        chunk_tokens=chunk_tokens,
        fault=fault,
        reports_usage=directives.get("usage") != "none",
    )


def refusal(fault: str | None) -> web.Response:
    """The answer to a request whose fault refuses it outright."""
    status, code, message = _REFUSALS[fault or ""]
    return error_response(status, code, message, {"Retry-After": "1"} if status == 429 else None)


async def paced(script: Script, count: int) -> AsyncGenerator[list[list[str]], None]:
    """Yield the first `count` tokens as chunks on the script's schedule, in groups:
    a group holds every chunk already due, so a stream that fell behind a busy loop
    catches up in one write rather than one per chunk. Each chunk is due at a fixed
    offset from the first, so lateness does not add up."""
    loop = asyncio.get_running_loop()
    size, gap_s = script.chunk_tokens, script.chunk_gap_s
    chunks = [script.tokens[start : min(start + size, count)] for start in range(0, count, size)]
    await asyncio.sleep(script.first_token_delay_s)
    started_at = loop.time()
    sent = 0
    while sent < len(chunks):
        wait_s = started_at + sent * gap_s - loop.time()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        due = int((loop.time() - started_at) / gap_s) + 1 if gap_s > 0 else len(chunks)
        group_end = min(len(chunks), max(due, sent + 1))
        yield chunks[sent:group_end]
        sent = group_end


def _text_of(content: object) -> str:
    if isinstance(content, list):  # OpenAI's content parts
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def _number(directives: dict[str, str], name: str, default: float) -> float:
    try:
        return float(directives.get(name, default))
    except ValueError:
        raise bad_request(f"simulator directive {name} needs a number") from None
