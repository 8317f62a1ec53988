"""The chat executor's repository: one statement to start a job, one to finish it."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import orjson

from uvian_worker.store.database import Database
from uvian_worker.store.jobs import mark_processing_ctes, storable_json
from uvian_worker.store.records import (
    ASSISTANT_PROFILE_ID,
    ChatContext,
    HistoryMessage,
    ReplyRecord,
    SavedReply,
    StaleReply,
)

# Marks the job row processing (unless it already ended) and reads everything
# the prompt needs, in one round trip. `prior` sees the row as it was before
# this statement, which tells a redelivered, already finished job apart.
_BEGIN_CHAT = (
    mark_processing_ctes("$6")
    + """, anchor as (
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
)

# Opens the reply at its first token, owned by this run. A reply another run
# completed (or a user stopped) is never reopened; a failed or interrupted one
# is, when the job runs again. `metadata` keeps the earlier attempts' entries.
_START_REPLY = """
insert into public.messages as m
    (id, conversation_id, sender_id, content, message_type, reply_to_id, job_id, status,
     run_id, metadata)
values ($1, $2, $3, '', 'ai', $4, $5, 'generating', $6, $7::jsonb)
on conflict (job_id) do update
    set content = '', status = 'generating', run_id = excluded.run_id,
        metadata = m.metadata || excluded.metadata, updated_at = now()
    where m.status in ('generating', 'failed', 'interrupted')
returning m.id
"""

# The partial text, saved every few seconds; no row means another run owns the reply now.
_SAVE_PARTIAL = """
update public.messages set content = $3, updated_at = now()
 where job_id = $1 and run_id = $2 and status = 'generating'
returning id
"""

# Ends the reply (and, for a completed one, the job row) in one statement. The
# reply is created here when no token ever opened it (an empty reply), and only
# the run that owns it may end it. `attempts` gains this attempt's entry.
_END_REPLY = """
with reply as (
    insert into public.messages as m
        (id, conversation_id, sender_id, content, message_type, reply_to_id, job_id,
         status, run_id, metadata)
    values ($1, $2, $3, $4, 'ai', $5, $6, $7, $8,
            $9::jsonb || jsonb_build_object('attempts', jsonb_build_array($10::jsonb)))
    on conflict (job_id) do update
        set content = excluded.content, status = excluded.status, updated_at = now(),
            metadata = m.metadata || $9::jsonb || jsonb_build_object(
                'attempts', coalesce(m.metadata -> 'attempts', '[]'::jsonb) || $10::jsonb)
        where m.run_id = excluded.run_id and m.status = 'generating'
    returning m.id
), job as (
    update public.jobs
       set status = 'completed', output = $11::jsonb, error_message = null,
           error_kind = null, finished_at = now(), updated_at = now()
     where id = $6 and $11::jsonb is not null and status not in ('completed', 'cancelled')
       and exists (select 1 from reply)
    returning 1
)
select exists (select 1 from reply) as written
"""

# A transient failure with attempts left: the reply stays open for the next
# attempt, which restarts its text; the text so far and this attempt's entry are kept.
_SUSPEND_REPLY = """
update public.messages
   set updated_at = now(), content = $4,
       metadata = metadata || jsonb_build_object(
           'attempts', coalesce(metadata -> 'attempts', '[]'::jsonb) || $3::jsonb)
 where job_id = $1 and run_id = $2 and status = 'generating'
"""

# Replies of one queue left generating with no write for a while: candidates for
# the sweep. Only workers of the reply's own queue can tell whether its job is gone.
_STALE_REPLIES = """
select id, job_id, run_id, conversation_id, reply_to_id, content, updated_at
  from public.messages
 where status = 'generating' and updated_at < now() - make_interval(secs => $1)
   and metadata ->> 'queue' = $3
 order by updated_at
 limit $2
"""

# Ends an abandoned reply, unless a run wrote to it since it was found.
_INTERRUPT_REPLY = """
update public.messages set status = 'interrupted', updated_at = now()
 where id = $1 and status = 'generating' and updated_at = $2
returning id
"""

# Ends the reply an earlier run left generating (any run: none is streaming now).
_END_LEFTOVER_REPLY = """
update public.messages set status = $2, updated_at = now()
 where job_id = $1 and status = 'generating'
returning id, job_id, run_id, conversation_id, reply_to_id, content, updated_at
"""

_GET_REPLY = """
select id, content, status, metadata::text as metadata from public.messages where job_id = $1
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
        async with self._database.statement() as conn:
            row = await conn.fetchrow(
                _BEGIN_CHAT,
                job_id,
                job_name,
                storable_json(job_input),
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

    async def start_reply(self, reply: ReplyRecord) -> bool:
        """Open the reply for this run; false when another run already finished it."""
        async with self._database.statement() as conn:
            row = await conn.fetchrow(
                _START_REPLY,
                reply.message_id,
                reply.conversation_id,
                ASSISTANT_PROFILE_ID,
                reply.reply_to_id,
                reply.job_id,
                reply.run_id,
                _json(reply.metadata),
            )
        return row is not None

    async def save_partial(self, job_id: UUID, run_id: UUID, content: str) -> bool:
        """Save the text so far; false when this run no longer owns the reply."""
        async with self._database.statement() as conn:
            row = await conn.fetchrow(_SAVE_PARTIAL, job_id, run_id, content)
        return row is not None

    async def end_reply(
        self,
        reply: ReplyRecord,
        attempt_entry: dict[str, Any],
        *,
        job_output: dict[str, Any] | None = None,
    ) -> bool:
        """End the reply in `reply.status` (and complete the job when `job_output` is given).

        False when this run did not own the reply: another run ended it, untouched.
        """
        async with self._database.statement() as conn:
            written = await conn.fetchval(
                _END_REPLY,
                reply.message_id,
                reply.conversation_id,
                ASSISTANT_PROFILE_ID,
                reply.content,
                reply.reply_to_id,
                reply.job_id,
                reply.status,
                reply.run_id,
                _json(reply.metadata),
                _json(attempt_entry),
                _json(job_output) if job_output is not None else None,
            )
        return bool(written)

    async def suspend_reply(
        self, job_id: UUID, run_id: UUID, attempt_entry: dict[str, Any], content: str
    ) -> None:
        async with self._database.statement() as conn:
            await conn.execute(_SUSPEND_REPLY, job_id, run_id, _json(attempt_entry), content)

    async def end_leftover_reply(self, job_id: UUID, status: str) -> StaleReply | None:
        """End a reply an earlier attempt left generating; None when there is none."""
        async with self._database.statement() as conn:
            row = await conn.fetchrow(_END_LEFTOVER_REPLY, job_id, status)
        return StaleReply(**dict(row)) if row is not None else None

    async def get_reply(self, job_id: UUID) -> SavedReply | None:
        async with self._database.statement() as conn:
            row = await conn.fetchrow(_GET_REPLY, job_id)
        if row is None:
            return None
        return SavedReply(
            message_id=row["id"],
            content=row["content"],
            status=row["status"],
            metadata=orjson.loads(row["metadata"]),
        )


class SweepRepository:
    """The reply sweep's view of `messages`."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def stale_replies(self, queue: str, stale_after_s: float, limit: int) -> list[StaleReply]:
        async with self._database.statement() as conn:
            rows = await conn.fetch(_STALE_REPLIES, stale_after_s, limit, queue)
        return [StaleReply(**dict(row)) for row in rows]

    async def interrupt(self, reply: StaleReply) -> bool:
        async with self._database.statement() as conn:
            row = await conn.fetchrow(_INTERRUPT_REPLY, reply.id, reply.updated_at)
        return row is not None


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()
