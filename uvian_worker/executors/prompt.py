"""The prompt of a chat reply: a system message, the history oldest first, the new message."""

from __future__ import annotations

from uvian_worker.providers.base import PromptMessage
from uvian_worker.store.records import ChatContext

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


def build_prompt(context: ChatContext, new_message: str) -> list[PromptMessage]:
    messages = [system_message(context.conversation_kind, context.conversation_title)]
    for past in context.history:
        if past.from_assistant:
            messages.append({"role": "assistant", "content": past.content})
        else:
            messages.append({"role": "user", "content": past.content})
    messages.append({"role": "user", "content": new_message})
    return messages
