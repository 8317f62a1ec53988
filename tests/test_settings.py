"""Settings: names the platform uses, one clear line for each problem, no secret defaults."""

from __future__ import annotations

from typing import Any

import pytest

from uvian_worker.errors import ConfigError
from uvian_worker.observability.redaction import register_secret
from uvian_worker.settings import (
    ProviderName,
    Settings,
    load_settings,
    resolve_provider,
    runpod_endpoint_url,
)

BASE = {"database_url": "postgresql://u:pw@db.example/postgres", "_env_file": None}


def load(**values: Any) -> Settings:
    return load_settings(**{**BASE, **values})


def problem(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name in ("DATABASE_URL", "LLM_PROVIDER", "RUNPOD_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None)
    return str(caught.value)


def test_missing_database_url_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    assert problem(monkeypatch, LLM_PROVIDER="simulator") == "DATABASE_URL is not set"


def test_malformed_number_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    message = problem(
        monkeypatch,
        DATABASE_URL="postgresql://x@h/db",
        LLM_PROVIDER="simulator",
        SIMULATOR_URL="http://127.0.0.1:1",
        WORKER_CONCURRENCY="lots",
    )
    assert message.startswith("WORKER_CONCURRENCY is invalid")


def test_malformed_setting_never_echoes_its_value(monkeypatch: pytest.MonkeyPatch) -> None:
    message = problem(monkeypatch, DATABASE_URL="mysql://root:hunter2@h/db")
    assert message == "DATABASE_URL is invalid: must be a postgresql:// connection string"
    assert "hunter2" not in message


def test_no_provider_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    message = problem(monkeypatch, DATABASE_URL="postgresql://x@h/db")
    assert message.startswith("LLM_PROVIDER is not set and no provider is configured")


def test_simulator_needs_its_url(monkeypatch: pytest.MonkeyPatch) -> None:
    message = problem(monkeypatch, DATABASE_URL="postgresql://x@h/db", LLM_PROVIDER="simulator")
    assert message == "SIMULATOR_URL is not set (needed by LLM_PROVIDER=simulator)"


def test_platform_runpod_settings_select_runpod() -> None:
    settings = load(runpod_api_key="rk_secret", runpod_endpoint_id="abc123")
    assert resolve_provider(settings) is ProviderName.RUNPOD
    assert runpod_endpoint_url(settings) == "https://api.runpod.ai/v2/abc123"
    assert "rk_secret" not in repr(settings)
    assert "pw" not in repr(settings.database_url)


def test_runpod_openai_route_needs_the_model_name() -> None:
    with pytest.raises(ConfigError, match="LLM_MODEL is not set"):
        load(runpod_api_key="k", runpod_endpoint_id="abc", runpod_api_mode="openai")


def test_redis_url_is_built_from_host_port_and_password() -> None:
    settings = load(
        llm_provider="simulator",
        simulator_url="http://s",
        redis_host="cache",
        redis_port=6380,
        redis_password="p@ss/word",
    )
    assert settings.effective_redis_url == "redis://:p%40ss%2Fword@cache:6380/0"


def test_unknown_log_level_is_refused() -> None:
    with pytest.raises(ConfigError, match="LOG_LEVEL is invalid"):
        load(llm_provider="simulator", simulator_url="http://s", log_level="chatty")


@pytest.mark.parametrize("name", ["openai_base_url", "simulator_url", "runpod_endpoint_url"])
def test_provider_urls_must_be_http_urls(name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(**{"llm_provider": "simulator", "simulator_url": "http://s", name: "127.0.0.1:8499"})
    assert (
        str(caught.value)
        == f"{name.upper()} is invalid: must be an http:// or https:// URL with a host"
    )


@pytest.mark.parametrize("name", ["database_url", "redis_url"])
def test_password_breaking_the_url_is_named_but_never_quoted(name: str) -> None:
    scheme = "postgresql" if name == "database_url" else "redis"
    url = f"{scheme}://user:Secr3tPart/Rest@host:5432/db"
    with pytest.raises(ConfigError) as caught:
        load(**{"llm_provider": "simulator", "simulator_url": "http://s", name: url})
    assert str(caught.value) == (
        f"{name.upper()} is invalid: its port is not a number (a password containing "
        "/ ? # @ or : must be percent-encoded)"
    )
    assert "Secr3t" not in str(caught.value)


def test_json_log_lines_redact_secrets_that_json_would_escape() -> None:
    import logging

    from uvian_worker.observability.logs import JsonFormatter

    register_secret('Tr0ub4dor"&\\3')
    record = logging.makeLogRecord(
        {"msg": 'auth failed with Tr0ub4dor"&\\3', "levelname": "WARNING"}
    )
    line = JsonFormatter().format(record)
    assert "Tr0ub4dor" not in line and "[redacted]" in line
