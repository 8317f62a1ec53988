"""Rows as the executors see them: frozen records, no driver types."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

# The assistant's own profile, created by the first migration; every reply is sent from it.
ASSISTANT_PROFILE_ID = UUID("00000000-0000-4000-8000-00000000a1a1")


@dataclass(frozen=True, slots=True)
class HistoryMessage:
    from_assistant: bool
    content: str


@dataclass(frozen=True, slots=True)
class ChatContext:
    """What one chat job needs from Postgres, read in one statement."""

    conversation_found: bool
    conversation_title: str
    conversation_kind: str
    user_is_member: bool
    message_found: bool
    history: list[HistoryMessage]  # oldest first
    prior_job_status: str | None  # the job row's status before this attempt marked it
    prior_output: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class ReplyRecord:
    """The reply to save: the job owns it, so its id derives from the job's."""

    message_id: UUID
    job_id: UUID
    run_id: UUID  # this run of the job; the newest run owns the reply
    conversation_id: UUID
    reply_to_id: UUID
    content: str
    status: str
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SavedReply:
    """A reply as stored."""

    message_id: UUID
    content: str
    status: str
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StaleReply:
    """A reply still generating with no write for a while."""

    id: UUID
    job_id: UUID
    run_id: UUID | None
    conversation_id: UUID
    reply_to_id: UUID | None
    content: str
    updated_at: datetime
