"""The notification executor's repository: one statement to start a job, one to finish it."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import orjson

from uvian_worker.executors.notification import NotificationRecord, RecipientCheck
from uvian_worker.store.database import Database
from uvian_worker.store.jobs import mark_processing_ctes, storable_json

# Marks the job row processing (unless it already ended) and reads whether the
# recipient exists and may hear of the conversation, in one round trip. `prior`
# sees the row as it was before this statement, which tells a redelivered,
# already finished job apart. A notification naming no conversation needs no
# membership.
_BEGIN_NOTIFICATION = (
    mark_processing_ctes("$7")
    + """
select
    (select status from prior) as prior_status,
    (select output from prior) as prior_output,
    exists (select 1 from public.profiles p where p.id = $5) as recipient_found,
    $6::uuid is null
        or exists (select 1 from public.conversation_members m
                   where m.conversation_id = $6 and m.profile_id = $5) as is_member
"""
)

# Stores the notification (when there is one) and completes the job row in one
# statement (so one transaction). The table's unique (job_id, user_id) and the
# id derived from both make a second run's insert do nothing; `stored_at` is
# then null, and that run does not publish the notification again.
_FINISH_NOTIFICATION = """
with stored as (
    insert into public.notifications (id, user_id, notification_type, data, job_id)
    select $1::uuid, $2::uuid, $3::text, $4::jsonb, $5::uuid
     where $1::uuid is not null
    on conflict do nothing
    returning created_at
), job as (
    update public.jobs
       set status = 'completed', output = $6::jsonb, error_message = null, error_kind = null,
           finished_at = now(), updated_at = now()
     where id = $5::uuid and status not in ('completed', 'cancelled')
    returning 1
)
select (select created_at from stored) as stored_at
"""


class NotificationRepository:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def begin_notification(
        self,
        *,
        job_id: UUID,
        job_name: str,
        job_input: dict[str, Any],
        attempt: int,
        user_id: UUID,
        conversation_id: UUID | None,
        sender_id: UUID | None,
    ) -> RecipientCheck:
        async with self._database.statement() as conn:
            row = await conn.fetchrow(
                _BEGIN_NOTIFICATION,
                job_id,
                job_name,
                storable_json(job_input),
                attempt,
                user_id,
                conversation_id,
                sender_id,
            )
        prior_output = row["prior_output"]
        return RecipientCheck(
            recipient_found=row["recipient_found"],
            recipient_is_member=row["is_member"],
            prior_job_status=row["prior_status"],
            prior_output=orjson.loads(prior_output) if prior_output else None,
        )

    async def finish_notification(
        self,
        *,
        job_id: UUID,
        output: dict[str, Any],
        notification: NotificationRecord | None,
    ) -> datetime | None:
        values: tuple[Any, ...] = (None, None, None, None)
        if notification is not None:
            values = (
                notification.notification_id,
                notification.user_id,
                notification.notification_type,
                orjson.dumps(notification.data).decode(),
            )
        async with self._database.statement() as conn:
            stored_at: datetime | None = await conn.fetchval(
                _FINISH_NOTIFICATION, *values, job_id, orjson.dumps(output).decode()
            )
        return stored_at
