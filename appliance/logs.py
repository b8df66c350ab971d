"""structlog set-up: JSON lines in production, console on a TTY, secrets redacted."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = re.compile(r"(pin|password|passphrase|secret|token|ott|authorization|share|key_pem)",
                          re.IGNORECASE)
_JWT = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]*")


_secret_key_seen: dict[str, bool] = {}  # the same few keys come with every request line


def _is_secret_key(key: str) -> bool:
    known = _secret_key_seen.get(key)
    if known is None:
        known = key != "event" and _SECRET_KEYS.search(key) is not None
        if len(_secret_key_seen) < 4096:
            _secret_key_seen[key] = known
    return known


def redact_secrets(_logger: Any, _name: str, event: MutableMapping[str, Any]
                   ) -> MutableMapping[str, Any]:
    """Drop values of secret-looking keys, and anything shaped like a JWT, from every event."""
    for key in list(event):
        value = event[key]
        if _is_secret_key(key):
            event[key] = "[redacted]"
        elif isinstance(value, str) and "eyJ" in value:
            event[key] = _JWT.sub("[redacted-jwt]", value)
    return event


def configure_logging(fmt: str = "json", level: int = logging.INFO) -> None:
    renderer: Any
    if fmt == "text" or (fmt == "auto" and sys.stderr.isatty()):
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
