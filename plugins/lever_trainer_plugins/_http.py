"""What the built-in plugins that talk HTTP share: checking a server URL an option names."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from lever_trainer.api import LeverError


def check_server_url(url: Any, flag: str, secret: str) -> str:
    """``url`` without a trailing slash; a :class:`LeverError` naming ``flag`` unless it is
    an http(s) URL without credentials (those belong in the environment variable
    ``secret``: the URL is recorded in ``run_config.json``)."""
    text = str(url).strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LeverError(f"{flag}: {text!r} is not an http:// or https:// URL")
    if parts.username or parts.password:
        raise LeverError(
            f"{flag}: put the credentials in {secret}, not in the URL "
            "(the URL is recorded in run_config.json)"
        )
    return text
