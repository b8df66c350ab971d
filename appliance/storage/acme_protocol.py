"""ACME state behind the `AcmeStore` protocol: the records it keeps and the typed methods.

The store records and reads; it does not decide. Which status may follow which is ACME's rule
(appliance.acme.messages): callers name the statuses a conditional write may start from, and
pass the rule that settles an order from its authorizations, so that a transition that must
not race is still one statement or one transaction inside the store.

Refusals are typed (appliance.errors): RecordNotFound, RecordConflict, TokenReused (a nonce
used before: nothing of the write is recorded).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class AccountStatus(StrEnum):
    VALID = "valid"
    DEACTIVATED = "deactivated"
    REVOKED = "revoked"


class OrderStatus(StrEnum):
    PENDING = "pending"
    READY = "ready"
    PROCESSING = "processing"
    VALID = "valid"
    INVALID = "invalid"


class AuthorizationStatus(StrEnum):
    PENDING = "pending"
    VALID = "valid"
    INVALID = "invalid"
    DEACTIVATED = "deactivated"
    EXPIRED = "expired"
    REVOKED = "revoked"


class ChallengeStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    VALID = "valid"
    INVALID = "invalid"


class IdentifierType(StrEnum):
    DNS = "dns"
    IP = "ip"


class ChallengeType(StrEnum):
    HTTP_01 = "http-01"
    DNS_01 = "dns-01"
    TLS_ALPN_01 = "tls-alpn-01"


# A JSON object as recorded (a JWK, a problem document); its members are the writer's business.
JsonObject = dict[str, object]


def new_id() -> str:
    """A fresh id for an account, order, authorization or challenge (unguessable, URL-safe)."""
    return secrets.token_urlsafe(16)


@dataclass(frozen=True)
class Identifier:
    """An order's identifier, already checked and normalised (appliance.acme.messages)."""

    type: IdentifierType
    value: str

    def to_json(self) -> dict[str, str]:
        return {"type": str(self.type), "value": self.value}


@dataclass(frozen=True)
class AcmeAccount:
    id: str
    provisioner: str
    thumbprint: str
    jwk: JsonObject
    status: AccountStatus
    contact: tuple[str, ...]
    eab_kid: str | None
    created_at: int


@dataclass(frozen=True)
class AcmeChallenge:
    id: str
    authz_id: str
    type: ChallengeType
    token: str
    status: ChallengeStatus
    validated: int | None
    error: JsonObject | None


@dataclass(frozen=True)
class AcmeAuthz:
    id: str
    order_id: str
    account_id: str
    identifier: Identifier  # a wildcard's without its "*."
    wildcard: bool
    status: AuthorizationStatus
    expires: int
    challenges: tuple[AcmeChallenge, ...] = field(default=())


@dataclass(frozen=True)
class AcmeOrder:
    id: str
    provisioner: str
    account_id: str
    status: OrderStatus
    expires: int
    identifiers: tuple[Identifier, ...]
    not_before: int | None
    not_after: int | None
    authz_ids: tuple[str, ...]
    error: JsonObject | None
    cert_serial: str | None
    replaces: str | None


@dataclass(frozen=True)
class EabKey:
    kid: str
    provisioner: str
    reference: str | None
    hmac_key: bytes
    created_at: int
    account_id: str | None
    bound_at: int | None


@dataclass(frozen=True)
class NonceUse:
    """A checked nonce to use up in the same commit as the write it authorizes."""

    nonce: str
    expires_at: int


@dataclass(frozen=True)
class AccountChange:
    """What an account update sets; None keeps a field as it is."""

    contact: tuple[str, ...] | None = None
    status: AccountStatus | None = None
    jwk: JsonObject | None = None
    thumbprint: str | None = None


# How an order's status follows from its own and its authorizations' (None: it stays).
OrderRule = Callable[[OrderStatus, Sequence[AuthorizationStatus]], OrderStatus | None]


