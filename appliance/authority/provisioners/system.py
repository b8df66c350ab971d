"""The CA's own provisioner: it authorizes the server's TLS certificate, nothing else.

It is not in ca.json and serves no requests; it exists so that the server's certificate takes
the same way as every other (`Authority.issue`), and its certificates say who authorized them.
"""

from __future__ import annotations

from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.authority.claims import Claims
from appliance.authority.leaf_templates import DEFAULT_LEAF
from appliance.authority.plan import RequestedValidity, SignPlan
from appliance.authority.policy import X509NamePolicy
from appliance.authority.provisioners.base import AuthorizationContext, Provisioner
from appliance.issuance.names import parse_san
from appliance.issuance.templates import CertificateDescription

TLS_LIFETIME = timedelta(hours=24)
TLS_BACKDATE = timedelta(minutes=1)
SYSTEM_PROVISIONER = "appliance-tls"


class SystemProvisioner(Provisioner):
    type = "SYSTEM"
    # The CA's names come from ca.json's dnsNames, set by the same operator as the policy; a
    # policy written for the leaves it issues must not stop the CA from serving.
    under_authority_policy = False

    def __init__(self) -> None:
        self.name = SYSTEM_PROVISIONER
        self.claims = Claims(max_duration=TLS_LIFETIME + TLS_BACKDATE,
                             default_duration=TLS_LIFETIME)
        self.template = DEFAULT_LEAF
        self.policy = X509NamePolicy.of(None)
        self.template_data = {}

    def public_json(self) -> dict[str, object]:
        return {"type": self.type, "name": self.name}

    def certificate_extension(self) -> None:
        return None  # as step-ca's own TLS certificate: it names no provisioner

    def authorize_server_tls(self, public_key: CertificatePublicKeyTypes,
                             dns_names: list[str], context: AuthorizationContext) -> SignPlan:
        """A 24-hour serverAuth certificate for the CA's configured names."""
        now = context.now()
        sans = tuple(parse_san(n) for n in dns_names)
        return SignPlan(
            provisioner=self, public_key=public_key, subject=dns_names[0], sans=sans,
            validity=RequestedValidity(now - TLS_BACKDATE, now + TLS_LIFETIME, fixed=True),
            description=CertificateDescription(
                subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]),
                sans=sans, key_usage=None, ext_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,),
                basic_constraints=None, crl_distribution_points=(), extensions=()))
