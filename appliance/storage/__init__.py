"""Storage of certificates, intents, used token ids; reached through the small `Store` protocol."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

# The store's typed refusals live with every other error; re-exported for the store's callers.
from appliance.errors import AlreadyRevoked as AlreadyRevoked
from appliance.errors import CertificateUnknown as CertificateUnknown
from appliance.errors import RecordConflict as RecordConflict
from appliance.errors import RecordNotFound as RecordNotFound
from appliance.errors import StorageError as StorageError
from appliance.errors import StoreRefusal as StoreRefusal
from appliance.errors import TokenReused as TokenReused


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


@dataclass(frozen=True)
class Revocation:
    serial: int
    reason_code: int
    reason: str
    revoked_at: datetime
    provisioner: str
    method: str  # "token" | "mtls" | "acme" ...
    token_use: TokenUse | None = None


@dataclass(frozen=True)
class RevocationRecord:
    serial: int
    reason_code: int
    reason: str
    revoked_at: datetime
    provisioner: str
    method: str
    not_after: datetime


@dataclass(frozen=True)
class CrlRecord:
    number: int
    this_update: datetime
    next_update: datetime
    der: bytes


class Store(Protocol):
    async def reserve(self, intent: CertificateIntent) -> None:
        """Record the intent (and its token id); raise TokenReused on a replayed token."""

    async def reserve_many(self, intents: list[CertificateIntent]
                           ) -> list[TokenReused | StorageError | None]:
        """Record intents in one commit; per intent None, TokenReused or StorageError."""

    async def record_certificate(self, serial: int, der: bytes) -> None:
        """Record the signed certificate for a reserved serial."""

    async def record_certificates(self, signed: list[tuple[int, bytes]]
                                  ) -> list[StorageError | None]:
        """Record signed certificates (serial, DER) in one commit; per certificate an outcome."""

    async def record_and_reserve(
        self, signed: list[tuple[int, bytes]], intents: list[CertificateIntent],
    ) -> tuple[list[StorageError | None], list[TokenReused | StorageError | None]]:
        """Both of the above in one commit; the outcomes of each, in order."""

    async def record_failure(self, serial: int) -> None:
        """Mark a reserved serial as never signed."""

    async def record_failures(self, serials: list[int]) -> None:
        """Mark reserved serials as never signed, in one commit."""

    async def get_certificate(self, serial: int) -> CertificateRecord | None: ...

    async def count_certificates(self) -> int: ...

    async def purge_expired_tokens(self, now: datetime) -> int: ...

    async def revoke(self, revocation: Revocation) -> None: ...

    async def get_revocation(self, serial: int) -> RevocationRecord | None: ...

    async def unexpired_revocations(self, now: datetime) -> list[RevocationRecord]: ...

    async def reserve_crl_number(self, this_update: datetime, next_update: datetime) -> int: ...

    async def record_crl(self, number: int, der: bytes) -> None: ...

    async def latest_crl(self) -> CrlRecord | None: ...

    async def close(self) -> None: ...
