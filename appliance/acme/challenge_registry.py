"""Challenge types by their `type`: what each can validate, and the validator that does it.

The validators are in appliance.acme.challenges; each challenge type registers one here (as
certbot's challenge classes register by `typ`). A provisioner's offer for an identifier is the
registered types, in registration order, that can validate it and that the provisioner allows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from appliance.acme.challenges import (
    ChallengeFailed,
    HttpValidationClient,
    ValidationSettings,
    validate_dns01,
    validate_http01,
    validate_tls_alpn01,
)
from appliance.storage.acme_protocol import ChallengeType, Identifier, IdentifierType


@dataclass(frozen=True)
class Validation:
    """One validation to make: the identifier (a wildcard's base name), token, key auth."""

    identifier: Identifier
    token: str
    key_authorization: str


class ChallengeValidator(Protocol):
    """Validates one challenge type; raises ChallengeFailed, nothing else, when it fails."""

    identifier_types: frozenset[IdentifierType]
    wildcards: bool  # whether it can prove control of a wildcard's base name (§7.1.3)

    async def validate(self, validation: Validation) -> None: ...

    async def close(self) -> None:
        """Release what it holds across validations (a client session)."""


class ChallengeRegistry:
    """The challenge types a server validates, keyed by type."""

    def __init__(self) -> None:
        self._validators: dict[ChallengeType, ChallengeValidator] = {}

    def register(self, kind: ChallengeType, validator: ChallengeValidator) -> None:
        if kind in self._validators:
            raise ValueError(f"challenge type {kind} is registered already")
        self._validators[kind] = validator

    def offered(self, identifier: Identifier, wildcard: bool, allowed: Iterable[str]
                ) -> tuple[ChallengeType, ...]:
        """The types that can validate `identifier` among those `allowed` (a provisioner's)."""
        permitted = set(allowed)
        return tuple(kind for kind, v in self._validators.items()
                     if kind in permitted and identifier.type in v.identifier_types
                     and (v.wildcards or not wildcard))

    async def validate(self, kind: ChallengeType, validation: Validation) -> None:
        validator = self._validators.get(kind)
        if validator is None:
            raise ChallengeFailed("malformed", f"unknown challenge type {kind}")
        await validator.validate(validation)

    async def close(self) -> None:
        for validator in self._validators.values():
            await validator.close()


class Http01:
    """http-01 (RFC 8555 §8.3; RFC 8738 for IPs) over the process's one validation client."""

    identifier_types = frozenset({IdentifierType.DNS, IdentifierType.IP})
    wildcards = False

    def __init__(self, settings: ValidationSettings) -> None:
        self._settings = settings
        self._client: HttpValidationClient | None = None  # made on first use, in the loop

    async def validate(self, validation: Validation) -> None:
        if self._client is None:
            self._client = HttpValidationClient(self._settings)
        await validate_http01(str(validation.identifier.type), validation.identifier.value,
                              validation.token, validation.key_authorization, self._settings,
                              self._client)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


class Dns01:
    """dns-01 (RFC 8555 §8.4): the only type that validates a wildcard; DNS names only."""

    identifier_types = frozenset({IdentifierType.DNS})
    wildcards = True

    def __init__(self, settings: ValidationSettings) -> None:
        self._settings = settings

    async def validate(self, validation: Validation) -> None:
        await validate_dns01(validation.identifier.value, validation.key_authorization,
                             self._settings)

    async def close(self) -> None:
        pass


class TlsAlpn01:
    """tls-alpn-01 (RFC 8737; RFC 8738 for IPs)."""

    identifier_types = frozenset({IdentifierType.DNS, IdentifierType.IP})
    wildcards = False

    def __init__(self, settings: ValidationSettings) -> None:
        self._settings = settings

    async def validate(self, validation: Validation) -> None:
        await validate_tls_alpn01(str(validation.identifier.type), validation.identifier.value,
                                  validation.key_authorization, self._settings)

    async def close(self) -> None:
        pass


def standard_registry(settings: ValidationSettings) -> ChallengeRegistry:
    """http-01, dns-01 and tls-alpn-01, in the order they are offered."""
    registry = ChallengeRegistry()
    registry.register(ChallengeType.HTTP_01, Http01(settings))
    registry.register(ChallengeType.DNS_01, Dns01(settings))
    registry.register(ChallengeType.TLS_ALPN_01, TlsAlpn01(settings))
    return registry
