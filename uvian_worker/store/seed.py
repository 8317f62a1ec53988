"""Development data: people, a conversation and their messages, for the demo and the tests.

Not used by the worker itself. Everything is inserted with fresh ids, so runs
never collide with each other or with real data in the same database.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID, uuid4

import orjson

from uvian_worker.store.database import Database
from uvian_worker.store.records import ASSISTANT_PROFILE_ID


@dataclass(frozen=True, slots=True)
class SeededConversation:
    conversation_id: UUID
    member_ids: list[UUID]
    outsider_id: UUID  # a profile that is not a member


async def seed_conversation(
    database: Database,
    *,
    title: str,
    member_names: list[str],
    history: list[tuple[int | None, str]],
    kind: str = "group",
) -> SeededConversation:
    """A conversation with the assistant, the named members and an outsider.

    `history` is (member index, text) in order; a None index is the assistant.
    """
    conversation_id = uuid4()
    member_ids = [uuid4() for _ in member_names]
    outsider_id = uuid4()
    profiles = [(pid, name) for pid, name in zip(member_ids, member_names, strict=True)]
    profiles.append((outsider_id, "Outsider"))

    async with database.transaction() as conn:
        await conn.executemany(
            "insert into public.profiles (id, display_name) values ($1, $2)", profiles
        )
        await conn.execute(
            "insert into public.conversations (id, title, kind, created_by)"
            " values ($1, $2, $3, $4)",
            conversation_id,
            title,
            kind,
            member_ids[0],
        )
        await conn.executemany(
            "insert into public.conversation_members (conversation_id, profile_id, role)"
            " values ($1, $2, $3)",
            [(conversation_id, pid, "member") for pid in member_ids]
            + [(conversation_id, ASSISTANT_PROFILE_ID, "assistant")],
        )
        for step, (who, text) in enumerate(history):
            sender = ASSISTANT_PROFILE_ID if who is None else member_ids[who]
            await conn.execute(
                "insert into public.messages (conversation_id, sender_id, content, message_type,"
                " created_at) values ($1, $2, $3, $4, now() - make_interval(secs => $5))",
                conversation_id,
                sender,
                text,
                "ai" if who is None else "text",
                float(len(history) - step + 1),
            )
    return SeededConversation(conversation_id, member_ids, outsider_id)


async def add_user_message(
    database: Database, conversation_id: UUID, sender_id: UUID, text: str
) -> UUID:
    """Save a user's message as the API does before it enqueues the chat job."""
    message_id = uuid4()
    async with database.transaction() as conn:
        await conn.execute(
            "insert into public.messages (id, conversation_id, sender_id, content)"
            " values ($1, $2, $3, $4)",
            message_id,
            conversation_id,
            sender_id,
            text,
        )
    return message_id


async def add_job_row(database: Database, job_id: UUID, job_type: str, job_input: object) -> None:
    """Insert the `queued` job row the API writes before it enqueues the BullMQ job."""
    async with database.transaction() as conn:
        await conn.execute(
            "insert into public.jobs (id, job_type, status, input) values ($1, $2, 'queued', $3)",
            job_id,
            job_type,
            orjson.dumps(job_input).decode(),
        )