class AcmeStore(Protocol):
    """Accounts, orders, authorizations, challenges, nonces and EAB keys of every provisioner."""

    # -- secrets and nonces
    async def secret(self, name: str, size: int = 32) -> bytes:
        """The named secret, made (random, `size` bytes) and recorded on first use."""

    async def use_nonce(self, nonce: NonceUse) -> None:
        """Record the nonce as used; TokenReused if it was used before."""

    async def purge(self, now: int, *, expire: Sequence[OrderStatus], expired_error: JsonObject
                    ) -> int:
        """Forget expired nonces; orders in `expire` past their expiry become invalid."""

    # -- accounts
    async def create_account(self, account: AcmeAccount, *, eab_bound_at: int | None = None
                             ) -> AcmeAccount:
        """Record the account (binding its EAB key), or return the one that has its key.

        RecordConflict when its EAB key is unknown or already bound."""

    async def find_account(self, provisioner: str, account_id: str) -> AcmeAccount | None: ...

    async def find_account_by_key(self, provisioner: str, thumbprint: str
                                  ) -> AcmeAccount | None: ...

    async def update_account(self, account_id: str, change: AccountChange, *,
                             deactivate_authzs_from: Sequence[AuthorizationStatus] = ()
                             ) -> AcmeAccount:
        """Apply the change; authorizations of the account in `deactivate_authzs_from` become
        deactivated. RecordConflict for a key another account has; RecordNotFound."""

    # -- an account read with what a request's URL names, as one snapshot
    async def account_and_order(self, provisioner: str, account_id: str, order_id: str
                                ) -> tuple[AcmeAccount | None, AcmeOrder | None]: ...

    async def account_and_order_certificate(
        self, provisioner: str, account_id: str, order_id: str,
    ) -> tuple[AcmeAccount | None, tuple[AcmeOrder | None, bytes | None]]:
        """(the account, (the order, its certificate's DER))."""

    async def account_and_authz(self, provisioner: str, account_id: str, authz_id: str
                                ) -> tuple[AcmeAccount | None, AcmeAuthz | None]: ...

    async def account_and_challenge(
        self, provisioner: str, account_id: str, challenge_id: str,
    ) -> tuple[AcmeAccount | None, tuple[AcmeChallenge | None, AcmeAuthz | None]]:
        """(the account, (the challenge, its authorization with all its challenges))."""

    # -- orders, authorizations, challenges
    async def create_order(self, order: AcmeOrder, authzs: Sequence[AcmeAuthz], *,
                           created_at: int, nonce: NonceUse | None = None) -> None: ...

    async def get_order(self, order_id: str) -> AcmeOrder | None: ...

    async def list_orders(self, account_id: str) -> list[str]:
        """The account's order ids, oldest first."""

    async def order_with_certificate(self, account_id: str, cert_serial: str) -> bool:
        """Whether one of the account's orders has the certificate with this serial."""

    async def get_authz(self, authz_id: str) -> AcmeAuthz | None: ...

    async def get_challenge(self, challenge_id: str) -> AcmeChallenge | None: ...

    async def deactivate_authz(self, authz_id: str, *, from_: Sequence[AuthorizationStatus],
                               settle: OrderRule, nonce: NonceUse | None = None) -> None:
        """Deactivate the authorization if in `from_`; settle its order. RecordNotFound."""

    async def transition_challenge(self, challenge_id: str, *, from_: ChallengeStatus,
                                   to: ChallengeStatus, nonce: NonceUse | None = None) -> bool:
        """`from_` -> `to` as one statement; True only for the caller that made the change."""

    async def finish_challenge(self, challenge_id: str, *, status: ChallengeStatus,
                               validated: int | None, error: JsonObject | None,
                               authz_status: AuthorizationStatus,
                               authz_from: Sequence[AuthorizationStatus],
                               settle: OrderRule) -> AcmeChallenge:
        """Record a validation's outcome; the authorization, if in `authz_from`, becomes
        `authz_status`, and its order is settled by `settle`. The challenge as it now is."""

    async def transition_order(self, order_id: str, *, from_: OrderStatus, to: OrderStatus,
                               nonce: NonceUse | None = None) -> bool:
        """`from_` -> `to` as one statement; True only for the caller that made the change."""

    async def finish_finalize(self, order_id: str, *, status: OrderStatus,
                              cert_serial: str | None, error: JsonObject | None) -> AcmeOrder:
        """Record finalization's outcome (and the certificate's serial). RecordNotFound."""

    # -- external account binding keys
    async def add_eab_key(self, provisioner: str, reference: str | None, *, created_at: int
                          ) -> EabKey:
        """A new random key; RecordConflict when the reference is taken."""

    async def list_eab_keys(self, provisioner: str) -> list[EabKey]: ...

    async def get_eab_key(self, provisioner: str, kid: str) -> EabKey | None: ...

    async def remove_eab_key(self, provisioner: str, kid: str) -> bool: ...

    async def close(self) -> None:
        """Release what the ACME store holds of its own (not the underlying database)."""
