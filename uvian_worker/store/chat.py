"""The chat executor's repository: one statement to start a job, one to finish it."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import orjson

from uvian_worker.store.database import Database
from uvian_worker.store.records import (
    ASSISTANT_PROFILE_ID,
    ChatContext,
    HistoryMessage,
    ReplyRecord,
    SavedReply,
)

# Marks the job row processing (unless it already ended) and reads everything
# the prompt needs, in one round trip. `prior` sees the row as it was before
# this statement, which tells a redelivered, already finished job apart.
_BEGIN_CHAT = """
with prior as (
    select status, output::text as output from public.jobs where id = $1
), marked as (
    insert into public.jobs as j (id, job_type, status, input, attempts, started_at, created_by)
    values ($1, $2, 'processing', $3::jsonb, $4, now(),
            (select p.id from public.profiles p where p.id = $6))
    on conflict (id) do update
        set status = 'processing', attempts = excluded.attempts,
            started_at = coalesce(j.started_at, now()), updated_at = now(),
            error_message = null, error_kind = null
        where j.status in ('queued', 'processing', 'failed')
    returning 1
), anchor as (
    select created_at from public.messages where id = $7 and conversation_id = $5
)
select
    (select status from prior) as prior_status,
    (select output from prior) as prior_output,
    c.id is not null as conversation_found,
    coalesce(c.title, '') as title,
    coalesce(c.kind, '') as kind,
    exists (select 1 from public.conversation_members m
            where m.conversation_id = $5 and m.profile_id = $6) as is_member,
    exists (select 1 from anchor) as message_found,
    (select coalesce(json_agg(json_build_array(h.sender_id = $9, h.content)
                              order by h.created_at, h.id), '[]')::text
       from (select m.sender_id, m.content, m.created_at, m.id
               from public.messages m
              where m.conversation_id = $5 and m.id <> $7 and m.status = 'completed'
                and m.created_at <= coalesce((select created_at from anchor), now())
              order by m.created_at desc, m.id desc
              limit $8) h) as history
from (values (1)) as one (x)
left join public.conversations c on c.id = $5
"""

# Saves the reply and ends the job row in one statement (so one transaction).
# A reply that another run of the same job already finished is left as it is:
# the conflict clause only updates a reply that is still generating, and the
# job row is only ended by the run whose reply was written.
_FINISH_REPLY = """
with reply as (
    insert into public.messages as m
        (id, conversation_id, sender_id, content, message_type, reply_to_id, job_id,
         status, metadata)
    values ($1, $2, $3, $4, 'ai', $5, $6, $7, $8::jsonb)
    on conflict (job_id) do update
        set content = excluded.content, status = excluded.status,
            metadata = excluded.metadata, updated_at = now()
        where m.status = 'generating'
    returning m.id
), job as (
    update public.jobs
       set status = $9, output = $10::jsonb, error_message = $11, error_kind = $12,
           finished_at = now(), updated_at = now()
     where id = $6 and status not in ('completed', 'cancelled')
       and exists (select 1 from reply)
    returning 1
)
select exists (select 1 from reply) as written,
       e.id, e.content, e.status, e.metadata::text as metadata
from (values (1)) as one (x)
left join public.messages e on e.job_id = $6
"""


class ChatRepository:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def begin_chat(
        self,
        *,
        job_id: UUID,
        job_name: str,
        job_input: dict[str, Any],
        attempt: int,
        conversation_id: UUID,
        user_id: UUID,
        message_id: UUID,
        history_limit: int,
    ) -> ChatContext:
        async with self._database.transaction() as conn:
            row = await conn.fetchrow(
                _BEGIN_CHAT,
                job_id,
                job_name,
                orjson.dumps(job_input).decode(),
                attempt,
                conversation_id,
                user_id,
                message_id,
                history_limit,
                ASSISTANT_PROFILE_ID,
            )
        history = [HistoryMessage(bool(a), str(c)) for a, c in orjson.loads(row["history"])]
        prior_output = row["prior_output"]
        return ChatContext(
            conversation_found=row["conversation_found"],
            conversation_title=row["title"],
            conversation_kind=row["kind"],
            user_is_member=row["is_member"],
            message_found=row["message_found"],
            history=history,
            prior_job_status=row["prior_status"],
            prior_output=orjson.loads(prior_output) if prior_output else None,
        )

    async def finish_reply(
        self,
        reply: ReplyRecord,
        *,
        job_status: str,
        job_output: dict[str, Any] | None,
        error_message: str | None = None,
        error_kind: str | None = None,
    ) -> SavedReply:
        async with self._database.transaction() as conn:
            row = await conn.fetchrow(
                _FINISH_REPLY,
                reply.message_id,
                reply.conversation_id,
                ASSISTANT_PROFILE_ID,
                reply.content,
                reply.reply_to_id,
                reply.job_id,
                reply.status,
                orjson.dumps(reply.metadata).decode(),
                job_status,
                orjson.dumps(job_output).decode() if job_output is not None else None,
                error_message,
                error_kind,
            )
        if row["written"] or row["id"] is None:
            return SavedReply(True, reply.message_id, reply.content, reply.status, reply.metadata)
        return SavedReply(
            written=False,
            message_id=row["id"],
            content=row["content"],
            status=row["status"],
            metadata=orjson.loads(row["metadata"]),
        )
