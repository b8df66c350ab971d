"""Storage of certificates, intents, used token ids; reached through the small `Store` protocol."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


class TokenReused(Exception):
    """The one-time token id was already recorded: a replay."""


@dataclass(frozen=True)
class TokenUse:
    """A one-time token id to record atomically with the issuance it authorised."""

    provisioner: str
    jti: str
    expires_at: datetime


@dataclass(frozen=True)
class CertificateIntent:
    """What is about to be signed: recorded durably before the token signs."""

    serial: int
    subject: str
    sans: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    provisioner: str
    token_use: TokenUse | None = None


@dataclass(frozen=True)
class CertificateRecord:
    serial: int
    subject: str
    sans: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    provisioner: str
    status: str
    der: bytes | None


class Store(Protocol):
    async def reserve(self, intent: CertificateIntent) -> None:
        """Record the intent (and its token id); raise TokenReused on a replayed token."""

    async def record_certificate(self, serial: int, der: bytes) -> None:
        """Record the signed certificate for a reserved serial."""

    async def record_failure(self, serial: int) -> None:
        """Mark a reserved serial as never signed."""

    async def get_certificate(self, serial: int) -> CertificateRecord | None: ...

    async def count_certificates(self) -> int: ...

    async def purge_expired_tokens(self, now: datetime) -> int: ...

    async def close(self) -> None: ...
