"""Logging set-up for the entry point, and the job context every log line carries.

Library modules only do `logging.getLogger(__name__)`. `bind_job()` stores the
job's id, name and attempt in a context variable once per job; a filter copies
them onto every record made while that job's task runs, so no call site repeats
them. Output is JSON lines (production) or readable lines (a terminal).
"""

from __future__ import annotations

import contextvars
import io
import logging
import math
import os
import select
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import orjson

from uvian_worker.observability.redaction import redact

_job_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "uvian_job_context", default=None
)

_RECORD_DEFAULTS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


@contextmanager
def bind_job(**fields: Any) -> Iterator[None]:
    """Attach `fields` (job id, name, attempt) to every log line of the current task."""
    token = _job_context.set({**(_job_context.get() or {}), **fields})
    try:
        yield
    finally:
        _job_context.reset(token)


class LogThrottle:
    """Lets one line per key through per interval, counting those left out.

    An outage makes every command fail; without this, one line per failure
    would bury everything else in the log.
    """

    def __init__(self, interval_s: float = 5.0) -> None:
        self._interval_s = interval_s
        self._last_s: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None to stay quiet; else how many lines of this key were left out before."""
        now_s = time.monotonic()
        if now_s - self._last_s.get(key, -self._interval_s) < self._interval_s:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return None
        self._last_s[key] = now_s
        return self._left_out.pop(key, 0)


class JobContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        context = _job_context.get()
        if context:
            for key, value in context.items():
                setattr(record, key, value)
        return True


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_DEFAULTS}


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        # The timestamp up to its seconds, made once per second rather than per line.
        self._second = -1
        self._second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        # Redacted field by field, before JSON escaping could change a secret's spelling.
        extras = {
            k: redact(v) if isinstance(v, str) else v for k, v in _extra_fields(record).items()
        }
        line: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
            **extras,
        }
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(line, default=str).decode()

    def _timestamp(self, created: float) -> str:
        """ISO 8601 in UTC to the millisecond, as `isoformat(timespec="milliseconds")`."""
        # Rounded to the microsecond first, as datetime does, then cut to milliseconds.
        fraction, whole = math.modf(created)
        second, micros = int(whole), round(fraction * 1_000_000)
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        if second != self._second:
            self._second = second
            self._second_text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._second_text}.{micros // 1000:03d}+00:00"


class LineWriter(logging.Handler):
    """Writes each line to a file descriptor with one system call, as it is logged.

    `StreamHandler` goes through a text stream and flushes it for every line;
    at thousands of jobs a second that was a tenth of the worker's CPU. Lines are
    not held back: the last ones before a crash are the ones that matter.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "replace")
            while data:
                try:
                    written = os.write(self._fd, data)
                except BlockingIOError:
                    # A non-blocking stderr that is full: wait for room rather than
                    # drop the rest of the line (the next would be glued onto it).
                    select.select([], [self._fd], [])
                    continue
                data = data[written:]
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(self._format(record))

    def _format(self, record: logging.LogRecord) -> str:
        clock = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        extras = " ".join(f"{k}={v}" for k, v in _extra_fields(record).items())
        text = f"{clock} {record.levelname:<7} {record.getMessage()}"
        if extras:
            text = f"{text}  [{extras}]"
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        return text


def _stderr_handler() -> logging.Handler:
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, io.UnsupportedOperation, ValueError):
        return logging.StreamHandler(sys.stderr)  # stderr replaced by an object without one
    sys.stderr.flush()  # anything written through the stream before goes first
    return LineWriter(fd)


def configure_logging(level: str = "INFO", log_format: str = "auto") -> None:
    """Install one stderr handler on the root logger; only entry points call this."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    handler = _stderr_handler()
    handler.setFormatter(JsonFormatter() if use_json else ConsoleFormatter())
    handler.addFilter(JobContextFilter())

    # Fields no line prints, each looked up for every record made (the caller's file
    # and line too: logging's documented switch for that is `_srcfile`).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None

    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries that narrate every request at INFO would bury the job lines.
    for noisy in ("aiohttp.access", "asyncio", "redis"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
