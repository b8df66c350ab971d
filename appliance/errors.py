"""Typed errors of the appliance: each carries the HTTP status a client should see.

Problem documents and JSON error bodies are built from these only at the web edge; the message
is written for the requester and never holds a secret, a stack trace or a PKCS#11 return code.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of every error the appliance reports to a client or an operator."""

    status = 500
    acme_type = "serverInternal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ApplianceError):
    status = 400
    acme_type = "malformed"


class BadCsr(BadRequest):
    acme_type = "badCSR"


class Unauthorized(ApplianceError):
    status = 401
    acme_type = "unauthorized"


class Forbidden(ApplianceError):
    status = 403
    acme_type = "unauthorized"


class PolicyViolation(Forbidden):
    acme_type = "rejectedIdentifier"


class NotFound(ApplianceError):
    status = 404
    acme_type = "malformed"


class Conflict(ApplianceError):
    status = 409
    acme_type = "malformed"


class PayloadTooLarge(ApplianceError):
    status = 413
    acme_type = "malformed"


class Unavailable(ApplianceError):
    """The CA cannot do this now; `retry_after` (seconds) becomes the edge's Retry-After."""

    status = 503
    acme_type = "serverInternal"

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ConfigError(ApplianceError):
    """ca.json (or another configuration input) is invalid; the message names the field."""


class StorageError(ApplianceError):
    """The database could not record or read something; the client may retry."""

    status = 503


class StoreRefusal(ApplianceError):
    """The store refused a write because of what is already recorded (not a fault: a decision)."""


class TokenReused(StoreRefusal, Unauthorized):
    """The one-time token id (or nonce) was already recorded: a replay."""

    def __init__(self, message: str = "token already used: one-time tokens cannot be replayed"
                 ) -> None:
        super().__init__(message)


class AlreadyRevoked(StoreRefusal, BadRequest):
    """The certificate is already revoked."""

    acme_type = "alreadyRevoked"


class CertificateUnknown(StoreRefusal, NotFound):
    """No issued certificate has this serial."""


class RecordNotFound(StoreRefusal, NotFound):
    """A record the caller named (an ACME account, order, authorization...) does not exist."""


class RecordConflict(StoreRefusal, Conflict):
    """The write lost a race with another one, or contradicts what is recorded."""
