"""The choice of a provider from settings."""

from __future__ import annotations

from uvian_worker.providers.base import Provider
from uvian_worker.providers.openai import OpenAIProvider
from uvian_worker.providers.runpod import RunPodProvider
from uvian_worker.settings import (
    ProviderName,
    RunPodApiMode,
    Settings,
    resolve_provider,
    runpod_endpoint_url,
)

# The simulator serves RunPod's native API under any endpoint id; this one names it in URLs.
SIMULATOR_ENDPOINT_ID = "simulator"
SIMULATOR_MODEL = "uvian-sim-1"


def build_provider(settings: Settings) -> Provider:
    """The provider the settings select (`load_settings` has already checked they are complete)."""
    name = resolve_provider(settings)
    model = settings.llm_model or ""
    timeout_s = settings.connect_timeout_s
    if name is ProviderName.SIMULATOR:
        base = (settings.simulator_url or "").rstrip("/")
        model = settings.llm_model or SIMULATOR_MODEL
        if settings.simulator_protocol is RunPodApiMode.NATIVE:
            return RunPodProvider(
                base_url=f"{base}/v2/{SIMULATOR_ENDPOINT_ID}",
                api_key="simulator",
                model=model,
                poll_interval_s=settings.runpod_poll_interval_s,
                connect_timeout_s=timeout_s,
            )
        return OpenAIProvider(base_url=f"{base}/v1", model=model, connect_timeout_s=timeout_s)

    if name is ProviderName.OPENAI:
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        base_url = (settings.openai_base_url or "").rstrip("/")
        return OpenAIProvider(
            base_url=base_url, model=model, api_key=key, connect_timeout_s=timeout_s
        )

    assert settings.runpod_api_key is not None  # checked by load_settings
    key = settings.runpod_api_key.get_secret_value()
    endpoint = runpod_endpoint_url(settings)
    if settings.runpod_api_mode is RunPodApiMode.OPENAI:
        return OpenAIProvider(
            base_url=f"{endpoint}/openai/v1", model=model, api_key=key, connect_timeout_s=timeout_s
        )
    return RunPodProvider(
        base_url=endpoint,
        api_key=key,
        model=model,
        poll_interval_s=settings.runpod_poll_interval_s,
        connect_timeout_s=timeout_s,
    )


def provider_model(settings: Settings) -> str:
    """The model name recorded with a reply when the provider does not report one."""
    if resolve_provider(settings) is ProviderName.SIMULATOR:
        return settings.llm_model or SIMULATOR_MODEL
    return settings.llm_model or "default"
