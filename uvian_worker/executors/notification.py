"""The `notification` executor: store one notification for its recipient and publish it.

A notification is keyed by its job and recipient, so however often a job runs
it stores one notification and publishes it once: only the run whose insert
wrote the row publishes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import UUID, uuid5

import orjson

from uvian_worker import events
from uvian_worker.errors import InvalidInput, NotFound
from uvian_worker.events import Publisher
from uvian_worker.executors.base import JobContext
from uvian_worker.executors.inputs import NotificationInput, check_text, parse_input

logger = logging.getLogger(__name__)

# Notification ids derive from (job, recipient), so every run of a job names the same row.
NOTIFICATION_ID_NAMESPACE = UUID("64f987f3-5bd4-40a3-a387-cc3252592837")

# `data` is stored in a jsonb column and sent to clients: small and shallow.
MAX_DATA_BYTES = 8_192
MAX_DATA_DEPTH = 8

_INVALID = "invalid notification input: "
# Keys are named in error texts, which end up in job rows and events.
_KEY_SHOWN_CHARS = 40


def notification_id(job_id: UUID, user_id: UUID) -> UUID:
    return uuid5(NOTIFICATION_ID_NAMESPACE, f"{job_id}:{user_id}")


@dataclass(frozen=True, slots=True)
class RecipientCheck:
    """What the decision needs from Postgres, read in the statement that marks the job row."""

    recipient_found: bool
    recipient_is_member: bool  # true when the notification names no conversation
    prior_job_status: str | None  # the job row's status before this attempt marked it
    prior_output: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class NotificationRecord:
    notification_id: UUID
    job_id: UUID
    user_id: UUID
    notification_type: str
    data: dict[str, Any]


class NotificationStore(Protocol):
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
    ) -> RecipientCheck: ...

    async def finish_notification(
        self,
        *,
        job_id: UUID,
        output: dict[str, Any],
        notification: NotificationRecord | None,
    ) -> datetime | None:
        """Store `notification` (if any) and complete the job row with `output`.

        Returns when the notification was stored by this call; None when an
        earlier run of the job had stored it, or when there was none to store.
        """


class NotificationExecutor:
    job_name = "notification"

    def __init__(self, store: NotificationStore, publisher: Publisher) -> None:
        self._store = store
        self._publisher = publisher

    async def run(self, job: JobContext) -> dict[str, Any]:
        notice = parse_input(NotificationInput, job.input, what="notification")
        data = _checked_data(notice)

        check = await self._store.begin_notification(
            job_id=job.job_id,
            job_name=job.name,
            job_input={"userId": str(notice.user_id), "type": notice.type, "data": data},
            attempt=job.attempt,
            user_id=notice.user_id,
            conversation_id=notice.data.conversation_id,
            sender_id=notice.data.sender_id,
        )
        if check.prior_job_status == "completed" and check.prior_output is not None:
            # Delivered again after a run that finished (its worker died before
            # BullMQ heard of it): same result, no second notification event.
            logger.info("Job already completed by an earlier run; returning its result")
            await self._publish_status(job, "completed")
            return check.prior_output
        if not check.recipient_found:
            raise NotFound(f"recipient profile {notice.user_id} does not exist")
        await self._publish_status(job, "processing")

        reason = _reason_not_to_deliver(notice, check)
        if reason is not None:
            return await self._complete_undelivered(job, reason)
        return await self._deliver(job, notice, data)

    async def _complete_undelivered(self, job: JobContext, reason: str) -> dict[str, Any]:
        logger.info("Notification not delivered", extra={"reason": reason})
        result: dict[str, Any] = {
            "status": "completed",
            "notificationId": None,
            "delivered": False,
            "reason": reason,
        }
        await self._store.finish_notification(job_id=job.job_id, output=result, notification=None)
        await self._publish_status(job, "completed")
        return result

    async def _deliver(
        self, job: JobContext, notice: NotificationInput, data: dict[str, Any]
    ) -> dict[str, Any]:
        record = NotificationRecord(
            notification_id=notification_id(job.job_id, notice.user_id),
            job_id=job.job_id,
            user_id=notice.user_id,
            notification_type=notice.type,
            data=data,
        )
        result: dict[str, Any] = {
            "status": "completed",
            "notificationId": str(record.notification_id),
            "delivered": True,
        }

        stored_at = await self._store.finish_notification(
            job_id=job.job_id, output=result, notification=record
        )
        if stored_at is not None:
            await self._publish_notification(job, record, stored_at)
        else:
            logger.info("Another run of this job already stored its notification")
        await self._publish_status(job, "completed")
        return result

    async def _publish_notification(
        self, job: JobContext, record: NotificationRecord, stored_at: datetime
    ) -> None:
        event = {
            "type": "notification",
            "notificationId": str(record.notification_id),
            "userId": str(record.user_id),
            "notificationType": record.notification_type,
            "data": record.data,
            "jobId": str(job.job_id),
            "createdAt": stored_at.astimezone(UTC).isoformat(timespec="milliseconds"),
        }
        await self._publisher.publish(events.user_notifications_channel(record.user_id), event)

    async def _publish_status(self, job: JobContext, status: str) -> None:
        event = events.job_status_event(
            job.job_id, status, attempt=job.attempt, max_attempts=job.max_attempts
        )
        await self._publisher.publish(events.job_status_channel(job.job_id), event)


def _reason_not_to_deliver(notice: NotificationInput, check: RecipientCheck) -> str | None:
    if notice.data.sender_id == notice.user_id:
        return "sender"
    if not check.recipient_is_member:
        return "not_member"
    return None


def _checked_data(notice: NotificationInput) -> dict[str, Any]:
    """`data` as it is stored and published: ids in canonical form, every string and key
    checked, small enough for a notification."""
    # The keys the model declares are checked already; the free-form rest is walked
    # before dumping, since pydantic's serializer fails on very deep nesting.
    _check_json(notice.data.model_extra or {}, "data", depth=0)
    data: dict[str, Any] = notice.data.model_dump(mode="json", by_alias=True, exclude_unset=True)
    try:
        size_bytes = len(orjson.dumps(data))
    except orjson.JSONEncodeError as exc:
        # Numbers beyond 64 bits, which Python's JSON reader accepts and jsonb clients may not.
        raise InvalidInput(f"{_INVALID}data cannot be stored as JSON ({exc})") from None
    if size_bytes > MAX_DATA_BYTES:
        raise InvalidInput(
            f"{_INVALID}data is too large ({size_bytes} bytes as JSON, the limit is"
            f" {MAX_DATA_BYTES})"
        )
    return data


def _check_json(value: Any, path: str, *, depth: int) -> None:
    """Refuse what jsonb or a client cannot take: control characters, lone surrogates,
    and nesting deeper than a notification needs."""
    if depth > MAX_DATA_DEPTH:
        raise InvalidInput(
            f"{_INVALID}data is nested too deeply (the limit is {MAX_DATA_DEPTH} levels)"
        )
    if isinstance(value, str):
        _check_string(value, f"{path} ")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_string(key, f"{path} has a key that ")
            _check_json(item, f"{path}.{_shortened(key)}", depth=depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, f"{path}[{index}]", depth=depth + 1)


def _check_string(value: str, where: str) -> None:
    try:
        check_text(value, max_chars=MAX_DATA_BYTES)
    except ValueError as exc:
        raise InvalidInput(f"{_INVALID}{where}{exc}") from None


def _shortened(key: str) -> str:
    return key if len(key) <= _KEY_SHOWN_CHARS else key[:_KEY_SHOWN_CHARS] + "…"
