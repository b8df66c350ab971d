"""What a provisioner hands the authority once it has authenticated a request: a SignPlan.

Every provisioner type (JWK, ACME, the renewal of a recorded certificate, the CA's own TLS
certificate) ends its authorization by returning one of these; `Authority.issue(plan)` is the
only thing that turns a plan into a certificate. A plan says what was authorized, never how the
certificate is built: validity is still only requested, the template is applied later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from appliance.issuance.templates import CertificateDescription
from appliance.storage import TokenUse

if TYPE_CHECKING:
    from appliance.authority.provisioners.base import Provisioner


@dataclass(frozen=True)
class RequestedValidity:
    """The validity a requester asked for, before the provisioner's claims are applied.

    `not_before` None means "now" (backdated to absorb clock skew); `not_after` None means the
    provisioner's default duration. A `fixed` validity (a renewal, the CA's own certificate) was
    computed by the authority itself and is only capped at the intermediate's expiry.
    """

    not_before: datetime | None = None
    not_after: datetime | None = None
    fixed: bool = False


@dataclass(frozen=True)
class OrderGrant:
    """What ACME new-order may record: the names passed policy; the validity asked for, if any."""

    names: tuple[x509.GeneralName, ...]
    not_before: datetime | None
    not_after: datetime | None


@dataclass(frozen=True)
class SignPlan:
    """An authorized request for a leaf certificate.

    `subject` and `sans` are what the provisioner authorized (the token's subject and names,
    the order's identifiers); a template may rewrite them, and policy then judges the result.
    `trusted_data` is what the provisioner vouches for (token claims); `untrusted_data` is the
    requester's templateData. `description` is set when the certificate's content is already
    decided (a renewal copies the old certificate, the CA's own TLS certificate is fixed):
    then no template runs.
    """

    provisioner: Provisioner
    public_key: CertificatePublicKeyTypes
    subject: str | None
    sans: tuple[x509.GeneralName, ...]
    validity: RequestedValidity
    token_use: TokenUse | None = None
    trusted_data: Mapping[str, Any] = field(default_factory=dict)
    untrusted_data: Mapping[str, Any] = field(default_factory=dict)
    csr: x509.CertificateSigningRequest | None = None
    description: CertificateDescription | None = None
    audit_event: str = "cert.issue"  # cert.renew, cert.rekey
