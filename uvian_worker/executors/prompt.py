"""The system message of a chat reply; executors/context.py fits the rest of the prompt."""

from __future__ import annotations

from uvian_worker.providers.base import PromptMessage

_KIND_WORDS = {
    "direct": "a one-to-one conversation",
    "group": "a group conversation",
    "assistant": "a conversation with you",
}


def system_message(kind: str, title: str) -> PromptMessage:
    where = _KIND_WORDS.get(kind, "a conversation")
    named = f' called "{title}"' if title else ""
    return {
        "role": "system",
        "content": (
            f"You are Uvian Assistant, taking part in {where}{named} on the Uvian chat "
            "platform. Answer the latest message helpfully and concisely."
        ),
    }
