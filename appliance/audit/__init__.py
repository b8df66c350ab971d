"""Append-only, hash-chained audit log (see docs/audit.md).

record.py: the event and its line (format, hash chain, secrets left out); checkpoint.py: the
issuer key's signatures over the chain head; log.py: the file writer (AuditLog); tail_repair.py:
cutting off a record a dead writer left torn; verify.py: reading back (verify, tail); sink.py:
the AuditSink protocol callers depend on.
"""

from appliance.audit.checkpoint import (
    Signer,
    certificate_sha256,
    checkpoint_algorithm,
    checkpoint_message,
    sign_message,
    verify_message,
)
from appliance.audit.log import AuditLog
from appliance.audit.record import EVENTS, AuditError, AuditEvent, is_secret_key
from appliance.audit.sink import AuditSink
from appliance.audit.tail_repair import TailRepair
from appliance.audit.verify import VerifyResult, tail, verify

__all__ = [
    "EVENTS",
    "AuditError",
    "AuditEvent",
    "AuditLog",
    "AuditSink",
    "Signer",
    "TailRepair",
    "VerifyResult",
    "certificate_sha256",
    "checkpoint_algorithm",
    "checkpoint_message",
    "is_secret_key",
    "sign_message",
    "tail",
    "verify",
    "verify_message",
]
