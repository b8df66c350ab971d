"""structlog set-up: JSON lines in production, console on a TTY, secrets redacted.

The libraries' own records (aiohttp, asyncio) come through the same renderer and redaction: for
malformed HTTP aiohttp logs a plain-text traceback quoting up to ~100 bytes of the offending
header or URL, which could be a credential; here it becomes one line naming the error, with no
traceback and nothing the client sent.
"""

from __future__ import annotations

import logging
import re
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


# A quoted run ('...', b'...', "..."): how aiohttp and asyncio quote what a peer sent.
_QUOTED = re.compile(r"b?'(?:[^'\\]|\\.)*'" r'|b?"(?:[^"\\]|\\.)*"')
_REASON_CHARS = 120
_MESSAGE_CHARS = 200


def _short(text: str, limit: int) -> str:
    """The first line of `text`, quoted parts (what a client sent) dropped, secrets redacted."""
    line = text.strip().split("\n", 1)[0]
    line = _QUOTED.sub("<...>", line)
    line = "".join(c if c.isprintable() else "?" for c in line)
    return redact_text(line)[:limit].rstrip(" :")


def _library_reason(error: BaseException) -> str:
    # aiohttp's HttpProcessingError keeps its text in .message; str() prefixes the status code.
    message = getattr(error, "message", None)
    return _short(message if isinstance(message, str) else str(error), _REASON_CHARS)


class LibraryLogBridge(logging.Handler):
    """A standard-library log record (aiohttp, asyncio ...) as one structured line.

    The exception becomes its class name and a short reason; its traceback is never written.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name,
                                      "message": _short(record.getMessage(), _MESSAGE_CHARS)}
            error = record.exc_info[1] if record.exc_info else None
            if error is not None:
                fields["error"] = type(error).__name__
                fields["reason"] = _library_reason(error)
            structlog.get_logger("library").log(record.levelno, "library_log", **fields)
        except Exception:  # noqa: BLE001 - logging must never raise into the library
            self.handleError(record)


def route_library_logs(level: int = logging.WARNING) -> None:
    """Send every standard-library logger's records (warnings and worse) through structlog."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, LibraryLogBridge):
            root.removeHandler(handler)
    root.addHandler(LibraryLogBridge(level))
    root.setLevel(min(root.level or level, level))


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
    route_library_logs()
