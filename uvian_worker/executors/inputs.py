"""Validation of job inputs: each input model turns bad data into one clear `InvalidInput`."""

from __future__ import annotations

import unicodedata
from typing import Any, ClassVar, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from uvian_worker.errors import InvalidInput

ModelT = TypeVar("ModelT", bound=BaseModel)

# Control characters a chat message may carry; everything else in categories Cc/Cs is refused.
_ALLOWED_CONTROLS = frozenset("\n\r\t")


def check_text(value: str, *, max_chars: int) -> str:
    """Refuse text a model should never see: too long, control characters, lone surrogates."""
    if len(value) > max_chars:
        raise ValueError(f"is too long ({len(value)} characters, the limit is {max_chars})")
    for char in value:
        if char in _ALLOWED_CONTROLS:
            continue
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise ValueError(f"contains a forbidden character U+{ord(char):04X}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=False)


class ChatInput(_Strict):
    conversation_id: UUID = Field(alias="conversationId")
    message: str = Field(min_length=1)
    user_id: UUID = Field(alias="userId")
    message_id: UUID = Field(alias="messageId")


class NotificationInput(_Strict):
    """One notification for one recipient. `data` is free-form JSON for the client; the
    keys the worker acts on are checked, every other key is kept as given."""

    class Data(_Strict):
        model_config = ConfigDict(extra="allow")

        # A preview is a glimpse in a notification list, never the whole message.
        max_preview_chars: ClassVar[int] = 500

        conversation_id: UUID | None = Field(default=None, alias="conversationId")
        sender_id: UUID | None = Field(default=None, alias="senderId")
        message_preview: str | None = Field(default=None, alias="messagePreview")

        @field_validator("message_preview")
        @classmethod
        def _preview_text(cls, value: str | None) -> str | None:
            return None if value is None else check_text(value, max_chars=cls.max_preview_chars)

    # The type names a client-side template and lands in Postgres and in events.
    max_type_chars: ClassVar[int] = 64

    user_id: UUID = Field(alias="userId")
    type: str
    data: Data = Field(default_factory=Data)

    @field_validator("type")
    @classmethod
    def _identifier(cls, value: str) -> str:
        # ASCII identifier, all lowercase, starting with a letter: message_notification.
        if (
            len(value) <= cls.max_type_chars
            and value.isascii()
            and value.isidentifier()
            and value.islower()
            and not value.startswith("_")
        ):
            return value
        raise ValueError(
            "must be a lowercase identifier such as message_notification"
            f" (a-z, 0-9 and _, at most {cls.max_type_chars} characters)"
        )

    @field_validator("data", mode="before")
    @classmethod
    def _object(cls, value: Any) -> Any:
        # Pydantic turns only ValueError into a validation error, so not TypeError here.
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object")  # noqa: TRY004
        return value


def parse_input(model: type[ModelT], raw: Any, *, what: str) -> ModelT:
    """Validate `raw` against `model`; the first problem becomes the error's text."""
    if not isinstance(raw, dict):
        raise InvalidInput(f"{what} input must be a JSON object, not {_json_type(raw)}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInput(f"invalid {what} input: {_first_problem(exc)}") from None


# Pydantic's error types in the words of a job's author.
_PROBLEMS = {
    "missing": "is required",
    "uuid_type": "must be a UUID",
    "uuid_parsing": "must be a UUID",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "string_too_long": "is too long",
    "string_unicode": "is not valid Unicode text",
    "string_pattern_mismatch": "has an invalid format",
    "dict_type": "must be a JSON object",
}


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "input"
    if error["type"] in _PROBLEMS:
        return f"{where} {_PROBLEMS[error['type']]}"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where} {message}" if error["type"] == "value_error" else f"{where}: {message}"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__
