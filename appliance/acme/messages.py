"""RFC 8555 messages: closed vocabularies, status rules, typed payloads, resource bodies.

As in certbot's acme/messages.py: a payload class reads its camelCase wire members into
snake_case attributes and refuses a member of the wrong type or a value outside a closed
vocabulary (status, identifier type) with the problem a client should see. Members a class does
not know are ignored, as RFC 8555 §7 asks of servers for extensibility. The status enums are
the store's vocabulary (appliance.storage.acme_protocol); which status may follow which is
decided here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509

from appliance.acme.problems import AcmeProblem
from appliance.errors import ApplianceError
from appliance.issuance.names import normalise_dns, reads_as_ipv4, shown
from appliance.jose.base64url import b64url_decode
from appliance.storage.acme_protocol import (
    AccountStatus,
    AcmeAccount,
    AcmeAuthz,
    AcmeChallenge,
    AcmeOrder,
    AuthorizationStatus,
    ChallengeStatus,
    ChallengeType,
    Identifier,
    IdentifierType,
    OrderStatus,
)

MAX_IDENTIFIERS = 100
REVOCATION_REASONS = (0, 1, 3, 4, 5, 9)  # RFC 5280 codes a subscriber may give (no CA ones)

# -- status rules ------------------------------------------------------------------------------
# Orders that lapse when their expiry passes; authorizations a client may deactivate (§7.5.2);
# those that go with a deactivated account (§7.3.6).
ORDER_EXPIRES_FROM = (OrderStatus.PENDING, OrderStatus.READY)
AUTHZ_DEACTIVATABLE_FROM = (AuthorizationStatus.PENDING, AuthorizationStatus.VALID)
AUTHZ_DEACTIVATED_WITH_ACCOUNT = (AuthorizationStatus.PENDING,)
# A validation's outcome settles only an authorization still waiting for one.
AUTHZ_SETTLED_FROM = (AuthorizationStatus.PENDING,)
_AUTHZ_FAILED = frozenset({AuthorizationStatus.INVALID, AuthorizationStatus.DEACTIVATED,
                           AuthorizationStatus.REVOKED, AuthorizationStatus.EXPIRED})


def settle_order(current: OrderStatus, authzs: Sequence[AuthorizationStatus]
                 ) -> OrderStatus | None:
    """§7.1.6: a pending order is ready once every authorization is valid, invalid once one
    fails; any other order keeps its status (None)."""
    if current is not OrderStatus.PENDING:
        return None
    if any(s in _AUTHZ_FAILED for s in authzs):
        return OrderStatus.INVALID
    if authzs and all(s is AuthorizationStatus.VALID for s in authzs):
        return OrderStatus.READY
    return None


def authz_status_at(authz: AcmeAuthz, now: float) -> AuthorizationStatus:
    """The status a client sees: a pending authorization past its expiry is expired."""
    if authz.status is AuthorizationStatus.PENDING and authz.expires < now:
        return AuthorizationStatus.EXPIRED
    return authz.status


def order_lapsed(order: AcmeOrder, now: float) -> bool:
    return order.status in ORDER_EXPIRES_FROM and order.expires < now


def order_expired_error() -> dict[str, object]:
    return AcmeProblem.malformed("the order expired").to_json()


# -- identifiers -------------------------------------------------------------------------------
def parse_identifier(untrusted: object) -> Identifier:
    """One identifier object, normalised (DNS names lowercased, IPs in canonical form)."""
    if not isinstance(untrusted, dict) or not isinstance(untrusted.get("value"), str):
        raise AcmeProblem.malformed("each identifier needs a type and a value")
    kind, value = untrusted.get("type"), untrusted["value"]
    if kind == IdentifierType.DNS:
        if reads_as_ipv4(value):
            # RFC 8738: an address is an "ip" identifier; as a dns one it would dodge IP policy
            # and be validated by resolving a name that every resolver reads as an address.
            raise AcmeProblem.rejected_identifier(
                f"dns identifier {shown(value)} is an IPv4 address, not a DNS name; "
                "order it as an ip identifier (RFC 8738)")
        try:
            value = normalise_dns(value)
        except ApplianceError as e:
            raise AcmeProblem.rejected_identifier(f"dns identifier: {e.message}") from None
        if "*" in value[1:] or (value.startswith("*") and not value.startswith("*.")):
            raise AcmeProblem.rejected_identifier(f"{value!r}: a wildcard may only be the "
                                                  "whole first label")
        return Identifier(IdentifierType.DNS, value)
    if kind == IdentifierType.IP:
        try:
            return Identifier(IdentifierType.IP, str(ipaddress.ip_address(value)))
        except ValueError:
            raise AcmeProblem.rejected_identifier(f"{shown(value)} is not an IP address"
                                                  ) from None
    raise AcmeProblem.unsupported_identifier(f"identifier type {str(kind)[:20]!r} is not "
                                             "supported (dns, ip)")


def parse_identifiers(untrusted: object) -> tuple[Identifier, ...]:
    if not isinstance(untrusted, list) or not untrusted:
        raise AcmeProblem.malformed("identifiers must be a non-empty list")
    if len(untrusted) > MAX_IDENTIFIERS:
        raise AcmeProblem.rejected_identifier(f"at most {MAX_IDENTIFIERS} identifiers per order")
    out: list[Identifier] = []
    for entry in untrusted:
        identifier = parse_identifier(entry)
        if identifier not in out:
            out.append(identifier)
    return tuple(out)


def is_wildcard(identifier: Identifier) -> bool:
    return identifier.type is IdentifierType.DNS and identifier.value.startswith("*.")


def general_name(identifier: Identifier) -> x509.GeneralName:
    if identifier.type is IdentifierType.DNS:
        return x509.DNSName(identifier.value)
    return x509.IPAddress(ipaddress.ip_address(identifier.value))


def identifier_names(identifiers: Sequence[Identifier]) -> tuple[x509.GeneralName, ...]:
    return tuple(general_name(i) for i in identifiers)


# -- payloads ----------------------------------------------------------------------------------
def decode_b64url(untrusted: object, what: str) -> bytes:
    if not isinstance(untrusted, str):
        raise AcmeProblem.malformed(f"{what} must be a base64url string")
    try:
        return b64url_decode(untrusted)
    except ApplianceError:
        raise AcmeProblem.malformed(f"{what} is not valid base64url") from None


def _optional_str(payload: Mapping[str, object], member: str, problem: str) -> str | None:
    value = payload.get(member)
    if value is not None and not isinstance(value, str):
        raise AcmeProblem.malformed(problem)
    return value


def parse_contacts(untrusted: object) -> tuple[str, ...]:
    if untrusted is None:
        return ()
    if not isinstance(untrusted, list) or not all(isinstance(c, str) for c in untrusted):
        raise AcmeProblem.malformed("contact must be a list of URLs")
    for contact in untrusted:
        if not contact.startswith("mailto:"):
            raise AcmeProblem.unsupported_contact(f"only mailto: contacts are supported, not "
                                                  f"{contact[:80]!r}")
        address = contact[7:]
        if "@" not in address or "," in address or "?" in address or len(address) > 254:
            raise AcmeProblem.invalid_contact(f"{contact[:80]!r} is not a single e-mail address")
    return tuple(untrusted)


@dataclass(frozen=True)
class NewAccount:
    """newAccount (§7.3): contact, termsOfServiceAgreed, onlyReturnExisting, EAB.

    The contacts are checked (`contacts()`) only for an account about to be made: a client
    that holds an account gets it back whatever else it sends.
    """

    untrusted_contact: object
    terms_of_service_agreed: bool
    only_return_existing: bool
    untrusted_external_account_binding: object  # checked by appliance.acme.jws

    @classmethod
    def from_json(cls, payload: Mapping[str, object]) -> NewAccount:
        return cls(untrusted_contact=payload.get("contact"),
                   terms_of_service_agreed=payload.get("termsOfServiceAgreed") is True,
                   only_return_existing=payload.get("onlyReturnExisting") is True,
                   untrusted_external_account_binding=payload.get("externalAccountBinding"))

    def contacts(self) -> tuple[str, ...]:
        return parse_contacts(self.untrusted_contact)


@dataclass(frozen=True)
class AccountUpdate:
    """An account POST (§7.3.2, §7.3.6): new contacts, or status deactivated."""

    contact: tuple[str, ...] | None
    status: AccountStatus | None

    @classmethod
    def from_json(cls, payload: Mapping[str, object]) -> AccountUpdate:
        status = payload.get("status")
        if status is not None and status != AccountStatus.DEACTIVATED:
            raise AcmeProblem.malformed("an account's status can only become deactivated")
        contact = parse_contacts(payload["contact"]) if "contact" in payload else None
        return cls(contact, None if status is None else AccountStatus.DEACTIVATED)


@dataclass(frozen=True)
class NewOrder:
    """newOrder (§7.4): identifiers, notBefore, notAfter (RFC 3339 or unset), replaces."""

    identifiers: tuple[Identifier, ...]
    untrusted_not_before: str | None
    untrusted_not_after: str | None
    replaces: str | None

    @classmethod
    def from_json(cls, payload: Mapping[str, object]) -> NewOrder:
        identifiers = parse_identifiers(payload.get("identifiers"))
        times = "notBefore and notAfter must be RFC 3339 strings"
        not_before = _optional_str(payload, "notBefore", times)
        not_after = _optional_str(payload, "notAfter", times)
        replaces = _optional_str(payload, "replaces",
                                 "replaces must be a renewalInfo certificate id")
        # Go's zero time (smallstep's client sends it for "not given") is the authority's to
        # read as unset, with every other time it is asked for.
        return cls(identifiers, not_before or None, not_after or None, replaces)


@dataclass(frozen=True)
class AuthorizationUpdate:
    """An authorization POST (§7.5.2): only status deactivated."""

    status: AuthorizationStatus

    @classmethod
    def from_json(cls, payload: Mapping[str, object]) -> AuthorizationUpdate:
        if payload.get("status") != AuthorizationStatus.DEACTIVATED:
            raise AcmeProblem.malformed("an authorization's status can only become deactivated")
        return cls(AuthorizationStatus.DEACTIVATED)


@dataclass(frozen=True)
class Finalize:
    """finalize (§7.4): csr, base64url DER."""

    csr: x509.CertificateSigningRequest

    @classmethod
    def from_json(cls, payload: Mapping[str, object]) -> Finalize:
        der = decode_b64url(payload.get("csr"), "csr")
        try:
            return cls(x509.load_der_x509_csr(der))
        except ValueError:
            raise AcmeProblem.bad_csr("csr is not a DER certificate request") from None


@dataclass(frozen=True)
class KeyChange:
    """keyChange (§7.3.5): the payload is the inner JWS, a flattened JWS JSON object signed by
    the new key; appliance.acme.jws.verify_key_change checks it."""

    untrusted_inner_jws: Mapping[str, object]

    @classmethod
    def from_json(cls, payload: Mapping[str, object]) -> KeyChange:
        return cls(payload)


@dataclass(frozen=True)
class RevokeCert:
    """revokeCert (§7.6): certificate (base64url DER), reason."""

    certificate: x509.Certificate
    reason: int

    @classmethod
    def from_json(cls, payload: Mapping[str, object]) -> RevokeCert:
        der = decode_b64url(payload.get("certificate"), "certificate")
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise AcmeProblem.malformed("certificate is not DER") from None
        reason = payload.get("reason", 0)
        if not isinstance(reason, int) or reason not in REVOCATION_REASONS:
            raise AcmeProblem.bad_revocation_reason("reason must be one of 0, 1, 3, 4, 5, 9")
        return cls(cert, reason)


@dataclass(frozen=True)
class CertId:
    """A renewalInfo id (RFC 9773 §4.1): base64url(AKI keyIdentifier) "." base64url(serial)."""

    key_identifier: bytes
    serial: int

    @classmethod
    def parse(cls, untrusted: object) -> CertId:
        if not isinstance(untrusted, str):
            raise AcmeProblem.malformed("replaces must be a renewalInfo certificate id")
        aki_b64, _, serial_b64 = untrusted.partition(".")
        if not aki_b64 or not serial_b64:
            raise AcmeProblem.malformed("a renewalInfo id is base64url(AKI).base64url(serial)")
        aki = decode_b64url(aki_b64, "renewalInfo key identifier")
        serial = int.from_bytes(decode_b64url(serial_b64, "renewalInfo serial"), "big")
        return cls(aki, serial)


# -- resource bodies ---------------------------------------------------------------------------
def rfc3339(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat().replace(
        "+00:00", "Z")


class Urls:
    """The URLs of one provisioner's resources, as a request saw the server."""

    def __init__(self, base: str) -> None:
        self.base = base

    def url(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def account(self, account_id: str) -> str:
        return self.url("account", account_id)


def account_json(urls: Urls, account: AcmeAccount) -> dict[str, object]:
    return {"status": str(account.status), "contact": list(account.contact),
            "orders": urls.url("account", account.id, "orders"),
            "termsOfServiceAgreed": True}


def order_json(urls: Urls, order: AcmeOrder) -> dict[str, object]:
    body: dict[str, object] = {
        "status": str(order.status), "expires": rfc3339(order.expires),
        "identifiers": [i.to_json() for i in order.identifiers],
        "authorizations": [urls.url("authz", a) for a in order.authz_ids],
        "finalize": urls.url("order", order.id, "finalize"),
    }
    if order.not_before:
        body["notBefore"] = rfc3339(order.not_before)
    if order.not_after:
        body["notAfter"] = rfc3339(order.not_after)
    if order.error:
        body["error"] = order.error
    if order.cert_serial:
        body["certificate"] = urls.url("cert", order.id)
    if order.replaces:
        body["replaces"] = order.replaces
    return body


def challenge_json(urls: Urls, chal: AcmeChallenge) -> dict[str, object]:
    body: dict[str, object] = {"type": str(chal.type), "url": urls.url("challenge", chal.id),
                               "status": str(chal.status), "token": chal.token}
    if chal.validated:
        body["validated"] = rfc3339(chal.validated)
    if chal.error:
        body["error"] = chal.error
    return body


def authz_json(urls: Urls, authz: AcmeAuthz, now: float) -> dict[str, object]:
    body: dict[str, object] = {
        "identifier": authz.identifier.to_json(), "status": str(authz_status_at(authz, now)),
        "expires": rfc3339(authz.expires),
        "challenges": [challenge_json(urls, c) for c in authz.challenges]}
    if authz.wildcard:
        body["wildcard"] = True
    return body


__all__ = [
    "AccountStatus", "AuthorizationStatus", "ChallengeStatus", "ChallengeType", "Identifier",
    "IdentifierType", "OrderStatus",
]
