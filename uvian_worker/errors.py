"""Every failure the worker raises on purpose, under one base.

    WorkerError
    ├── ConfigError                 a setting is missing or malformed (stops start-up)
    ├── PermanentError              retrying cannot help: the job fails at once
    │   ├── InvalidInput            the job's name or data does not validate
    │   ├── NotAuthorized           the user may not act on the conversation
    │   ├── NotFound                a record the job names does not exist
    │   └── ProviderRejected        the model server says the request itself is bad
    ├── TransientError              the same job may succeed on a later attempt
    │   ├── ProviderUnavailable     connect/reset, 5xx, 429 (with its Retry-After)
    │   ├── ProviderTimeout         a streaming deadline passed (first token, gap, total)
    │   ├── StreamTruncated         the stream ended without a finish
    │   ├── ProviderFailed          the model server reported a failure of its own
    │   ├── StoreUnavailable        Postgres could not be reached or dropped the connection
    │   ├── RedisUnavailable        Redis could not be reached (conversation slot, stop requests)
    │   ├── EventsUnavailable       Redis refused an event (publishing is best effort)
    │   └── InternalError           a bug; retried, since it may depend on timing
    ├── JobCancelled                a stop was asked for; ends the job cancelled, no retry
    └── ReplySuperseded             another run of the same job owns its reply; this run yields

Third-party errors are translated into this tree where they enter the worker:
the providers for HTTP, the store for asyncpg, `runtime.retry.classify` for
whatever else reaches the runner. The texts of these errors end up
in job rows, events and BullMQ's failed reason, so they never carry secrets.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error the worker raises on purpose."""

    kind = "error"


class ConfigError(WorkerError):
    kind = "config"


class PermanentError(WorkerError):
    kind = "permanent"


class InvalidInput(PermanentError):
    kind = "invalid_input"


class NotAuthorized(PermanentError):
    kind = "not_authorized"


class NotFound(PermanentError):
    kind = "not_found"


class ProviderRejected(PermanentError):
    kind = "provider_rejected"


class TransientError(WorkerError):
    kind = "transient"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ProviderUnavailable(TransientError):
    kind = "provider_unavailable"


class ProviderTimeout(TransientError):
    kind = "provider_timeout"


class StreamTruncated(TransientError):
    kind = "stream_truncated"


class ProviderFailed(TransientError):
    kind = "provider_failed"


class StoreUnavailable(TransientError):
    kind = "store_unavailable"


class RedisUnavailable(TransientError):
    kind = "redis_unavailable"


class InternalError(TransientError):
    kind = "internal"


class EventsUnavailable(TransientError):
    kind = "events_unavailable"


class JobCancelled(WorkerError):
    kind = "cancelled"


class ReplySuperseded(WorkerError):
    """Raised inside a chat run whose reply was taken over; never leaves the executor."""

    kind = "superseded"
