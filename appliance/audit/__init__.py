"""Append-only, hash-chained audit log (see log.py and docs/audit.md)."""

from appliance.audit.log import (
    EVENTS,
    AuditError,
    AuditEvent,
    AuditLog,
    Signer,
    VerifyResult,
    certificate_sha256,
    checkpoint_algorithm,
    checkpoint_message,
    is_secret_key,
    sign_message,
    tail,
    verify,
    verify_message,
)

__all__ = [
    "EVENTS",
    "AuditError",
    "AuditEvent",
    "AuditLog",
    "Signer",
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
