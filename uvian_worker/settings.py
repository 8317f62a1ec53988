"""Settings from the environment (and `.env`), with the names the platform already uses.

`load_settings()` is the only entry: it raises `ConfigError` with one line that
names the offending setting, which the CLI prints without a traceback. No
setting defaults to a secret; `DATABASE_URL` and the provider have no default
at all, so a worker that is not configured refuses to start.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any
from urllib.parse import SplitResult, quote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from uvian_worker.errors import ConfigError
from uvian_worker.observability.redaction import register_secret, register_url_password

RUNPOD_API_BASE = "https://api.runpod.ai/v2"


class ProviderName(StrEnum):
    RUNPOD = "runpod"
    OPENAI = "openai"
    SIMULATOR = "simulator"


class RunPodApiMode(StrEnum):
    NATIVE = "native"  # /run, /stream/{id}, /status/{id}, /cancel/{id}
    OPENAI = "openai"  # the endpoint's OpenAI-compatible route, {endpoint}/openai/v1


class DatabasePooler(StrEnum):
    TRANSACTION = (
        "transaction"  # pgbouncer or Supabase's pooler in transaction mode (safe anywhere)
    )
    NONE = "none"  # a direct connection or a session-mode pooler: prepared statements are kept


class ConversationMode(StrEnum):
    QUEUE = "queue"  # a conversation's next reply waits for the one streaming
    SUPERSEDE = "supersede"  # a newer job stops the one streaming, then takes its turn


class LogFormat(StrEnum):
    AUTO = "auto"  # readable lines on a terminal, JSON lines otherwise
    JSON = "json"
    CONSOLE = "console"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        case_sensitive=False,
        extra="ignore",
        frozen=True,
    )

    # Connections
    redis_url: str | None = None
    redis_host: str = "127.0.0.1"
    redis_port: int = Field(default=6379, ge=1, le=65535)
    redis_password: SecretStr | None = None
    database_url: SecretStr
    database_pooler: DatabasePooler = DatabasePooler.TRANSACTION
    db_pool_min_size: int = Field(default=2, ge=0)
    db_pool_max_size: int = Field(default=20, ge=1)
    db_acquire_timeout_s: float = Field(default=10.0, gt=0)
    db_command_timeout_s: float = Field(default=30.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)

    # Queues and the runtime
    queue_prefix: str = "bull"
    chat_queue: str = "ai-jobs"
    notification_queue: str = "notifications"
    worker_concurrency: int = Field(default=50, ge=1, le=10_000)
    notification_concurrency: int = Field(default=20, ge=1, le=10_000)
    worker_max_retries: int = Field(default=3, ge=1, le=100)
    lock_duration_ms: int = Field(default=10_000, ge=1_000)
    stalled_interval_ms: int = Field(default=5_000, ge=500)
    shutdown_grace_s: float = Field(default=25.0, ge=0)
    sweep_interval_s: float = Field(default=30.0, gt=0)
    sweep_stale_after_s: float = Field(default=60.0, gt=0)

    # The LLM provider
    llm_provider: ProviderName | None = None
    llm_model: str | None = None
    runpod_api_key: SecretStr | None = None
    runpod_endpoint_id: str | None = None
    runpod_endpoint_url: str | None = None
    runpod_api_mode: RunPodApiMode = RunPodApiMode.NATIVE
    runpod_poll_interval_s: float = Field(default=0.05, gt=0)
    openai_base_url: str | None = None
    openai_api_key: SecretStr | None = None
    simulator_url: str | None = None
    simulator_protocol: RunPodApiMode = RunPodApiMode.OPENAI

    # Chat replies
    reply_max_tokens: int = Field(default=1024, ge=1)
    reply_temperature: float = Field(default=0.7, ge=0, le=2)
    history_limit: int = Field(default=100, ge=0, le=1000)  # rows read; the budget trims
    model_context_tokens: int = Field(default=8192, ge=256)
    context_margin_tokens: int | None = Field(default=None, ge=0)
    tokenizer_path: str | None = None
    max_message_chars: int = Field(default=16_000, ge=1)
    conversation_mode: ConversationMode = ConversationMode.QUEUE
    reply_delta_window_ms: float = Field(default=50.0, ge=0)
    reply_delta_max_chars: int = Field(default=512, ge=1)
    reply_save_interval_s: float = Field(default=2.0, gt=0)
    first_token_timeout_s: float = Field(default=120.0, gt=0)
    chunk_gap_timeout_s: float = Field(default=30.0, gt=0)
    reply_timeout_s: float = Field(default=300.0, gt=0)

    # Observability
    log_level: str = "INFO"
    log_format: LogFormat = LogFormat.AUTO
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"  # all interfaces, so a scraper outside the container reaches it
    worker_name: str | None = None

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr) -> SecretStr:
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in {"postgres", "postgresql"}:
            raise ValueError("must be a postgresql:// connection string")
        _check_port(parts)
        return value

    @field_validator("openai_base_url", "simulator_url", "runpod_endpoint_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in {"redis", "rediss", "unix"}:
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        _check_port(parts)
        return value

    @property
    def effective_redis_url(self) -> str:
        """REDIS_URL when given, else one built from REDIS_HOST, REDIS_PORT, REDIS_PASSWORD."""
        if self.redis_url:
            return self.redis_url
        auth = ""
        if self.redis_password is not None:
            auth = ":" + quote(self.redis_password.get_secret_value(), safe="") + "@"
        return f"redis://{auth}{self.redis_host}:{self.redis_port}/0"

    @property
    def effective_context_margin_tokens(self) -> int:
        """The margin left unused in the context window.

        Without the served model's tokenizer, counts come from cl100k_base,
        which undercounts for models with smaller vocabularies; 15% of the
        context absorbs that. With the model's own tokenizer, a small margin
        covers the chat template's own tokens.
        """
        if self.context_margin_tokens is not None:
            return self.context_margin_tokens
        if self.tokenizer_path:
            return 256
        return int(self.model_context_tokens * 0.15)

    @property
    def queue_names(self) -> tuple[str, str]:
        return (self.chat_queue, self.notification_queue)


def _check_port(parts: SplitResult) -> None:
    """A port that is not a number; the text never quotes it: it may be half a password."""
    try:
        parts.port  # noqa: B018 - parsing is the check
    except ValueError:
        raise ValueError(
            "its port is not a number (a password containing / ? # @ or : must be percent-encoded)"
        ) from None


def load_settings(*, require_provider: bool = True, **overrides: Any) -> Settings:
    """Read and check every setting; the first problem becomes one `ConfigError` line.

    Commands that never talk to a model (migrate, stats) pass `require_provider=False`.
    """
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_first_problem(exc)) from None
    if require_provider:
        _check_provider(settings)
    _register_secrets(settings)
    return settings


def _register_secrets(settings: Settings) -> None:
    """Every secret the worker holds, so texts leaving it are cut clean of them."""
    for secret in (settings.runpod_api_key, settings.openai_api_key, settings.redis_password):
        register_secret(secret.get_secret_value() if secret else None)
    register_url_password(settings.database_url.get_secret_value())
    for url in (
        settings.redis_url,
        settings.openai_base_url,
        settings.simulator_url,
        settings.runpod_endpoint_url,
    ):
        register_url_password(url)


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    name = str(error["loc"][0]).upper() if error["loc"] else "settings"
    if error["type"] == "missing":
        return f"{name} is not set"
    # The input is left out on purpose: it may be a password or a connection string.
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{name} is invalid: {message}"


def _check_provider(settings: Settings) -> None:
    provider = resolve_provider(settings)
    if provider is ProviderName.RUNPOD:
        if settings.runpod_api_key is None:
            raise ConfigError("RUNPOD_API_KEY is not set (needed by LLM_PROVIDER=runpod)")
        if not (settings.runpod_endpoint_id or settings.runpod_endpoint_url):
            raise ConfigError("RUNPOD_ENDPOINT_ID is not set (or give RUNPOD_ENDPOINT_URL)")
        if settings.runpod_api_mode is RunPodApiMode.OPENAI and not settings.llm_model:
            raise ConfigError("LLM_MODEL is not set (needed by RUNPOD_API_MODE=openai)")
    elif provider is ProviderName.OPENAI:
        if not settings.openai_base_url:
            raise ConfigError("OPENAI_BASE_URL is not set (needed by LLM_PROVIDER=openai)")
        if not settings.llm_model:
            raise ConfigError("LLM_MODEL is not set (needed by LLM_PROVIDER=openai)")
    elif not settings.simulator_url:
        raise ConfigError("SIMULATOR_URL is not set (needed by LLM_PROVIDER=simulator)")


def resolve_provider(settings: Settings) -> ProviderName:
    """The configured provider; with none named, the platform's RunPod settings select RunPod.

    The simulator is never chosen implicitly: a worker that would otherwise
    answer chats with scripted text must be told so.
    """
    if settings.llm_provider is not None:
        return settings.llm_provider
    if settings.runpod_api_key is not None and (
        settings.runpod_endpoint_id or settings.runpod_endpoint_url
    ):
        return ProviderName.RUNPOD
    if settings.openai_base_url:
        return ProviderName.OPENAI
    raise ConfigError(
        "LLM_PROVIDER is not set and no provider is configured "
        "(set RUNPOD_API_KEY and RUNPOD_ENDPOINT_ID, or OPENAI_BASE_URL, or LLM_PROVIDER)"
    )


def runpod_endpoint_url(settings: Settings) -> str:
    if settings.runpod_endpoint_url:
        return settings.runpod_endpoint_url.rstrip("/")
    return f"{RUNPOD_API_BASE}/{settings.runpod_endpoint_id}"
