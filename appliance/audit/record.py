"""Audit records: the event a caller gives, and the exact bytes of its line in the log.

Each line is a record `{"seq","time","actor","event","outcome","details","prev"}` where `prev` is
the SHA-256 (hex) of the previous line's bytes, newline included, and 64 zeros for the first
record. Editing, deleting, reordering or inserting a line breaks the chain at the next record.
Secret-named details never reach a line (appliance.redaction, the rule the logs use too).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import PurePath
from typing import Any, Final

from cryptography import x509

from appliance.redaction import is_secret_name, without_secrets

ZERO_HEAD: Final = "0" * 64
OUTCOMES: Final = frozenset({"success", "failure"})
# The events the appliance writes. Not a closed list (the event name only has to be a lowercase
# dotted word); `checkpoint` is reserved for AuditLog.checkpoint, `audit.repair` for the writer
# that cuts a torn record off (tail_repair.py).
EVENTS: Final = frozenset({
    "ca.init", "token.login", "token.logout", "seal", "unseal", "unseal.share",
    "provisioner.change", "policy.change", "cert.issue", "cert.renew", "cert.rekey",
    "cert.revoke", "request.refused", "crl.generate", "config.reload", "server.start",
    "server.stop", "checkpoint", "kms.check", "audit.repair",
})
EVENT_NAME: Final = re.compile(r"[a-z][a-z0-9_-]*(\.[a-z][a-z0-9_-]*)*")
FIELDS: Final = ("seq", "time", "actor", "event", "outcome", "details", "prev")


class AuditError(Exception):
    """An audit record could not be written or read; a caller about to act must refuse."""


@dataclass(frozen=True)
class AuditEvent:
    """One thing that happened: who did what, whether it worked, and the non-secret facts."""

    event: str
    outcome: str
    actor: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not EVENT_NAME.fullmatch(self.event) or len(self.event) > 64:
            raise ValueError(f"audit event name {self.event!r} is not a lowercase dotted word")
        if self.event == "checkpoint":
            raise ValueError("checkpoint records are written by AuditLog.checkpoint only")
        if self.event == "audit.repair":
            raise ValueError("audit.repair records are written by AuditLog only")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"audit outcome must be 'success' or 'failure', not {self.outcome!r}")
        if not self.actor or len(self.actor) > 256 or not self.actor.isprintable():
            raise ValueError("audit actor must be 1 to 256 printable characters")
        if not isinstance(self.details, Mapping):
            raise ValueError("audit details must be a mapping")


# -- secrets never reach the log: the one rule of appliance.redaction ----------------------------
is_secret_key = is_secret_name  # the name callers of appliance.audit know it by


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return rfc3339(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, uuid.UUID | PurePath | ipaddress.IPv4Address | ipaddress.IPv6Address
                  | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, x509.Name):
        return value.rfc4514_string()
    # bytes are refused on purpose: raw bytes in an audit record are too often key material.
    raise TypeError(f"an audit detail of type {type(value).__name__} is not JSON")


def rfc3339(moment: datetime) -> str:
    """A record's time: UTC, microseconds, `Z`."""
    if moment.tzinfo is None:
        raise AuditError("the audit clock returned a naive datetime")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_json(value: Any) -> str:
    """Compact ASCII JSON, as every record is written."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False,
                      default=_json_default)


def record_body(event: str, outcome: str, actor: str, details: Mapping[str, Any]) -> bytes:
    """The middle of a line (actor, event, outcome, details): everything but seq, time, prev."""
    try:
        details_json = to_json(without_secrets(details))
    except (TypeError, ValueError) as e:
        raise AuditError(f"audit details for {event} cannot be recorded: {e}") from None
    # ensure_ascii: a name from a CSR cannot smuggle control or bidi characters into a terminal.
    # event and outcome were checked against plain-ASCII patterns, so need no escaping.
    return (f'"actor":{_json_actor(actor)},"event":"{event}","outcome":"{outcome}",'
            f'"details":{details_json}').encode("ascii")


@functools.lru_cache(maxsize=1024)
def _json_actor(actor: str) -> str:
    return to_json(actor)


def record_line(seq: int, time: str, body: bytes, prev: str) -> bytes:
    """The whole line of a record: `body` numbered, stamped and chained to `prev`."""
    # Byte-identical to json.dumps of the record with separators (",", ":"), keys in this order.
    return b'{"seq":%d,"time":"%s",%s,"prev":"%s"}\n' % (seq, time.encode(), body, prev.encode())
