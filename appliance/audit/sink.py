"""What the issuer, the authority and the server need of an audit log: the AuditSink protocol.

Callers depend on this, not on the file writer (AuditLog), so a test can hand them a recording
sink and another backend (a remote log, a database table) can stand in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from cryptography import x509

from appliance.audit.checkpoint import Signer
from appliance.audit.record import AuditEvent


class AuditSink(Protocol):
    """Fail closed: each method returns once the record is durable, else raises AuditError."""

    async def append(self, event: AuditEvent) -> int:
        """Record `event`; return its sequence number."""
        ...

    async def append_many(self, events: Sequence[AuditEvent]) -> list[int]:
        """Record `events` in one write; return their sequence numbers, in order."""
        ...

    async def checkpoint(self, sign: Signer, certificate: x509.Certificate, actor: str) -> int:
        """Append a record sealing the log so far with `sign`; return its sequence number."""
        ...

    async def close(self) -> None:
        """Write what is queued and release the log."""
        ...
