"""The `jobs` row outside the happy path: failures, cancellations, retries pending."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import orjson

from uvian_worker.store.database import Database

# Ends (or, with attempts left, re-queues) a job row. It is created when the
# API never wrote it, so that every job taken is visible in Postgres; a row
# that already ended completed or cancelled is never reopened.
_RECORD_OUTCOME = """
insert into public.jobs as j
    (id, job_type, status, input, attempts, error_message, error_kind, finished_at)
values ($1, $2, $4, $3::jsonb, $5, $6, $7, case when $4 = 'queued' then null else now() end)
on conflict (id) do update
    set status = excluded.status, attempts = excluded.attempts,
        error_message = excluded.error_message, error_kind = excluded.error_kind,
        finished_at = excluded.finished_at, updated_at = now()
    where j.status not in ('completed', 'cancelled')
"""


def storable(value: Any) -> Any:
    """`value` with what Postgres' jsonb refuses taken out: NUL characters and lone surrogates.

    Only the copy of a refused input kept on its failed job row goes through
    here; valid inputs never contain either.
    """
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {storable(str(k)): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(item) for item in value]
    return value


def storable_json(value: Any) -> str:
    """`value` as jsonb text; an input too odd to store (huge integers, nesting hundreds
    deep) is replaced by a note, so the job's failure is still recorded."""
    try:
        return orjson.dumps(storable(value)).decode()
    except (TypeError, orjson.JSONEncodeError, RecursionError):
        return '{"unstorable": "the input could not be stored as JSON"}'


def mark_processing_ctes(creator_param: str) -> str:
    """The opening CTEs every executor's first statement shares: `prior` (the job row as
    it was, which tells a redelivered, already finished job apart) and `marked` (the row
    set processing with this attempt, unless it already ended completed or cancelled).

    Parameters $1..$4 are the job id, its name, its input and the attempt;
    `creator_param` names the one holding the profile that created the job.
    """
    return f"""
with prior as (
    select status, output::text as output from public.jobs where id = $1
), marked as (
    insert into public.jobs as j (id, job_type, status, input, attempts, started_at, created_by)
    values ($1, $2, 'processing', $3::jsonb, $4, now(),
            (select p.id from public.profiles p where p.id = {creator_param}))
    on conflict (id) do update
        set status = 'processing', attempts = excluded.attempts,
            started_at = coalesce(j.started_at, now()), updated_at = now(),
            error_message = null, error_kind = null
        where j.status in ('queued', 'processing', 'failed')
    returning 1
)"""


# A job BullMQ failed itself (it stalled too often): close its row if still open.
_FAIL_STALLED = """
update public.jobs
   set status = 'failed', error_message = $2, error_kind = 'stalled',
       finished_at = now(), updated_at = now()
 where id = $1 and status in ('queued', 'processing')
returning attempts
"""


class JobRepository:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def record_outcome(
        self,
        *,
        job_id: UUID,
        job_name: str,
        job_input: dict[str, Any],
        status: str,
        attempt: int,
        error_message: str | None,
        error_kind: str | None,
    ) -> None:
        async with self._database.statement() as conn:
            await conn.execute(
                _RECORD_OUTCOME,
                job_id,
                job_name,
                storable_json(job_input),
                status,
                attempt,
                error_message,
                error_kind,
            )

    async def fail_stalled(self, job_id: UUID, reason: str) -> int | None:
        async with self._database.statement() as conn:
            attempts = await conn.fetchval(_FAIL_STALLED, job_id, reason)
        return None if attempts is None else int(attempts)
