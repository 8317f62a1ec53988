"""Secrets are cut out of every text that leaves the worker.

The entry point registers each secret it was configured with (API keys,
passwords in connection strings); log lines, job failure reasons, job rows and
events pass through `redact`. Code that builds error texts already leaves
secrets out; this is the net for a library's exception text that quotes one.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

REDACTED = "[redacted]"
_MIN_SECRET_CHARS = 4  # shorter values would redact ordinary words

_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    if value and len(value) >= _MIN_SECRET_CHARS:
        _secrets.add(value)


def register_url_password(url: str | None) -> None:
    """The password of a connection string, as written and URL-decoded."""
    if not url:
        return
    password = urlsplit(url).password
    if password:
        register_secret(password)
        register_secret(unquote(password))


def redact(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text
