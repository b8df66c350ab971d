"""structlog set-up: JSON lines in production, console on a TTY, secrets redacted."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

from appliance.redaction import REDACTED, is_secret_name, masked, redact_text


def redact_secrets(_logger: Any, _name: str, event: MutableMapping[str, Any]
                   ) -> MutableMapping[str, Any]:
    """Redact the values of secret-named keys, private keys and JWTs from every event.

    The names are the audit log's (appliance.redaction): a PIN is a secret in both.
    """
    for key in list(event):
        value = event[key]
        if is_secret_name(key):
            event[key] = REDACTED
        elif isinstance(value, str):
            event[key] = redact_text(value)
        elif isinstance(value, Mapping | list | tuple):
            event[key] = masked(value)
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
