"""The provisioner contract: every provisioner type authenticates its own kind of request and
answers with a typed SignPlan (or a refusal), as step-ca's AuthorizeSign/AuthorizeRenew do.

What every provisioner has: a name, claims, a name policy and a template (the built-in default
leaf unless ca.json gives one). What a provisioner does not do: build, check or sign a
certificate; that is `Authority.issue(plan)`, the same for every type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtensionOID

from appliance.authority.claims import Claims
from appliance.authority.leaf_templates import LeafTemplate, leaf_template_of
from appliance.authority.plan import RequestedValidity, SignPlan
from appliance.authority.policy import X509NamePolicy
from appliance.config import AcmeProvisionerConfig, JwkProvisionerConfig
from appliance.errors import Forbidden, Unauthorized
from appliance.issuance.provisioner_ext import PROVISIONER_OID, provisioner_extension
from appliance.issuance.templates import CertificateDescription, X509Template
from appliance.storage import TokenUse

if TYPE_CHECKING:
    from appliance.authority.lifecycle import RevokeRequest
    from appliance.authority.requests import SignRequest

# Set anew on every renewal (by the issuer or the authority); any other extension of the old
# certificate, e.g. one its template added, carries over, as in step-ca.
REISSUED_EXTENSIONS = frozenset({
    ExtensionOID.SUBJECT_KEY_IDENTIFIER, ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.CRL_DISTRIBUTION_POINTS, PROVISIONER_OID,
})


@dataclass(frozen=True)
class Audiences:
    """Every URL a token for each endpoint may name (see `audiences_for`)."""

    sign: tuple[str, ...]
    revoke: tuple[str, ...]
    renew: tuple[str, ...]
    rekey: tuple[str, ...]


@dataclass(frozen=True)
class AuthorizationContext:
    """What a provisioner needs from the authority to judge a request: nothing it could sign."""

    root_fingerprint: str
    audiences: Audiences
    clock: Callable[[], float]
    backdate: Any  # timedelta; renewals start `backdate` before now

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC).replace(microsecond=0)


class Provisioner:
    """Base of every provisioner type; each authorize_* refuses unless the type implements it."""

    type = ""
    # The authority-wide name policy applies to every provisioner but the CA's own.
    under_authority_policy = True

    def __init__(self, config: JwkProvisionerConfig | AcmeProvisionerConfig, claims: Claims,
                 template: X509Template | None = None) -> None:
        self.config = config
        self.name = config.name
        self.claims = claims
        self.template: LeafTemplate = leaf_template_of(template)
        self.policy = X509NamePolicy.of(config.policy)
        x509_options = config.options.x509 if config.options else None
        self.template_data: dict[str, Any] = (
            dict(x509_options.template_data or {}) if x509_options else {})

    @property
    def credential_id(self) -> str:
        """Recorded in step-ca's provisioner extension of every certificate it authorises."""
        return self.name

    def public_json(self) -> dict[str, Any]:
        return self.config.model_dump(by_alias=True, exclude_none=True)

    def certificate_extension(self) -> x509.Extension[x509.ExtensionType] | None:
        """step-ca's extension naming who authorized a certificate (type, name, credential)."""
        return provisioner_extension(self.type, self.name, self.credential_id)

    def authorize_sign(self, request: SignRequest, context: AuthorizationContext) -> SignPlan:
        """Authenticate a POST /sign request and say what it may get."""
        raise Unauthorized(f"provisioner {self.name!r} ({self.type}) does not sign /sign "
                           "requests")

    def authorize_revoke(self, request: RevokeRequest, context: AuthorizationContext
                         ) -> TokenUse:
        """Authenticate a revoke token for `request.serial`; the token use to record."""
        raise Unauthorized(f"provisioner {self.name!r} ({self.type}) does not issue revoke "
                           "tokens")

    def authorize_renew(self, cert: x509.Certificate, context: AuthorizationContext, *,
                        token_use: TokenUse | None,
                        new_public_key: CertificatePublicKeyTypes | None = None) -> SignPlan:
        """A recorded, unrevoked certificate of this provisioner asks to be renewed (or rekeyed).

        The caller has proven possession (mTLS or an x5c token) and that the certificate is
        ours and not revoked; this checks the renewal claims and plans a copy of the
        certificate with the same lifetime, starting now (step-ca's arithmetic).
        """
        if self.claims.disable_renewal:
            raise Forbidden(f"renewal is disabled for provisioner {self.name!r}")
        now = context.now()
        if now > cert.not_valid_after_utc:
            if token_use is None:
                raise Unauthorized("the certificate has expired; renew it with an x5c token "
                                   "where the provisioner allows renewal after expiry")
            if not self.claims.allow_renewal_after_expiry:
                raise Unauthorized(
                    f"the certificate expired at {cert.not_valid_after_utc.isoformat()} and "
                    f"provisioner {self.name!r} does not allow renewal after expiry")
        duration = cert.not_valid_after_utc - cert.not_valid_before_utc
        start = now - context.backdate
        return SignPlan(
            provisioner=self, public_key=new_public_key or cert.public_key(),
            subject=None, sans=(), token_use=token_use,
            validity=RequestedValidity(start, start + duration, fixed=True),
            description=copy_of(cert, rekeyed=new_public_key is not None),
            audit_event="cert.rekey" if new_public_key is not None else "cert.renew")


def copy_of(cert: x509.Certificate, *, rekeyed: bool) -> CertificateDescription:
    """A renewal's content: the old certificate's subject, names, usages and extensions."""
    def value(kind: type[x509.ExtensionType]) -> Any:
        try:
            return cert.extensions.get_extension_for_class(kind).value
        except x509.ExtensionNotFound:
            return None

    sans = value(x509.SubjectAlternativeName)
    eku = value(x509.ExtendedKeyUsage)
    return CertificateDescription(
        subject=cert.subject, sans=tuple(sans) if sans else (),
        key_usage=None if rekeyed else value(x509.KeyUsage),  # keyEncipherment follows the key
        ext_key_usage=tuple(eku) if eku else None, basic_constraints=None,
        crl_distribution_points=(),
        extensions=tuple(e for e in cert.extensions if e.oid not in REISSUED_EXTENSIONS))
